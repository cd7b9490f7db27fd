# TLS 1.3 primitives for common/tls13.py: the key schedule (RFC 8446 7.1) over an injected
# provider, and a portable provider for MicroPython.  Portable: CPython and MicroPython.
#
# A provider ("prims") is any object with
#     prims.sha256(data) -> 32 bytes
#     prims.hmac_sha256(key, data) -> 32 bytes
#     prims.aead(key16) -> an object with
#         seal(nonce12, aad, plaintext) -> ciphertext || 16-byte tag      (AES-128-GCM)
#         open(nonce12, aad, ciphertext_and_tag) -> plaintext, or None when the tag fails
#     prims.random(n) -> n bytes
# On CPython: fleetid.common.host.tls13_host.CryptographyTls13Primitives (pyca/cryptography).
# On MicroPython: PortableTls13Primitives below: hashlib's SHA-256, HMAC written here
# (RFC 2104; micropython-lib's hmac is not needed for one hash), and AES-128-GCM (NIST SP
# 800-38D) built from an AES-ECB block function (MicroPython's `cryptolib.aes(key, 1)`)
# plus the GHASH below.
#
# Nothing here copies a hash object (MicroPython's hashlib has no copy()): every digest
# is computed over complete bytes.  Nothing here logs; keys never appear in reprs.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


HASH_LEN = const(32)  # SHA-256, the hash of TLS_AES_128_GCM_SHA256
KEY_LEN = const(16)  # AES-128
IV_LEN = const(12)  # RFC 8446 5.3: iv_length = max(8, N_MIN) = 12 for AES-GCM
TAG_LEN = const(16)
_BLOCK = const(16)
_HMAC_BLOCK = const(64)  # SHA-256 block size (RFC 2104 "B")
_MASK128 = (1 << 128) - 1

ZEROS = bytes(HASH_LEN)


# -- key schedule (RFC 8446 7.1, RFC 5869) ---------------------------------------------------


def hkdf_extract(prims, salt, ikm):
    """HKDF-Extract (RFC 5869 2.2) with SHA-256; an empty salt means HashLen zeros."""
    return prims.hmac_sha256(salt or ZEROS, ikm)


def hkdf_expand(prims, prk, info, length):
    """HKDF-Expand (RFC 5869 2.3) with SHA-256, length <= 255 * 32."""
    out = bytearray()
    block = b""
    counter = 1
    while len(out) < length:
        block = prims.hmac_sha256(prk, block + info + bytes((counter,)))
        out.extend(block)
        counter += 1
    return bytes(out[:length])


def hkdf_expand_label(prims, secret, label, context, length):
    """HKDF-Expand-Label (RFC 8446 7.1):

        struct { uint16 length; opaque label<7..255> = "tls13 " + Label;
                 opaque context<0..255>; } HkdfLabel;
    """
    full = b"tls13 " + label
    info = bytes((length >> 8, length & 0xFF, len(full))) + full + bytes((len(context),)) + context
    return hkdf_expand(prims, secret, info, length)


def derive_secret(prims, secret, label, transcript_hash):
    """Derive-Secret(Secret, Label, Messages) with the transcript hash given (RFC 8446 7.1)."""
    return hkdf_expand_label(prims, secret, label, transcript_hash, HASH_LEN)


def traffic_keys(prims, secret):
    """(key, iv) of a traffic secret (RFC 8446 7.3)."""
    return (hkdf_expand_label(prims, secret, b"key", b"", KEY_LEN),
            hkdf_expand_label(prims, secret, b"iv", b"", IV_LEN))


def finished_mac(prims, base_key, transcript_hash):
    """verify_data = HMAC(finished_key, Transcript-Hash) (RFC 8446 4.4.4)."""
    finished_key = hkdf_expand_label(prims, base_key, b"finished", b"", HASH_LEN)
    return prims.hmac_sha256(finished_key, transcript_hash)


def next_traffic_secret(prims, secret):
    """application_traffic_secret_N+1 (RFC 8446 7.2, KeyUpdate)."""
    return hkdf_expand_label(prims, secret, b"traffic upd", b"", HASH_LEN)


# -- the portable provider -----------------------------------------------------------------


def hmac_sha256(sha256, key, data):
    """HMAC-SHA-256 (RFC 2104) over a one-shot `sha256(bytes) -> digest` function."""
    if len(key) > _HMAC_BLOCK:
        key = sha256(key)
    key = bytes(key) + bytes(_HMAC_BLOCK - len(key))
    inner = bytes(b ^ 0x36 for b in key)
    outer = bytes(b ^ 0x5C for b in key)
    return sha256(outer + sha256(inner + bytes(data)))


# GCM reduction of the 4 bits shifted out, for Shoup's 4-bit table method (as in mbed TLS
# gcm.c "last4"), placed in the top 16 bits of the 128-bit accumulator.
_LAST4 = (0x0000, 0x1C20, 0x3840, 0x2460, 0x7080, 0x6CA0, 0x48C0, 0x54E0,
          0xE100, 0xFD20, 0xD940, 0xC560, 0x9180, 0x8DA0, 0xA9C0, 0xB5E0)
_R = 0xE1 << 120  # x^128 + x^7 + x^2 + x + 1 in GCM's reflected bit order (SP 800-38D 6.3)


class Ghash:
    """GHASH (NIST SP 800-38D 6.4) for one hash subkey H, with a 16-entry table of the
    multiples of H (Shoup's 4-bit method): 32 table steps per block instead of 128 bit
    steps.  Blocks are big-endian 128-bit integers, bit 0 of the field being the MSB."""

    def __init__(self, h_block):
        table = [0] * 16
        v = int.from_bytes(h_block, "big")
        table[8] = v
        i = 4
        while i:
            v = (v >> 1) ^ _R if v & 1 else v >> 1
            table[i] = v
            i >>= 1
        i = 2
        while i < 16:
            for j in range(1, i):
                table[i + j] = table[i] ^ table[j]
            i <<= 1
        self._table = table

    def mult(self, x):
        """x * H in GF(2^128); x and the result as 128-bit integers."""
        table = self._table
        last4 = _LAST4
        z = 0
        for i in range(15, -1, -1):
            byte = (x >> (8 * (15 - i))) & 0xFF
            if i != 15:
                rem = z & 0xF
                z = (z >> 4) ^ (last4[rem] << 112)
            z ^= table[byte & 0xF]
            rem = z & 0xF
            z = (z >> 4) ^ (last4[rem] << 112)
            z ^= table[byte >> 4]
        return z

    def digest(self, aad, ciphertext):
        """GHASH_H(A || 0* || C || 0* || [len(A)]64 || [len(C)]64) as 16 bytes."""
        y = 0
        for data in (aad, ciphertext):
            for i in range(0, len(data), _BLOCK):
                chunk = data[i:i + _BLOCK]
                if len(chunk) < _BLOCK:
                    chunk = bytes(chunk) + bytes(_BLOCK - len(chunk))
                y = self.mult(y ^ int.from_bytes(chunk, "big"))
        y = self.mult(y ^ ((len(aad) * 8) << 64 | (len(ciphertext) * 8)))
        return y.to_bytes(16, "big")


class PortableGcm:
    """AES-GCM (NIST SP 800-38D) with 96-bit nonces and 128-bit tags over an AES-ECB
    block function `encrypt_block(block16) -> 16 bytes` for one key."""

    def __init__(self, encrypt_block):
        self._encrypt = encrypt_block
        self._ghash = Ghash(encrypt_block(bytes(_BLOCK)))

    def _ctr(self, nonce, data):
        # GCTR from inc32(J0), J0 = nonce || 0^31 || 1 (SP 800-38D 7.1 steps 2-3).
        out = bytearray(len(data))
        counter = 2
        encrypt = self._encrypt
        for i in range(0, len(data), _BLOCK):
            stream = encrypt(nonce + counter.to_bytes(4, "big"))
            chunk = data[i:i + _BLOCK]
            for k in range(len(chunk)):
                out[i + k] = chunk[k] ^ stream[k]
            counter += 1
        return bytes(out)

    def _tag(self, nonce, aad, ciphertext):
        s = self._ghash.digest(aad, ciphertext)
        j0 = self._encrypt(nonce + b"\x00\x00\x00\x01")
        return bytes(a ^ b for a, b in zip(s, j0))

    def seal(self, nonce, aad, plaintext):
        if len(nonce) != IV_LEN:
            raise ValueError("GCM nonce must be 12 bytes")
        ciphertext = self._ctr(bytes(nonce), plaintext)
        return ciphertext + self._tag(bytes(nonce), aad, ciphertext)

    def open(self, nonce, aad, data):
        if len(nonce) != IV_LEN or len(data) < TAG_LEN:
            return None
        ciphertext = data[:-TAG_LEN]
        expected = self._tag(bytes(nonce), aad, ciphertext)
        acc = 0
        for a, b in zip(expected, data[-TAG_LEN:]):
            acc |= a ^ b  # constant time in the tag
        if acc:
            return None
        return self._ctr(bytes(nonce), ciphertext)


def _cryptolib_ecb(key):
    import cryptolib  # MicroPython

    return cryptolib.aes(bytes(key), 1).encrypt


class PortableTls13Primitives:
    """The provider for runtimes without `cryptography` (MicroPython).

    Params: random: `random(n) -> bytes` (default os.urandom).  aes_ecb: `aes_ecb(key) ->
        encrypt_block` (default MicroPython's cryptolib, mode 1 = ECB).  sha256: one-shot
        `sha256(bytes) -> digest` (default hashlib).
    """

    def __init__(self, random=None, aes_ecb=None, sha256=None):
        if random is None:
            import os

            random = os.urandom
        if sha256 is None:
            import hashlib

            def sha256(data):
                return hashlib.sha256(data).digest()

        self.random = random
        self._aes_ecb = aes_ecb or _cryptolib_ecb
        self.sha256 = sha256

    def hmac_sha256(self, key, data):
        return hmac_sha256(self.sha256, key, data)

    def aead(self, key):
        if len(key) != KEY_LEN:
            raise ValueError("AES-128 key must be 16 bytes")
        return PortableGcm(self._aes_ecb(key))

    def __repr__(self):
        return "PortableTls13Primitives()"
