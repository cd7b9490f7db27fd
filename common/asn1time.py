# RFC 5280 Time (UTCTime / GeneralizedTime) to epoch seconds.  Portable: CPython and
# MicroPython; integer-only, no time module or RTC library needed.
#
# Shared by the certificate reader (device/certinfo.py) and the CRL cache
# (device/crl_cache.py).  A module of its own rather than part of common/der.py: on the
# MicroPython unix port, bytecode sits in the heap, and the DER workflows that never read a
# time should not carry it.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common import der
from fleetid.common.errors import DerError

TAG_UTC_TIME = const(0x17)  # X.680 universal 23
TAG_GENERALIZED_TIME = const(0x18)  # X.680 universal 24


def days_from_civil(y, m, d):
    """Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant, "chrono-Compatible
    Low-Level Date Algorithms"); integer-only, so the same on every port, no RTC library."""
    if m <= 2:
        y -= 1
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _time_digits(text, start, count):
    value = 0
    for i in range(start, start + count):
        c = text[i]
        if c < 0x30 or c > 0x39:
            raise DerError(der.REASON_VALUE, "time digit")
        value = value * 10 + c - 0x30
    return value


def parse_time(tag, text):
    """Decode an RFC 5280 Time -> int seconds since 1970-01-01 UTC.

    UTCTime YYMMDDHHMMSSZ (YY < 50 is 20YY, RFC 5280 4.1.2.5.1) or GeneralizedTime
    YYYYMMDDHHMMSSZ (4.1.2.5.2: Zulu, seconds, no fractions).
    Params: tag: TAG_UTC_TIME or TAG_GENERALIZED_TIME.  text: the contents octets.
    Returns: int.  Raises: DerError (der.REASON_TAG: another tag; der.REASON_VALUE: not that
        form; der.REASON_RANGE: a field out of range).
    """
    if tag == TAG_UTC_TIME:
        if len(text) != 13:
            raise DerError(der.REASON_VALUE, "UTCTime")
        year = _time_digits(text, 0, 2)
        year += 2000 if year < 50 else 1900
        pos = 2
    elif tag == TAG_GENERALIZED_TIME:
        if len(text) != 15:
            raise DerError(der.REASON_VALUE, "GeneralizedTime")
        year = _time_digits(text, 0, 4)
        pos = 4
    else:
        raise DerError(der.REASON_TAG, "not a Time")
    if text[-1] != 0x5A:  # "Z"
        raise DerError(der.REASON_VALUE, "time not UTC")
    month = _time_digits(text, pos, 2)
    day = _time_digits(text, pos + 2, 2)
    hour = _time_digits(text, pos + 4, 2)
    minute = _time_digits(text, pos + 6, 2)
    second = _time_digits(text, pos + 8, 2)
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 60):
        raise DerError(der.REASON_RANGE, "time field")
    return ((days_from_civil(year, month, day) * 24 + hour) * 60 + minute) * 60 + second
