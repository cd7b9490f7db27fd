"""The device's HTTPS client with its key in the SE (fleetid.device.host.se_https, on the
portable TLS 1.3 client) against the real fleet verifier on 127.0.0.1, for chips
personalised by the real factory line: TLS 1.3, ECDHE in the SE's transient key,
CertificateVerify signed by the SE, the server validated with the fleet root anchor read
from the SE, PSK-DHE resumption with the server's ticket, typed failures with bounded
waits."""

import datetime
import hashlib
import json
import socket
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.common import se_consts as C
from fleetid.device.host.se_https import SeTlsClient, TicketCache, TlsClientError
from tests.device.device_cloud_support import LABEL, LineAndCloud


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    running = LineAndCloud(tmp_path_factory.mktemp("se-tls"), devices=2)
    yield running
    running.close()


def _anchor(se):
    return se.get_data(C.DATA_TRUST_FLEET_ROOT, -1, 65536)


def _client(se, slot=C.SLOT_IDENTITY, **kwargs):
    return SeTlsClient(se, slot, [se.get_cert(slot)], [_anchor(se)], **kwargs)


def test_whoami_over_tls13_with_the_se_held_identity_key(env):
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
    # TLS 1.3, a full handshake: the client certificate signed for by the SE, the server
    # chain validated to the fleet root the line stored in the SE (checked by its VERIFY).
    info = client.last_info
    assert (info.version, info.suite) == ("TLSv1.3", "TLS_AES_128_GCM_SHA256")
    assert info.client_certificate and not info.resumed
    assert dict(info.chain_report)["name"]
    assert client.handshakes == 1 and client.resumed == 0
    # The verifier sent a session ticket: the next connection to it with the same key
    # resumes (PSK-DHE: ECDHE in the SE again, no SIGN, no chain check) and the verifier
    # still knows the device (the resumed session keeps its certificate).
    assert len(client.tickets) == 1
    full_ops = client.se_operations
    again = client.request("127.0.0.1", env.ports["verifier"], "GET", "/v1/whoami")
    assert again.status == 200 and json.loads(again.body) == identity
    assert client.last_info.resumed and client.resumed == 1
    assert client.se_operations - full_ops == 2  # GENERATE (transient) + ECDH only
    assert full_ops >= 4  # GENERATE + ECDH + SIGN + VERIFY(s)


def test_a_ticket_is_never_offered_for_another_key_or_server(env):
    se = env.session(0)
    tickets = TicketCache()
    identity = _client(se, tickets=tickets)
    assert identity.request("127.0.0.1", env.ports["verifier"], "GET",
                            "/v1/whoami").status == 200
    assert len(tickets) == 1
    # Another server name: a full handshake (the ticket is the verifier's at 127.0.0.1).
    assert identity.request("localhost", env.ports["verifier"], "GET",
                            "/healthz").status == 200
    assert not identity.last_info.resumed
    # No client certificate (a public document, here EST cacerts): a full handshake, no
    # SIGN.  Its ticket resumes on the verifier (same name, one session cache), and the
    # resumed session carries no client certificate: refused by the verifier.
    anonymous = SeTlsClient(se, None, [], [_anchor(se)], tickets=tickets)
    response = anonymous.request("127.0.0.1", env.ports["est"], "GET",
                                 "/.well-known/est/%s/cacerts" % LABEL)
    assert response.status == 200
    assert not anonymous.last_info.resumed and not anonymous.last_info.client_certificate
    response = anonymous.request("127.0.0.1", env.ports["verifier"], "GET", "/v1/whoami")
    assert anonymous.last_info.resumed
    assert response.status == 401 and response.body.startswith(b"no_client_certificate")


def test_a_ticket_from_the_verifier_resumes_on_est_and_back(env):
    # One server name, two listeners sharing one session cache (cloud/server.py): the
    # device's key signs once, every later connection resumes whichever port it goes to.
    se = env.session(0)
    client = _client(se)
    assert client.request("127.0.0.1", env.ports["verifier"], "GET",
                          "/v1/whoami").status == 200
    assert client.request("127.0.0.1", env.ports["est"], "GET",
                          "/.well-known/est/%s/cacerts" % LABEL).status == 200
    assert client.last_info.resumed
    assert client.request("127.0.0.1", env.ports["verifier"], "GET",
                          "/v1/whoami").status == 200
    assert client.last_info.resumed
    assert (client.handshakes, client.resumed, client.signatures) == (3, 2, 1)


def test_a_kept_connection_carries_the_next_request_without_a_handshake(env):
    # As the agent's nonce and re-enrolment do: the first answer leaves the connection
    # open, the second request goes over it, and closes it.
    se = env.session(0)
    client = _client(se)
    nonce = client.request("127.0.0.1", env.ports["est"], "GET",
                           "/.well-known/est/%s/nonce" % LABEL, keep_open=True)
    assert nonce.status == 200 and nonce.connection is not None
    cacerts = client.request("127.0.0.1", env.ports["est"], "GET",
                             "/.well-known/est/%s/cacerts" % LABEL,
                             connection=nonce.connection)
    assert cacerts.status == 200 and cacerts.connection is None
    assert client.handshakes == 1 and client.signatures == 1
    # Closed after the second request: given again, it connects anew (resumed).
    again = client.request("127.0.0.1", env.ports["est"], "GET",
                           "/.well-known/est/%s/cacerts" % LABEL, connection=nonce.connection)
    assert again.status == 200 and client.handshakes == 2 and client.last_info.resumed


def _foreign_root():
    other = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "someone else's root")])
    now = datetime.datetime.now(datetime.timezone.utc)
    foreign_root = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                    .public_key(other.public_key()).serial_number(1)
                    .not_valid_before(now - datetime.timedelta(days=1))
                    .not_valid_after(now + datetime.timedelta(days=1))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                    .sign(other, hashes.SHA256()))
    return foreign_root.public_bytes(serialization.Encoding.DER)


def test_a_server_outside_the_device_trust_anchor_is_refused(env):
    se = env.session(0)
    client = SeTlsClient(se, C.SLOT_IDENTITY, [se.get_cert(1)], [_foreign_root()])
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


def test_a_crl_is_fetched_over_https_with_the_server_checked_by_the_se(env):
    """HostNetwork.fetch / fetch_url over https://: the TLS 1.3 client without a client
    certificate, the server verified to the fleet root the SE holds; a server outside it
    is refused, an HTTP error is typed, the answer is bounded."""
    import http.server
    import ssl

    from fleetid.device.agent import NetError
    from fleetid.device.host.agent_net import HostNetwork, fetch_url

    served = {"/crl/ca": b"0\x82 a CRL's bytes"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 http.server's name
            body = served.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(env.server_cert, env.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        se = env.session(0)
        port = server.server_address[1]
        url = "https://localhost:%d/crl/ca" % port
        net = HostNetwork(se, url, url, [_anchor(se)], connect_timeout=5, io_timeout=5)
        assert net.fetch(url) == served["/crl/ca"]
        assert net.handshakes == 1 and net.resumed == 0  # no client certificate needed
        assert fetch_url(url, 5, se=se, trust_roots_der=[_anchor(se)]) == served["/crl/ca"]
        with pytest.raises(NetError) as info:
            net.fetch("https://localhost:%d/crl/none" % port)
        assert info.value.reason == NetError.REFUSED and info.value.status == 404
        # A device of another fleet (another root in its SE) refuses this server.
        with pytest.raises(NetError) as info:
            fetch_url(url, 5, se=se, trust_roots_der=[_foreign_root()])
        assert info.value.reason == NetError.REFUSED and info.value.status is None
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_host_side_verification_issues_no_se_verify_and_still_refuses_a_foreign_root(env):
    se = env.session(0)
    client = _client(se, verify_in_se=False)
    assert client.request("127.0.0.1", env.ports["verifier"], "GET",
                          "/v1/whoami").status == 200
    assert client.verifications == 0 and client.signatures == 1
    assert dict(client.last_info.chain_report)["signature"]
    foreign = SeTlsClient(se, C.SLOT_IDENTITY, [se.get_cert(1)], [_foreign_root()],
                          verify_in_se=False)
    with pytest.raises(TlsClientError) as info:
        foreign.request("127.0.0.1", env.ports["verifier"], "GET", "/v1/whoami")
    assert info.value.reason == TlsClientError.SERVER_CERTIFICATE


def test_the_tls_socket_ends_with_close_notify_and_serves_http_client_and_threads(env):
    """TlsSocket against Python's ssl server (TLS 1.3, client certificate required): data
    both ways from two threads at once, makefile() lines, and close() sends close_notify
    (the server's read ends cleanly, not with 'EOF in violation of protocol')."""
    import ssl

    from fleetid.device.host.tls13_socket import TlsSocket, se_client_config

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(env.server_cert, env.server_key)
    for cert in (env.line.root_cert, env.line.ca_cert):  # the device's issuing chain
        context.load_verify_locations(cadata=cert.public_bytes(
            serialization.Encoding.PEM).decode())
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    seen = {}

    def serve():
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(10)
            received = b""
            tls.sendall(b"hello\nworld\n")
            try:
                while True:
                    data = tls.recv(4096)
                    if not data:
                        break
                    received += data
                    tls.sendall(data.upper())
                seen["end"] = "close_notify"
            except ssl.SSLError as exc:
                seen["end"] = exc.reason
            seen["received"] = received
            seen["peer"] = tls.getpeercert(binary_form=True)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    se = env.session(0)
    config, _ephemeral = se_client_config(se, C.SLOT_IDENTITY, [_anchor(se)], "127.0.0.1")
    tls = TlsSocket.connect("127.0.0.1", listener.getsockname()[1], config, io_timeout=10)
    try:
        reader = tls.makefile("rb")
        assert reader.readline() == b"hello\n" and reader.readline() == b"world\n"
        echoed = []
        pump = threading.Thread(target=lambda: echoed.append(reader.read(2 * 3000)))
        pump.start()
        for _ in range(2):
            tls.sendall(b"abc" * 1000)  # while the other thread reads
        pump.join(10)
        assert echoed == [b"ABC" * 2000]
        reader.close()
    finally:
        tls.close()
    server.join(10)
    listener.close()
    assert seen["end"] == "close_notify"
    assert seen["received"] == b"abc" * 2000 and seen["peer"] == se.get_cert(1)
    assert tls.closed
