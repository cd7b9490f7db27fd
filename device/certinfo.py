# What the device agent needs to know about an X.509 certificate, read with the portable
# strict DER reader (common/der.py).  Portable: CPython and MicroPython.  No signature is
# checked here: the certificate came from the SE (stored after the agent checked that it
# names the SE's own key) or from the CA over a server-authenticated channel.
#
#   Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
#   TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber INTEGER,
#       signature AlgorithmIdentifier, issuer Name, validity SEQUENCE { notBefore Time,
#       notAfter Time }, subject Name, subjectPublicKeyInfo, ... }      (RFC 5280 4.1)
#       ... [3] EXPLICIT Extensions OPTIONAL }
#   Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE,
#       extnValue OCTET STRING }                                         (RFC 5280 4.1)
#   AuthorityKeyIdentifier ::= SEQUENCE { keyIdentifier [0] IMPLICIT OCTET STRING
#       OPTIONAL, ... }                                                  (RFC 5280 4.2.1.1)
#   Time ::= UTCTime "YYMMDDHHMMSSZ" (years 1950-2049) | GeneralizedTime
#       "YYYYMMDDHHMMSSZ" (RFC 5280 4.1.2.5), decoded by common/asn1time.py

from fleetid.common import asn1time, der

_OID_COMMON_NAME = "2.5.4.3"
_OID_SERIAL_NUMBER = "2.5.4.5"
_OID_AUTHORITY_KEY_IDENTIFIER = "2.5.29.35"


class CertFacts:
    """serial (int), not_before / not_after (int seconds since 1970-01-01 UTC),
    common_name / serial_number (str or None: the subject's CN and serialNumber),
    point (65-byte uncompressed P-256 public key), authority_key_id (bytes: the issuing
    CA's key identifier from the AKI extension, or None)."""

    def __init__(self, serial, not_before, not_after, common_name, serial_number, point,
                 authority_key_id=None):
        self.authority_key_id = authority_key_id
        self.serial = serial
        self.not_before = not_before
        self.not_after = not_after
        self.common_name = common_name
        self.serial_number = serial_number
        self.point = point


def _name(reader):
    # Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }: the CN and the
    # serialNumber, as text (UTF8String or PrintableString: both are ASCII here).
    common_name = None
    serial_number = None
    rdns = reader.read_sequence()
    while not rdns.at_end():
        rdn = rdns.read_set()
        while not rdn.at_end():
            atv = rdn.read_sequence()
            oid = atv.read_oid()
            _tag, value = atv.read_tlv()
            if oid == _OID_COMMON_NAME:
                common_name = bytes(value).decode()
            elif oid == _OID_SERIAL_NUMBER:
                serial_number = bytes(value).decode()
    return common_name, serial_number


def _authority_key_id(tbs):
    # After subjectPublicKeyInfo: [1] / [2] unique IDs (skipped), then [3] extensions.
    while not tbs.at_end():
        if tbs.peek_tag() != 0xA3:
            tbs.read_tlv()
            continue
        extensions = tbs.read_context(3).read_sequence()
        while not extensions.at_end():
            extension = extensions.read_sequence()
            oid = extension.read_oid()
            if extension.peek_tag() == der.TAG_BOOLEAN:
                extension.read_boolean()
            value = extension.read_octet_string()
            if oid == _OID_AUTHORITY_KEY_IDENTIFIER:
                aki = der.DerReader(value).read_sequence()
                key_id = aki.read_optional_context(0, False)
                return None if key_id is None else bytes(key_id)
        return None
    return None


def certificate_facts(cert_der):
    """Parse the facts above out of a DER certificate.

    Returns: CertFacts.  Raises: DerError when it is not a certificate with a P-256 key
    (or its extensions are not DER).
    """
    tbs = der.DerReader(cert_der).read_sequence().read_sequence()
    if tbs.peek_tag() == 0xA0:
        tbs.read_tlv(0xA0)
    serial = tbs.read_integer()
    tbs.read_raw(der.TAG_SEQUENCE)  # signature algorithm
    tbs.read_raw(der.TAG_SEQUENCE)  # issuer
    validity = tbs.read_sequence()
    tag, contents = validity.read_tlv()
    not_before = asn1time.parse_time(tag, contents)
    tag, contents = validity.read_tlv()
    not_after = asn1time.parse_time(tag, contents)
    common_name, serial_number = _name(tbs)
    point = der.read_p256_spki(tbs)
    return CertFacts(serial, not_before, not_after, common_name, serial_number, point,
                     _authority_key_id(tbs))
