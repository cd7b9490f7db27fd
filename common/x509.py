# The one X.509 reader of the portable core: a DER certificate parsed once, strictly, into
# the few facts the device's checks read.  Portable: CPython and MicroPython (strict DER
# reader common/der.py, no X.509 library, no crypto of its own).  Policy lives in the
# layers above, each with its own refusals:
#
#   device/certcheck.py    the agent's checks before it stores a certificate from the CA
#   common/tls13_cert.py   the TLS 1.3 client's check of the server's chain
#   device/certinfo.py     certificate facts (serial, AKI, subject) for revocation checks
#
# What parse_certificate() accepts (RFC 5280 4.1, reduced to the fleet's one profile):
#
#   Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
#   TBSCertificate ::= SEQUENCE { [0] EXPLICIT version (v3 = 2), serialNumber INTEGER,
#       signature AlgorithmIdentifier, issuer Name, validity SEQUENCE { notBefore Time,
#       notAfter Time }, subject Name, subjectPublicKeyInfo,
#       [1] issuerUniqueID OPTIONAL, [2] subjectUniqueID OPTIONAL, [3] EXPLICIT extensions }
#   Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE,
#       extnValue OCTET STRING }
#
#   * strict DER, v3, both AlgorithmIdentifiers ecdsa-with-SHA256 (RFC 5758 3.2), a P-256
#     key (RFC 5480); a bad algorithm or key raises DerError(REASON_ALGORITHM / _POINT);
#   * subject CN and serialNumber (UTF8String or PrintableString), each at most once;
#   * extensions read: basicConstraints (4.2.1.9), keyUsage (4.2.1.3), extKeyUsage
#     (4.2.1.12), subjectAltName dNSName / iPAddress / URI (4.2.1.6), authorityKeyIdentifier
#     keyIdentifier (4.2.1.1); each extension at most once (4.2); other non-critical ones
#     ignored; the first unknown critical one is kept in `unknown_critical` -- whether
#     that refuses the certificate (4.2: "MUST reject") is the policy layer's call.
#
# No signature is checked while parsing: verify_signature() hashes the signed bytes and
# calls an injected `verify(point, digest, signature)` (the SE's VERIFY on a device, a host
# ECDSA verify on CPython).

import hashlib

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common import asn1time, der
from fleetid.common.errors import DerError

_OID_COMMON_NAME = "2.5.4.3"
_OID_SERIAL_NUMBER = "2.5.4.5"
_OID_BASIC_CONSTRAINTS = "2.5.29.19"
_OID_KEY_USAGE = "2.5.29.15"
_OID_EXT_KEY_USAGE = "2.5.29.37"
_OID_SUBJECT_ALT_NAME = "2.5.29.17"
_OID_AUTHORITY_KEY_IDENTIFIER = "2.5.29.35"
OID_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"  # id-kp-serverAuth (RFC 5280 4.2.1.12)
OID_CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"  # id-kp-clientAuth
KU_DIGITAL_SIGNATURE = const(0x80)  # keyUsage bit 0, first octet (RFC 5280 4.2.1.3)
KU_KEY_CERT_SIGN = const(0x04)  # bit 5
_KNOWN = (_OID_BASIC_CONSTRAINTS, _OID_KEY_USAGE, _OID_EXT_KEY_USAGE, _OID_SUBJECT_ALT_NAME,
          _OID_AUTHORITY_KEY_IDENTIFIER)
_SAN_DNS = const(0x82)  # GeneralName dNSName [2] IA5String (implicit, primitive)
_SAN_URI = const(0x86)  # uniformResourceIdentifier [6] IA5String
_SAN_IP = const(0x87)  # iPAddress [7] OCTET STRING

# time_status() answers (device/certcheck.py uses them as its refusal reasons).
NOT_YET_VALID = "not_yet_valid"
EXPIRED = "expired"


class Certificate:
    """One parsed certificate.

    Attributes: data (the DER bytes), tbs_start / tbs_end (offsets of the signed part in
    data), signature (DER ECDSA-Sig-Value), serial (int), issuer / subject (DER Name
    bytes), not_before / not_after (epoch seconds), common_name / serial_number (the
    subject's, str or None), point (65-byte P-256 key), is_ca (bool, None without
    basicConstraints), path_len (int or None), key_usage (first octet or None), eku (list
    of dotted OIDs, None when absent), dns_names / uris (lists of str), ip_addresses (list
    of bytes), authority_key_id (bytes or None), unknown_critical (dotted OID of the first
    unknown critical extension, or None), depth (set by device/certcheck.py).
    """

    def __init__(self, data):
        self.data = data
        self.common_name = None
        self.serial_number = None
        self.is_ca = None
        self.path_len = None
        self.key_usage = None
        self.eku = None
        self.dns_names = []
        self.uris = []
        self.ip_addresses = []
        self.authority_key_id = None
        self.unknown_critical = None
        self.depth = 0

    def tbs(self):
        """The signed bytes (tbsCertificate), a memoryview into data."""
        return memoryview(self.data)[self.tbs_start:self.tbs_end]


def _text(tag, value):
    # DirectoryString as the fleet writes it: UTF8String or PrintableString.
    if tag == der.TAG_UTF8_STRING:
        return der.DerReader(der.encode_tlv(tag, value)).read_utf8_string()
    if tag == der.TAG_PRINTABLE_STRING:
        return der.DerReader(der.encode_tlv(tag, value)).read_printable_string()
    raise DerError(der.REASON_TAG, "name attribute not UTF8String / PrintableString")


def _ia5(value):
    return der.DerReader(der.encode_tlv(der.TAG_IA5_STRING, value)).read_ia5_string()


def _subject(cert):
    # Name ::= SEQUENCE OF SET OF AttributeTypeAndValue; the CN and serialNumber, each at
    # most once (two CNs would make "the device's name" ambiguous).
    rdns = der.DerReader(cert.subject).read_sequence()
    while not rdns.at_end():
        rdn = rdns.read_set()
        while not rdn.at_end():
            atv = rdn.read_sequence()
            oid = atv.read_oid()
            tag, value = atv.read_tlv()
            atv.finish()
            if oid == _OID_COMMON_NAME:
                if cert.common_name is not None:
                    raise DerError(der.REASON_VALUE, "two common names")
                cert.common_name = _text(tag, value)
            elif oid == _OID_SERIAL_NUMBER:
                if cert.serial_number is not None:
                    raise DerError(der.REASON_VALUE, "two serialNumbers")
                cert.serial_number = _text(tag, value)


def _extension(cert, oid, critical, value):
    if oid not in _KNOWN:
        # Non-critical ones this module reads nothing from (SKI, CRL DP, the fleet's
        # attestation extension, ...) are ignored (RFC 5280 4.2).
        if critical and cert.unknown_critical is None:
            cert.unknown_critical = oid
        return
    reader = der.DerReader(value)
    seq = None if oid == _OID_KEY_USAGE else reader.read_sequence()
    if oid == _OID_BASIC_CONSTRAINTS:
        cert.is_ca = seq.read_boolean() if seq.peek_tag() == der.TAG_BOOLEAN else False
        if not seq.at_end():
            cert.path_len = seq.read_small_integer(0, 255)
        seq.finish()
    elif oid == _OID_KEY_USAGE:
        bits, _unused = reader.read_bit_string_bits()
        cert.key_usage = bits[0] if bits else 0
    elif oid == _OID_EXT_KEY_USAGE:
        cert.eku = []
        while not seq.at_end():
            cert.eku.append(seq.read_oid())
    elif oid == _OID_SUBJECT_ALT_NAME:
        while not seq.at_end():
            tag, name = seq.read_tlv()
            if tag == _SAN_DNS:
                cert.dns_names.append(_ia5(name))
            elif tag == _SAN_URI:
                cert.uris.append(_ia5(name))
            elif tag == _SAN_IP:
                cert.ip_addresses.append(bytes(name))
    else:  # authorityKeyIdentifier
        key_id = seq.read_optional_context(0, False)  # authorityCertIssuer etc. follow
        cert.authority_key_id = None if key_id is None else bytes(key_id)
    reader.finish()


def _extensions(cert, tbs):
    extensions = tbs.read_optional_context(3)
    if extensions is None:
        return
    items = extensions.read_sequence()
    extensions.finish()
    seen = []
    while not items.at_end():
        ext = items.read_sequence()
        oid = ext.read_oid()
        critical = ext.read_boolean() if ext.peek_tag() == der.TAG_BOOLEAN else False
        value = ext.read_octet_string()
        ext.finish()
        if oid in seen:  # RFC 5280 4.2: at most one instance
            raise DerError(der.REASON_VALUE, "extension %s twice" % oid)
        seen.append(oid)
        _extension(cert, oid, critical, value)


def parse_certificate(data):
    """Parse a DER X.509 v3 certificate with a P-256 key, signed with ecdsa-with-SHA256.

    Params: data: bytes (bytearray / memoryview are copied).
    Returns: Certificate.
    Raises: DerError (REASON_ALGORITHM or REASON_POINT for another algorithm or key, other
        reasons for anything not strict DER of the structure above).
    """
    cert = Certificate(bytes(data))
    try:
        top = der.DerReader(cert.data)
        outer = top.read_sequence()
        top.finish()
        cert.tbs_start = outer.span()[0]
        tbs = outer.read_sequence()
        cert.tbs_end = outer.span()[0]
        der.read_ecdsa_with_sha256_algorithm(outer)
        cert.signature = outer.read_bit_string()
        outer.finish()
        version = tbs.read_context(0)
        version.read_small_integer(2, 2)  # v3: the extensions are what the checks read
        version.finish()
        cert.serial = tbs.read_integer()
        der.read_ecdsa_with_sha256_algorithm(tbs)
        cert.issuer = tbs.read_raw(der.TAG_SEQUENCE)
        validity = tbs.read_sequence()
        tag, contents = validity.read_tlv()
        cert.not_before = asn1time.parse_time(tag, contents)
        tag, contents = validity.read_tlv()
        cert.not_after = asn1time.parse_time(tag, contents)
        validity.finish()
        cert.subject = tbs.read_raw(der.TAG_SEQUENCE)
        _subject(cert)
        cert.point = der.read_p256_spki(tbs)
        tbs.read_optional_context(1, False)
        tbs.read_optional_context(2, False)
        _extensions(cert, tbs)
        tbs.finish()
    except (ValueError, IndexError) as exc:  # UnicodeError is a ValueError
        if isinstance(exc, DerError):
            raise
        raise DerError(der.REASON_VALUE, str(exc)) from None
    return cert


def time_status(cert, now, skew_s=0):
    """None when `now` (epoch seconds) is within the validity, else NOT_YET_VALID (now +
    skew_s before notBefore) or EXPIRED (after notAfter).  RFC 5280 6.1.3 (a)(2)."""
    if now + skew_s < cert.not_before:
        return NOT_YET_VALID
    if now > cert.not_after:
        return EXPIRED
    return None


def find_issuer(cert, candidates):
    """The first of `candidates` (Certificates) whose subject is `cert`'s issuer (binary
    comparison of the DER Names, RFC 5280 7.1), other than `cert` itself; or None."""
    for candidate in candidates:
        if candidate.subject == cert.issuer and candidate is not cert:
            return candidate
    return None


def verify_signature(cert, point, verify, sha256=None):
    """Check `cert`'s signature with the issuer's key.

    Params: cert: Certificate.  point: the issuer's 65-byte P-256 point.  verify:
        `verify(point, digest32, signature_der)` that raises when the signature does not
        verify (the SE's VERIFY with point=, or a host ECDSA verify).  sha256: one-shot
        digest function (None: hashlib's).
    Raises: whatever `verify` raises; the policy layer maps it to its refusal.
    """
    if sha256 is None:
        digest = hashlib.sha256(cert.tbs()).digest()
    else:
        digest = sha256(cert.tbs())
    verify(point, digest, cert.signature)
