"""Checkpoint signers (an HSM key, an in-memory key) and the key naming both signers and
verifiers use: a key is named by the SHA-256 of its SubjectPublicKeyInfo DER."""

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.audit.errors import AuditError


def key_id(public_key):
    """SHA-256 (hex) of a public key's SubjectPublicKeyInfo DER: names a checkpoint signer."""
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def load_public_key(key):
    """A cryptography EC public key from itself, PEM bytes/str, or a PEM certificate."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key
    data = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if b"BEGIN CERTIFICATE" in data:
        public = x509.load_pem_x509_certificate(data).public_key()
    else:
        public = serialization.load_pem_public_key(data)
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise AuditError(AuditError.SIGNER, "checkpoint keys are EC P-256")
    return public


def trusted_keys(keys, role):
    """{key_id: public key} of the keys a verifier trusts for `role` ("line" / "witness").

    `keys`: one key (EC public key, PEM bytes/str, or a PEM certificate) or a list of them
    (a rotated key).  Raises AuditError(SIGNER) if none is given.
    """
    if keys is None:
        raise AuditError(AuditError.SIGNER, "the %s public key is required" % role)
    if isinstance(keys, (list, tuple)):
        loaded = [load_public_key(k) for k in keys]
    else:
        loaded = [load_public_key(keys)]
    if not loaded:
        raise AuditError(AuditError.SIGNER, "the %s public key is required" % role)
    return {key_id(k): k for k in loaded}


class HsmSigner:
    """A checkpoint signer over an HSM key: `HsmSigner(hsm, "audit-line-1")`.

    sign(data) -> DER ECDSA-SHA256 signature made inside the HSM; public_key() -> the
    cryptography public key.  The private key never reaches this process.
    """

    def __init__(self, hsm, label):
        self.hsm = hsm
        self.label = label

    def sign(self, data):
        return self.hsm.sign(self.label, data)

    def public_key(self):
        return self.hsm.public_key(self.label)


class KeySigner:
    """A checkpoint signer over an in-memory private key (a witness's own software key,
    tests).  Same protocol as HsmSigner.  The key is never printed by repr()."""

    def __init__(self, private_key):
        self._private_key = private_key

    def sign(self, data):
        return self._private_key.sign(bytes(data), ec.ECDSA(hashes.SHA256()))

    def public_key(self):
        return self._private_key.public_key()

    def __repr__(self):
        return "KeySigner(<private key>)"
