# The attested CSR written in pieces, for a device's small heap.  Portable: CPython and
# MicroPython.  The bytes are common/der.py's build_csr_info() / finish_csr() with the
# evidence bundle of common/attestation.py (tests/common/test_csr.py compares them), but
# built as a list of parts: headers computed from lengths, the statement and the chain
# certificates referenced, not copied; the parts are hashed one by one for the SE's SIGN
# and the CSR is written once into a buffer the caller allocated early.  The nested
# builders hold the bundle, the attribute, its SET, the attributes, the info and the CSR
# side by side (device/enrol.py; bench/micropython.py run_agent_csr).  A module of its
# own: workflows that never build a CSR do not load its bytecode.

import hashlib
import sys

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.der import (
    REASON_RANGE,
    REASON_TAG,
    REASON_VALUE,
    TAG_SEQUENCE,
    TAG_SET,
    DerReader,
    check_single,
    ecdsa_der_to_raw,
    ecdsa_with_sha256_algorithm,
    encode_bit_string,
    encode_integer,
    encode_length,
    encode_name,
    encode_oid,
    parse_p256_spki,
)
from fleetid.common.errors import DerError

_TAG_ATTRIBUTES = const(0xA0)  # [0] constructed: CertificationRequestInfo.attributes
_LENGTH_OCTETS_MAX = const(4)  # der.py's longest length form
_ECDSA_SIG_MAX = const(72)  # DER ECDSA-Sig-Value of P-256: 2 + 2 x (2 + 33)
_MICROPYTHON = sys.implementation.name == "micropython"


def encode_header(tag, length):
    """Identifier byte and DER length octets of an element whose contents are `length`
    bytes (an element written in pieces: its header, then the contents' parts)."""
    return bytes((tag,)) + encode_length(length)


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
    raise DerError(REASON_VALUE, "parts are not one element")


def evidence_bundle_parts(signed_attestations, certificates):
    """attestation.encode_evidence_bundle() as a list of bytes parts (the headers, then
    the statements and certificates themselves, not copied).

    Params: signed_attestations: non-empty list of attestation.SignedAttestation
        (decode_signed_attestation() output: parsed strictly already).  certificates:
        list of DER certificates (MAK certificate first; headers checked).
    Returns: list of bytes.  Raises: DerError (no statement, malformed certificate).
    """
    if not signed_attestations:
        raise DerError(REASON_RANGE, "at least one statement")
    elements = []
    for signed in signed_attestations:
        elements.append(signed.der if isinstance(signed.der, bytes) else bytes(signed.der))
    certs = []
    for cert in certificates:
        reader = DerReader(cert)
        reader.skip(TAG_SEQUENCE)
        reader.finish()
        certs.append(cert if isinstance(cert, bytes) else bytes(cert))
    statements_header = encode_header(TAG_SEQUENCE, _parts_len(elements))
    certs_header = encode_header(TAG_SEQUENCE, _parts_len(certs))
    parts = [encode_header(TAG_SEQUENCE, len(statements_header) + _parts_len(elements)
                           + len(certs_header) + _parts_len(certs)), statements_header]
    parts.extend(elements)
    parts.append(certs_header)
    parts.extend(certs)
    return parts


def _attribute_parts(oid, values):
    # Attribute ::= SEQUENCE { type OID, values SET OF ANY } as a list of parts; a value
    # is a complete TLV (checked) or a list of parts of one (not joined here).
    if not values:
        raise DerError(REASON_RANGE, "attribute needs at least one value")
    elements = []
    for value in values:
        if isinstance(value, (list, tuple)):
            elements.append(_element_parts(value))
        else:
            elements.append([check_single(value)])
    if len(elements) > 1:  # SET OF in DER order: compare whole encodings
        elements = sorted([b"".join(element)] for element in elements)
    set_len = 0
    for element in elements:
        set_len += _parts_len(element)
    set_header = encode_header(TAG_SET, set_len)
    oid_der = encode_oid(oid)
    parts = [encode_header(TAG_SEQUENCE, len(oid_der) + len(set_header) + set_len),
             oid_der, set_header]
    for element in elements:
        parts.extend(element)
    return parts


def info_parts(subject_cn, subject_serial, spki_der, attributes=None):
    """der.build_csr_info() as a list of bytes parts whose concatenation is the info.

    Params: as der.build_csr_info(); an attribute value may also be a list of bytes
        parts forming one element (evidence_bundle_parts()), kept as parts.
    Returns: list of bytes.  Raises: DerError as der.build_csr_info().
    """
    parse_p256_spki(spki_der)
    encoded = []
    for oid, values in attributes or ():
        encoded.append(_attribute_parts(oid, values))
    # attributes [0] IMPLICIT SET OF Attribute, sorted like any SET OF.  Distinct headers
    # + OIDs decide the DER order by themselves (a TLV is never a proper prefix of
    # another); equal ones need the whole encodings.
    keys = [element[0] + element[1] for element in encoded]
    if len(set(keys)) != len(keys):
        keys = [b"".join(element) for element in encoded]
    order = sorted(range(len(encoded)), key=lambda i: keys[i])
    attributes_len = 0
    for element in encoded:
        attributes_len += _parts_len(element)
    head = [encode_integer(0),  # version v1(0)
            encode_name(subject_cn, subject_serial),
            bytes(spki_der),
            encode_header(_TAG_ATTRIBUTES, attributes_len)]
    parts = [encode_header(TAG_SEQUENCE, _parts_len(head) + attributes_len)]
    parts.extend(head)
    for i in order:
        parts.extend(encoded[i])
    return parts


def signing_digest(parts):
    """der.csr_signing_digest() of info_parts()' output, hashed part by part."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.digest()


def buffer_for(parts):
    """Room for finish(): a bytearray of the CSR's largest size for these info parts
    (the longest P-256 signature)."""
    return bytearray(2 + _LENGTH_OCTETS_MAX + _parts_len(parts)
                     + len(ecdsa_with_sha256_algorithm()) + 3 + _ECDSA_SIG_MAX)


def finish(parts, signature_der, out=None):
    """der.finish_csr() from info_parts()' output, the info never held whole on its own.

    Params: out: a bytearray allocated beforehand (buffer_for(), or a bound taken before
        the parts existed: device/enrol.csr_size_max()), or None.  When the CSR fits, it
        is written into `out` and the bytearray trimmed to the CSR's length (in place),
        then returned as it is on MicroPython (no copy) and as bytes on CPython;
        otherwise (None, too small) the CSR is joined once into new bytes.
    Returns: the CSR (bytes, or `out` on MicroPython).
    Raises: DerError if the parts are not one SEQUENCE or the signature not strict DER.
    """
    parts = _element_parts(parts)
    if parts[0][0] != TAG_SEQUENCE:
        raise DerError(REASON_TAG, "info is not a SEQUENCE")
    ecdsa_der_to_raw(signature_der)
    algorithm = ecdsa_with_sha256_algorithm()
    bits = encode_bit_string(signature_der)
    total = _parts_len(parts) + len(algorithm) + len(bits)
    whole = [encode_header(TAG_SEQUENCE, total)]
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
