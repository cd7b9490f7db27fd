"""CPython crypto primitives for the portable SCP03 code, on top of pyca/cryptography.

`CryptographyPrimitives` is the `prims` object fleetid.common.scp03 and sim.scp03_card
take: AES-ECB of one block, AES-CBC without padding, AES-CMAC (NIST SP 800-38B) and
random bytes.  `kbkdf_cmac_counter_middle` computes the same SP 800-108 KDF as
scp03.sp800_108_counter_cmac with cryptography's own KBKDFCMAC, for cross-checks.

`CryptographyPrimitives.prepare_key(key)` returns a `PreparedKey`: the same operations
for one key, with the AES key schedule and the CMAC subkeys computed once.  scp03 uses it
for the *session* keys of an open secure channel (ephemeral, in host memory for the
session's life anyway: each APDU then costs a context copy instead of a fresh cipher
object); it drops them on close().  Static keys are never prepared here (they stay behind
the HSM interface).
"""

import os

from cryptography.hazmat.primitives import cmac as _cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFCMAC, CounterLocation, Mode

BLOCK = 16


def _key(key):
    if not isinstance(key, (bytes, bytearray, memoryview)) or len(key) not in (16, 24, 32):
        # Never echo the key: only its length.
        raise ValueError("AES key must be 16, 24 or 32 bytes, got %d" % len(key))
    return bytes(key)


class CryptographyPrimitives:
    """AES / AES-CMAC / random for fleetid.common.scp03, backed by `cryptography`.

    Every method raises ValueError on a bad key size or a data length that is not a whole
    number of blocks; messages never contain key or data bytes.
    """

    def aes_ecb_encrypt(self, key, block16):
        """AES-ECB encryption of exactly one 16-byte block.  Returns 16 bytes."""
        if len(block16) != BLOCK:
            raise ValueError("AES-ECB input must be one 16-byte block")
        enc = Cipher(algorithms.AES(_key(key)), modes.ECB()).encryptor()  # noqa: S305 one block
        return enc.update(bytes(block16)) + enc.finalize()

    def aes_cbc_encrypt(self, key, iv, data):
        """AES-CBC encryption without padding.  `data`: a multiple of 16 bytes."""
        if len(iv) != BLOCK or len(data) % BLOCK:
            raise ValueError("AES-CBC needs a 16-byte IV and whole blocks")
        enc = Cipher(algorithms.AES(_key(key)), modes.CBC(bytes(iv))).encryptor()
        return enc.update(bytes(data)) + enc.finalize()

    def aes_cbc_decrypt(self, key, iv, data):
        """AES-CBC decryption without unpadding.  `data`: a multiple of 16 bytes."""
        if len(iv) != BLOCK or len(data) % BLOCK:
            raise ValueError("AES-CBC needs a 16-byte IV and whole blocks")
        dec = Cipher(algorithms.AES(_key(key)), modes.CBC(bytes(iv))).decryptor()
        return dec.update(bytes(data)) + dec.finalize()

    def cmac(self, key, data):
        """AES-CMAC (NIST SP 800-38B) with the full 16-byte tag."""
        mac = _cmac.CMAC(algorithms.AES(_key(key)))
        mac.update(bytes(data))
        return mac.finalize()

    def random(self, n):
        """n bytes from the OS CSPRNG."""
        return os.urandom(n)

    def prepare_key(self, key):
        """A PreparedKey for `key` (the optional fast path fleetid.common.scp03 looks for).

        Raises ValueError on a bad key size (the message never contains key bytes)."""
        return PreparedKey(key)

    def __repr__(self):
        return "CryptographyPrimitives()"


class PreparedKey:
    """One AES key with its cipher contexts built once: AES-ECB of a block, AES-CBC
    without padding, AES-CMAC.  Same results as CryptographyPrimitives with that key.

    For ephemeral keys (SCP03 session keys) whose owner drops them with close(): the
    contexts hold the key schedule, and close() finalizes them (OpenSSL frees and
    cleanses the schedule) and forgets the key.  Not thread-safe (one session, one
    thread).  The repr never shows key bytes.
    """

    __slots__ = ("_alg", "_cbc_enc", "_cbc_last", "_cmac", "_ecb_dec", "_ecb_enc")

    def __init__(self, key):
        self._alg = algorithms.AES(_key(key))
        # Contexts are made on first use (an S-MAC key only ever MACs): ECB keeps no
        # state between whole blocks, so one context serves every call; the CMAC one is
        # keyed (subkeys derived) and each MAC works on a copy of it.
        self._ecb_enc = None
        self._ecb_dec = None
        self._cmac = None
        # One CBC encryption context for every call: it chains from the last ciphertext
        # block it produced (_cbc_last), so a call with another IV whitens its first block
        # (aes_cbc_encrypt).
        self._cbc_enc = None
        self._cbc_last = bytes(BLOCK)

    def _live(self):
        if self._alg is None:
            raise ValueError("prepared key closed")

    def _encryptor(self):
        enc = self._ecb_enc
        if enc is None:
            self._live()
            enc = self._ecb_enc = Cipher(self._alg, modes.ECB()).encryptor()
        return enc

    def aes_ecb_encrypt(self, block16):
        """AES-ECB encryption of exactly one 16-byte block."""
        if len(block16) != BLOCK:
            raise ValueError("AES-ECB input must be one 16-byte block")
        return self._encryptor().update(bytes(block16))

    def aes_cbc_encrypt(self, iv, data):
        """AES-CBC encryption without padding.  `data`: a multiple of 16 bytes."""
        self._live()
        n = len(data)
        if len(iv) != BLOCK or n % BLOCK:
            raise ValueError("AES-CBC needs a 16-byte IV and whole blocks")
        if not n:
            return b""
        # The persistent context computes C(1) = E(X xor L) for a first block X, L its
        # last output block (the zero IV at first).  X = P(1) xor IV xor L gives
        # E(P(1) xor IV): CBC under `iv` (SP 800-38A 6.2), then the context chains on.
        enc = self._cbc_enc
        if enc is None:
            enc = self._cbc_enc = Cipher(self._alg, modes.CBC(bytes(BLOCK))).encryptor()
        data = bytes(data)
        from_bytes = int.from_bytes
        first = (from_bytes(data[:BLOCK], "big") ^ from_bytes(iv, "big")
                 ^ from_bytes(self._cbc_last, "big")).to_bytes(BLOCK, "big")
        out = enc.update(first + data[BLOCK:])
        self._cbc_last = out[n - BLOCK:]
        return out

    def aes_cbc_decrypt(self, iv, data):
        """AES-CBC decryption without unpadding.  `data`: a multiple of 16 bytes."""
        self._live()
        n = len(data)
        if len(iv) != BLOCK or n % BLOCK:
            raise ValueError("AES-CBC needs a 16-byte IV and whole blocks")
        if not n:
            return b""
        data = bytes(data)
        # P(i) = D(C(i)) xor C(i-1): every block decrypts independently (ECB), then one
        # XOR with IV || C(1..n-1).
        dec = self._ecb_dec
        if dec is None:
            dec = self._ecb_dec = Cipher(self._alg, modes.ECB()).decryptor()
        plain = dec.update(data)
        mask = bytes(iv) + data[: n - BLOCK]
        return (int.from_bytes(plain, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")

    def cmac(self, data):
        """AES-CMAC (NIST SP 800-38B) with the full 16-byte tag."""
        keyed = self._cmac
        if keyed is None:
            self._live()
            keyed = self._cmac = _cmac.CMAC(self._alg)
        mac = keyed.copy()
        mac.update(bytes(data))
        return mac.finalize()

    def close(self):
        """Finalize the contexts and forget the key.  Idempotent."""
        if self._alg is None:
            return
        for ctx in (self._ecb_enc, self._ecb_dec, self._cmac, self._cbc_enc):
            if ctx is None:
                continue
            try:
                ctx.finalize()
            except Exception:  # noqa: BLE001, S110 - already finalized: nothing to free
                pass
        self._alg = self._ecb_enc = self._ecb_dec = self._cmac = self._cbc_enc = None
        self._cbc_last = bytes(BLOCK)

    def __repr__(self):
        return "PreparedKey(<redacted>)"


def kbkdf_cmac_counter_middle(key, fixed_before, fixed_after, bits):
    """SP 800-108 counter-mode KDF with AES-CMAC, 8-bit counter between the two fixed parts,
    computed by cryptography's KBKDFCMAC (CounterLocation.MiddleFixed).

    Returns: bits // 8 bytes.  Raises: ValueError (bits not a positive multiple of 8).
    """
    if bits <= 0 or bits % 8:
        raise ValueError("output length must be a positive multiple of 8 bits")
    kdf = KBKDFCMAC(
        algorithm=algorithms.AES,
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=1,
        llen=None,
        location=CounterLocation.MiddleFixed,
        label=None,
        context=None,
        fixed=bytes(fixed_before) + bytes(fixed_after),
        break_location=len(fixed_before),
    )
    return kdf.derive(_key(key))


def kbkdf_scp03(key, constant, context, bits):
    """The SCP03 KDF (GP Amd D 4.1.5) computed with cryptography's KBKDFCMAC.

    Fixed input: 11 x 00 || constant || 00 || L (u16 BE) | counter (u8) | context.
    """
    before = bytes(11) + bytes((constant, 0x00)) + bits.to_bytes(2, "big")
    return kbkdf_cmac_counter_middle(key, before, context, bits)
