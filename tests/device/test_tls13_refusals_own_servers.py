"""Refusals of the device's TLS 1.3 client against the project's own servers: the
verifier and EST listeners of CloudServer (what `fleetid cloud serve` runs) and mosquitto
as `fleetid mqtt broker` configures it, for a chip the real factory line personalised.

Each case is one row of REFUSALS: the server is real; what makes the handshake wrong is
either the client's view (another server name, a clock past or before the server
certificate's validity, a trust anchor of another fleet, the agent's CRL cache listing the
server certificate) or a tampering TCP relay in front of the server (a truncated, cut or
oversized record, a replayed ServerHello, a TLS 1.2 ServerHello the server was led to by
a rewritten ClientHello).  Against the CloudServer listeners the relay also reads the
server's TLS key log, so it can re-encrypt the server's real flight with a wrong Finished
or without its CertificateVerify; mosquitto writes no key log, so those two rows run
against the CloudServer listeners only.

For every row, through TlsSocket (CPython's HTTPS and MQTT tunnel) and Tls13Stream (the
portable driver a board runs): the client raises a TlsError (a FleetidError) naming the
reason and the alert, nothing untyped; the alert reaches the server (read in the clear,
or decrypted with the client's handshake secret from the key log; mosquitto's sealed
ones are only seen to be one record); the client's socket is closed, and the relay,
standing where the server is, sees the client's side close within a bounded wait (no
half-open connection).  A second table runs rows through the callers (se_https,
device/https, the paho MQTT transport): each raises its own typed error.

The server is led to TLS 1.2 two ways: by a relay that strips supported_versions (the
client refuses the TLS 1.2 ServerHello itself: protocol_version), and by capping the
CloudServer context at TLS 1.2 (the server gives up: the client sees its alert or close).
"""

import datetime
import os
import socket
import ssl
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.revocation.crl import CrlIssuer, CrlPublisher
from fleetid.common import se_consts as C
from fleetid.common import tls13 as T
from fleetid.common.clock import SystemClock
from fleetid.common.errors import FleetidError, TlsAlertReceived, TlsCertificateError, TlsError
from fleetid.common.host.tls13_host import CryptographyTls13Primitives
from fleetid.common.tls13 import RecordProtection, Tls13Client
from fleetid.device.board import server_revocation
from fleetid.device.crl_cache import CrlCache
from fleetid.device.host.tls13_socket import TlsSocket, se_client_config
from fleetid.device.tls13_keys import Tls13Stream
from tests.device.crl_support import MemoryStore
from tests.device.device_cloud_support import LineAndCloud

pytestmark = pytest.mark.timeout(300)

WAIT = 5.0  # seconds: every wait of a row (the handshake, the relay seeing the close)
SERVERS = ("verifier", "est", "mosquitto")
KEYLOG_SERVERS = ("verifier", "est")
HOST = "127.0.0.1"


# -- the tampering relay -----------------------------------------------------------------


def split_records(buffer):
    """Whole TLS records at the start of `buffer` (a bytearray, consumed)."""
    out = []
    while len(buffer) >= 5:
        size = 5 + (buffer[3] << 8 | buffer[4])
        if len(buffer) < size:
            break
        out.append(bytes(buffer[:size]))
        del buffer[:size]
    return out


GO, HOLD, CUT = "go", "hold", "cut"  # forward on / forward nothing more / end the stream


class Relay:
    """A TCP relay on a free loopback port in front of a real server, for one connection.

    `to_client(index, record) -> (bytes, action)` and `to_server(...)` see every whole
    record of their direction (index from 0) and return what to forward and GO, HOLD
    (forward nothing more, keep the connection open) or CUT (close the stream to the
    client after the bytes).  `client_closed` is set when the client's side of the
    connection ends (EOF or reset): what the server would see."""

    def __init__(self, upstream_port, to_client=None, to_server=None):
        self.upstream_port = upstream_port
        self.to_client = to_client or (lambda index, record: (record, GO))
        self.to_server = to_server or (lambda index, record: (record, GO))
        self.client_closed = threading.Event()
        self.client_records = []  # every whole record the client sent, as sent
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self._sockets = [self.listener]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        self.listener.settimeout(WAIT)
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        upstream = socket.create_connection((HOST, self.upstream_port), WAIT)
        for sock in (client, upstream):
            sock.settimeout(WAIT * 2)
            self._sockets.append(sock)
        threading.Thread(target=self._pump, args=(upstream, client, self.to_client, False),
                         daemon=True).start()
        self._pump(client, upstream, self.to_server, True)

    def _pump(self, source, sink, edit, from_client):
        buffer = bytearray()
        index = 0
        action = GO
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                if from_client:
                    self.client_closed.set()
                _shutdown(sink)
                return
            buffer += data
            for record in split_records(buffer):
                if from_client:
                    self.client_records.append(record)
                if action != GO:
                    continue  # held: read (so a close is seen) but forward nothing
                out, action = edit(index, record)
                index += 1
                try:
                    sink.sendall(out)
                except OSError:
                    pass
                if action == CUT:
                    _shutdown(sink)

    def close(self):
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass
        self._thread.join(WAIT)


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


# -- record edits (server to client) ---------------------------------------------------------


def at_first_encrypted(change):
    """Pass the ServerHello (and the ChangeCipherSpec OpenSSL sends for middlebox
    compatibility), apply `change(record) -> (bytes, action)` to the first encrypted record
    (EncryptedExtensions)."""

    def edit(index, record):
        if record[0] != T.CT_APPLICATION_DATA:
            return record, GO
        return change(record)

    return edit


def truncated(record):
    # One byte off the body, the length fixed: the AEAD tag no longer matches.
    body = record[5:-1]
    return record[:3] + len(body).to_bytes(2, "big") + body, HOLD


def cut_mid_record(record):
    return record[:len(record) // 2], CUT


def oversized(record):
    # 2^14 + 256 + 1 bytes announced (RFC 8446 5.2: record_overflow).
    size = T.MAX_CIPHERTEXT + 1
    body = (record[5:] + bytes(size))[:size]
    return record[:3] + size.to_bytes(2, "big") + body, HOLD


def replayed_server_hello(index, record):
    # The ServerHello again, in the clear, after the handshake keys are in use.
    if index == 0:
        return record + record, HOLD
    return b"", HOLD


class FlightRewrite:
    """Re-encrypt the server's real handshake flight after `change(messages)` with the
    server's handshake traffic secret from its key log (a CloudServer SSLContext with
    keylog_filename set).  Records are edited only once the whole flight (up to Finished)
    is in; each message is then sealed in its own record."""

    def __init__(self, relay_ref, keylog, change):
        self.relay_ref = relay_ref
        self.keylog = keylog
        self.change = change
        self.records = []
        self.prims = CryptographyTls13Primitives()

    def _secret(self):
        return keylog_secret(self.keylog, "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                             self.relay_ref[0].client_records[0])

    def __call__(self, index, record):
        if index == 0 or record[0] != T.CT_APPLICATION_DATA:
            return record, GO  # ServerHello (and a compatibility ChangeCipherSpec)
        self.records.append(record)
        reader = RecordProtection(self.prims, self._secret())
        plain = b"".join(reader.open(r[:5], r[5:])[:-1] for r in self.records)
        messages = []
        while len(plain) >= 4:
            size = 4 + int.from_bytes(plain[1:4], "big")
            if len(plain) < size:
                break
            messages.append(plain[:size])
            plain = plain[size:]
        if not messages or messages[-1][0] != T.HT_FINISHED:
            return b"", GO  # the flight is not whole yet
        writer = RecordProtection(self.prims, self._secret())
        return b"".join(writer.seal(T.CT_HANDSHAKE, m) for m in self.change(messages)), HOLD


def keylog_secret(keylog, label, client_hello):
    """A secret of the connection whose ClientHello record is `client_hello`, from the
    server's key log (NSS format: LABEL client_random secret), waited for (bounded)."""
    client_random = client_hello[11:43].hex()
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        with open(keylog) as f:
            for line in f:
                fields = (line.split() + ["", "", ""])[:3]
                if fields[:2] == [label, client_random]:
                    return bytes.fromhex(fields[2])
        time.sleep(0.01)
    raise AssertionError("no key log line for this connection")


def alert_on_the_wire(relay, keylog):
    """The alert the client sent after its ClientHello, as the server received it: in the
    clear, or decrypted with the client's handshake secret from the server's key log.
    Returns: its number, None when the client sent nothing more, SEALED when it is
    encrypted and the server keeps no key log."""
    after = relay.client_records[1:]
    if not after:
        return None
    assert len(after) == 1, "more than one record after the ClientHello"
    record = after[0]
    if record[0] == T.CT_ALERT:
        return record[6]
    if keylog is None:
        return SEALED
    secret = keylog_secret(keylog, "CLIENT_HANDSHAKE_TRAFFIC_SECRET", relay.client_records[0])
    inner = RecordProtection(CryptographyTls13Primitives(), secret).open(record[:5],
                                                                         record[5:])
    assert inner[-1] == T.CT_ALERT and len(inner) == 3, inner.hex()
    assert inner[0] == T.ALERT_LEVEL_FATAL
    return inner[1]


SEALED = "sealed"


def bad_finished(messages):
    finished = messages[-1]
    return messages[:-1] + [finished[:-1] + bytes((finished[-1] ^ 0x01,))]


def without_certificate_verify(messages):
    return [m for m in messages if m[0] != T.HT_CERTIFICATE_VERIFY]


# -- record edits (client to server) ---------------------------------------------------------


TLS12_SUITE = b"\xc0\x2b"  # TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 (RFC 5289)


def downgrading_client_hello(index, record):
    """A middlebox's downgrade: the ClientHello without supported_versions (so TLS 1.2
    to the server) and with a TLS 1.2 suite added; the server answers TLS 1.2."""
    if index != 0:
        return record, GO
    body = record[9:]  # after the record header (5) and the handshake header (4)
    suites_at = 2 + 32 + 1 + body[2 + 32]  # legacy_version, random, legacy_session_id
    suites_end = suites_at + 2 + int.from_bytes(body[suites_at:suites_at + 2], "big")
    extensions_at = suites_end + 1 + body[suites_end]  # legacy_compression_methods
    extensions = body[extensions_at + 2:]
    kept = b""
    while extensions:
        size = 4 + int.from_bytes(extensions[2:4], "big")
        if int.from_bytes(extensions[:2], "big") != T.EXT_SUPPORTED_VERSIONS:
            kept += extensions[:size]
        extensions = extensions[size:]
    suites = body[suites_at + 2:suites_end] + TLS12_SUITE
    hello = (body[:suites_at] + len(suites).to_bytes(2, "big") + suites
             + body[suites_end:extensions_at] + len(kept).to_bytes(2, "big") + kept)
    message = bytes((T.HT_CLIENT_HELLO,)) + len(hello).to_bytes(3, "big") + hello
    return record[:3] + len(message).to_bytes(2, "big") + message, GO


# -- the servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    running = LineAndCloud(tmp_path_factory.mktemp("refusals"), devices=1)
    keylog = os.path.join(running.dir, "server-keys.log")
    # The listeners' own SSLContexts (server_ssl_context) log their secrets for the relay
    # that rewrites a flight; the contexts are otherwise untouched.
    running.contexts = {name: context for name, _app, _port, context in running.server._plan
                        if context is not None}
    for context in running.contexts.values():
        context.keylog_filename = keylog
    running.keylog = keylog
    yield running
    running.close()


@pytest.fixture(scope="module")
def broker(env, tmp_path_factory):
    from tests.cloud.mqtt_support import MqttFleet

    fleet = MqttFleet(tmp_path_factory.mktemp("refusals-mqtt"), line=env.line,
                      chips=env.chips)
    yield fleet
    fleet.close()


def _server(env, request, name):
    """(port, server certificate) of one of the project's listeners."""
    if name == "mosquitto":
        fleet = request.getfixturevalue("broker")
        path, port = fleet.files["server_cert"], fleet.broker.port
    else:
        path, port = env.server_cert, env.ports[name]
    with open(path, "rb") as f:
        return port, x509.load_pem_x509_certificate(f.read())


def _anchor(se):
    return bytes(se.get_data(C.DATA_TRUST_FLEET_ROOT, -1, 65536))


def _foreign_root():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "another fleet's root")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


class _RevokedServer:
    # A registry view for the root's CrlPublisher: the server certificate listed under its
    # issuer (the fleet root), as the root's CRL would list it once revoked.
    def __init__(self, certificate):
        self.issuer = certificate.issuer.rfc4514_string()
        self.record = type("Revoked", (), {
            "cert_serial": "%x" % certificate.serial_number, "revocation_reason":
            "keyCompromise", "revoked_at": "2026-01-01T00:00:00+00:00"})()

    def revoked_certificates(self, issuer):
        return [self.record] if issuer == self.issuer else []


def _revocation(env, se, certificate):
    """The agent's CRL cache of the fleet root, refreshed (verified in the SE) with a CRL
    the line's root key signed through the HSM, listing `certificate`."""
    line = env.line
    publisher = CrlPublisher(_RevokedServer(certificate), [
        CrlIssuer("root", line.hsm, line.labels["root"], line.root_cert)])
    point = line.root_cert.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    cache = CrlCache(se, MemoryStore(), point, line.root_cert.subject.public_bytes())
    now = int(time.time())
    cache.refresh(lambda: publisher.current_der("root"), now)
    return server_revocation([cache], lambda: now)


# -- the table ---------------------------------------------------------------------------------

# name: (client options(env, se, certificate) -> se_client_config kwargs, relay edits,
#        expected (type, reason, alert, check)).  Alert None: no alert applies (eof).
_DAY = 86400


def _at(seconds):
    return lambda: seconds


REFUSALS = {
    "wrong_server_name": (
        lambda env, se, cert: {"server_name": "verifier.fleet.example"}, {},
        (TlsCertificateError, "server_certificate", 42, "name")),
    "expired_certificate": (
        lambda env, se, cert: {"now": _at(int(cert.not_valid_after_utc.timestamp()) + _DAY)},
        {}, (TlsCertificateError, "server_certificate", 45, "validity")),
    "not_yet_valid_certificate": (
        lambda env, se, cert: {"now": _at(int(cert.not_valid_before_utc.timestamp()) - _DAY)},
        {}, (TlsCertificateError, "server_certificate", 42, "validity")),
    "chain_to_another_root": (
        lambda env, se, cert: {"anchors_der": [_foreign_root()]}, {},
        (TlsCertificateError, "server_certificate", 48, "path")),
    "revoked_server_certificate": (
        lambda env, se, cert: {"revocation": _revocation(env, se, cert)}, {},
        (TlsCertificateError, "server_certificate", 44, "revocation")),
    "truncated_record": (
        lambda env, se, cert: {}, {"to_client": at_first_encrypted(truncated)},
        (TlsError, "bad_record_mac", T.ALERT_BAD_RECORD_MAC, None)),
    "stream_cut_mid_record": (
        lambda env, se, cert: {}, {"to_client": at_first_encrypted(cut_mid_record)},
        (TlsError, "eof", None, None)),
    "oversized_record": (
        lambda env, se, cert: {}, {"to_client": at_first_encrypted(oversized)},
        (TlsError, "record_overflow", T.ALERT_RECORD_OVERFLOW, None)),
    "replayed_server_hello": (
        lambda env, se, cert: {}, {"to_client": replayed_server_hello},
        (TlsError, "unexpected_message", T.ALERT_UNEXPECTED_MESSAGE, None)),
    "downgrade_to_tls12": (
        lambda env, se, cert: {}, {"to_server": downgrading_client_hello},
        (TlsError, "protocol_version", T.ALERT_PROTOCOL_VERSION, None)),
    "bad_finished": (
        lambda env, se, cert: {}, {"flight": bad_finished},
        (TlsError, "bad_finished", T.ALERT_DECRYPT_ERROR, None)),
    "certificate_verify_missing": (
        lambda env, se, cert: {}, {"flight": without_certificate_verify},
        (TlsError, "unexpected_message", T.ALERT_UNEXPECTED_MESSAGE, None)),
}


def _cases():
    for case, (_options, edits, _expected) in REFUSALS.items():
        for server in SERVERS:
            if "flight" in edits and server not in KEYLOG_SERVERS:
                continue  # mosquitto writes no key log (module docstring)
            yield pytest.param(server, case, id="%s-%s" % (server, case))


def _refused(env, relay, options, driver="socket", keylog=None):
    """Handshake through `relay` with the SE's identity key, by TlsSocket (what HTTPS and
    the MQTT tunnel use on CPython) or Tls13Stream (the portable driver a board runs).
    Checks the client's socket is closed and the relay saw the client's side end.
    Returns: (the TlsError, the alert the server received: alert_on_the_wire)."""
    se = env.session(0)
    kwargs = {"anchors_der": [_anchor(se)], "server_name": "localhost"}
    kwargs.update(options)
    config, _ephemeral = se_client_config(se, C.SLOT_IDENTITY, **kwargs)
    sock = socket.create_connection((HOST, relay.port), WAIT)
    sock.settimeout(WAIT)
    if driver == "socket":
        tls = TlsSocket(sock, Tls13Client(config), handshake_timeout=WAIT)
    else:
        tls = Tls13Stream(sock, Tls13Client(config), SystemClock(), int(WAIT * 1000))
    try:
        with pytest.raises(FleetidError) as caught:
            tls.handshake()
        assert isinstance(caught.value, TlsError), repr(caught.value)
        assert sock.fileno() == -1  # the client's descriptor is closed
        assert relay.client_closed.wait(WAIT), "the server side never saw the close"
        wire = alert_on_the_wire(relay, keylog)
    finally:
        sock.close()
        relay.close()
    return caught.value, wire


@pytest.mark.parametrize("driver", ("socket", "stream"))
@pytest.mark.parametrize("server, case", list(_cases()))
def test_refusal_is_typed_and_leaves_no_connection(env, request, server, case, driver):
    options, edits, (kind, reason, alert, check) = REFUSALS[case]
    port, certificate = _server(env, request, server)
    se_options = options(env, env.session(0), certificate)
    relay_ref = []
    to_client = edits.get("to_client")
    if "flight" in edits:
        to_client = FlightRewrite(relay_ref, env.keylog, edits["flight"])
    relay = Relay(port, to_client=to_client, to_server=edits.get("to_server"))
    relay_ref.append(relay)
    keylog = env.keylog if server in KEYLOG_SERVERS else None
    error, wire = _refused(env, relay, se_options, driver, keylog)
    assert type(error) is kind, repr(error)
    assert (error.reason, error.alert) == (reason, alert), repr(error)
    # The alert reached the server (RFC 8446 6.2: a fatal alert, then close).
    assert wire in ((alert, SEALED) if alert is not None else (None,)), (wire, error)
    if check is not None:
        assert error.check == check, repr(error)


@pytest.mark.parametrize("server", KEYLOG_SERVERS)
def test_a_server_limited_to_tls12_is_refused(env, server):
    """The verifier's / EST's own context capped at TLS 1.2 (as a fleet that kept a TLS
    1.2-only listener would run it): the client offers TLS 1.3 only, so there is nothing
    in common.  The server's OpenSSL queues a protocol_version alert, but asyncio's TLS
    transport drops the connection on a failed handshake without flushing it: the client
    sees the close (eof) and raises it typed, as it would the alert."""
    context = env.contexts[server]
    saved = context.maximum_version
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        error, wire = _refused(env, Relay(env.ports[server]), {}, keylog=env.keylog)
    finally:
        context.maximum_version = saved
    assert wire is None  # nothing to answer a server that gave up
    if isinstance(error, TlsAlertReceived):
        assert error.alert in (T.ALERT_PROTOCOL_VERSION, T.ALERT_HANDSHAKE_FAILURE)
    else:
        assert (type(error), error.reason, error.alert) == (TlsError, "eof", None)


# -- the callers: each turns the refusal into its own typed error ---------------------------

# case -> expected reason per caller: the host HTTPS client (se_https.TlsClientError), the
# portable HTTPS client a board runs (device/https.HttpError), the MQTT transport
# (device/mqtt.TransportError: every TLS refusal is CONNECT).
CALLER_CASES = {
    "chain_to_another_root": ("server_certificate", "refused", "connect"),
    "oversized_record": ("handshake", "handshake", "connect"),
    "stream_cut_mid_record": ("handshake", "link", "connect"),
    "downgrade_to_tls12": ("handshake", "handshake", "connect"),
    "bad_finished": ("handshake", "handshake", None),
}
CALLERS = (("se_https", "verifier"), ("device_https", "est"), ("mqtt", "mosquitto"))


def _call(env, request, caller, relay, options):
    from fleetid.device.host.se_https import SeTlsClient
    from fleetid.device.https import HttpsClient

    se = env.session(0)
    anchors = options.get("anchors_der", [_anchor(se)])
    chain = [bytes(se.get_cert(C.SLOT_IDENTITY))]
    if caller == "se_https":
        client = SeTlsClient(se, C.SLOT_IDENTITY, chain, anchors, connect_timeout=WAIT,
                             io_timeout=WAIT)
        client.request(HOST, relay.port, "GET", "/v1/whoami")
    elif caller == "device_https":
        HttpsClient(se, anchors, lambda: int(time.time()), CryptographyTls13Primitives(),
                    timeout_s=WAIT).request(
            C.SLOT_IDENTITY, "https://%s:%d" % (HOST, relay.port), "GET", "/healthz")
    else:
        from fleetid.device.host.mqtt_paho import PahoSeTransport

        fleet = request.getfixturevalue("broker")
        transport = PahoSeTransport(se, C.SLOT_IDENTITY, fleet.chain_der(se), anchors, HOST,
                                    relay.port, timeout=WAIT)
        try:
            transport.connect()
        finally:
            transport.close()


def _caller_cases():
    for case, reasons in sorted(CALLER_CASES.items()):
        for (caller, server), expected in zip(CALLERS, reasons):
            if expected is not None:  # None: mosquitto writes no key log (docstring)
                yield pytest.param(caller, server, case, expected,
                                   id="%s-%s" % (caller, case))


@pytest.mark.parametrize("caller, server, case, expected", list(_caller_cases()))
def test_each_caller_raises_its_typed_error_and_leaves_no_connection(env, request, caller,
                                                                      server, case, expected):
    options, edits, _expected = REFUSALS[case]
    port, certificate = _server(env, request, server)
    relay_ref = []
    to_client = edits.get("to_client")
    if "flight" in edits:
        to_client = FlightRewrite(relay_ref, env.keylog, edits["flight"])
    relay = Relay(port, to_client=to_client, to_server=edits.get("to_server"))
    relay_ref.append(relay)
    try:
        with pytest.raises(FleetidError) as caught:
            _call(env, request, caller, relay, options(env, env.session(0), certificate))
        assert caught.value.reason == expected, repr(caught.value)
        assert "internal" not in str(caught.value), repr(caught.value)  # no bug behind it
        assert not isinstance(caught.value, TlsError)  # the caller's own type
        assert relay.client_closed.wait(WAIT), "the server side never saw the close"
    finally:
        relay.close()
