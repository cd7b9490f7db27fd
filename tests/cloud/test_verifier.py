"""The verifier: mTLS termination (TLS 1.3 and TLS 1.2 ECDHE-ECDSA-AES-GCM), fleet checks
with a verdict each, the attack list (each refused with its reason, nothing written),
the verdict cache and its invalidation, endpoints, metrics, JSON logs, and interop with
`openssl s_client` and `curl --cert`.

TLS clients use the software device keys the test vendor generated (cloud_support.py
explains why: Python's ssl cannot sign with an SE-held key).
"""

import datetime
import io
import json
import logging
import shutil
import ssl
import subprocess
import urllib.request

import pytest

from bench.mtls import free_port

from fleetid.cloud.ca.evidence import attestation_extension
from fleetid.cloud.http.middleware import configure_json_logging
from fleetid.cloud.verifier.errors import AccessRefused
from tests.cloud.attestation_support import SoftVendor, new_key
from tests.cloud.cloud_support import Fleet, RunningCloud, der, rogue_certificate
from tests.conftest import require

NONCE = b"\x5a" * 32


def refused(fleet, cert, reason, detail=""):
    before = fleet.snapshot()
    with pytest.raises(AccessRefused) as info:
        fleet.verifier.verify(der(cert))
    assert info.value.reason == reason, info.value
    assert detail in info.value.detail
    assert fleet.snapshot() == before
    return info.value


# -- TLS and the authenticated identity --------------------------------------------------------


@pytest.mark.parametrize("tls13", [True, False], ids=["tls1.3", "tls1.2"])
def test_whoami_over_tls13_and_tls12_gives_the_authenticated_device(fleet, cloud, tls13):
    device = fleet.provision()
    fleet.enrol(device)
    status, _, body = cloud.request("verifier", "GET", "/v1/whoami", files=device.files(),
                                    tls13=tls13)
    assert status == 200
    identity = json.loads(body)
    assert identity["serial"] == device.name and identity["kind"] == "operational"
    assert identity["se_uid"] == device.chip.se_uid.hex()


def test_tls12_offers_only_ecdhe_ecdsa_aes_gcm(fleet, cloud):
    device = fleet.provision()
    context = cloud.client_context(device.files(), tls13=False)
    import socket

    with socket.create_connection(("127.0.0.1", cloud.ports["verifier"]), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            name, version, _ = tls.cipher()
    assert version == "TLSv1.2" and name.startswith("ECDHE-ECDSA-AES") and "GCM" in name
    context = cloud.client_context(device.files(), tls13=False)
    context.set_ciphers("ECDHE-ECDSA-AES128-SHA256")  # CBC: not offered by the server
    with pytest.raises(ssl.SSLError):
        with socket.create_connection(("127.0.0.1", cloud.ports["verifier"]), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.recv(1)


def test_no_client_certificate_is_refused_before_any_handler(fleet, cloud):
    # The verifier shares its TLS context (and session cache) with EST, where a client
    # certificate is optional: the handshake completes, the verifier's middleware refuses.
    before = fleet.snapshot()
    status, _, body = cloud.request("verifier", "GET", "/v1/whoami")
    assert status == 401 and body.startswith(b"no_client_certificate:")
    status, _, body = cloud.request("verifier", "POST", "/v1/rotation/ack")
    assert status == 401 and body.startswith(b"no_client_certificate:")
    assert fleet.snapshot() == before


def test_identity_certificates_authenticate_and_every_check_has_a_verdict(fleet):
    device = fleet.provision()
    results = fleet.verifier.explain(der(device.identity_cert))
    assert [r.name for r in results] == ["certificate", "validity", "eku", "chain",
                                         "ca_revocation", "registry", "revocation",
                                         "device_status", "attestation", "overlap"]
    assert all(r.ok for r in results)


# -- attacks ---------------------------------------------------------------------------------


def test_attack_certificate_from_another_fleet(fleet, cloud, tmp_path):
    other = Fleet(tmp_path / "other")
    try:
        stranger = other.provision()
        refused(fleet, stranger.identity_cert, "chain", "fleet root")
        before = fleet.snapshot()
        with pytest.raises((ssl.SSLError, ConnectionError)):  # OpenSSL: unknown CA
            cloud.request("verifier", "GET", "/v1/whoami", files=stranger.files())
        assert fleet.snapshot() == before
    finally:
        other.close()


def test_attack_valid_chain_but_no_attestation_extension(fleet, cloud):
    device = fleet.provision()
    key, cert = rogue_certificate(fleet, device)  # insider-signed, registered
    refused(fleet, cert, "attestation", "no_evidence")
    status, _, body = cloud.request("verifier", "GET", "/v1/whoami",
                                    files=device.files(cert, key))
    assert status == 403 and body == b"attestation: no_evidence\n"


def test_attack_attestation_signed_by_an_unknown_vendor(fleet):
    device = fleet.provision()
    key = new_key()
    fake = SoftVendor("Counterfeit Chips").make_chip(se_uid=device.chip.se_uid)
    ext = attestation_extension(fake.evidence(key.public_key(), NONCE))
    _, cert = rogue_certificate(fleet, device, ext, key)
    refused(fleet, cert, "attestation", "unknown_vendor")


def test_attack_attested_key_is_not_the_certificate_key(fleet):
    device = fleet.provision()
    ext = attestation_extension(device.chip.evidence(new_key().public_key(), NONCE))
    _, cert = rogue_certificate(fleet, device, ext)
    refused(fleet, cert, "attestation", "key_mismatch")


def test_attack_se_uid_of_another_device(fleet):
    device, other = fleet.provision(), fleet.provision()
    key = new_key()
    ext = attestation_extension(other.chip.evidence(key.public_key(), NONCE))
    _, cert = rogue_certificate(fleet, device, ext, key)
    refused(fleet, cert, "attestation", "se_uid_mismatch")


def test_attack_revoked_device_even_with_a_cached_verdict(fleet, cloud):
    device = fleet.provision()
    fleet.enrol(device)
    files = device.files()
    assert cloud.request("verifier", "GET", "/v1/whoami", files=files)[0] == 200
    fleet.verifier.verify(der(device.cert))
    assert fleet.verifier.cache_hits >= 1
    fleet.revoke_certificate(device.cert, "keyCompromise")
    refused(fleet, device.cert, "revoked", "keyCompromise")
    status, _, body = cloud.request("verifier", "GET", "/v1/whoami", files=files)
    assert status == 403 and body.startswith(b"revoked")
    # Revoking the identity certificate revokes the device: it cannot enrol again.
    fleet.revoke_certificate(device.identity_cert, "cessationOfOperation")
    refused(fleet, device.identity_cert, "revoked")


def test_a_resumed_tls13_session_is_still_checked_on_every_request(fleet, cloud):
    import http.client
    import socket

    device = fleet.provision()
    fleet.enrol(device)
    context = cloud.client_context(device.files())
    context.minimum_version = ssl.TLSVersion.TLSv1_3

    def whoami(session):
        with socket.create_connection(("127.0.0.1", cloud.ports["verifier"]), 20) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1",
                                     session=session) as tls:
                tls.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\n"
                            b"Connection: close\r\n\r\n")
                response = http.client.HTTPResponse(tls)
                response.begin()
                body = response.read()
                return response.status, body, tls.session, tls.session_reused

    status, _, session, reused = whoami(None)
    assert status == 200 and not reused
    # Stateful TLS 1.3 tickets (OP_NO_TICKET: a session id into the server's cache).
    status, body, session, reused = whoami(session)
    assert status == 200 and reused
    assert json.loads(body)["serial"] == device.name
    # A resumed session skips the TLS certificate check, never the fleet checks.
    fleet.revoke_certificate(device.cert, "keyCompromise")
    status, body, _, reused = whoami(session)
    assert reused and status == 403 and body.startswith(b"revoked")


def test_a_session_made_with_est_resumes_at_the_verifier_and_is_checked_there(fleet, cloud):
    # The verifier and EST share one TLS context (one session cache): a device's session
    # with EST resumes at the verifier, which still runs every fleet check on the
    # certificate the session carries; a revocation refuses the very next request.
    import socket

    device = fleet.provision()
    fleet.enrol(device)
    context = cloud.client_context(device.files())
    context.minimum_version = ssl.TLSVersion.TLSv1_3

    def get(service, path, session):
        import http.client

        with socket.create_connection(("127.0.0.1", cloud.ports[service]), 20) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1",
                                     session=session) as tls:
                tls.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                            % path.encode())
                response = http.client.HTTPResponse(tls)
                response.begin()
                body = response.read()
                return response.status, body, tls.session, tls.session_reused

    status, _, session, reused = get("est", "/.well-known/est/b42/cacerts", None)
    assert status == 200 and not reused
    status, body, session, reused = get("verifier", "/v1/whoami", session)
    assert status == 200 and reused and json.loads(body)["serial"] == device.name
    status, _, session, reused = get("est", "/.well-known/est/b42/cacerts", session)
    assert status == 200 and reused
    fleet.revoke_certificate(device.cert, "keyCompromise")
    status, body, _, reused = get("verifier", "/v1/whoami", session)
    assert reused and status == 403 and body.startswith(b"revoked")


def test_attack_revoked_batch_intermediate(fleet, cloud):
    device, other_batch = fleet.provision(), fleet.provision(batch="b43")
    fleet.verifier.verify(der(device.identity_cert))  # cached chain verdict
    fleet.revocation.revoke_ca(fleet.ca_certs["b42"], "unspecified")
    refused(fleet, device.identity_cert, "ca_revoked", "batch:b42")
    assert fleet.verifier.verify(der(other_batch.identity_cert)).serial == other_batch.name
    status, _, _ = cloud.request("verifier", "GET", "/v1/whoami", files=device.files())
    assert status == 403


def test_attack_expired_certificate_inside_and_outside_the_overlap_window(fleet, cloud):
    device = fleet.provision()
    old = fleet.enrol(device)
    old_key = device.key
    key, csr = device.csr()
    new = fleet.est.enroll("b42", der(old), csr, reenroll=True)
    # Inside the window the old certificate is accepted ...
    assert fleet.verifier.verify(der(old)).in_overlap
    # ... outside it (8 days later, not yet expired) refused as superseded ...
    fleet.clock.advance(days=8)
    refused(fleet, old, "superseded", "overlap window closed")
    assert fleet.verifier.verify(der(new)).kind == "operational"
    # ... and once expired, refused as expired whatever the window says.
    fleet.clock.advance(days=30)
    refused(fleet, old, "expired")
    refused(fleet, new, "expired")
    # A really expired certificate never gets past the TLS handshake.
    fleet.clock.offset = datetime.timedelta(0)
    stale_device = fleet.provision()
    past = fleet.clock() - datetime.timedelta(days=60)
    nonce = fleet.cas["b42"].issue_nonce(now=past)
    stale_key, stale_csr = stale_device.csr(nonce=nonce)
    stale = fleet.cas["b42"].issue(stale_csr, stale_device.chip.se_uid, stale_device.name,
                                   "operational", now=past)
    fleet.registry.add_certificate(stale_device.serial, der(stale), "operational")
    refused(fleet, stale, "expired")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        cloud.request("verifier", "GET", "/v1/whoami",
                      files=stale_device.files(stale, stale_key))
    assert old_key is not None


def test_attack_inside_window_accepted_and_older_generations_refused(fleet):
    device = fleet.provision()
    first = fleet.enrol(device)
    _, csr = device.csr()
    second = fleet.est.enroll("b42", der(first), csr, reenroll=True)
    _, csr = device.csr()
    third = fleet.est.enroll("b42", der(second), csr, reenroll=True)
    assert fleet.verifier.verify(der(second)).in_overlap
    refused(fleet, first, "superseded", "newer certificate")
    assert not fleet.verifier.verify(der(third)).in_overlap


# -- endpoints, metrics, logs, errors ---------------------------------------------------------


def test_telemetry_revocation_status_and_rotation_ack_endpoints(fleet, cloud):
    device = fleet.provision()
    fleet.enrol(device)
    files = device.files()
    status, _, body = cloud.request("verifier", "POST", "/v1/telemetry", files=files,
                                    body=b'{"temp": 21.5}',
                                    headers={"Content-Type": "application/json"})
    assert status == 202
    assert cloud.request("verifier", "POST", "/v1/telemetry", files=files, body=b"[1]",
                         headers={"Content-Type": "application/json"})[0] == 400
    assert cloud.request("verifier", "POST", "/v1/telemetry", files=files, body=b"{",
                         headers={"Content-Type": "application/json"})[0] == 400
    assert cloud.request("verifier", "POST", "/v1/telemetry", files=files, body=b"{}",
                         headers={"Content-Type": "text/plain"})[0] == 415
    status, _, body = cloud.request("verifier", "GET", "/v1/revocation/status", files=files)
    assert status == 200
    document = json.loads(body)
    assert document["revoked"] is False and document["device_status"] == "committed"
    status, _, body = cloud.request("verifier", "POST", "/v1/rotation/ack", files=files)
    assert status == 200 and json.loads(body)["rotation"] == "active"
    assert cloud.request("verifier", "GET", "/v1/nothing", files=files)[0] == 404
    assert cloud.request("verifier", "DELETE", "/v1/whoami", files=files)[0] == 405


def test_metrics_and_json_logs(fleet, tmp_path):
    device = fleet.provision()
    stream = io.StringIO()
    configure_json_logging(stream=stream)
    try:
        with RunningCloud(fleet, metrics_port=free_port()) as cloud:
            cloud.request("verifier", "GET", "/v1/whoami", files=device.files())
            key, cert = rogue_certificate(fleet, device)
            cloud.request("verifier", "GET", "/v1/whoami", files=device.files(cert, key))
            url = "http://127.0.0.1:%d/metrics" % cloud.ports["metrics"]
            text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        logging.getLogger("fleetid.cloud").handlers[:] = []
    assert 'fleetid_verifier_verdicts_total{reason="ok"} 1.0' in text
    assert 'fleetid_verifier_verdicts_total{reason="attestation"} 1.0' in text
    assert "fleetid_http_request_seconds_bucket" in text
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    requests = [line for line in lines if line["msg"] == "request"]
    assert {r["status"] for r in requests} == {200, 403}
    assert any(r.get("device") == device.name for r in requests)
    assert any(r.get("reason") == "attestation" for r in requests)
    assert "PRIVATE KEY" not in stream.getvalue()


def test_a_request_aiohttp_cannot_parse_is_one_warning_line_not_a_traceback(fleet):
    """A chunked body with a bad chunk size (aiohttp answers 400 and logs "Error handling
    request" with a traceback at ERROR): one WARNING line naming the cause instead."""
    import socket
    import ssl

    stream = io.StringIO()
    configure_json_logging(stream=stream)
    try:
        with RunningCloud(fleet) as cloud:
            context = ssl.create_default_context(cafile=fleet.root_file)
            with socket.create_connection(("127.0.0.1", cloud.ports["est"]), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Type: application/pkcs10\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
                    answer = s.recv(4096)
    finally:
        logging.getLogger("fleetid.cloud").handlers[:] = []
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    malformed = [line for line in lines if line["logger"] == "aiohttp.server"]
    assert malformed and all(line["level"] == "warning" for line in malformed), lines
    assert "chunk size" in malformed[0]["msg"]
    assert "Traceback" not in stream.getvalue()


def test_answers_neither_echo_a_malformed_request_nor_name_versions(fleet):
    """aiohttp's own 400 quotes the offending bytes back and every answer says
    `Server: Python/3.x aiohttp/3.y`; the cloud's runner (sites.Runner) answers the
    status phrase only, and `Server: fleetid`."""
    import socket
    import ssl

    def exchange(port, request):
        context = ssl.create_default_context(cafile=fleet.root_file)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(request)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
        return answer

    marker = b"<script>echo-me-back</script>"
    with RunningCloud(fleet) as cloud:
        for port in (cloud.ports["est"], cloud.ports["verifier"]):
            for request in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad " + marker + b"\r\n\r\n",
                            b"GET /" + marker + b"\x00 HTTP/1.1\r\nHost: x\r\n\r\n"):
                answer = exchange(port, request)
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.0 400 ") or head.startswith(b"HTTP/1.1 400 ")
                assert body == b"400 Bad Request" and marker not in answer, answer
                assert b"\r\nServer: fleetid\r\n" in head and b"aiohttp" not in answer
        answer = exchange(cloud.ports["est"], b"GET /.well-known/est/cacerts HTTP/1.1\r\n"
                                              b"Host: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and b"\r\nServer: fleetid\r\n" in answer


class ExplodingRegistry:
    """A registry whose reads fail with an internal cause the client must never see."""

    def __init__(self, registry, exc):
        self._registry = registry
        self._exc = exc

    def certificate_status(self, *args, **kwargs):
        raise self._exc

    def certificate_and_device(self, *args, **kwargs):  # the verifier's per-request read
        raise self._exc

    def __getattr__(self, name):
        return getattr(self._registry, name)


def test_internal_causes_never_reach_clients(fleet, cloud):
    from fleetid.cloud.registry import RegistryError

    device = fleet.provision()
    files = device.files()
    real = fleet.verifier.registry
    for exc, expected in ((RuntimeError("secret internal cause /var/db"), 500),
                          (RegistryError(RegistryError.STORAGE, "disk /var/db full"), 503)):
        fleet.verifier.registry = ExplodingRegistry(real, exc)
        try:
            status, _, body = cloud.request("verifier", "GET", "/v1/whoami", files=files)
        finally:
            fleet.verifier.registry = real
        assert status == expected
        assert b"/var/db" not in body and b"secret" not in body


# -- interop: openssl s_client and curl --cert ------------------------------------------------


def test_interop_openssl_s_client_and_curl_cert(fleet, cloud):
    require(shutil.which("openssl") and shutil.which("curl"), "openssl and curl")
    device = fleet.provision()
    fleet.enrol(device)
    cert_file, key_file = device.files()
    port = cloud.ports["verifier"]
    for version in ("-tls1_3", "-tls1_2"):
        result = subprocess.run(
            ["openssl", "s_client", "-connect", "127.0.0.1:%d" % port, version, "-CAfile",
             fleet.root_file, "-cert", cert_file, "-key", key_file, "-verify_return_error",
             "-ign_eof", "-quiet"],
            input=b"GET /v1/whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            capture_output=True, timeout=30)
        assert b"HTTP/1.1 200 OK" in result.stdout, result.stderr[-500:]
        assert ('"serial": "%s"' % device.name).encode() in result.stdout
    result = subprocess.run(
        ["curl", "-sS", "--cacert", fleet.root_file, "--cert", cert_file, "--key", key_file,
         "https://127.0.0.1:%d/v1/whoami" % port], capture_output=True, timeout=30)
    assert json.loads(result.stdout)["kind"] == "operational"
    # Without a client certificate: refused by the verifier (401) before any handler.
    result = subprocess.run(["curl", "-sS", "-w", "%{http_code}", "--cacert", fleet.root_file,
                             "https://127.0.0.1:%d/v1/whoami" % port],
                            capture_output=True, timeout=30)
    assert result.stdout.startswith(b"no_client_certificate:")
    assert result.stdout.endswith(b"401")


# -- property: any bytes as a client certificate are refused with a reason ----------------------


def test_arbitrary_certificate_bytes_are_refused_never_crash(fleet):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    device = fleet.provision()
    good = der(device.identity_cert)
    before = fleet.snapshot()

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.one_of(
        st.binary(min_size=1, max_size=200),
        st.integers(1, len(good) - 1).map(lambda n: good[:n]),
        st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)).map(
            lambda t: good[:t[0]] + bytes([good[t[0]] ^ t[1]]) + good[t[0] + 1:]),
    ))
    def check(blob):
        try:
            fleet.verifier.verify(blob)
        except AccessRefused:
            return
        # A flipped bit can land in an unsigned part the verifier does not read; then the
        # DER differs, so the registry (keyed by fingerprint) must not know it.
        raise AssertionError("accepted a modified certificate")

    check()
    assert fleet.snapshot() == before


# -- the reason of a chain refusal -------------------------------------------------------------


def ca_signed_without_san(fleet, device):
    """The device's line-issued identity certificate less its subjectAltName, for a new key,
    signed by the fleet CA through its HSM and registered (the careless insider's copy).
    Returns (key, certificate)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtensionOID

    from fleetid.cloud.pki.signing import sign_certificate

    issued, key = device.identity_cert, new_key()
    builder = (x509.CertificateBuilder().subject_name(issued.subject)
               .issuer_name(issued.issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(issued.not_valid_before_utc)
               .not_valid_after(issued.not_valid_after_utc)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    for ext in issued.extensions:
        if ext.oid not in (ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                           ExtensionOID.SUBJECT_KEY_IDENTIFIER):
            builder = builder.add_extension(ext.value, ext.critical)
    cert = sign_certificate(fleet.hsm, "ca-widget-" + device.batch, builder)
    fleet.registry.add_certificate(device.serial, der(cert), "operational")
    return key, cert


def test_chain_refusal_names_the_policy_check_a_ca_signed_certificate_fails(fleet):
    """A certificate the fleet CA really signed (through its HSM), the device's own name,
    but no subjectAltName: the path exists, cryptography's client-auth policy refuses the
    leaf.  verify() and explain() (what `fleetid cloud check-cert` prints) say so instead
    of "does not chain to a fleet root"."""
    _key, cert = ca_signed_without_san(fleet, fleet.provision())
    exc = refused(fleet, cert, "chain", "subjectAltName")
    assert "does not chain" not in exc.detail
    assert "missing required extension" in exc.detail and "CN=" in exc.detail
    chain = {r.name: r for r in fleet.verifier.explain(der(cert))}["chain"]
    assert chain.ok is False and "subjectAltName" in chain.detail


def test_chain_refusal_of_another_fleets_certificate_still_says_no_path(fleet, tmp_path):
    other = Fleet(tmp_path / "other")
    try:
        exc = refused(fleet, other.provision().identity_cert, "chain",
                      "does not chain to a fleet root")
        assert "candidates exhausted" in exc.detail
    finally:
        other.close()
