"""The always-connected tier: the RFC 6960 responder (cloud/revocation/ocsp.py) signed by
a delegated responder certificate in the HSM, queried over POST and GET by
`cryptography`'s client structures and by `openssl ocsp`; a revocation is seen at the
next query; a revoked batch CA revokes every certificate under it; nonces echo."""

import base64
import datetime
import os
import shutil
import subprocess
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from fleetid.cloud.revocation.revset_publisher import ca_key_id
from fleetid.cloud.http.revocation_app import make_revocation_app
from fleetid.cloud.revocation.ocsp import OCSP_REQUEST_TYPE
from fleetid.cloud.revocation.ocsp_tier import OcspTier
from tests.cloud.cloud_support import Fleet, pem
from tests.cloud.ocsp_support import LoopbackServer, ocsp_responder, ocsp_signers
from tests.conftest import require


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("ocspfleet"))
    fleet.devices = [fleet.provision("b42") for _ in range(3)] + [fleet.provision("b43")]
    yield fleet
    fleet.close()


def _request(device, nonce=None, algorithm=hashes.SHA1()):
    builder = ocsp.OCSPRequestBuilder().add_certificate(
        device.identity_cert, device.fleet.ca_certs[device.batch], algorithm)
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _post(url, body):
    req = urllib.request.Request(url + "/ocsp", data=body,
                                 headers={"Content-Type": OCSP_REQUEST_TYPE})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "application/ocsp-response"
        return ocsp.load_der_ocsp_response(resp.read())


def _get(url, body):
    tail = urllib.request.quote(base64.b64encode(body).decode(), safe="")
    with urllib.request.urlopen(url + "/ocsp/" + tail, timeout=10) as resp:
        return ocsp.load_der_ocsp_response(resp.read())


def _check_signed(response, fleet, batch):
    # Delegated responder: its certificate in `certs`, issued by the CA, id-kp-OCSPSigning,
    # and the response signature verifies under it.
    responder = response.certificates[0]
    ca = fleet.ca_certs[batch]
    responder.verify_directly_issued_by(ca)
    assert ExtendedKeyUsageOID.OCSP_SIGNING in responder.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    responder.public_key().verify(response.signature, response.tbs_response_bytes,
                                  ec.ECDSA(hashes.SHA256()))


def test_ocsp_client_sees_a_revocation_at_its_next_query_over_post_and_get(fleet):
    device = fleet.devices[0]
    responder = ocsp_responder(fleet)
    with LoopbackServer(make_revocation_app([OcspTier(responder)])) as server:
        first = _post(server.url, _request(device, nonce=b"n" * 16))
        assert first.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert first.certificate_status == ocsp.OCSPCertStatus.GOOD
        assert first.serial_number == device.identity_cert.serial_number
        assert first.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"n" * 16
        _check_signed(first, fleet, "b42")
        fleet.registry.mark_revoked(device.identity_cert.serial_number, "keyCompromise",
                                    issuer=device.identity_cert.issuer.rfc4514_string())
        for ask in (_post, _get):
            again = ask(server.url, _request(device, algorithm=hashes.SHA256()))
            assert again.certificate_status == ocsp.OCSPCertStatus.REVOKED
            assert again.revocation_reason == x509.ReasonFlags.key_compromise
            _check_signed(again, fleet, "b42")
        assert _post(server.url, _request(fleet.devices[1])).certificate_status == \
            ocsp.OCSPCertStatus.GOOD


def test_batch_revocation_revokes_every_certificate_under_the_ca(fleet):
    when = datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc)
    responder = ocsp_responder(
        fleet, revoked_cas=lambda: {ca_key_id(fleet.ca_certs["b43"]): when})
    answer = ocsp.load_der_ocsp_response(responder.respond(_request(fleet.devices[3])))
    assert answer.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert answer.revocation_reason == x509.ReasonFlags.ca_compromise
    assert answer.revocation_time_utc == when
    assert ocsp.load_der_ocsp_response(responder.respond(_request(fleet.devices[2]))) \
        .certificate_status == ocsp.OCSPCertStatus.GOOD


def test_unknown_serial_foreign_issuer_and_garbage(fleet):
    responder = ocsp_responder(fleet)
    ca = fleet.ca_certs["b42"]
    req = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        _request_hashes(ca)[0], _request_hashes(ca)[1], 12345, hashes.SHA1()).build()
    answer = ocsp.load_der_ocsp_response(responder.respond(
        req.public_bytes(serialization.Encoding.DER)))
    assert answer.certificate_status == ocsp.OCSPCertStatus.UNKNOWN
    foreign = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        b"\x01" * 20, b"\x02" * 20, 1, hashes.SHA1()).build()
    assert ocsp.load_der_ocsp_response(responder.respond(foreign.public_bytes(
        serialization.Encoding.DER))).response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    assert ocsp.load_der_ocsp_response(responder.respond(b"\x30\x03\x02\x01\x01")) \
        .response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def _request_hashes(ca):
    import hashlib

    point = ca.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)
    return hashlib.sha1(ca.subject.public_bytes()).digest(), hashlib.sha1(point).digest()


def test_openssl_ocsp_queries_the_responder(fleet, tmp_path):
    openssl = shutil.which("openssl")
    require(openssl is not None, "openssl")
    good, revoked = fleet.devices[1], fleet.devices[2]
    fleet.registry.mark_revoked(revoked.identity_cert.serial_number, "cessationOfOperation",
                                issuer=revoked.identity_cert.issuer.rfc4514_string())
    files = {"root": fleet.root, "ca": fleet.ca_certs["b42"], "good": good.identity_cert,
             "revoked": revoked.identity_cert}
    for name, cert in files.items():
        (tmp_path / (name + ".pem")).write_bytes(pem(cert))
    ocsp_signers(fleet)
    texts = {}
    with LoopbackServer(make_revocation_app([OcspTier(ocsp_responder(fleet))])) as server:
        for name in ("good", "revoked"):
            out = subprocess.run(
                [openssl, "ocsp", "-issuer", str(tmp_path / "ca.pem"),
                 "-CAfile", str(tmp_path / "root.pem"),
                 "-verify_other", str(tmp_path / "ca.pem"),
                 "-cert", str(tmp_path / (name + ".pem")), "-url", server.url + "/ocsp"],
                capture_output=True, text=True, timeout=30, check=False,
                env=dict(os.environ, OPENSSL_CONF="/dev/null"))
            texts[name] = out.stdout + out.stderr
            assert out.returncode == 0, texts[name]
            assert "Response verify OK" in texts[name], texts[name]
    assert "good.pem: good" in texts["good"], texts
    assert "revoked.pem: revoked" in texts["revoked"], texts
    assert "Reason: cessationOfOperation" in texts["revoked"], texts


@pytest.mark.parametrize("length", [0, 33, 129, 3000])
def test_a_nonce_outside_1_to_32_octets_is_a_malformed_request_and_not_echoed(fleet, length):
    # RFC 8954 2.1: Nonce ::= OCTET STRING (SIZE(1..32)); a responder MUST reject others.
    with LoopbackServer(make_revocation_app([OcspTier(ocsp_responder(fleet))])) as server:
        answer = _post(server.url, _request(fleet.devices[1], nonce=os.urandom(length)))
    assert answer.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


@pytest.mark.parametrize("length", [1, 16, 32])
def test_a_nonce_of_1_to_32_octets_is_echoed(fleet, length):
    nonce = os.urandom(length)
    with LoopbackServer(make_revocation_app([OcspTier(ocsp_responder(fleet))])) as server:
        answer = _post(server.url, _request(fleet.devices[1], nonce=nonce))
    assert answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert answer.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce


def test_openssl_ocsp_sees_a_3000_byte_nonce_refused_as_malformed(fleet, tmp_path):
    openssl = shutil.which("openssl")
    require(openssl is not None, "openssl")
    (tmp_path / "req.der").write_bytes(_request(fleet.devices[1], nonce=os.urandom(3000)))
    with LoopbackServer(make_revocation_app([OcspTier(ocsp_responder(fleet))])) as server:
        out = subprocess.run(
            [openssl, "ocsp", "-reqin", str(tmp_path / "req.der"), "-url",
             server.url + "/ocsp", "-noverify"],
            capture_output=True, text=True, timeout=30, check=False,
            env=dict(os.environ, OPENSSL_CONF="/dev/null"))
    text = out.stdout + out.stderr
    assert "malformedrequest" in text.lower(), text
