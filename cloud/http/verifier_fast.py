"""The verifier's fast path: its hot GET routes answered by a lean asyncio protocol around
aiohttp's own HTTP parser; every other request handed, with its connection, to the
verifier's aiohttp application.

    fast = VerifierFastPath(verifier, metrics, keepalive_timeout=..)
    site = VerifierFastSite(runner, host, port, fast, ssl_context=context)  # not TCPSite
    await site.start()

Why: a device's request on a resumed session costs the verifier a cached verdict and
one memoised registry read (~0.05 ms), and aiohttp's per-connection machinery (a
request handler and its task, request and response objects, router, two middlewares)
cost several times that: in bench/mtls.py the bare aiohttp floor alone was 0.6x the
connections per server CPU-second of nginx with the same session mechanism.  So the
routes a device calls on every connection are taken off that path:

    GET /v1/whoami       the authenticated identity (JSON), as verifier_app's whoami
    GET /healthz         {"ok": true}, after the same authentication

with no body (no Content-Length above 0, not chunked, no Expect).  Each connection
starts in this protocol; at each request boundary it looks at the request line.  One of
those routes is parsed by aiohttp's HttpRequestParser (request line and headers
validated by aiohttp; the only bytes looked at here are the request line, to pick the
route, and the end of the head) and answered here; anything else (the POST routes, other
paths, HEAD, a query string, a head aiohttp refuses, a body) hands the connection and
the bytes not yet consumed to aiohttp's protocol (transport.set_protocol), which serves
it through the app, its middlewares and the error table as before.

The same checks as the app's authenticate middleware, in the same place: the TLS client
certificate of this connection (none: 401 no_client_certificate) through
FleetVerifier.verify, every check of its CHECKS list on every request (cached chain and
attestation verdicts, the registry read, revocation, validity); refusals rendered from
the one status table (cloud/http/errors.py, WWW-Authenticate on 401); registry and HSM
failures logged and answered 503, anything else logged and answered 500 (internal causes
never reach the client); the metrics counter and latency histogram under the same
endpoint names; the JSON access line when INFO is enabled; the OCSP staple header when
the server has one (revocation_app.attach_staple_header's, for the aiohttp routes).

Bounds: a request head of at most MAX_HEAD bytes, whether it arrives whole or in pieces
(longer: handed to aiohttp, which bounds each line and the number of header lines, not
the head as a whole, and refuses or serves it); answers wait (and reading pauses) while the transport's write buffer is
over its high-water mark, so a client that pipelines and never reads holds a bounded
amount of memory; a connection with no complete request head for `keepalive_timeout` seconds
is closed (the listener's ServerTimeouts.idle, as aiohttp's keepalive_timeout; checked
every SWEEP_SECONDS by one timer per listener, not one per connection); the TLS
handshake and shutdown bounds are the site's ssl_bounds (cloud/http/sites.py).
"""

import json
import time

from aiohttp.http import HttpProcessingError

from fleetid.cloud.http.fast_path import KEEPALIVE_TIMEOUT, MAX_HEAD, FastConnection, \
    FastPath, FastSite, error_answer
from fleetid.cloud.http.middleware import failure_error
from fleetid.cloud.revocation.staple import STAPLE_HEADER
from fleetid.cloud.verifier.errors import CloudError

SERVICE = "verifier"
# request line -> endpoint name (the aiohttp route's canonical path, for the metrics)
ROUTES = {b"GET /v1/whoami HTTP/1.1": "/v1/whoami", b"GET /v1/whoami HTTP/1.0": "/v1/whoami",
          b"GET /healthz HTTP/1.1": "/healthz", b"GET /healthz HTTP/1.0": "/healthz"}
JSON_TYPE = b"Content-Type: application/json; charset=utf-8"
HEALTHZ_BODY = json.dumps({"ok": True}).encode()


class VerifierFastPath(FastPath):
    """What the fast-path connections of the verifier's listener share.

    Params: verifier: the FleetVerifier.  metrics: Metrics or None.  keepalive_timeout:
        seconds (module text).  staple: a ServerStaple whose header_value() goes on every
        answer (set it before connections arrive), or None.
    """

    def __init__(self, verifier, metrics=None, keepalive_timeout=KEEPALIVE_TIMEOUT,
                 staple=None):
        super().__init__(keepalive_timeout)
        self.verifier = verifier
        self.metrics = metrics
        self.staple = staple


class VerifierConnection(FastConnection):
    """One client connection while it calls the fast routes (see the module text)."""

    __slots__ = ("fast", "fallback", "transport", "peer", "buffer", "pos", "loop",
                 "last_active", "write_paused")

    def __init__(self, fast, fallback):
        super().__init__(fast, fallback)
        # bytes received; those before `pos` are answered (pipelined requests are taken
        # off by moving `pos`, the rest copied once per data_received, not per request)
        self.buffer = b""
        self.pos = 0

    def data_received(self, data):
        self.buffer = self.buffer[self.pos:] + data if self.buffer else data
        self.pos = 0
        self._process()

    def _process(self):
        while self.pos < len(self.buffer) and not self.write_paused \
                and not self.transport.is_closing():
            if not self._next_request():
                return

    def _next_request(self):
        """Answer the request at the start of the buffer when its head is whole.  True to
        look for another one; False to wait for more bytes (or after handing over)."""
        buffer, pos = self.buffer, self.pos
        line_end = buffer.find(b"\r\n", pos)
        if line_end < 0:
            if len(buffer) - pos > MAX_HEAD:
                self._hand_over()  # aiohttp refuses the over-long line
            return False
        endpoint = ROUTES.get(buffer[pos:line_end])
        if endpoint is None:
            self._hand_over()
            return False
        end = buffer.find(b"\r\n\r\n", line_end)
        if end < 0:
            if len(buffer) - pos > MAX_HEAD:
                self._hand_over()
            return False
        head = buffer[pos:end + 4]
        try:
            message = self.fast.parse_head(head)
        except HttpProcessingError:
            self._hand_over()  # aiohttp answers 400 and logs it as it does for any route
            return False
        if message.chunked or message.length or message.expect_continue:
            self._hand_over()  # a body: aiohttp reads and bounds it
            return False
        if end + 4 == len(buffer):
            self.buffer, self.pos = b"", 0
        else:
            self.pos = end + 4
        self._answer(message, endpoint)
        return True

    def _hand_over(self):
        data, self.buffer, self.pos = self.buffer[self.pos:], b"", 0
        self.give_to_app(data)

    def _answer(self, message, endpoint):
        """verifier_app's authenticate middleware and handler, for one request."""
        started = time.perf_counter()
        identity = reason = None
        try:
            identity = self.fast.verifier.verify(self.client_certificate())
            if endpoint == "/v1/whoami":
                body = json.dumps(identity.as_json()).encode()
            else:
                body = HEALTHZ_BODY
            status, headers = 200, [JSON_TYPE]
        except Exception as exc:  # noqa: BLE001 - internal causes: logged, never sent
            if not isinstance(exc, CloudError):
                exc = failure_error(exc, SERVICE, message.path)
            status, headers, body = error_answer(exc)
            reason = exc.reason
        self._write(status, headers, body, message, endpoint, started, identity, reason)

    def _write(self, status, headers, body, message, endpoint, started, identity, reason):
        staple = self.fast.staple
        if staple is not None:
            try:
                headers = headers + [("%s: %s" % (STAPLE_HEADER,
                                                  staple.header_value())).encode()]
            except Exception:  # noqa: BLE001 - no staple is better than no answer
                pass
        self.served(SERVICE, endpoint, status, message, started, reason, identity)
        self.send(status, headers, body, message, message.should_close)


class VerifierFastSite(FastSite):
    """The verifier listener's site: connections start in VerifierConnection (FastSite)."""

    connection_class = VerifierConnection
