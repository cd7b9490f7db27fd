# ISO/IEC 7816-4 command/response exchange: ApduProtocol.  Portable: CPython and MicroPython.
#
# The one layer that turns status words into exceptions.  It sits on a link that offers
# `transceive(apdu_bytes) -> response_bytes` (the T=1' link, or an SCP03 wrapper's peer),
# and encodes with common/apdu_wire.py (the command layouts and encode_command are there).
# The card's side, decode_command and CommandApdu, is common/command_apdu.py: a device
# only encodes commands, and on the MicroPython unix port, where bytecode sits in the
# heap, the decoder costs about 2 KB, so only transceive_raw(check=True) loads it.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.apdu_wire import encode_command, split_response
from fleetid.common.errors import ApduFormatError, apdu_error_for_sw

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
            from fleetid.common.command_apdu import decode_command  # loaded on first use

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
