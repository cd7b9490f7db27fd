"""The device's mTLS client with its key in the SE (fleetid.device.host.se_tls) against
the real fleet verifier on 127.0.0.1, for chips personalised by the real factory line:
TLS 1.2 ECDHE-ECDSA-AES-GCM, CertificateVerify signed by the SE, the server validated
with the fleet root anchor read from the SE, typed failures with bounded waits."""

import datetime
import hashlib
import json
import socket
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from fleetid.common import se_consts as C
from tests.device.device_cloud_support import LineAndCloud

pytest.importorskip("tlslite")
from fleetid.device.host.se_tls import SeEcdsaKey, SeTlsClient, TlsClientError  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    running = LineAndCloud(tmp_path_factory.mktemp("se-tls"), devices=2)
    yield running
    running.close()


def _anchor(se):
    return se.get_data(C.DATA_TRUST_FLEET_ROOT, -1, 65536)


def _client(se, slot=C.SLOT_IDENTITY, **kwargs):
    return SeTlsClient(se, slot, [se.get_cert(slot)], [_anchor(se)], **kwargs)


def test_whoami_over_tls12_with_the_se_held_identity_key(env):
    se = env.session(0)
    record, cert = env.device(se)
    client = _client(se)
    response = client.request("127.0.0.1", env.ports["verifier"], "GET", "/v1/whoami")
    assert response.status == 200, response.body
    identity = json.loads(response.body)
    assert identity["serial"] == cert.subject.get_attributes_for_oid(
        x509.NameOID.COMMON_NAME)[0].value
    assert identity["registry_serial"] == record.serial
    assert identity["se_uid"] == se.uid().hex() and identity["kind"] == "identity"
    assert identity["fingerprint"] == hashlib.sha256(se.get_cert(1)).hexdigest()
    # CertificateVerify was signed by the SE (one SIGN per handshake), AES-GCM suite, and
    # the server chain validated to the fleet root the line stored in the SE.
    assert client.key.signatures == 1
    assert client.last_cipher[0] in ("aes128gcm", "aes256gcm")
    assert client.last_server_chain[0].subject.rfc4514_string() == "CN=localhost"
    # One request per connection: a second request handshakes (and signs) again.
    assert client.request("localhost", env.ports["verifier"], "GET", "/healthz").status == 200
    assert client.key.signatures == 2


def test_key_object_signs_sha256_digests_in_the_se_and_nothing_else(env):
    se = env.session(0)
    key = SeEcdsaKey(se, C.SLOT_IDENTITY)
    digest = hashlib.sha256(b"handshake transcript").digest()
    signature = bytes(key.sign(bytearray(digest), hashAlg="sha256"))
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key.point)
    public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert key.verify(bytearray(signature), bytearray(digest)) is True
    assert key.verify(bytearray(signature), bytearray(b"\x00" * 32)) is False
    assert len(key) == 256 and key.hasPrivateKey()
    with pytest.raises(TlsClientError) as info:
        key.sign(bytearray(48), hashAlg="sha384")
    assert info.value.reason == TlsClientError.SE
    with pytest.raises(TlsClientError):
        key.write()  # an SE-held key has nothing to export


def test_a_server_outside_the_device_trust_anchor_is_refused(env):
    se = env.session(0)
    other = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "someone else's root")])
    now = datetime.datetime.now(datetime.timezone.utc)
    foreign_root = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                    .public_key(other.public_key()).serial_number(1)
                    .not_valid_before(now - datetime.timedelta(days=1))
                    .not_valid_after(now + datetime.timedelta(days=1))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                    .sign(other, hashes.SHA256()))
    client = SeTlsClient(se, C.SLOT_IDENTITY, [se.get_cert(1)],
                         [foreign_root.public_bytes(serialization.Encoding.DER)])
    with pytest.raises(TlsClientError) as info:
        client.request("127.0.0.1", env.ports["verifier"], "GET", "/v1/whoami")
    assert info.value.reason == TlsClientError.SERVER_CERTIFICATE


def test_a_certificate_that_is_not_for_the_slot_key_is_rejected_up_front(env):
    se = env.session(0)
    other_chip = env.session(1)
    with pytest.raises(ValueError):
        SeTlsClient(se, C.SLOT_IDENTITY, [other_chip.get_cert(1)], [_anchor(se)])


def test_connection_refused_and_silent_server_are_typed_and_bounded(env):
    se = env.session(0)
    client = _client(se, connect_timeout=2, io_timeout=0.3)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(TlsClientError) as info:
        client.request("127.0.0.1", port, "GET", "/v1/whoami")
    assert info.value.reason == TlsClientError.CONNECT

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True)
    thread.start()
    try:
        with pytest.raises(TlsClientError) as info:
            client.request("127.0.0.1", silent.getsockname()[1], "GET", "/v1/whoami")
        assert info.value.reason == TlsClientError.TIMEOUT
    finally:
        thread.join(5)
        for conn, _ in accepted:
            conn.close()
        silent.close()


def test_after_revocation_the_device_is_refused_with_the_reason(env):
    se = env.session(1)
    record, cert = env.device(se)
    client = _client(se)
    assert client.request("127.0.0.1", env.ports["verifier"], "GET",
                          "/v1/whoami").status == 200
    env.revoke_certificate(cert, "keyCompromise", operator="test")
    response = client.request("127.0.0.1", env.ports["verifier"], "GET", "/v1/whoami")
    assert response.status == 403
    assert response.body.startswith(b"revoked") and b"keyCompromise" in response.body
    assert env.line.registry.get_device(record.serial).status == "revoked"
