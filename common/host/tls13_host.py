"""CPython provider of the TLS 1.3 primitives (fleetid.common.tls13_crypto's interface),
on pyca/cryptography: SHA-256, HMAC-SHA-256, AES-128-GCM and the OS CSPRNG.

Also, for tests, benches and hosts without an SE:
* `ecdsa_verify(point, digest, signature_der)` -- a software verifier with the same
  contract as the SE's VERIFY (raises on a bad signature), for common.tls13_cert;
* `SoftwareEphemeral` -- an ECDHE key in host memory (the SE's transient key does this
  on a device);
* `ecb_block_function(key)` -- AES-ECB of one block, to run the portable GCM on CPython
  the way MicroPython's cryptolib runs it.
"""

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleetid.common.errors import VerificationFailed, WrongData


class _Aead:
    __slots__ = ("_gcm",)

    def __init__(self, key):
        self._gcm = AESGCM(bytes(key))

    def seal(self, nonce, aad, plaintext):
        return self._gcm.encrypt(bytes(nonce), bytes(plaintext), bytes(aad))

    def open(self, nonce, aad, data):
        try:
            return self._gcm.decrypt(bytes(nonce), bytes(data), bytes(aad))
        except (InvalidTag, ValueError):
            return None


class CryptographyTls13Primitives:
    """sha256 / hmac_sha256 / aead / random for fleetid.common.tls13, on `cryptography`."""

    def sha256(self, data):
        return hashlib.sha256(data).digest()

    def hmac_sha256(self, key, data):
        return hmac.new(bytes(key), bytes(data), hashlib.sha256).digest()

    def aead(self, key):
        if len(key) != 16:
            raise ValueError("AES-128 key must be 16 bytes")
        return _Aead(key)

    def random(self, n):
        return os.urandom(n)

    def __repr__(self):
        return "CryptographyTls13Primitives()"


def ecb_block_function(key):
    """AES-ECB of one 16-byte block under `key` (what MicroPython's cryptolib gives)."""
    encryptor = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()  # noqa: S305
    return encryptor.update


def ecdsa_verify(point, digest, signature_der):
    """ECDSA P-256 verification of a 32-byte digest, as the SE's VERIFY answers it.

    Raises: VerificationFailed when the signature does not verify (or is malformed)."""
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(point))
        key.verify(bytes(signature_der), bytes(digest), ec.ECDSA(Prehashed(hashes.SHA256())))
    except (InvalidSignature, ValueError):
        raise VerificationFailed(0x6300) from None


class SoftwareEphemeral:
    """An ECDHE P-256 key pair in host memory, with the SE transient key's interface
    (generate() -> 65-byte point, shared_secret(peer_point) -> 32 bytes)."""

    def __init__(self):
        self._key = None
        self.operations = 0

    def generate(self):
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.operations += 1
        return self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)

    def shared_secret(self, peer_point):
        """Raises: WrongData, as the SE's ECDH does, for a point not on P-256."""
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(peer_point))
        except ValueError:
            raise WrongData(0x6A80) from None
        self.operations += 1
        return self._key.exchange(ec.ECDH(), peer)
