# ISO/IEC 7816-4 command and response APDUs on the wire.  Portable: CPython and MicroPython.
#
# Sans-I/O: the command layouts, the header rules both sides apply (check_header), encoding
# a command (encode_command, the host's side) and splitting a response (split_response).
# The two halves built on it import it and not each other: common/apdu.py (ApduProtocol,
# the host's exchange) and common/command_apdu.py (decode_command, the card's side).
#
# Command APDU layouts (ISO/IEC 7816-4:2005 5.1, decoding per ISO/IEC 7816-3:2006 12.1.3):
#
#     header: CLA INS P1 P2                                    (4 bytes, always)
#     case 1  : header
#     case 2S : header | Le(1)                 Le 01..FF = 1..255, 00 = 256
#     case 3S : header | Lc(1) | data          Lc 01..FF
#     case 4S : header | Lc(1) | data | Le(1)
#     case 2E : header | 00 | Le(2)            Le 0001..FFFF = 1..65535, 0000 = 65536
#     case 3E : header | 00 | Lc(2) | data     Lc 0001..FFFF
#     case 4E : header | 00 | Lc(2) | data | Le(2)
#
# The cases never overlap: after the header, a first body byte of 00 announces extended
# lengths (a short Lc of 0 does not exist), and the body length then fixes the case.
# Anything else (Lc 0, a body that matches no case, short Lc with extended Le) is refused.
#
# Response APDU: data | SW1 SW2.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.errors import ApduFormatError

_SHORT_MAX_NC = const(255)  # ISO/IEC 7816-4:2005 5.1: short Lc codes 1..255
_SHORT_MAX_NE = const(256)  # short Le 00 means 256
_EXT_MAX_NC = const(65535)  # extended Lc codes 1..65535
_EXT_MAX_NE = const(65536)  # extended Le 0000 means 65536

# ISO/IEC 7816-4:2005 5.1.1: CLA 'FF' is invalid (reserved for PPS, ISO/IEC 7816-3).
_CLA_INVALID = const(0xFF)
# ISO/IEC 7816-4:2005 5.1.2: INS '6X' and '9X' are invalid (they are SW1 values, which
# the T=0 procedure bytes would confuse with an instruction).
_INS_INVALID_HI_1 = const(0x60)
_INS_INVALID_HI_2 = const(0x90)

CASE_1 = "1"
CASE_2S = "2S"
CASE_3S = "3S"
CASE_4S = "4S"
CASE_2E = "2E"
CASE_3E = "3E"
CASE_4E = "4E"


def _check_byte(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > 0xFF:
        raise ApduFormatError("%s must be an integer 0..255" % name)


def check_header(cla, ins, p1, p2):
    """Check a command header: four bytes, CLA not FF, INS not 6X/9X (ISO/IEC 7816-4:2005 5.1).

    Params: cla, ins, p1, p2: ints.
    Raises: ApduFormatError naming the field that is out of range or invalid.
    """
    # Fast path for the usual plain ints; anything else gets the per-field checks.
    if not (type(cla) is int and type(ins) is int and type(p1) is int and type(p2) is int
            and 0 <= cla <= 0xFF and 0 <= ins <= 0xFF and 0 <= p1 <= 0xFF and 0 <= p2 <= 0xFF):
        _check_byte("CLA", cla)
        _check_byte("INS", ins)
        _check_byte("P1", p1)
        _check_byte("P2", p2)
    if cla == _CLA_INVALID:
        raise ApduFormatError("CLA FF is invalid")
    hi = ins & 0xF0
    if hi == _INS_INVALID_HI_1 or hi == _INS_INVALID_HI_2:
        raise ApduFormatError("INS %02X is invalid" % ins)


def encode_command(cla, ins, p1, p2, data=b"", le=None, extended=None):
    """Encode a command APDU (ISO/IEC 7816-4:2005 5.1).

    Params: cla, ins, p1, p2: ints 0..255 (CLA FF and INS 6X/9X are invalid).
        data: bytes-like, 0..65535 bytes (empty = no Lc field).
        le: None = no Le field; else Ne 1..65536 (256 short encodes as 00, 65536
            extended as 0000).  Le 0 cannot be expressed: use None.
        extended: None = extended only when needed (len(data) > 255 or le > 256);
            True forces extended fields; False forces short fields.
    Returns: bytes.
    Raises: ApduFormatError if an argument is out of range or does not fit the encoding.
    """
    check_header(cla, ins, p1, p2)
    if data is None:
        data = b""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ApduFormatError("data must be bytes")
    data = bytes(data)
    nc = len(data)
    if le is not None:
        if not isinstance(le, int) or isinstance(le, bool) or le < 1 or le > _EXT_MAX_NE:
            raise ApduFormatError("Le must be None or 1..65536")
    if nc > _EXT_MAX_NC:
        raise ApduFormatError("data longer than 65535 bytes")
    needs_extended = nc > _SHORT_MAX_NC or (le is not None and le > _SHORT_MAX_NE)
    if extended is None:
        extended = needs_extended
    elif extended is not True and extended is not False:
        raise ApduFormatError("extended must be None, True or False")
    elif not extended and needs_extended:
        raise ApduFormatError("lengths need extended encoding")

    out = bytearray((cla, ins, p1, p2))
    if not extended:
        if nc:
            out.append(nc)
            out.extend(data)
        if le is not None:
            out.append(le & 0xFF)  # 256 -> 00
        return bytes(out)

    if nc == 0 and le is None:
        # Case 1 has no length field: "extended" cannot be expressed.
        raise ApduFormatError("case 1 has no length fields to extend")
    if nc:
        # Case 3E / 4E: 00 || Lc(2) || data [|| Le(2)]  (ISO/IEC 7816-4:2005 5.1).
        out.append(0)
        out.append(nc >> 8)
        out.append(nc & 0xFF)
        out.extend(data)
        if le is not None:
            out.append((le >> 8) & 0xFF)  # 65536 -> 0000
            out.append(le & 0xFF)
    else:
        # Case 2E: 00 || Le(2).
        out.append(0)
        out.append((le >> 8) & 0xFF)
        out.append(le & 0xFF)
    return bytes(out)


def split_response(resp):
    """Split a response APDU into (data, sw).

    Params: resp: bytes-like, data || SW1 SW2.
    Returns: (bytes data, int sw).
    Raises: ApduFormatError if shorter than the 2 status bytes.
    """
    if not isinstance(resp, (bytes, bytearray, memoryview)):
        raise ApduFormatError("response must be bytes")
    resp = bytes(resp)
    if len(resp) < 2:
        raise ApduFormatError("response shorter than SW1 SW2")
    return resp[:-2], (resp[-2] << 8) | resp[-1]
