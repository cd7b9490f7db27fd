"""SCP03 card side (security domain) for the SE emulator.  CPython.

GlobalPlatform Card Specification v2.3 Amendment D ("Amd D"), S8 mode, AES keys.  The
derivations, padding and ICVs are the portable ones in fleetid.common.scp03 (shared with
the host side); everything the card decides (state, levels, status words) lives here.

Methods the chip (sim/chip.py) calls, one secure channel per card object:

    Scp03Card(prims, keyset_lookup, random_fn, diversification_data=None, sd_aid=None)
    initialize_update(p1_kvn, p2, host_challenge, sequence_counter) -> 32-byte response data
    external_authenticate(apdu_bytes) -> None            raises Scp03CardError(sw)
    unwrap_command(apdu_bytes) -> plain APDU bytes       raises Scp03CardError(sw)
    wrap_response(data, sw) -> response bytes (data || SW1 SW2)
    reset()
    attributes: active, level, kvn, dek

Every Scp03CardError ends the session (the card forgets keys and state); the chip answers
the error's `sw` unprotected and counts `counts_as_failure` errors (refused cryptogram or
MAC) in NVM.
"""

from fleetid.common import scp03
from fleetid.common.apdu_wire import encode_command
from fleetid.common.command_apdu import decode_command
from fleetid.common.errors import ApduFormatError, FleetidError, SecureChannelError

# Status words (ISO/IEC 7816-4 5.1.3; GP CS 2.3 11.1.3).
SW_WRONG_LENGTH = 0x6700
SW_SECURITY_STATUS = 0x6982  # cryptogram or C-MAC refused (Amd D 7.1.2 / 6.2.4)
SW_CONDITIONS = 0x6985  # EXTERNAL AUTHENTICATE without INITIALIZE UPDATE
SW_SM_MISSING = 0x6987  # a plain command reached unwrap_command
SW_SM_INCORRECT = 0x6988  # C-DEC data not whole blocks, or bad padding
SW_WRONG_DATA = 0x6A80
SW_INCORRECT_P1P2 = 0x6A86  # unsupported security level, P2 not 00
SW_REF_NOT_FOUND = 0x6A88  # no key set with that KVN

# INITIALIZE UPDATE response (Amd D 7.1.1.6 Table 7-3), S8 mode:
#   key diversification data (10) | key information (3: KVN, 03, i) | card challenge (8) |
#   card cryptogram (8) | sequence counter (3, u24 BE)
DIVERSIFICATION_DATA_LEN = 10
SEQUENCE_COUNTER_MAX = 0xFFFFFF

# i parameter announced: R-MAC and R-ENC supported (b6, b7), S8 mode (b1 = 0); b5 (pseudo-
# random card challenge) only when the card knows its security domain AID (Amd D 5.1).
I_PARAM_RANDOM = scp03.I_R_MAC_SUPPORT | scp03.I_R_ENC_SUPPORT  # 0x60
I_PARAM_PSEUDO_RANDOM = I_PARAM_RANDOM | scp03.I_PSEUDO_RANDOM_CHALLENGE  # 0x70

_CLA_CHANNEL = 0x03  # logical channel number, CLA b2 b1 (ISO/IEC 7816-4 5.1.1)
_CLA_ISO_SM_HEADER = 0x08  # CLA b4: ISO SM with authenticated header, not GP SCP03

_STATE_IDLE = 0
_STATE_INITIALIZED = 1  # INITIALIZE UPDATE answered, waiting for EXTERNAL AUTHENTICATE
_STATE_AUTHENTICATED = 2


class Scp03CardError(FleetidError):
    """The card refuses an SCP03 step; `sw` is the status word to answer (unprotected).

    `counts_as_failure` is True for a refused host cryptogram or C-MAC (the chip counts
    those towards SCP03_FAILURE_LIMIT).  The session is closed when this is raised.
    """

    def __init__(self, sw, reason="", counts_as_failure=False):
        super().__init__("SW %04X%s" % (sw, (" " + reason) if reason else ""))
        self.sw = sw
        self.reason = reason
        self.counts_as_failure = counts_as_failure


class Scp03Card:
    """The card side of SCP03.

    Params:
        prims: crypto primitives (fleetid.common.host.hostcrypto.CryptographyPrimitives).
        keyset_lookup: fn(kvn) -> scp03.StaticKeys or None; kvn 0 = the default set.
        random_fn: fn(n) -> n random bytes (card challenges).
        diversification_data: 10 bytes for the INITIALIZE UPDATE response (default zeros).
        sd_aid: when given, card challenges are pseudo-random (Amd D 6.2.2.1) and the i
            parameter says so (0x70); otherwise random, i = 0x60.
    """

    def __init__(self, prims, keyset_lookup, random_fn, diversification_data=None,
                 sd_aid=None):
        if diversification_data is None:
            diversification_data = bytes(DIVERSIFICATION_DATA_LEN)
        if len(diversification_data) != DIVERSIFICATION_DATA_LEN:
            raise ValueError("key diversification data must be 10 bytes")
        self._prims = prims
        self._keyset_lookup = keyset_lookup
        self._random_fn = random_fn
        self._div_data = bytes(diversification_data)
        self._sd_aid = bytes(sd_aid) if sd_aid is not None else None
        self.i_param = I_PARAM_PSEUDO_RANDOM if sd_aid is not None else I_PARAM_RANDOM
        self.reset()

    # -- state -------------------------------------------------------------------------

    def reset(self):
        """Close any session and forget its keys (power loss, SELECT, failure)."""
        self._state = _STATE_IDLE
        self._static = None
        self._keys = None
        self._host_challenge = None
        self._card_challenge = None
        self._level = 0
        self._channel = 0
        self._chain = None
        self._counter = 0
        self._response_counter = None  # set by unwrap_command, used by wrap_response

    @property
    def active(self):
        """True once EXTERNAL AUTHENTICATE succeeded, until the session ends."""
        return self._state == _STATE_AUTHENTICATED

    @property
    def level(self):
        """The security level of the open session (0 when none)."""
        return self._level if self.active else 0

    @property
    def kvn(self):
        """KVN of the key set of the open session (None when none)."""
        return self._static.kvn if self.active else None

    @property
    def dek(self):
        """Static DEK of the open session's key set, to decrypt PUT KEY data (None when
        no session).  Never log it."""
        return self._static.dek if self.active else None

    @property
    def counter(self):
        """Encryption counter the next command will use (0 when no session)."""
        return self._counter if self.active else 0

    def _fail(self, sw, reason, counts_as_failure=False):
        self.reset()
        return Scp03CardError(sw, reason, counts_as_failure)

    # -- handshake ---------------------------------------------------------------------

    def initialize_update(self, p1_kvn, p2, host_challenge, sequence_counter):
        """Start a session (Amd D 7.1.1): derive the session keys, answer the challenge.

        Any session in progress ends first.
        Params: p1_kvn: KVN asked for (0 = default set); p2: must be 0; host_challenge:
            8 bytes; sequence_counter: int 0..0xFFFFFF (or 3 bytes) that the chip persists
            and advances.
        Returns: 32 bytes (layout above).
        Raises: Scp03CardError 6A86 (P2), 6700 (challenge length), 6A88 (no such key set),
            6A80 (sequence counter out of range).
        """
        self.reset()
        if p2 != 0:
            raise self._fail(SW_INCORRECT_P1P2, "P2")
        if not isinstance(host_challenge, (bytes, bytearray)) or len(host_challenge) != scp03.S8:
            raise self._fail(SW_WRONG_LENGTH, "host challenge length")
        if isinstance(sequence_counter, (bytes, bytearray)):
            if len(sequence_counter) != 3:
                raise self._fail(SW_WRONG_DATA, "sequence counter")
            sequence_counter = int.from_bytes(sequence_counter, "big")
        if (not isinstance(sequence_counter, int)
                or not 0 <= sequence_counter <= SEQUENCE_COUNTER_MAX):
            raise self._fail(SW_WRONG_DATA, "sequence counter")
        static = self._keyset_lookup(p1_kvn)
        if static is None:
            raise self._fail(SW_REF_NOT_FOUND, "key set")
        counter_bytes = sequence_counter.to_bytes(3, "big")
        if self._sd_aid is not None:
            card_challenge = scp03.pseudo_random_card_challenge(
                self._prims, static.enc, counter_bytes, self._sd_aid)
        else:
            card_challenge = bytes(self._random_fn(scp03.S8))
            if len(card_challenge) != scp03.S8:
                raise ValueError("random_fn returned the wrong length")
        host_challenge = bytes(host_challenge)
        keys = scp03.derive_session_keys(self._prims, static, host_challenge, card_challenge)
        cryptogram = scp03.card_cryptogram(self._prims, keys.s_mac, host_challenge,
                                           card_challenge)
        self._static = static
        self._keys = keys
        self._host_challenge = host_challenge
        self._card_challenge = card_challenge
        self._state = _STATE_INITIALIZED
        key_info = bytes((static.kvn, scp03.SCP03_ID, self.i_param))
        return self._div_data + key_info + card_challenge + cryptogram + counter_bytes

    def external_authenticate(self, apdu):
        """Check the host cryptogram and its C-MAC; open the session (Amd D 7.1.2).

        Params: apdu: the whole command, 84 82 level 00 10 host cryptogram || C-MAC [Le].
        Returns: None.  The response is a plain 9000 (no R-MAC on this command).
        Raises: Scp03CardError 6985 (no INITIALIZE UPDATE before), 6700 (data length),
            6982 (cryptogram or C-MAC refused: counts_as_failure), 6A86 (security level or
            P2).  The session is closed on any error.
        """
        if self._state != _STATE_INITIALIZED:
            raise self._fail(SW_CONDITIONS, "no INITIALIZE UPDATE")
        try:
            cmd = decode_command(apdu)
        except ApduFormatError:
            raise self._fail(SW_WRONG_LENGTH, "malformed")
        if len(cmd.data) != 2 * scp03.S8:
            raise self._fail(SW_WRONG_LENGTH, "data length")
        if not cmd.cla & scp03.CLA_SM or cmd.cla & _CLA_ISO_SM_HEADER:
            raise self._fail(SW_SECURITY_STATUS, "no C-MAC", True)
        # C-MAC input: the command as sent (short or extended Lc), up to the MAC, CLA with
        # channel zero; chained from 16 zero bytes (Amd D 6.2.4).
        macced_end = 4 + (3 if cmd.extended else 1) + scp03.S8
        mac_input = bytes((scp03.mac_cla(cmd.cla),)) + bytes(apdu[1:macced_end])
        full_mac = self._prims.cmac(self._keys.s_mac, bytes(scp03.BLOCK) + mac_input)
        expected = scp03.host_cryptogram(self._prims, self._keys.s_mac, self._host_challenge,
                                         self._card_challenge) + full_mac[:scp03.S8]
        if not scp03.ct_equal(expected, cmd.data):
            raise self._fail(SW_SECURITY_STATUS, "host cryptogram or C-MAC", True)
        if cmd.p2 != 0 or cmd.p1 not in scp03.LEVELS:
            raise self._fail(SW_INCORRECT_P1P2, "security level")
        self._level = cmd.p1
        self._channel = cmd.cla & _CLA_CHANNEL
        self._chain = full_mac
        self._counter = 1  # Amd D 6.2.6: first command after EXTERNAL AUTHENTICATE uses 1
        self._response_counter = None
        self._state = _STATE_AUTHENTICATED

    # -- secure messaging --------------------------------------------------------------

    def unwrap_command(self, apdu):
        """Verify the C-MAC, decrypt C-DEC data, strip the padding (Amd D 6.2.4, 6.2.6).

        Advances the encryption counter and the MAC chaining value.
        Params: apdu: the wrapped command as received (CLA b3 set).
        Returns: the plain command APDU bytes (CLA b3 cleared, Le unchanged).
        Raises: Scp03CardError 6982 (no session, or wrong / missing C-MAC:
            counts_as_failure; also a command on another logical channel), 6987 (plain
            command inside a session), 6988 (encrypted
            data not whole blocks, bad padding), 6700 (malformed APDU).  The session is
            closed on any error.
        """
        if not self.active:
            raise self._fail(SW_SECURITY_STATUS, "no secure channel")
        try:
            cmd = decode_command(apdu)
        except ApduFormatError:
            raise self._fail(SW_WRONG_LENGTH, "malformed")
        if not cmd.cla & scp03.CLA_SM or cmd.cla & (0x40 | _CLA_ISO_SM_HEADER):
            raise self._fail(SW_SM_MISSING, "no GP secure messaging")
        if cmd.cla & _CLA_CHANNEL != self._channel:
            # The channel bits are outside the C-MAC (Amd D 6.2.4): the session belongs to
            # the logical channel it was opened on.
            raise self._fail(SW_SECURITY_STATUS, "other logical channel")
        if len(cmd.data) < scp03.S8:
            raise self._fail(SW_SECURITY_STATUS, "no C-MAC", True)
        length_field = 3 if cmd.extended else 1
        macced_end = 4 + length_field + len(cmd.data) - scp03.S8
        mac_input = bytes((scp03.mac_cla(cmd.cla),)) + bytes(apdu[1:macced_end])
        full_mac = self._prims.cmac(self._keys.s_mac, self._chain + mac_input)
        if not scp03.ct_equal(full_mac[:scp03.S8], cmd.data[len(cmd.data) - scp03.S8:]):
            raise self._fail(SW_SECURITY_STATUS, "C-MAC", True)
        self._chain = full_mac
        counter = self._counter
        self._counter = counter + 1
        body = cmd.data[: len(cmd.data) - scp03.S8]
        if self._level & scp03.LEVEL_C_DECRYPTION and body:
            if len(body) % scp03.BLOCK:
                raise self._fail(SW_SM_INCORRECT, "C-DEC length")
            icv = scp03.command_icv(self._prims, self._keys.s_enc, counter)
            try:
                body = scp03.unpad80(self._prims.aes_cbc_decrypt(self._keys.s_enc, icv, body))
            except SecureChannelError:
                raise self._fail(SW_SM_INCORRECT, "padding")
        self._response_counter = counter
        return encode_command(cmd.cla & ~scp03.CLA_SM & 0xFF, cmd.ins, cmd.p1, cmd.p2, body,
                              cmd.le, None)

    def wrap_response(self, data, sw):
        """Protect the response to the last unwrapped command (Amd D 6.2.5, 6.2.7).

        R-ENC on the data (if any) and R-MAC over data || SW as the level requires; error
        status words (not 9000 / 62XX / 63XX) go out alone and unprotected.  Outside a
        session, or for a command that did not go through unwrap_command (e.g. EXTERNAL
        AUTHENTICATE), the response is returned plain.
        Params: data: response data bytes; sw: int status word.
        Returns: response bytes (data || SW1 SW2).
        """
        sw_bytes = bytes(((sw >> 8) & 0xFF, sw & 0xFF))
        counter = self._response_counter
        self._response_counter = None
        if not self.active or counter is None:
            return bytes(data) + sw_bytes
        if not self._level & scp03.LEVEL_R_MAC:
            return bytes(data) + sw_bytes
        if not scp03.is_success_sw(sw):
            return sw_bytes
        body = bytes(data)
        if self._level & scp03.LEVEL_R_ENCRYPTION and body:
            icv = scp03.response_icv(self._prims, self._keys.s_enc, counter)
            body = self._prims.aes_cbc_encrypt(self._keys.s_enc, icv, scp03.pad80(body))
        mac = self._prims.cmac(self._keys.s_rmac, self._chain + body + sw_bytes)
        return body + mac[: scp03.S8] + sw_bytes

    def __repr__(self):
        return "Scp03Card(active=%s, level=0x%02X)" % (self.active, self.level)
