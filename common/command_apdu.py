# ISO/IEC 7816-4 command APDUs as the card sees them (parsing).  Portable: CPython and
# MicroPython.
#
# The card's half of common/apdu_wire.py (the host's half is common/apdu.py): kept apart so
# that a device, which only encodes commands, does not load it.  The layouts and the
# decoding rule are in apdu_wire.py's header (ISO/IEC 7816-4:2005 5.1, ISO/IEC 7816-3:2006
# 12.1.3).

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.apdu_wire import CASE_1, check_header, encode_command
from fleetid.common.errors import ApduFormatError

_HEADER_LEN = const(4)


def _case_name(nc, ne, extended):
    if nc == 0 and ne is None:
        return CASE_1
    if nc == 0:
        kind = "2"
    elif ne is None:
        kind = "3"
    else:
        kind = "4"
    return kind + ("E" if extended else "S")


class CommandApdu:
    """A decoded command APDU.

    Attributes: cla, ins, p1, p2 (ints), data (bytes, b"" when absent), le (None when
    the Le field is absent, else Ne = 1..65536), extended (bool: extended length fields
    on the wire), case (one of CASE_*).
    """

    def __init__(self, cla, ins, p1, p2, data=b"", le=None, extended=False):
        self.cla = cla
        self.ins = ins
        self.p1 = p1
        self.p2 = p2
        self.data = bytes(data)
        self.le = le
        self.extended = extended
        self.case = _case_name(len(self.data), le, extended)

    def encode(self):
        """Return the wire bytes (same length encoding as decoded)."""
        return encode_command(
            self.cla, self.ins, self.p1, self.p2, self.data, self.le, self.extended
        )

    def __eq__(self, other):
        if not isinstance(other, CommandApdu):
            return NotImplemented
        return (
            self.cla == other.cla
            and self.ins == other.ins
            and self.p1 == other.p1
            and self.p2 == other.p2
            and self.data == other.data
            and self.le == other.le
            and self.extended == other.extended
        )

    def __ne__(self, other):
        result = self.__eq__(other)
        if result is NotImplemented:
            return result
        return not result

    def __repr__(self):
        return "CommandApdu(case=%s cla=%02X ins=%02X p1=%02X p2=%02X nc=%d le=%s)" % (
            self.case,
            self.cla,
            self.ins,
            self.p1,
            self.p2,
            len(self.data),
            self.le,
        )


def decode_command(apdu):
    """Decode a command APDU, refusing anything that is not exactly one ISO case.

    Params: apdu: bytes-like.
    Returns: CommandApdu.
    Raises: ApduFormatError (shorter than 4 bytes, invalid CLA/INS, Lc 0, lengths that
        do not match the body, short/extended mix, trailing bytes).
    """
    if not isinstance(apdu, (bytes, bytearray, memoryview)):
        raise ApduFormatError("APDU must be bytes")
    apdu = bytes(apdu)
    n = len(apdu)
    if n < _HEADER_LEN:
        raise ApduFormatError("shorter than a header")
    cla = apdu[0]
    ins = apdu[1]
    p1 = apdu[2]
    p2 = apdu[3]
    check_header(cla, ins, p1, p2)
    body = n - _HEADER_LEN  # ISO/IEC 7816-3:2006 12.1.3: body B1..BL, L = body
    if body == 0:
        return CommandApdu(cla, ins, p1, p2)  # case 1
    b1 = apdu[4]
    if body == 1:
        return CommandApdu(cla, ins, p1, p2, b"", b1 or 256, False)  # case 2S
    if b1 != 0:
        # Short Lc = B1 (1..255).
        if body == 1 + b1:
            return CommandApdu(cla, ins, p1, p2, apdu[5:], None, False)  # case 3S
        if body == 2 + b1:
            le = apdu[n - 1] or 256
            return CommandApdu(cla, ins, p1, p2, apdu[5 : n - 1], le, False)  # case 4S
        raise ApduFormatError("short Lc does not match the body length")
    # B1 == 00: extended length fields.
    if body == 3:
        le = ((apdu[5] << 8) | apdu[6]) or 65536
        return CommandApdu(cla, ins, p1, p2, b"", le, True)  # case 2E
    if body < 3:
        raise ApduFormatError("truncated extended length")
    nc = (apdu[5] << 8) | apdu[6]
    if nc == 0:
        raise ApduFormatError("extended Lc 0000 is invalid")
    if body == 3 + nc:
        return CommandApdu(cla, ins, p1, p2, apdu[7:], None, True)  # case 3E
    if body == 5 + nc:
        le = ((apdu[n - 2] << 8) | apdu[n - 1]) or 65536
        return CommandApdu(cla, ins, p1, p2, apdu[7 : n - 2], le, True)  # case 4E
    raise ApduFormatError("extended Lc does not match the body length")
