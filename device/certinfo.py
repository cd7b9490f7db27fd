# What the device agent needs to know about an X.509 certificate, read with the portable
# strict DER reader (common/der.py).  Portable: CPython and MicroPython.  No signature is
# checked here: the certificate came from the SE (stored after the agent checked that it
# names the SE's own key) or from the CA over a server-authenticated channel.
#
#   Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
#   TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber INTEGER,
#       signature AlgorithmIdentifier, issuer Name, validity SEQUENCE { notBefore Time,
#       notAfter Time }, subject Name, subjectPublicKeyInfo, ... }      (RFC 5280 4.1)
#   Time ::= UTCTime "YYMMDDHHMMSSZ" (years 1950-2049) | GeneralizedTime
#       "YYYYMMDDHHMMSSZ" (RFC 5280 4.1.2.5)

from fleetid.common import der
from fleetid.common.errors import DerError

_TAG_UTC_TIME = 0x17
_TAG_GENERALIZED_TIME = 0x18
_OID_COMMON_NAME = "2.5.4.3"
_OID_SERIAL_NUMBER = "2.5.4.5"


class CertFacts:
    """serial (int), not_before / not_after (int seconds since 1970-01-01 UTC),
    common_name / serial_number (str or None: the subject's CN and serialNumber),
    point (65-byte uncompressed P-256 public key)."""

    def __init__(self, serial, not_before, not_after, common_name, serial_number, point):
        self.serial = serial
        self.not_before = not_before
        self.not_after = not_after
        self.common_name = common_name
        self.serial_number = serial_number
        self.point = point


def days_from_civil(year, month, day):
    """Days from 1970-01-01 to the given proleptic Gregorian date (H. Hinnant's algorithm;
    no time module needed, so it runs the same on a board without an RTC library)."""
    if month <= 2:
        year -= 1
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _digits(text, start, count):
    value = 0
    for i in range(start, start + count):
        c = text[i]
        if c < 0x30 or c > 0x39:
            raise DerError(der.REASON_RANGE, "time digit")
        value = value * 10 + c - 0x30
    return value


def parse_time(tag, contents):
    """UTCTime / GeneralizedTime contents (DER: Z, no fraction) -> int epoch seconds.

    Raises: DerError."""
    if tag == _TAG_UTC_TIME and len(contents) == 13:
        year = _digits(contents, 0, 2)
        year += 1900 if year >= 50 else 2000
        i = 2
    elif tag == _TAG_GENERALIZED_TIME and len(contents) == 15:
        year = _digits(contents, 0, 4)
        i = 4
    else:
        raise DerError(der.REASON_RANGE, "certificate time")
    if contents[-1] != 0x5A:  # "Z"
        raise DerError(der.REASON_RANGE, "certificate time not UTC")
    month = _digits(contents, i, 2)
    day = _digits(contents, i + 2, 2)
    hour = _digits(contents, i + 4, 2)
    minute = _digits(contents, i + 6, 2)
    second = _digits(contents, i + 8, 2)
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60
            and second < 60):
        raise DerError(der.REASON_RANGE, "certificate time")
    return ((days_from_civil(year, month, day) * 24 + hour) * 60 + minute) * 60 + second


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


def certificate_facts(cert_der):
    """Parse the facts above out of a DER certificate.

    Returns: CertFacts.  Raises: DerError when it is not a certificate with a P-256 key.
    """
    tbs = der.DerReader(cert_der).read_sequence().read_sequence()
    if tbs.peek_tag() == 0xA0:
        tbs.read_tlv(0xA0)
    serial = tbs.read_integer()
    tbs.read_raw(der.TAG_SEQUENCE)  # signature algorithm
    tbs.read_raw(der.TAG_SEQUENCE)  # issuer
    validity = tbs.read_sequence()
    tag, contents = validity.read_tlv()
    not_before = parse_time(tag, contents)
    tag, contents = validity.read_tlv()
    not_after = parse_time(tag, contents)
    common_name, serial_number = _name(tbs)
    point = der.read_p256_spki(tbs)
    return CertFacts(serial, not_before, not_after, common_name, serial_number, point)
