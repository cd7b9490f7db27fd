# GlobalPlatform Secure Channel Protocol 03, host side.  Portable: CPython and MicroPython.
#
# Reference: GlobalPlatform Card Specification v2.3, Amendment D (SCP03), "Amd D" below.
# AES-128/192/256 static keys, S8 mode (8-byte challenges, cryptograms and MACs).
#
# Crypto is injected: `prims` is any object with
#     prims.aes_ecb_encrypt(key, block16) -> 16 bytes
#     prims.aes_cbc_encrypt(key, iv, data) -> bytes     (data a multiple of 16 bytes)
#     prims.aes_cbc_decrypt(key, iv, data) -> bytes
#     prims.cmac(key, data) -> 16 bytes                 (AES-CMAC, NIST SP 800-38B)
#     prims.random(n) -> n bytes
#     prims.prepare_key(key) -> optional: an object with the four AES/CMAC calls above
#         for that one key (without the key argument) and close(); used for the session
#         keys of an open channel, dropped on close().  Without it (MicroPython) the plain
#         calls are used with the key bytes.
# (fleetid.common.host.hostcrypto.CryptographyPrimitives on CPython).  Session keys come
# from a `session_keys_fn`, so an HSM can derive them without the static keys ever
# reaching this process (cloud/hsm: scp03_session_keys).
#
# Key derivation (Amd D 4.1.5 / 6.2.1): NIST SP 800-108 KDF in counter mode, PRF = AES-CMAC,
# counter (1 byte) in the middle of the fixed input data:
#
#     label (12) = 11 x 00 || derivation constant
#     00 (separation indicator) | L (u16 BE, output bits) | i (u8, 1..) | context
#
#     S-ENC  = KDF(K-ENC, 0x04, host challenge || card challenge, 128 or key size)
#     S-MAC  = KDF(K-MAC, 0x06, ...)            S-RMAC = KDF(K-MAC, 0x07, ...)
#     card cryptogram = KDF(S-MAC, 0x00, ..., 64)   host cryptogram = KDF(S-MAC, 0x01, ..., 64)
#
# Secure messaging, per command (Amd D 6.2.4 - 6.2.7):
#   C-DEC: data || 80 00.. (ISO/IEC 9797-1 method 2) -> AES-CBC(S-ENC, ICV), with
#          ICV = AES-ECB(S-ENC, counter as 16 bytes BE); no data -> nothing encrypted.
#   C-MAC: CLA b3 set, Lc += 8; MAC = CMAC(S-MAC, chaining value || CLA' INS P1 P2 Lc' data'),
#          first 8 bytes sent; the full 16 bytes become the next chaining value (the first
#          one, for EXTERNAL AUTHENTICATE, is 16 zero bytes).  Le is not MACed.
#   R-MAC: CMAC(S-RMAC, chaining value of the command || response data || SW), 8 bytes.
#   R-ENC: ICV = AES-ECB(S-ENC, 80 || counter as 15 bytes BE); no data -> nothing encrypted.
#   The encryption counter starts at 1 after EXTERNAL AUTHENTICATE and advances on every
#   command of the session, whether or not it carries data.
#   Responses with an error status word (anything but 9000, 62XX, 63XX) carry no R-MAC and
#   no protection: only the status word (Amd D 6.2.5).
#
# Nothing here logs; keys, session keys and plaintext never appear in reprs or errors.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.apdu_wire import encode_command, split_response
from fleetid.common.command_apdu import decode_command
from fleetid.common.errors import ApduFormatError, SecureChannelError, apdu_error_for_sw

# Data derivation constants, Amd D 4.1.5 Table 4-1.
DDC_CARD_CRYPTOGRAM = const(0x00)
DDC_HOST_CRYPTOGRAM = const(0x01)
DDC_CARD_CHALLENGE = const(0x02)
DDC_S_ENC = const(0x04)
DDC_S_MAC = const(0x06)
DDC_S_RMAC = const(0x07)

# Security level, EXTERNAL AUTHENTICATE P1 (Amd D 7.1.2.1 Table 7-4).
LEVEL_C_MAC = const(0x01)
LEVEL_C_DECRYPTION = const(0x02)
LEVEL_R_MAC = const(0x10)
LEVEL_R_ENCRYPTION = const(0x20)
# The combinations fleetid supports (C-MAC always on; R-ENC needs R-MAC and C-DEC).
LEVELS = (0x01, 0x03, 0x11, 0x13, 0x33)

# "i" parameter of SCP03 in the key information (Amd D 5.1 Table 5-1).
I_S16_MODE = const(0x01)
I_PSEUDO_RANDOM_CHALLENGE = const(0x10)
I_R_MAC_SUPPORT = const(0x20)
I_R_ENC_SUPPORT = const(0x40)

SCP03_ID = const(0x03)
S8 = const(8)  # challenge / cryptogram / MAC length in S8 mode
BLOCK = const(16)

# INITIALIZE UPDATE / EXTERNAL AUTHENTICATE (Amd D 7.1.1, 7.1.2).
CLA_GP = const(0x80)
CLA_SM = const(0x04)  # GP secure messaging indication, CLA b3 (Amd D 6.2.4)
_CLA_ISO_SM_HEADER = const(0x08)  # CLA b4: ISO/IEC 7816-4 SM with authenticated header
INS_INITIALIZE_UPDATE = const(0x50)
INS_EXTERNAL_AUTHENTICATE = const(0x82)
INIT_UPDATE_RESPONSE_LEN = const(32)  # 10 + 3 + 8 + 8 + 3 (S8 mode, with sequence counter)
INIT_UPDATE_RESPONSE_LEN_NO_SEQ = const(29)  # random-challenge cards may omit the counter

_SHORT_MAX_NC = const(255)  # ISO/IEC 7816-4:2005 5.1: short Lc 1..255, extended 1..65535
_EXT_MAX_NC = const(65535)

_SW_OK = const(0x9000)
_SW_SECURITY_STATUS = const(0x6982)

_AES_KEY_SIZES = (16, 24, 32)


try:  # CPython: the C constant-time compare
    from hmac import compare_digest as _compare_digest
except ImportError:  # MicroPython: the loop below
    _compare_digest = None


def ct_equal(a, b):
    """Constant-time comparison of two byte strings (time depends on length only).

    hmac.compare_digest where the port has it, else an xor-accumulate loop.
    Returns: bool.  Lengths are not secret: different lengths compare unequal at once.
    """
    if len(a) != len(b):
        return False
    if _compare_digest is not None:
        return _compare_digest(bytes(a), bytes(b))
    acc = 0
    for i in range(len(a)):
        acc |= a[i] ^ b[i]
    return acc == 0


def _check_key(name, key):
    if not isinstance(key, (bytes, bytearray)) or len(key) not in _AES_KEY_SIZES:
        raise ValueError("%s must be a 16, 24 or 32 byte AES key" % name)
    return bytes(key)


class StaticKeys:
    """An SCP03 static key set: K-ENC, K-MAC, K-DEK (AES) and its key version number.

    The repr never shows key bytes.
    """

    def __init__(self, enc, mac, dek, kvn=0):
        self.enc = _check_key("enc", enc)
        self.mac = _check_key("mac", mac)
        self.dek = _check_key("dek", dek) if dek is not None else None
        if not isinstance(kvn, int) or kvn < 0 or kvn > 0xFF:
            raise ValueError("kvn must be 0..255")
        self.kvn = kvn

    def __repr__(self):
        return "StaticKeys(kvn=0x%02X, <redacted>)" % self.kvn


class SessionKeys:
    """S-ENC, S-MAC, S-RMAC of one SCP03 session (Amd D 6.2.1).  Repr redacted."""

    def __init__(self, s_enc, s_mac, s_rmac):
        self.s_enc = s_enc
        self.s_mac = s_mac
        self.s_rmac = s_rmac

    def __repr__(self):
        return "SessionKeys(<redacted>)"


def sp800_108_counter_cmac(prims, key, fixed_before, fixed_after, bits):
    """NIST SP 800-108 KDF in counter mode, PRF AES-CMAC, 8-bit counter between two parts.

    K(i) = CMAC(key, fixed_before || i (u8) || fixed_after), i = 1, 2, ...; the output is
    K(1) || K(2) || ... truncated to `bits`.
    Params: key: AES key; fixed_before, fixed_after: bytes; bits: output length in bits, a
        positive multiple of 8, at most 255 blocks.
    Returns: bits // 8 bytes.
    Raises: ValueError for a bad length.
    """
    if not isinstance(bits, int) or bits <= 0 or bits % 8:
        raise ValueError("KDF output length must be a positive multiple of 8 bits")
    nbytes = bits // 8
    blocks = (nbytes + BLOCK - 1) // BLOCK
    if blocks > 0xFF:
        raise ValueError("KDF output too long for an 8-bit counter")
    out = bytearray()
    for i in range(1, blocks + 1):
        out.extend(prims.cmac(key, bytes(fixed_before) + bytes((i,)) + bytes(fixed_after)))
    return bytes(out[:nbytes])


def kdf(prims, key, constant, context, bits):
    """The SCP03 data derivation function (Amd D 4.1.5).

    Input per block: 11 x 00 || constant || 00 || L (u16 BE) || i (u8) || context.
    Params: key: AES key; constant: one of DDC_*; context: bytes; bits: output length.
    Returns: bits // 8 bytes.
    Raises: ValueError for a bad length or constant.
    """
    if not isinstance(constant, int) or constant < 0 or constant > 0xFF:
        raise ValueError("derivation constant must be one byte")
    if not isinstance(bits, int) or bits <= 0 or bits > 0xFFFF:
        raise ValueError("KDF output length out of range")
    before = bytes(11) + bytes((constant, 0x00, (bits >> 8) & 0xFF, bits & 0xFF))
    return sp800_108_counter_cmac(prims, key, before, context, bits)


def _check_challenges(host_challenge, card_challenge):
    for name, value in (("host", host_challenge), ("card", card_challenge)):
        if not isinstance(value, (bytes, bytearray)) or len(value) != S8:
            raise ValueError("%s challenge must be 8 bytes (S8 mode)" % name)
    return bytes(host_challenge) + bytes(card_challenge)


def derive_session_keys(prims, static_keys, host_challenge, card_challenge):
    """Derive S-ENC, S-MAC, S-RMAC from a static key set (Amd D 6.2.1).

    Each session key has the length of its static key.
    Params: prims; static_keys: StaticKeys; host_challenge, card_challenge: 8 bytes each.
    Returns: SessionKeys.
    Raises: ValueError for bad challenge sizes.
    """
    context = _check_challenges(host_challenge, card_challenge)
    enc_bits = len(static_keys.enc) * 8
    mac_bits = len(static_keys.mac) * 8
    return SessionKeys(
        kdf(prims, static_keys.enc, DDC_S_ENC, context, enc_bits),
        kdf(prims, static_keys.mac, DDC_S_MAC, context, mac_bits),
        kdf(prims, static_keys.mac, DDC_S_RMAC, context, mac_bits),
    )


def card_cryptogram(prims, s_mac, host_challenge, card_challenge):
    """The 8-byte card authentication cryptogram (Amd D 6.2.2.2)."""
    context = _check_challenges(host_challenge, card_challenge)
    return kdf(prims, s_mac, DDC_CARD_CRYPTOGRAM, context, 64)


def host_cryptogram(prims, s_mac, host_challenge, card_challenge):
    """The 8-byte host authentication cryptogram (Amd D 6.2.2.3)."""
    context = _check_challenges(host_challenge, card_challenge)
    return kdf(prims, s_mac, DDC_HOST_CRYPTOGRAM, context, 64)


def pseudo_random_card_challenge(prims, k_enc, sequence_counter, sd_aid):
    """The card challenge of a card that announces i-param b5 (Amd D 6.2.2.1).

    KDF(K-ENC, 0x02, sequence counter (3 bytes) || AID of the security domain, 64 bits).
    """
    return kdf(prims, k_enc, DDC_CARD_CHALLENGE, bytes(sequence_counter) + bytes(sd_aid), 64)


class _PlainKey:
    """A key bound to plain `prims` calls: the portable stand-in for prims.prepare_key."""

    def __init__(self, prims, key):
        self._prims = prims
        self._key = key

    def aes_ecb_encrypt(self, block16):
        return self._prims.aes_ecb_encrypt(self._key, block16)

    def aes_cbc_encrypt(self, iv, data):
        return self._prims.aes_cbc_encrypt(self._key, iv, data)

    def aes_cbc_decrypt(self, iv, data):
        return self._prims.aes_cbc_decrypt(self._key, iv, data)

    def cmac(self, data):
        return self._prims.cmac(self._key, data)

    def close(self):
        self._key = None

    def __repr__(self):
        return "_PlainKey(<redacted>)"


def bind_key(prims, key):
    """An object doing prims' AES-ECB / AES-CBC / CMAC with `key` fixed: prims.prepare_key
    (key) when prims offers it (schedules computed once), else plain prims calls.

    For session keys only.  Returns: object with aes_ecb_encrypt(block), aes_cbc_encrypt
    (iv, data), aes_cbc_decrypt(iv, data), cmac(data), close().
    """
    prepare = getattr(prims, "prepare_key", None)
    if prepare is not None:
        return prepare(key)
    return _PlainKey(prims, key)


def _kdf_bound(bound, constant, context, bits):
    # kdf() with a bound key (same input layout, Amd D 4.1.5); bits <= 128 here.
    return bound.cmac(bytes(11) + bytes((constant, 0x00, (bits >> 8) & 0xFF, bits & 0xFF, 1))
                      + context)[: bits // 8]


def static_session_keys_fn(prims, static_keys):
    """Make a `session_keys_fn` for Scp03Host from a StaticKeys held in this process.

    Returns: fn(host_challenge, card_challenge, key_info) -> SessionKeys.
    """

    def session_keys(host_challenge, card_challenge, key_info):
        return derive_session_keys(prims, static_keys, host_challenge, card_challenge)

    return session_keys


def pad80(data):
    """ISO/IEC 9797-1 padding method 2 to a multiple of 16 bytes (GP CS B.2.3)."""
    return bytes(data) + b"\x80" + bytes(BLOCK - 1 - len(data) % BLOCK)


def unpad80(data):
    """Strip ISO/IEC 9797-1 method 2 padding.

    Raises: SecureChannelError("padding") when the padding is absent or malformed.
    """
    i = len(data) - 1
    # Scan at most one block of trailing zeros: the padding never spans more than that.
    stop = len(data) - BLOCK
    while i >= 0 and i >= stop and data[i] == 0:
        i -= 1
    if i < 0 or i < stop or data[i] != 0x80:
        raise SecureChannelError("padding")
    return bytes(data[:i])


def command_icv(prims, s_enc, counter):
    """ICV for C-DEC: AES-ECB(S-ENC, counter as 16 bytes BE) (Amd D 6.2.6)."""
    return prims.aes_ecb_encrypt(s_enc, counter.to_bytes(BLOCK, "big"))


def response_icv(prims, s_enc, counter):
    """ICV for R-ENC: AES-ECB(S-ENC, 80 || counter as 15 bytes BE) (Amd D 6.2.7)."""
    return prims.aes_ecb_encrypt(s_enc, b"\x80" + counter.to_bytes(BLOCK - 1, "big"))


def mac_cla(cla):
    """The CLA byte as it enters the C-MAC (Amd D 6.2.4): logical channel (b2 b1) zero, b4
    zero, b3 set.  The channel is thus outside the MAC: the card binds the session to the
    channel it was opened on instead."""
    return (cla & 0xF0) | CLA_SM


def is_success_sw(sw):
    """True for 9000 and warnings 62XX / 63XX: the status words that get R-MAC (Amd D 6.2.5)."""
    return sw == _SW_OK or (sw >> 8) in (0x62, 0x63)


def _check_level(level):
    if level not in LEVELS:
        raise SecureChannelError("level", "security level %02X not supported" % level)


def _check_wrappable_cla(cla):
    # First interindustry / GP proprietary coding only (b7 = 0): channels 0..3 in b2 b1 and
    # b3 free for the secure-messaging indication.  Already wrapped commands are refused.
    if cla & 0x40:
        raise ApduFormatError("CLA %02X: only b7 = 0 class bytes can be wrapped" % cla)
    if cla & (CLA_SM | _CLA_ISO_SM_HEADER):
        raise ApduFormatError("CLA %02X already announces secure messaging" % cla)


class SecureMessaging:
    """Sans-I/O host-side SCP03 secure messaging for one authenticated session.

    Built by Scp03Host.open() (or directly, e.g. to wrap OTA APDUs for a relay).
    Params: prims; session_keys: object with s_enc, s_mac, s_rmac; level: one of LEVELS;
        mac_chain: the chaining value after EXTERNAL AUTHENTICATE (its full C-MAC);
        counter: the encryption counter of the next command (1 after authentication).
    """

    def __init__(self, prims, session_keys, level, mac_chain, counter=1, _bound_mac=None):
        _check_level(level)
        self.level = level
        # Each session key bound once (bind_key): S-ENC for C-DEC / R-ENC, S-MAC, S-RMAC.
        self._enc = bind_key(prims, session_keys.s_enc) if level & LEVEL_C_DECRYPTION else None
        self._mac = _bound_mac if _bound_mac is not None else bind_key(prims,
                                                                       session_keys.s_mac)
        self._rmac = bind_key(prims, session_keys.s_rmac) if level & LEVEL_R_MAC else None
        self._chain = bytes(mac_chain)
        self.counter = counter
        self._pending_counter = None

    def close(self):
        """Drop the session keys (their prepared contexts too).  Idempotent; the object
        cannot wrap or unwrap afterwards."""
        for bound in (self._enc, self._mac, self._rmac):
            if bound is not None:
                bound.close()
        self._enc = self._mac = self._rmac = None
        self._chain = b""

    def wrap_command(self, apdu):
        """Protect one command: C-DEC (if the level says so) then C-MAC.

        Advances the encryption counter and the MAC chaining value.
        Params: apdu: plain command APDU bytes (CLA b3 clear).
        Returns: the wrapped command APDU bytes (Le unchanged).
        Raises: ApduFormatError (malformed or unwrappable command, too long once wrapped);
            SecureChannelError("state") if a response is still awaited.
        """
        if self._pending_counter is not None:
            raise SecureChannelError("state", "previous response not unwrapped")
        if self._mac is None:
            raise SecureChannelError("state", "secure messaging closed")
        cmd = decode_command(apdu)
        _check_wrappable_cla(cmd.cla)
        counter = self.counter
        data = cmd.data
        if self.level & LEVEL_C_DECRYPTION and data:
            # ICV = AES(S-ENC, counter block) (command_icv) and CBC under that ICV, in one
            # cipher call: CBC from a zero IV over (counter block || data) yields the ICV as
            # its first output block, then exactly the CBC(ICV, data) blocks.
            data = self._enc.aes_cbc_encrypt(
                bytes(BLOCK), counter.to_bytes(BLOCK, "big") + pad80(data))[BLOCK:]
        cla = cmd.cla | CLA_SM
        ins, p1, p2, le = cmd.ins, cmd.p1, cmd.p2, cmd.le
        # Lc' covers the data and the MAC.  Extended fields stay if the caller used them
        # (an Le above 256 implies them); they become necessary past 255 bytes.
        nc = len(data) + S8
        if nc > _EXT_MAX_NC:
            raise ApduFormatError("data longer than 65535 bytes once wrapped")
        extended = bool(cmd.extended) or nc > _SHORT_MAX_NC
        if extended:
            lc = bytes((0, nc >> 8, nc & 0xFF))
            le_field = b"" if le is None else bytes(((le >> 8) & 0xFF, le & 0xFF))
        else:
            lc = bytes((nc,))
            le_field = b"" if le is None else bytes((le & 0xFF,))
        # MAC input: chaining value || CLA' INS P1 P2 Lc' data' (Le not MACed).
        full_mac = self._mac.cmac(self._chain + bytes((mac_cla(cla), ins, p1, p2)) + lc + data)
        wrapped = bytes((cla, ins, p1, p2)) + lc + data + full_mac[:S8] + le_field
        # Commit state only once everything encoded.
        self._chain = full_mac
        self.counter = counter + 1
        self._pending_counter = counter
        return wrapped

    def unwrap_response(self, resp):
        """Check R-MAC and decrypt R-ENC of the response to the last wrapped command.

        Params: resp: response bytes (data || SW1 SW2).
        Returns: plain response bytes (data || SW1 SW2).
        Raises: SecureChannelError("response_mac") (bad or missing R-MAC, data with an error
            status), SecureChannelError("padding"), SecureChannelError("state") (no command
            awaiting a response); ApduFormatError (shorter than SW1 SW2).
        """
        counter = self._pending_counter
        if counter is None or self._mac is None:
            raise SecureChannelError("state", "no command awaiting a response")
        self._pending_counter = None
        data, sw = split_response(resp)
        sw_bytes = bytes(((sw >> 8) & 0xFF, sw & 0xFF))
        if not self.level & LEVEL_R_MAC:
            return bytes(resp)
        if not is_success_sw(sw):
            # Error status: the card sends the status word alone (Amd D 6.2.5).
            if data:
                raise SecureChannelError("response_mac", "data with an error status")
            return sw_bytes
        if len(data) < S8:
            raise SecureChannelError("response_mac", "response too short for an R-MAC")
        body = data[: len(data) - S8]
        expected = self._rmac.cmac(self._chain + body + sw_bytes)[:S8]
        if not ct_equal(expected, data[len(data) - S8 :]):
            raise SecureChannelError("response_mac")
        if self.level & LEVEL_R_ENCRYPTION and body:
            if len(body) % BLOCK:
                raise SecureChannelError("padding", "encrypted data not whole blocks")
            # ICV = AES-ECB(S-ENC, 80 || counter as 15 bytes BE) (Amd D 6.2.7).
            icv = self._enc.aes_ecb_encrypt(b"\x80" + counter.to_bytes(BLOCK - 1, "big"))
            body = unpad80(self._enc.aes_cbc_decrypt(icv, body))
        return body + sw_bytes


class Scp03Host:
    """Host (off-card entity) side of an SCP03 session over a `transceive` link.

    Params:
        transceive: callable `transceive(apdu_bytes) -> response_bytes`, or an object with
            such a method (T1Link).
        prims: crypto primitives (module header).
        session_keys_fn: fn(host_challenge, card_challenge, key_info) -> object with
            s_enc, s_mac, s_rmac (an HSM's scp03_session_keys, or static_session_keys_fn()).
        level: security level for EXTERNAL AUTHENTICATE, one of LEVELS (default 0x33).
        host_challenge: 8 bytes used by the next open() (then random again), or a callable
            returning 8 bytes; None = prims.random(8).
        kvn: key version number for INITIALIZE UPDATE P1 (0 = the card's default set).

    After open(): `level`, `key_info` (3 bytes: KVN, 03, i), `kvn`, `sequence_counter`
    (int or None), `card_challenge`, `is_open`.
    Use `ApduProtocol(host.transceive)` for secure send_apdu.
    """

    def __init__(self, transceive, prims, session_keys_fn, level=0x33, host_challenge=None,
                 kvn=0):
        if not callable(transceive):
            transceive = transceive.transceive
        _check_level(level)
        if not isinstance(kvn, int) or kvn < 0 or kvn > 0xFF:
            raise ValueError("kvn must be 0..255")
        self._transceive = transceive
        self._prims = prims
        self._session_keys_fn = session_keys_fn
        self.level = level
        self._host_challenge = host_challenge
        self.kvn = kvn
        self.key_info = None
        self.sequence_counter = None
        self.card_challenge = None
        self._sm = None

    @property
    def is_open(self):
        """True while an authenticated session is in place."""
        return self._sm is not None

    @property
    def counter(self):
        """Encryption counter of the next command (None when closed)."""
        return self._sm.counter if self._sm is not None else None

    def close(self):
        """Forget the session (keys and chaining state).  The card keeps its own until it
        sees a new INITIALIZE UPDATE, a failure or a reset."""
        sm = self._sm
        self._sm = None
        if sm is not None:
            sm.close()

    def _next_host_challenge(self):
        chosen = self._host_challenge
        self._host_challenge = None  # a fixed challenge is for one open() only
        if callable(chosen):
            chosen = chosen()
        if chosen is None:
            chosen = self._prims.random(S8)
        if not isinstance(chosen, (bytes, bytearray)) or len(chosen) != S8:
            raise ValueError("host challenge must be 8 bytes")
        return bytes(chosen)

    def _initialize_update(self, host_challenge):
        # INITIALIZE UPDATE (Amd D 7.1.1); returns the response data once its length, the
        # key set's SCP identifier and its i parameter suit this session's level.
        init_update = encode_command(CLA_GP, INS_INITIALIZE_UPDATE, self.kvn, 0x00,
                                     host_challenge, 256)
        data, sw = split_response(self._transceive(init_update))
        if sw != _SW_OK:
            raise apdu_error_for_sw(sw, "INITIALIZE UPDATE")
        if len(data) not in (INIT_UPDATE_RESPONSE_LEN, INIT_UPDATE_RESPONSE_LEN_NO_SEQ):
            raise SecureChannelError("card_cryptogram", "INITIALIZE UPDATE response length")
        key_info = data[10:13]
        if key_info[1] != SCP03_ID:
            raise SecureChannelError("card_cryptogram", "key set is not for SCP03")
        i_param = key_info[2]
        if i_param & I_S16_MODE:
            raise SecureChannelError("level", "S16 mode not supported")
        if self.level & LEVEL_R_MAC and not i_param & I_R_MAC_SUPPORT:
            raise SecureChannelError("level", "card does not support R-MAC")
        if self.level & LEVEL_R_ENCRYPTION and not i_param & I_R_ENC_SUPPORT:
            raise SecureChannelError("level", "card does not support R-ENC")
        return data

    def open(self):
        """Run INITIALIZE UPDATE and EXTERNAL AUTHENTICATE (Amd D 7.1.1, 7.1.2).

        Verifies the card cryptogram in constant time before anything else is sent.
        Returns: None (the session is open; see the instance attributes).
        Raises: SecureChannelError("card_cryptogram") (wrong cryptogram or malformed
            INITIALIZE UPDATE response), SecureChannelError("level") (the card's i
            parameter lacks what the level needs, or S16 mode); ApduError subclass when the
            card answers a status word other than 9000 (e.g. 6A88 unknown key set, 6983
            blocked, 6982 host cryptogram refused); whatever the link raises.
        """
        self.close()
        host_challenge = self._next_host_challenge()
        init_data = self._initialize_update(host_challenge)
        key_info = init_data[10:13]
        card_challenge = init_data[13:21]
        cryptogram = init_data[21:29]
        keys = self._session_keys_fn(host_challenge, card_challenge, key_info)
        context = _check_challenges(host_challenge, card_challenge)
        s_mac = bind_key(self._prims, keys.s_mac)
        try:
            # Card cryptogram (Amd D 6.2.2.2), then the host's (6.2.2.3): KDF(S-MAC, 64).
            expected = _kdf_bound(s_mac, DDC_CARD_CRYPTOGRAM, context, 64)
            if not ct_equal(expected, cryptogram):
                raise SecureChannelError("card_cryptogram")
            host_crypt = _kdf_bound(s_mac, DDC_HOST_CRYPTOGRAM, context, 64)

            # EXTERNAL AUTHENTICATE: 84 82 level 00 10 host cryptogram || C-MAC, chained
            # from 16 zero bytes (Amd D 6.2.4, 7.1.2).  Never encrypted; no R-MAC.
            cla = CLA_GP | CLA_SM
            header = bytes((cla, INS_EXTERNAL_AUTHENTICATE, self.level, 0x00, 2 * S8))
            full_mac = s_mac.cmac(bytes(BLOCK) + header + host_crypt)
            ext_auth = header + host_crypt + full_mac[:S8]
            resp_data, sw = split_response(self._transceive(ext_auth))
            if sw != _SW_OK:
                raise apdu_error_for_sw(sw, "EXTERNAL AUTHENTICATE")
            if resp_data:
                raise SecureChannelError("state", "EXTERNAL AUTHENTICATE returned data")
        except BaseException:
            s_mac.close()
            raise
        self.key_info = key_info
        self.card_challenge = card_challenge
        self.sequence_counter = (
            int.from_bytes(init_data[29:32], "big")
            if len(init_data) == INIT_UPDATE_RESPONSE_LEN
            else None
        )
        self._sm = SecureMessaging(self._prims, keys, self.level, full_mac, 1, s_mac)

    def transceive(self, apdu):
        """Send one command through the secure channel and return the plain response.

        Params: apdu: plain command APDU bytes.
        Returns: plain response bytes (data || SW1 SW2).
        Raises: SecureChannelError("state") when no session is open;
            SecureChannelError("response_mac" / "padding") when the response does not check
            out (the session is then closed); ApduFormatError for an unwrappable command;
            whatever the link raises (the session is then closed: its state is unknown).
        A 6982 status closes the session too: in a session it means the card dropped it
        (Amd D 6.2.4: a refused C-MAC ends the secure channel).
        """
        sm = self._sm
        if sm is None:
            raise SecureChannelError("state", "no secure channel open")
        wrapped = sm.wrap_command(apdu)
        try:
            resp = self._transceive(wrapped)
        except Exception:
            self.close()
            raise
        try:
            plain = sm.unwrap_response(resp)
        except (SecureChannelError, ApduFormatError):
            self.close()
            raise
        if len(plain) >= 2 and ((plain[-2] << 8) | plain[-1]) == _SW_SECURITY_STATUS:
            self.close()
        return plain
