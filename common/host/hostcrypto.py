"""CPython crypto primitives for the portable SCP03 code, on top of pyca/cryptography.

`CryptographyPrimitives` is the `prims` object fleetid.common.scp03 and sim.scp03_card
take: AES-ECB of one block, AES-CBC without padding, AES-CMAC (NIST SP 800-38B) and
random bytes.  `kbkdf_cmac_counter_middle` computes the same SP 800-108 KDF as
scp03.sp800_108_counter_cmac with cryptography's own KBKDFCMAC, for cross-checks.
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

    def __repr__(self):
        return "CryptographyPrimitives()"


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
