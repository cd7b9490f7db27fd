# ISO/IEC 7816-4 command and response APDUs.  Portable: CPython and MicroPython.
#
# Sans-I/O codec (encode_command, decode_command, split_response) plus ApduProtocol, the
# one layer that turns status words into exceptions.  It sits on a link that offers
# `transceive(apdu_bytes) -> response_bytes` (the T=1' link, or an SCP03 wrapper's peer).
# decode_command and CommandApdu are defined in command_apdu.py and loaded from there on
# first use (see __getattr__ below).
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


from fleetid.common.errors import ApduFormatError, apdu_error_for_sw

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

# ISO/IEC 7816-4:2005 5.1.3 status bytes handled by the protocol itself.
_SW1_MORE_DATA = const(0x61)  # 61XX: XX more bytes available with GET RESPONSE (00 = 256+)
_SW1_WRONG_LE = const(0x6C)  # 6CXX: wrong Le; XX is the exact length available (00 = 256)
_SW_OK = const(0x9000)

# ISO/IEC 7816-4:2005 7.6.1 GET RESPONSE: INS C0, P1-P2 0000, Le = bytes wanted.
_INS_GET_RESPONSE = const(0xC0)

# Upper bound on GET RESPONSE rounds for one command: 64 x 256 = 16 KB, far above any
# response of the fleetid applet (certificate chains are the largest, a few KB).  A card
# that keeps answering 61XX past that is broken or hostile; we stop instead of looping.
_MAX_GET_RESPONSE = const(64)

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


def _check_header(cla, ins, p1, p2):
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
    _check_header(cla, ins, p1, p2)
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


def __getattr__(name):
    # CommandApdu and decode_command (the card's side: parsing a command) live in
    # command_apdu.py, loaded on first use: a device only encodes commands, and on the
    # MicroPython unix port, where bytecode sits in the heap, the decoder costs about
    # 2 KB.  `from fleetid.common.apdu import decode_command` keeps working everywhere
    # (PEP 562; MicroPython's module __getattr__).
    if name == "CommandApdu" or name == "decode_command":
        from fleetid.common import command_apdu

        return getattr(command_apdu, name)
    raise AttributeError(name)


def _get_response_cla(cla):
    # GET RESPONSE is an interindustry command (ISO/IEC 7816-4:2005 5.1.1): send it with
    # the interindustry class, keeping the logical channel of the command when that
    # command itself used the first interindustry coding (b8..b7 = 00, channel in b2..b1).
    if cla & 0xC0 == 0:
        return cla & 0x03
    return 0x00


class ApduProtocol:
    """Command/response exchange over a link, with ISO status-word handling.

    The only layer that raises on a status word.  61XX is followed with GET RESPONSE
    (bounded to `max_get_response` rounds) and 6CXX is answered once by resending the
    command with the exact Le the card asked for (ISO/IEC 7816-4:2005 5.1.3).

    Params: transceive: a callable `transceive(apdu_bytes) -> response_bytes`, or an
        object with such a `transceive` method (the T=1' link).
        max_get_response: bound on GET RESPONSE rounds per command.
    """

    def __init__(self, transceive, max_get_response=_MAX_GET_RESPONSE):
        if not callable(transceive):
            transceive = transceive.transceive
        self._transceive = transceive
        self.max_get_response = max_get_response

    def transceive_raw(self, apdu, check=True):
        """Send prebuilt APDU bytes unchanged; no 61XX/6CXX handling.

        Used to relay APDUs built elsewhere (e.g. SCP03-wrapped OTA commands).
        Params: apdu: bytes.  check: refuse bytes that are not a well-formed command.
        Returns: (data, sw).
        Raises: ApduFormatError (malformed command when check, or response < 2 bytes);
            whatever the link raises (LinkError).
        """
        if check:
            from fleetid.common.command_apdu import decode_command

            decode_command(apdu)
        return split_response(self._transceive(bytes(apdu)))

    def _exchange(self, cla, ins, p1, p2, data, le, extended):
        # One command, answering a 6CXX once with the corrected Le.
        apdu = encode_command(cla, ins, p1, p2, data, le, extended)
        resp_data, sw = split_response(self._transceive(apdu))
        if (sw >> 8) == _SW1_WRONG_LE:
            exact = (sw & 0xFF) or 256
            apdu = encode_command(cla, ins, p1, p2, data, exact, True if extended else None)
            resp_data, sw = split_response(self._transceive(apdu))
        return resp_data, sw

    def transmit(self, cla, ins, p1, p2, data=b"", le=None, extended=None):
        """Send one command and collect its whole response.

        Params: as encode_command().
        Returns: (data, sw): data gathered over any GET RESPONSE rounds, and the final
            status word (not checked: see send_apdu()).
        Raises: ApduFormatError (bad arguments, malformed response, more GET RESPONSE
            rounds than max_get_response); whatever the link raises (LinkError).
        """
        resp_data, sw = self._exchange(cla, ins, p1, p2, data, le, extended)
        if (sw >> 8) != _SW1_MORE_DATA:
            return resp_data, sw
        gr_cla = _get_response_cla(cla)
        collected = bytearray(resp_data)
        rounds = 0
        while (sw >> 8) == _SW1_MORE_DATA:
            if rounds >= self.max_get_response:
                raise ApduFormatError("too many GET RESPONSE rounds")
            rounds += 1
            remaining = (sw & 0xFF) or 256
            part, sw = self._exchange(gr_cla, _INS_GET_RESPONSE, 0, 0, b"", remaining, None)
            collected.extend(part)
        return bytes(collected), sw

    def send_apdu(self, cla, ins, p1, p2, data=b"", le=None, extended=None):
        """Send one command and return its response data if the card answered 9000.

        Params: as encode_command().
        Returns: bytes (response data).
        Raises: ApduError subclass for any status word but 9000 (chosen by
            apdu_error_for_sw, `.sw` set); ApduFormatError; LinkError from the link.
        """
        resp_data, sw = self.transmit(cla, ins, p1, p2, data, le, extended)
        if sw != _SW_OK:
            raise apdu_error_for_sw(sw)
        return resp_data
