# PKCS#10 (RFC 2986 4) with the signature made elsewhere (inside the SE): fleetid's one
# CSR builder, for the device (device/enrol.py) and the host's tests and benches.
# Portable: CPython and MicroPython.
#
#   parts = info_parts(cn, serial, spki, attributes)   # the CertificationRequestInfo
#   signature_der = SE.sign(slot, signing_digest(parts))
#   csr = finish(parts, signature_der, out)
#
# The info is a list of bytes parts: headers computed from lengths, the values (the
# evidence bundle's statement and chain certificates: evidence_bundle_parts())
# referenced, not copied.  The parts are hashed one by one for the SE's SIGN and the CSR
# is written once into a buffer the caller allocated early, so a device's small heap
# holds the CSR once instead of the bundle, the attribute, its SET, the attributes, the
# info and the CSR side by side (bench/micropython.py run_agent_csr).  A caller that
# signs the info itself (cryptography's key.sign on the host) joins the parts.  A module
# of its own: workflows that never build a CSR do not load its bytecode.

import hashlib
import sys

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common import der, oids
from fleetid.common.errors import DerError

_TAG_SEQUENCE = const(0x30)
_TAG_SET = const(0x31)
_TAG_ATTRIBUTES = const(0xA0)  # [0] constructed: CertificationRequestInfo.attributes
_TAG_URI = const(0x86)  # GeneralName uniformResourceIdentifier: [6] IMPLICIT IA5String
_LENGTH_OCTETS_MAX = const(4)  # der.py's longest length form
_ECDSA_SIG_MAX = const(72)  # DER ECDSA-Sig-Value of P-256: 2 + 2 x (2 + 33)
_UB_NAME = const(64)  # ub-common-name, ub-serial-number (X.520, RFC 5280 A.1)
_MICROPYTHON = sys.implementation.name == "micropython"


def encode_header(tag, length):
    """Identifier byte and DER length octets of an element whose contents are `length`
    bytes (an element written in pieces: its header, then the contents' parts)."""
    return bytes((tag,)) + der.encode_length(length)


def _parts_len(parts):
    total = 0
    for part in parts:
        total += len(part)
    return total


def _element_parts(parts):
    # A value given in pieces: bytes each, together exactly one element (its header
    # announces the rest).  Returns: the list of bytes parts.
    parts = [part if isinstance(part, bytes) else bytes(part) for part in parts]
    total = _parts_len(parts)
    first = parts[0] if parts else b""
    for header_len in range(2, 3 + _LENGTH_OCTETS_MAX):
        if len(first) >= header_len and total >= header_len \
                and first[:header_len] == encode_header(first[0], total - header_len):
            return parts
    raise DerError(der.REASON_VALUE, "parts are not one element")


def _rdn(oid, value_der):
    return der.encode_set([der.encode_sequence([der.encode_oid(oid), value_der])])


def encode_name(common_name, serial_number=None):
    """X.501 Name: CN (UTF8String) then, if given, serialNumber (PrintableString).

    Raises: DerError(REASON_RANGE) for empty or over-long values (ub 64, RFC 5280 A.1)."""
    if not isinstance(common_name, str) or not 1 <= len(common_name) <= _UB_NAME:
        raise DerError(der.REASON_RANGE, "common name length 1..64")
    rdns = [_rdn(oids.OID_COMMON_NAME, der.encode_utf8_string(common_name))]
    if serial_number is not None:
        if not isinstance(serial_number, str) or not 1 <= len(serial_number) <= _UB_NAME:
            raise DerError(der.REASON_RANGE, "serial number length 1..64")
        rdns.append(_rdn(oids.OID_SERIAL_NUMBER, der.encode_printable_string(serial_number)))
    return der.encode_sequence(rdns)


def uri_san_extension_request(uri):
    """CSR attribute extensionRequest (PKCS#9, RFC 2985 5.4.2) holding one
    non-critical subjectAltName with a uniformResourceIdentifier (RFC 5280 4.2.1.6).

    Returns: (OID_EXTENSION_REQUEST, [Extensions DER]) for info_parts().
    Raises: DerError(REASON_VALUE) for an empty or non-ASCII URI.
    """
    if not isinstance(uri, str) or not uri:
        raise DerError(der.REASON_VALUE, "URI must be a non-empty str")
    # The IA5String (its ASCII check) under the GeneralName's implicit tag.
    general_names = der.encode_sequence([bytes((_TAG_URI,)) + der.encode_ia5_string(uri)[1:]])
    extension = der.encode_sequence(
        [der.encode_oid(oids.OID_SUBJECT_ALT_NAME), der.encode_octet_string(general_names)]
    )  # critical DEFAULT FALSE: omitted in DER (X.690 11.5)
    return (oids.OID_EXTENSION_REQUEST, [der.encode_sequence([extension])])


def evidence_bundle_parts(signed_attestations, certificates):
    """attestation.encode_evidence_bundle() as a list of bytes parts (the headers, then
    the statements and certificates themselves, not copied).

    Params: signed_attestations: non-empty list of attestation.SignedAttestation
        (decode_signed_attestation() output: parsed strictly already).  certificates:
        list of DER certificates (MAK certificate first; headers checked).
    Returns: list of bytes.  Raises: DerError (no statement, malformed certificate).
    """
    if not signed_attestations:
        raise DerError(der.REASON_RANGE, "at least one statement")
    elements = []
    for signed in signed_attestations:
        elements.append(signed.der if isinstance(signed.der, bytes) else bytes(signed.der))
    certs = []
    for cert in certificates:
        reader = der.DerReader(cert)
        reader.skip(_TAG_SEQUENCE)
        reader.finish()
        certs.append(cert if isinstance(cert, bytes) else bytes(cert))
    statements_header = encode_header(_TAG_SEQUENCE, _parts_len(elements))
    certs_header = encode_header(_TAG_SEQUENCE, _parts_len(certs))
    parts = [encode_header(_TAG_SEQUENCE, len(statements_header) + _parts_len(elements)
                           + len(certs_header) + _parts_len(certs)), statements_header]
    parts.extend(elements)
    parts.append(certs_header)
    parts.extend(certs)
    return parts


def _attribute_parts(oid, values):
    # Attribute ::= SEQUENCE { type OID, values SET SIZE(1..MAX) OF ANY } as a list of
    # parts; a value is a complete TLV (checked) or a list of parts of one (not joined).
    if not values:
        raise DerError(der.REASON_RANGE, "attribute needs at least one value")
    elements = []
    for value in values:
        if isinstance(value, (list, tuple)):
            elements.append(_element_parts(value))
        else:
            elements.append([der.check_single(value)])
    if len(elements) > 1:  # SET OF in DER order: compare whole encodings
        elements = sorted([b"".join(element)] for element in elements)
    set_len = 0
    for element in elements:
        set_len += _parts_len(element)
    set_header = encode_header(_TAG_SET, set_len)
    oid_der = der.encode_oid(oid)
    parts = [encode_header(_TAG_SEQUENCE, len(oid_der) + len(set_header) + set_len),
             oid_der, set_header]
    for element in elements:
        parts.extend(element)
    return parts


def info_parts(subject_cn, subject_serial, spki_der, attributes=None):
    """DER CertificationRequestInfo (RFC 2986 4.1), the bytes the SE signs, as a list of
    bytes parts whose concatenation is the info.

    Params: subject_cn: str (UTF8String CN).  subject_serial: str or None
        (PrintableString serialNumber).  spki_der: DER P-256 SubjectPublicKeyInfo.
        attributes: list of (oid, [value, ...]) or None; a value is one DER element, or
        a list of bytes parts forming one (evidence_bundle_parts()), kept as parts.
    Returns: list of bytes.
    Raises: DerError on any invalid input (bad key, bad names, malformed values).
    """
    der.parse_p256_spki(spki_der)
    encoded = []
    for oid, values in attributes or ():
        encoded.append(_attribute_parts(oid, values))
    # attributes [0] IMPLICIT SET OF Attribute: always present, sorted like any SET OF.
    # Distinct headers + OIDs decide the DER order by themselves (a TLV is never a proper
    # prefix of another); equal ones need the whole encodings.
    keys = [element[0] + element[1] for element in encoded]
    if len(set(keys)) != len(keys):
        keys = [b"".join(element) for element in encoded]
    order = sorted(range(len(encoded)), key=lambda i: keys[i])
    attributes_len = 0
    for element in encoded:
        attributes_len += _parts_len(element)
    head = [der.encode_integer(0),  # version v1(0)
            encode_name(subject_cn, subject_serial),
            bytes(spki_der),
            encode_header(_TAG_ATTRIBUTES, attributes_len)]
    parts = [encode_header(_TAG_SEQUENCE, _parts_len(head) + attributes_len)]
    parts.extend(head)
    for i in order:
        parts.extend(encoded[i])
    return parts


def signing_digest(parts):
    """SHA-256 of the info (info_parts()' output, hashed part by part): the digest to
    give to SE SIGN."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.digest()


def buffer_for(parts):
    """Room for finish(): a bytearray of the CSR's largest size for these info parts
    (the longest P-256 signature)."""
    return bytearray(2 + _LENGTH_OCTETS_MAX + _parts_len(parts)
                     + len(der.ecdsa_with_sha256_algorithm()) + 3 + _ECDSA_SIG_MAX)


def finish(parts, signature_der, out=None):
    """DER CertificationRequest from the info and an ECDSA signature over sha256(info),
    the info never held whole on its own.

    Params: parts: info_parts()' output (or [info DER]).  signature_der: DER
        ECDSA-Sig-Value.  out: a bytearray allocated beforehand (buffer_for(), or a bound
        taken before the parts existed: device/enrol.csr_size_max()), or None.  When the
        CSR fits, it is written into `out` and the bytearray trimmed to the CSR's length
        (in place), then returned as it is on MicroPython (no copy) and as bytes on
        CPython; otherwise (None, too small) the CSR is joined once into new bytes.
    Returns: the CSR (bytes, or `out` on MicroPython).
    Raises: DerError if the parts are not one SEQUENCE or the signature not strict DER.
    """
    parts = _element_parts(parts)
    if parts[0][0] != _TAG_SEQUENCE:
        raise DerError(der.REASON_TAG, "info is not a SEQUENCE")
    der.ecdsa_der_to_raw(signature_der)
    algorithm = der.ecdsa_with_sha256_algorithm()
    bits = der.encode_bit_string(signature_der)
    total = _parts_len(parts) + len(algorithm) + len(bits)
    whole = [encode_header(_TAG_SEQUENCE, total)]
    whole.extend(parts)
    whole.append(algorithm)
    whole.append(bits)
    total += len(whole[0])
    if out is None or len(out) < total:
        return b"".join(whole)
    pos = 0
    for part in whole:
        out[pos : pos + len(part)] = part
        pos += len(part)
    out[pos:] = b""
    return out if _MICROPYTHON else bytes(out)
