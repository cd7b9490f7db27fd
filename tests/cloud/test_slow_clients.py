"""Slow and abruptly closing clients against the cloud's own listeners (issue 19, item 6):
the verifier (mTLS), the EST server (TLS) and the revocation listener (plain HTTP: CRLs,
OCSP, the compact set), all in one CloudServer on loopback (on uvloop and on asyncio's
loop), run with short timeouts (ServerTimeouts) so each case ends in a second or two.

Each hostile client is real bytes on a real socket: a ClientHello cut in half, a request
head dribbled a byte at a time (slowloris), a body that stops arriving, a body abandoned by
a close, a body announced or streamed far over the limit.  For each: the server ends the
connection itself within a bounded wait (the test's BOUND, many times the configured
timeouts; nothing here times the server), a good client on the same listener is served
while the hostile one is held, and the registry, audit chain and HSM counters are as they
were (Fleet.snapshot).
"""

import http.client
import logging
import socket
import ssl
import threading
import time
import urllib.request

import pytest

from fleetid.cloud.http.middleware import ServerTimeouts
from fleetid.cloud.revocation import tiers
from fleetid.cloud.revocation.crl import CrlIssuer, CrlPublisher
from tests.cloud.cloud_support import Fleet, RunningCloud

HOUR = 3600.0
TIMEOUTS = ServerTimeouts(handshake=1.0, idle=1.0, body=1.0, linger=0.5)
BOUND = 20.0  # seconds the test waits at most for the server to end a connection
DRIBBLE = 0.2  # seconds between the slowloris client's bytes
LISTENERS = ("verifier", "est", "crl")
TLS_LISTENERS = ("verifier", "est")
# A POST per listener whose body the server reads: (path, content type).
POSTS = {
    "verifier": ("/v1/telemetry", "application/json"),
    "est": ("/.well-known/est/simpleenroll", "application/pkcs10"),
    "crl": ("/ocsp", "application/ocsp-request"),
}


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def served(request, tmp_path_factory):
    """The cloud on uvloop (what `fleetid cloud serve` runs when it is installed: its own
    TLS transport and handshake timer) and on asyncio's loop (the fallback)."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    folder = tmp_path_factory.mktemp("slow-clients")
    fleet = Fleet(folder / "fleet")
    device = fleet.provision("b42")
    state = str(folder / "state")
    issuers = [("ca-widget-b42", fleet.ca_certs["b42"])]
    tiers.init_keys(fleet.hsm, state, "fleet-root", fleet.root, issuers)
    registry_view, crl_issuers = tiers.with_root_crl(
        fleet.hsm, fleet.registry, [fleet.root],
        [CrlIssuer("b42", fleet.hsm, "ca-widget-b42", fleet.ca_certs["b42"])],
        fleet.revoked_cas_path)
    crl = CrlPublisher(registry_view, crl_issuers, poll_interval=HOUR)
    revocation = tiers.load(fleet.hsm, fleet.registry, state, fleet.root, issuers,
                            fleet.revoked_cas_path, crl)
    try:
        with RunningCloud(fleet, crl_publisher=crl, crl_port=0, revocation_tiers=revocation,
                          timeouts=TIMEOUTS, event_loop=request.param) as cloud:
            yield fleet, device, cloud
    finally:
        fleet.close()


# -- clients -------------------------------------------------------------------------------------


def _connect(cloud, listener, files):
    """A connected socket to `listener`: TLS (handshake done, the device's certificate
    presented) or plain TCP for the revocation listener."""
    raw = socket.create_connection(("127.0.0.1", cloud.ports[listener]), timeout=BOUND)
    if listener not in TLS_LISTENERS:
        return raw
    return cloud.client_context(files).wrap_socket(raw, server_hostname="127.0.0.1")


def _ended_by_server(sock, dribble=None, end=None):
    """Read (and, with `dribble`, send one byte of it per DRIBBLE seconds) until the server
    ends the connection or BOUND passes (or `end`, a time.monotonic() deadline).
    Returns (ended, bytes the server sent)."""
    received = b""
    end = time.monotonic() + BOUND if end is None else end
    sock.settimeout(DRIBBLE)
    while time.monotonic() < end:
        try:
            data = sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            if dribble:
                try:
                    sock.sendall(dribble[:1])
                except OSError:
                    return True, received
                dribble = dribble[1:] or b"x"
            continue
        except (ConnectionError, ssl.SSLError, OSError):
            return True, received
        if not data:
            return True, received
        received += data
    return False, received


def _good_request(cloud, listener, files):
    """One ordinary request a well-behaved client makes to `listener`: its status."""
    if listener == "crl":
        url = "http://127.0.0.1:%d/crl/b42.crl" % cloud.ports["crl"]
        with urllib.request.urlopen(url, timeout=BOUND) as answer:
            return answer.status
    path = "/healthz" if listener == "verifier" else "/.well-known/est/cacerts"
    return cloud.request(listener, "GET", path, files=files)[0]


def _head(listener, length=None, chunked=False):
    path, content_type = POSTS[listener]
    lines = ["POST %s HTTP/1.1" % path, "Host: 127.0.0.1", "Content-Type: " + content_type]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append("Content-Length: %d" % length)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _partial_client_hello(cloud):
    """The first half of a real TLS ClientHello (Python's ssl, through memory BIOs)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = cloud.client_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    return hello[:len(hello) // 2]


# -- the hostile clients ---------------------------------------------------------------------
# Each takes (cloud, listener, files) and returns (ended by the server, bytes it sent).


def stalls_mid_handshake(cloud, listener, files):
    sock = socket.create_connection(("127.0.0.1", cloud.ports[listener]), timeout=BOUND)
    with sock:
        sock.sendall(_partial_client_hello(cloud))
        return _ended_by_server(sock)


def dribbles_the_head(cloud, listener, files):
    with _connect(cloud, listener, files) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        return _ended_by_server(sock, dribble=b"X-Slow: " + b"a" * 4000 + b"\r\n")


def stops_mid_body(cloud, listener, files):
    with _connect(cloud, listener, files) as sock:
        sock.sendall(_head(listener, 1000) + b"A" * 10)
        return _ended_by_server(sock)


HUGE = 1 << 36  # 64 GiB: more than any loopback carries within BOUND


def sends_a_huge_body(cloud, listener, files):
    """Announces 64 GiB and streams it as fast as the server takes it."""
    with _connect(cloud, listener, files) as sock:
        sock.sendall(_head(listener, HUGE))
        return _stream_until_ended(sock)


def streams_a_huge_chunked_body(cloud, listener, files):
    """No length announced: chunks until the server has had enough."""
    with _connect(cloud, listener, files) as sock:
        sock.sendall(_head(listener, chunked=True))
        return _stream_until_ended(sock, b"%x\r\n%s\r\n" % (65536, b"A" * 65536))


def _stream_until_ended(sock, piece=b"A" * 65536):
    # Send until the server stops taking the body (its close makes a send fail), then
    # read its answer; both within one BOUND.
    end = time.monotonic() + BOUND
    sock.settimeout(BOUND)
    sent = 0
    while time.monotonic() < end and sent < HUGE:
        try:
            sock.sendall(piece)
            sent += len(piece)
        except OSError:
            break  # the server closed while we were sending
    return _ended_by_server(sock, end=end)


HOSTILE = {
    "stalls_mid_handshake": (stalls_mid_handshake, TLS_LISTENERS, None),
    "dribbles_the_head": (dribbles_the_head, LISTENERS, None),
    "stops_mid_body": (stops_mid_body, LISTENERS, b"HTTP/1.1 408"),
    "sends_a_huge_body": (sends_a_huge_body, LISTENERS, b"HTTP/1.1 413"),
    "streams_a_huge_chunked_body": (streams_a_huge_chunked_body, LISTENERS, b"HTTP/1.1 413"),
}


def _cases():
    for name, (_client, listeners, _answer) in HOSTILE.items():
        for listener in listeners:
            yield pytest.param(name, listener, id="%s-%s" % (listener, name))


@pytest.mark.parametrize("case, listener", list(_cases()))
def test_the_server_bounds_the_wait_keeps_serving_and_changes_nothing(served, case,
                                                                      listener):
    fleet, device, cloud = served
    client, _listeners, answer = HOSTILE[case]
    files = device.files()
    assert _good_request(cloud, listener, files) == 200  # a CRL signed once, before
    before = fleet.snapshot()
    outcome = {}

    def run():
        try:
            outcome["result"] = client(cloud, listener, files)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test
            outcome["error"] = exc

    hostile = threading.Thread(target=run, daemon=True)
    hostile.start()
    # While the hostile client holds its connection, others are served.
    assert _good_request(cloud, listener, files) == 200
    hostile.join(BOUND * 2 + 5)
    if "error" in outcome:
        raise outcome["error"]
    assert "result" in outcome, "the hostile client never returned"
    ended, received = outcome["result"]
    assert ended, "the server kept the connection past %d s" % BOUND
    if answer is not None:
        assert received.startswith(answer), received[:200]
    assert _good_request(cloud, listener, files) == 200
    assert fleet.snapshot() == before


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_client_closing_mid_body_is_no_internal_error(served, listener, caplog):
    """A client gone mid-body is the client's doing: no 'internal error' logged (the log
    is where operators look for bugs), nothing written, the next client served."""
    fleet, device, cloud = served
    files = device.files()
    assert _good_request(cloud, listener, files) == 200
    before = fleet.snapshot()
    with caplog.at_level(logging.INFO, logger="fleetid.cloud"):
        with _connect(cloud, listener, files) as sock:
            sock.sendall(_head(listener, 1000) + b"A" * 10)
        assert _good_request(cloud, listener, files) == 200
        # the server's handler for the abandoned request has ended by now or soon: wait
        # (bounded) for its access line, if it writes one, before looking at the log
        end = time.monotonic() + 2 * TIMEOUTS.body + 1
        while time.monotonic() < end and not any(
                getattr(r, "fields", {}).get("path") == POSTS[listener][0]
                for r in caplog.records):
            time.sleep(0.05)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [(r.getMessage(), getattr(r, "fields", None)) for r in errors]
    assert fleet.snapshot() == before


def test_default_timeouts_bound_every_wait():
    timeouts = ServerTimeouts()
    for name in ("handshake", "idle", "body", "linger", "stop"):
        assert 0 < getattr(timeouts, name) <= 60, name
    assert timeouts.runner_options()["shutdown_timeout"] == timeouts.stop
    with pytest.raises(ValueError):
        ServerTimeouts(body=0)
    with pytest.raises(ValueError):
        ServerTimeouts(handshake=None)
