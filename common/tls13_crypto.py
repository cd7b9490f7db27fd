# TLS 1.3 primitives for common/tls13.py: the key schedule (RFC 8446 7.1) over an injected
# provider, and a portable provider for MicroPython.  Portable: CPython and MicroPython.
#
# A provider ("prims") is any object with
#     prims.sha256(data) -> 32 bytes
#     prims.hmac_sha256(key, data) -> 32 bytes
#     prims.aead(key16) -> an object with
#         seal(nonce12, aad, plaintext) -> ciphertext || 16-byte tag      (AES-128-GCM)
#         open(nonce12, aad, ciphertext_and_tag) -> plaintext, or None when the tag fails
#         and optionally open_in_place(nonce12, aad, writable_buffer) -> plaintext length
#         or None: the plaintext written over the ciphertext, and seal_in_place(nonce12,
#         aad, writable_buffer): plaintext || 16 bytes of room sealed in place (PortableGcm
#         has both)
#     prims.random(n) -> n bytes
# On CPython: fleetid.common.host.tls13_host.CryptographyTls13Primitives (pyca/cryptography).
# On MicroPython: PortableTls13Primitives below: hashlib's SHA-256, HMAC written here
# (RFC 2104; micropython-lib's hmac is not needed for one hash), and AES-128-GCM (NIST SP
# 800-38D) built from an AES-ECB block function (MicroPython's `cryptolib.aes(key, 1)`)
# plus the GHASH below.
#
# Nothing here copies a hash object (MicroPython's hashlib has no copy()): every digest
# is computed over complete bytes.  Nothing here logs; keys never appear in reprs.

from array import array

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
# gcm.c "last4"): XORed into the most significant 16 bits of the 128-bit accumulator.
_LAST4 = (0x0000, 0x1C20, 0x3840, 0x2460, 0x7080, 0x6CA0, 0x48C0, 0x54E0,
          0xE100, 0xFD20, 0xD940, 0xC560, 0x9180, 0x8DA0, 0xA9C0, 0xB5E0)


def _h_table(h_block):
    # The 16 multiples of H for Shoup's method in one array of 128 16-bit limbs: entry i
    # at [8 * i, 8 * i + 8), most significant limb first.  Built in limbs (no 128-bit
    # integer, no list per limb): one 256-byte block per key, allocated once.
    t = array("H", range(128))  # sized from range's length: no list, no regrowth
    for k in range(8):
        t[k] = 0
        t[64 + k] = h_block[2 * k] << 8 | h_block[2 * k + 1]
    # Entries 4, 2, 1: each the one before times x (a right shift in GCM's reflected
    # order, reduced by R when a bit falls out).
    src = 64
    for dst in (32, 16, 8):
        carry = 0
        for k in range(8):
            w = t[src + k]
            t[dst + k] = w >> 1 | carry << 15
            carry = w & 1
        if carry:
            t[dst] ^= 0xE100  # R's most significant 16 bits
        src = dst
    i = 2
    while i < 16:
        for j in range(1, i):
            for k in range(8):
                t[8 * (i + j) + k] = t[8 * i + k] ^ t[8 * j + k]
        i <<= 1
    return t


class Ghash:
    """GHASH (NIST SP 800-38D 6.4) for one hash subkey H, with a 16-entry table of the
    multiples of H (Shoup's 4-bit method): 32 table steps per block instead of 128 bit
    steps.  The 128-bit accumulator is eight 16-bit limbs (most significant first) in
    locals and one preallocated array: every value stays a small int on 32-bit ports
    too (no 128-bit integer, so no heap allocation, per block).  Per key: the table (one
    256-byte array) and the accumulator, nothing else."""

    def __init__(self, h_block):
        self._t = _h_table(h_block)
        self._y = array("H", range(8))

    def _mult(self, y):
        # y <- y * H in place: the nibbles of y from the least significant up, each step
        # z = (z >> 4) ^ reduction ^ table[nibble].
        t = self._t
        last4 = _LAST4
        z0 = z1 = z2 = z3 = z4 = z5 = z6 = z7 = 0
        for j in range(7, -1, -1):
            w = y[j]
            for _ in range(4):
                rem = z7 & 0xF
                z7 = (z7 >> 4) | ((z6 & 0xF) << 12)
                z6 = (z6 >> 4) | ((z5 & 0xF) << 12)
                z5 = (z5 >> 4) | ((z4 & 0xF) << 12)
                z4 = (z4 >> 4) | ((z3 & 0xF) << 12)
                z3 = (z3 >> 4) | ((z2 & 0xF) << 12)
                z2 = (z2 >> 4) | ((z1 & 0xF) << 12)
                z1 = (z1 >> 4) | ((z0 & 0xF) << 12)
                n = (w & 0xF) << 3
                z0 = (z0 >> 4) ^ last4[rem] ^ t[n]
                z1 ^= t[n + 1]
                z2 ^= t[n + 2]
                z3 ^= t[n + 3]
                z4 ^= t[n + 4]
                z5 ^= t[n + 5]
                z6 ^= t[n + 6]
                z7 ^= t[n + 7]
                w >>= 4
        y[0] = z0
        y[1] = z1
        y[2] = z2
        y[3] = z3
        y[4] = z4
        y[5] = z5
        y[6] = z6
        y[7] = z7

    def digest(self, aad, ciphertext, out=None):
        """GHASH_H(A || 0* || C || 0* || [len(A)]64 || [len(C)]64): 16 bytes, written
        into `out` (a writable 16-byte buffer) when given, else returned as bytes."""
        y = self._y
        for k in range(8):
            y[k] = 0
        for data in (aad, ciphertext):
            n = len(data)
            for i in range(0, n, _BLOCK):
                for k in range(8):
                    p = i + 2 * k
                    hi = data[p] if p < n else 0
                    lo = data[p + 1] if p + 1 < n else 0
                    y[k] ^= hi << 8 | lo
                self._mult(y)
        for k, bits in ((0, len(aad) * 8), (4, len(ciphertext) * 8)):
            y[k + 1] ^= bits >> 32 & 0xFFFF
            y[k + 2] ^= bits >> 16 & 0xFFFF
            y[k + 3] ^= bits & 0xFFFF
        self._mult(y)
        target = bytearray(_BLOCK) if out is None else out
        for k in range(8):
            target[2 * k] = y[k] >> 8
            target[2 * k + 1] = y[k] & 0xFF
        return bytes(target) if out is None else out


class PortableGcm:
    """AES-GCM (NIST SP 800-38D) with 96-bit nonces and 128-bit tags over an AES-ECB
    block function `encrypt_block(block16) -> 16 bytes` for one key (its answer is used
    before the next call, so it may be one buffer the function reuses).

    seal() returns one bytearray (ciphertext || tag) written in place; open() decrypts
    into one bytearray; the counter block and the tag are preallocated per key."""

    def __init__(self, encrypt_block):
        self._encrypt = encrypt_block
        self._ghash = Ghash(encrypt_block(bytes(_BLOCK)))
        self._counter = bytearray(_BLOCK)
        self._tagbuf = bytearray(_BLOCK)

    def _ctr(self, nonce, data, out):
        # GCTR from inc32(J0), J0 = nonce || 0^31 || 1 (SP 800-38D 7.1 steps 2-3), into
        # out[:len(data)].
        block = self._counter
        block[:IV_LEN] = nonce
        encrypt = self._encrypt
        n = len(data)
        counter = 2
        for i in range(0, n, _BLOCK):
            block[12] = counter >> 24 & 0xFF
            block[13] = counter >> 16 & 0xFF
            block[14] = counter >> 8 & 0xFF
            block[15] = counter & 0xFF
            stream = encrypt(block)
            for k in range(min(_BLOCK, n - i)):
                out[i + k] = data[i + k] ^ stream[k]
            counter += 1

    def _tag(self, nonce, aad, ciphertext):
        # The tag in self._tagbuf: GHASH xor E(K, J0).
        tag = self._ghash.digest(aad, ciphertext, self._tagbuf)
        block = self._counter
        block[:IV_LEN] = nonce
        block[12:] = b"\x00\x00\x00\x01"
        j0 = self._encrypt(block)
        for k in range(_BLOCK):
            tag[k] ^= j0[k]
        return tag

    def seal(self, nonce, aad, plaintext):
        if len(nonce) != IV_LEN:
            raise ValueError("GCM nonce must be 12 bytes")
        n = len(plaintext)
        out = bytearray(n + TAG_LEN)
        self._ctr(nonce, plaintext, out)
        out[n:] = self._tag(nonce, aad, memoryview(out)[:n])
        return out

    def seal_in_place(self, nonce, aad, buf):
        """seal() into the writable buffer `buf` (plaintext || TAG_LEN bytes of room): the
        ciphertext overwrites the plaintext and the tag fills the room (aad may be a view
        of the same buffer, before `buf`)."""
        if len(nonce) != IV_LEN or len(buf) < TAG_LEN:
            raise ValueError("GCM nonce must be 12 bytes, and room for the tag")
        n = len(buf) - TAG_LEN
        self._ctr(nonce, buf[:n], buf)
        buf[n:] = self._tag(nonce, aad, buf[:n])

    def open(self, nonce, aad, data):
        if len(nonce) != IV_LEN or len(data) < TAG_LEN:
            return None
        n = len(data) - TAG_LEN
        view = memoryview(data)
        expected = self._tag(nonce, aad, view[:n])
        acc = 0
        for k in range(TAG_LEN):
            acc |= expected[k] ^ data[n + k]  # constant time in the tag
        if acc:
            return None
        out = bytearray(n)
        self._ctr(nonce, view[:n], out)
        return out

    def open_in_place(self, nonce, aad, buf):
        """open() into the ciphertext's own writable buffer `buf` (ciphertext || tag):
        the plaintext overwrites the ciphertext.  Returns: its length, or None when the
        tag fails (buf then unchanged)."""
        if len(nonce) != IV_LEN or len(buf) < TAG_LEN:
            return None
        n = len(buf) - TAG_LEN
        expected = self._tag(nonce, aad, buf[:n])
        acc = 0
        for k in range(TAG_LEN):
            acc |= expected[k] ^ buf[n + k]  # constant time in the tag
        if acc:
            return None
        self._ctr(nonce, buf[:n], buf)
        return n


def _cryptolib_ecb(key):
    # One block per call into one preallocated 16-byte buffer (cryptolib's encrypt(in,
    # out)): the returned block is overwritten by the next call, which PortableGcm allows.
    import cryptolib  # MicroPython

    aes = cryptolib.aes(bytes(key), 1)
    out = bytearray(_BLOCK)

    def encrypt(block):
        aes.encrypt(block, out)
        return out

    return encrypt


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
