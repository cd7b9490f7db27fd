"""The soft keystore keeps the keys it decrypted in memory for the process's life: a CA
signature does not decrypt the entry and re-derive the EC key each time.  Nothing of the
cache reaches the keystore file; close() drops it."""

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from fleetid.cloud.hsm import HsmError
from fleetid.cloud.hsm.soft_backend import SoftBackend
from tests.cloud.hsm_support import KEYSTORE_PASS, TEST_SCRYPT_N


def test_a_signing_key_is_decrypted_and_derived_once_per_process(tmp_path, monkeypatch):
    path = tmp_path / "keystore.json"
    hsm = SoftBackend(path, KEYSTORE_PASS, scrypt_n=TEST_SCRYPT_N)
    public = hsm.generate_signing_key("ca-widget")
    on_disk = path.read_bytes()
    derived = []
    real_derive = ec.derive_private_key
    monkeypatch.setattr(ec, "derive_private_key",
                        lambda *a, **k: derived.append(1) or real_derive(*a, **k))
    digests = [hashlib.sha256(b"tbs %d" % n).digest() for n in range(5)]
    signatures = [hsm.sign_digest("ca-widget", d) for d in digests]
    for digest, signature in zip(digests, signatures):
        public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert len(derived) == 1  # the first signature derived the key; the others reused it
    assert path.read_bytes() == on_disk  # the cache is memory only
    hsm.close()
    with pytest.raises(HsmError) as info:
        hsm.sign_digest("ca-widget", digests[0])
    assert info.value.reason == HsmError.CLOSED
    assert hsm._plain == {} and hsm._key_objects == {}


def test_the_cache_keeps_kinds_apart(tmp_path):
    with SoftBackend(tmp_path / "k.json", KEYSTORE_PASS, scrypt_n=TEST_SCRYPT_N) as hsm:
        hsm.generate_signing_key("ca")
        hsm.sign_digest("ca", bytes(32))
        with pytest.raises(HsmError):  # an EC key is not an RSA unwrapping key
            hsm.transport_wrapping_public_key("ca")
