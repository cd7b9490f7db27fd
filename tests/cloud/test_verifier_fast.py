"""The verifier's fast path (cloud/http/verifier_fast.py): GET /v1/whoami and /healthz
answered off aiohttp's request path with the same checks and the same answers as the
aiohttp app, everything else handed to the app on the same connection.

Each comparison asks the same question twice on the same server: once on the fast route,
once in a form the fast path hands over (a query string: aiohttp's router ignores it), so
the app's answer is the reference.
"""

import json
import socket
import ssl

import pytest

from fleetid.cloud.http import verifier_fast
from tests.cloud.cloud_support import HandedOverApp, RecordingTransport, check_flow_control, \
    pad_headers, read_answers, rogue_certificate


def _connect(cloud, files):
    raw = socket.create_connection(("127.0.0.1", cloud.ports["verifier"]), timeout=20)
    context = cloud.client_context(files)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def _ask(cloud, files, target, method="GET", extra=b""):
    with _connect(cloud, files) as tls:
        tls.sendall(b"%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s\r\n"
                    % (method.encode(), target.encode(), extra))
        return read_answers(tls, 1, head_only=method == "HEAD")[0]


def _same_answer(fast, app):
    """The fast path's answer is the app's: status, body, content type, challenge."""
    assert fast[0] == app[0]
    assert fast[2] == app[2]
    for header in ("content-type", "www-authenticate"):
        assert fast[1].get(header) == app[1].get(header), header


def test_every_verdict_is_the_apps_answer(fleet, cloud):
    good = fleet.provision()
    fleet.enrol(good)
    rogue = fleet.provision()
    rogue_files = rogue.files(*rogue_certificate(fleet, rogue)[::-1])
    revoked = fleet.provision()
    fleet.enrol(revoked)
    fleet.revoke_certificate(revoked.cert, "keyCompromise")
    for files, status, start in ((good.files(), 200, b"{"),
                                 (None, 401, b"no_client_certificate:"),
                                 (rogue_files, 403, b"attestation:"),
                                 (revoked.files(), 403, b"revoked:")):
        for path in ("/v1/whoami", "/healthz"):
            fast = _ask(cloud, files, path)
            assert fast[0] == status and fast[2].startswith(start), fast
            _same_answer(fast, _ask(cloud, files, path + "?via=app"))
    assert json.loads(_ask(cloud, good.files(), "/v1/whoami")[2])["serial"] == good.name


def test_requests_counted_under_the_apps_endpoint_names(fleet, cloud):
    device = fleet.provision()
    _ask(cloud, device.files(), "/v1/whoami")
    _ask(cloud, None, "/healthz")
    requests = cloud.server.metrics.requests
    assert requests.labels("verifier", "/v1/whoami", "200")._value.get() == 1
    assert requests.labels("verifier", "/healthz", "401")._value.get() == 1


def test_keep_alive_pipelining_and_hand_over_on_one_connection(fleet, cloud):
    device = fleet.provision()
    fleet.enrol(device)
    with _connect(cloud, device.files()) as tls:
        # two fast requests in one write, answered in order
        tls.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        (s1, _, b1), (s2, _, b2) = read_answers(tls, 2)
        assert s1 == 200 and json.loads(b1)["serial"] == device.name
        assert s2 == 200 and json.loads(b2) == {"ok": True}
        # then a route the fast path does not serve: aiohttp takes the connection over
        body = b'{"temperature": 21}'
        tls.sendall(b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        status, _, answer = read_answers(tls, 1)[0]
        assert status == 202 and json.loads(answer) == {"accepted": 1}
        # and keeps it: the app answers whoami too now
        tls.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, answer = read_answers(tls, 1)[0]
        assert status == 200 and json.loads(answer)["serial"] == device.name


@pytest.mark.parametrize("method, extra, status", [
    ("HEAD", b"", 200),                                  # aiohttp's GET route answers HEAD
    ("GET", b"Content-Length: 0\r\n", 200),              # no body: still the fast path
    ("DELETE", b"", 405),
])
def test_other_forms_are_answered_by_the_app(fleet, cloud, method, extra, status):
    device = fleet.provision()
    assert _ask(cloud, device.files(), "/v1/whoami", method, extra)[0] == status


def test_a_get_with_a_body_or_a_bad_head_goes_to_aiohttp(fleet, cloud):
    device = fleet.provision()
    with _connect(cloud, device.files()) as tls:
        tls.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                    b"Connection: close\r\n\r\nhi")
        assert read_answers(tls, 1)[0][0] == 200  # the app read (and ignored) the body
    with _connect(cloud, device.files()) as tls:
        tls.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        data = tls.recv(4096)
    assert data.startswith(b"HTTP/1.1 400") or data.startswith(b"HTTP/1.0 400"), data


def test_a_head_over_the_bound_is_refused_by_aiohttp(fleet, cloud):
    device = fleet.provision()
    with _connect(cloud, device.files()) as tls:
        tls.sendall(b"GET /v1/whoami HTTP/1.1\r\nX-Big: " + b"a" * (verifier_fast.MAX_HEAD + 10)
                    + b"\r\n\r\n")
        try:
            data = tls.recv(4096)
        except (ConnectionError, ssl.SSLError):
            data = b""
    assert not data.startswith(b"HTTP/1.1 200"), data


def test_http10_closes_unless_kept_alive(fleet, cloud):
    device = fleet.provision()
    with _connect(cloud, device.files()) as tls:
        tls.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = read_answers(tls, 1)[0]
        assert status == 200 and headers["connection"].lower() == "keep-alive"
        tls.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        status, headers, _ = read_answers(tls, 1)[0]
        assert status == 200 and headers["connection"].lower() == "close"
        assert tls.recv(1) == b""


def test_a_client_that_reads_no_answer_stops_being_read_and_answered(fleet):
    import asyncio

    from fleetid.cloud.http.verifier_fast import VerifierConnection, VerifierFastPath

    async def scenario():
        fast = VerifierFastPath(fleet.verifier)
        check_flow_control(fast, VerifierConnection(fast, fallback=None),
                           b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")

    asyncio.run(scenario())


def test_a_whole_head_over_max_head_is_handed_to_aiohttp(fleet):
    import asyncio

    from fleetid.cloud.http.verifier_fast import VerifierConnection, VerifierFastPath

    async def scenario():
        fast = VerifierFastPath(fleet.verifier)
        app = HandedOverApp()
        connection = VerifierConnection(fast, fallback=lambda: app)
        transport = RecordingTransport()
        connection.connection_made(transport)
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + pad_headers(3) + b"\r\n"
        connection.data_received(head)  # whole, in one read (TLS joins reads)
        assert app.data == head and not transport.written
        fast.close_all()

    asyncio.run(scenario())
