"""The OCSP fast path of the revocation listener: OCSP requests answered by a lean
asyncio protocol around aiohttp's own HTTP parser; every other request handed, with its
connection, to the listener's aiohttp application.

    fast = OcspFastPath(ocsp_tier, client_limits=limits, watcher=watcher, metrics=metrics)
    site = OcspFastSite(runner, host, port, fast)     # instead of web.TCPSite
    await site.start()

Why: an OCSP answer from the pre-signed cache (cloud/revocation/ocsp_cache.py) is a
dictionary lookup, and aiohttp's per-request machinery (request and response objects,
a task per request, router, middlewares) cost several times that: in bench/ocsp.py the
bare aiohttp floor alone used more server CPU per response than `openssl ocsp` signing
each one.  So the requests the OCSP tier serves are taken off that path:

    POST /ocsp, POST /ocsp/          application/ocsp-request, Content-Length <= 4096
    GET|HEAD /ocsp/<base64>          RFC 6960 A.1 / RFC 5019 5 (not /ocsp/staple)

Each connection starts in this protocol.  At each request boundary it looks at the
request line: an OCSP route is parsed by aiohttp's HttpRequestParser (request line and
headers validated by aiohttp: no HTTP parsing of our own beyond finding the end of the
head and counting Content-Length bytes) and answered here; anything else (CRLs, the
compact set, the staple, unknown paths, chunked bodies) hands the connection and the
bytes not yet consumed to aiohttp's protocol (transport.set_protocol), which serves it
through the app, middlewares and error table as before.  The same checks as the app's
route: the per-client token bucket (429 rate_limited, Retry-After), the event-file poll
(one stat), the content type (415), the body limit (413); refusals rendered from the one
status table (cloud/http/errors.py); the metrics counter and latency histogram under the
same endpoint names; the JSON access line when INFO is enabled.

Bounds: a request head of at most MAX_HEAD bytes, a body of at most MAX_REQUEST; a
connection with no complete request head for `keepalive_timeout` seconds is closed, and one
whose body does not arrive whole within `body_timeout` seconds of its head gets 408
request_timeout and is closed (the listener's ServerTimeouts idle and body, as on the
aiohttp path; checked every SWEEP_SECONDS); one request at a
time per connection (reading pauses while a signature is made in a worker thread, so
pipelined requests are answered in order).
"""

import asyncio
import email.utils
import logging
import time

from aiohttp import web
from aiohttp.http import HttpProcessingError, HttpRequestParser

from fleetid.cloud.hsm.errors import HsmError
from fleetid.cloud.http.errors import HTTP_STATUS, WWW_AUTHENTICATE
from fleetid.cloud.registry import RegistryError
from fleetid.cloud.revocation.ocsp import MAX_REQUEST, OCSP_REQUEST_TYPE
from fleetid.cloud.revocation.tier import Deferred
from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import CloudError, RateLimited

log = logging.getLogger("fleetid.cloud")

SERVICE = "revocation"
MAX_HEAD = 8190  # aiohttp's own max_line_size / max_field_size default
KEEPALIVE_TIMEOUT = 75.0  # aiohttp's default keepalive_timeout
BODY_TIMEOUT = 30.0  # ServerTimeouts' default body bound
SWEEP_SECONDS = 1.0  # how often idle connections are looked for
MAX_HEADS = 1024  # distinct request heads remembered (parse_head)
MAX_DRAIN = 65536  # a refused body up to this size is read and dropped before closing
_REASON = {200: b"OK", 304: b"Not Modified", 400: b"Bad Request", 413: b"Payload Too Large",
           415: b"Unsupported Media Type", 429: b"Too Many Requests",
           500: b"Internal Server Error", 503: b"Service Unavailable"}


class HttpDate:
    """The Date header (RFC 9110 6.6.1), formatted once per second."""

    second = None
    value = b""

    @classmethod
    def now(cls):
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.value = email.utils.formatdate(second, usegmt=True).encode()
        return cls.value


def _route(line):
    """The endpoint name of an OCSP request line, or None for anything else."""
    parts = line.split(b" ")
    if len(parts) != 3:
        return None
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method == b"POST" and target in (b"/ocsp", b"/ocsp/"):
        return target.decode()
    if method in (b"GET", b"HEAD") and target.startswith(b"/ocsp/") and len(target) > 6 \
            and target != b"/ocsp/staple":
        return "/ocsp/{request}"
    return None


class OcspFastPath:
    """What the OCSP connections of one listener share.

    Params: tier: the OcspTier (answer(der) / answer_path(text) -> Reply or Deferred).
        client_limits: ClientRateLimits or None.  watcher: EventWatcher polled per
        request, or None.  metrics: Metrics or None.  keepalive_timeout, body_timeout:
        seconds (see the module text).
    """

    def __init__(self, tier, client_limits=None, watcher=None, metrics=None,
                 keepalive_timeout=KEEPALIVE_TIMEOUT, body_timeout=BODY_TIMEOUT):
        self.tier = tier
        self.client_limits = client_limits
        self.watcher = watcher
        self.metrics = metrics
        self.keepalive_timeout = keepalive_timeout
        self.body_timeout = body_timeout
        self.connections = set()
        self._sweeper = None
        self._heads = {}  # request head bytes -> HeadFacts (clients repeat their heads)
        self._parser = None

    def parse_head(self, head):
        """HeadFacts of a complete request head (through "\r\n\r\n"), parsed by
        aiohttp's HttpRequestParser; the same bytes parse the same, so a head seen before
        is not parsed again (at most MAX_HEADS kept).  Raises HttpProcessingError."""
        facts = self._heads.get(head)
        if facts is None:
            # A parser of its own per head: it is then never left waiting for a body.
            parser = HttpRequestParser(NoFlowControl, asyncio.get_running_loop(), 2**16,
                                       max_line_size=MAX_HEAD, max_field_size=MAX_HEAD)
            messages, _, _ = parser.feed_data(head)
            if not messages:
                raise HttpProcessingError(message="not a complete request head")
            facts = HeadFacts(messages[0][0])
            if len(self._heads) >= MAX_HEADS:
                self._heads.clear()
            self._heads[head] = facts
        return facts

    def add(self, connection):
        self.connections.add(connection)
        if self._sweeper is None:
            self._sweeper = connection.loop.call_later(SWEEP_SECONDS, self._sweep)

    def _sweep(self):
        # Connections with no complete request for keepalive_timeout seconds (idle, or
        # a slow client) are closed, like aiohttp's own keep-alive bound; one timer per
        # listener instead of one per request.
        self._sweeper = None
        if not self.connections:
            return
        loop = next(iter(self.connections)).loop
        now = loop.time()
        for connection in list(self.connections):
            if connection.busy:
                continue
            if connection.pending is not None:  # a head in, its body not yet whole
                if connection.body_since < now - self.body_timeout:
                    connection.time_out_body()
            elif connection.last_active < now - self.keepalive_timeout:
                connection.transport.close()
                self.connections.discard(connection)
        if self.connections:
            self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep)

    def close_all(self):
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self.connections):
            connection.transport.close()
        self.connections.clear()


class NoFlowControl:
    """The parser's payload reader may ask its protocol to pause: heads only here."""

    @staticmethod
    def pause_reading(*args, **kwargs):
        pass

    @staticmethod
    def resume_reading(*args, **kwargs):
        pass


class HeadFacts:
    """What the fast path needs of a parsed request head (aiohttp RawRequestMessage)."""

    __slots__ = ("method", "path", "version", "should_close", "chunked", "length",
                 "content_type", "expect_continue", "if_none_match")

    def __init__(self, message):
        self.method = message.method
        self.path = message.path
        self.version = message.version
        self.should_close = message.should_close
        self.chunked = message.chunked
        self.length = int(message.headers.get("Content-Length") or 0)
        self.content_type = message.headers.get("Content-Type", "").split(";", 1)[0] \
            .strip().lower()
        self.expect_continue = message.headers.get("Expect", "").lower() == "100-continue"
        match = message.headers.get("If-None-Match")
        self.if_none_match = None if match is None else \
            [tag.strip() for tag in match.split(",")]


class OcspConnection(asyncio.Protocol):
    """One client connection while it asks OCSP questions (see the module text)."""

    def __init__(self, fast, fallback):
        self.fast = fast
        self.fallback = fallback  # aiohttp's protocol factory (the runner's web.Server)
        self.transport = None
        self.buffer = bytearray()
        self.pending = None  # (message, endpoint, body length) of a head being read
        self.busy = False
        self.write_paused = False  # the transport's write buffer is over its high-water mark
        self.draining = 0  # bytes of a refused body still to read and drop

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.loop = asyncio.get_running_loop()
        self.last_active = self.loop.time()
        self.fast.add(self)

    def connection_lost(self, exc):
        self.fast.connections.discard(self)

    # A client that pipelines requests and reads no answer: while the write buffer is over
    # its high-water mark, nothing is answered or read (memory stays bounded; the idle
    # sweep closes a client that never reads).  As the verifier's fast path does.

    def pause_writing(self):
        self.write_paused = True
        self.transport.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        if not self.busy and not self.transport.is_closing():
            self.transport.resume_reading()
            self._process()

    def data_received(self, data):
        self.buffer += data
        if self.draining:
            self._drain()
        elif not self.busy and not self.write_paused:
            self._process()

    def _drain(self):
        taken = min(self.draining, len(self.buffer))
        del self.buffer[:taken]
        self.draining -= taken
        if not self.draining:
            self.transport.close()

    # -- requests -----------------------------------------------------------------------------

    def _process(self):
        while not self.busy and not self.write_paused and not self.transport.is_closing():
            if self.pending is None and not self._read_head():
                return
            message, endpoint, length = self.pending
            if len(self.buffer) < length:
                return
            body = bytes(self.buffer[:length])
            del self.buffer[:length]
            self.pending = None
            self._answer(message, endpoint, body)

    def _read_head(self):
        """Parse the next request head when it is complete.  True when self.pending is
        set; False to wait for more bytes (or after handing over / refusing)."""
        line_end = self.buffer.find(b"\r\n")
        if line_end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._refuse(CloudError(errors.BAD_REQUEST, "request line too long"))
            return False
        endpoint = _route(bytes(self.buffer[:line_end]))
        if endpoint is None:
            self._hand_over()
            return False
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._refuse(CloudError(errors.BAD_REQUEST, "request head too long"))
            return False
        head = bytes(self.buffer[:end + 4])
        del self.buffer[:end + 4]
        try:
            message = self.fast.parse_head(head)
        except HttpProcessingError as exc:
            self._refuse(CloudError(errors.BAD_REQUEST, exc.message or "not HTTP"))
            return False
        if message.chunked:  # aiohttp reads chunked bodies (and bounds them: 413)
            self.buffer[:0] = head
            self._hand_over()
            return False
        length = message.length
        if length > MAX_REQUEST:
            # Read (and drop) a body of modest size before closing: closing with unread
            # bytes makes the kernel reset the connection, and the client may lose the 413.
            self.draining = length if length <= MAX_DRAIN else 0
            self._refuse(CloudError(errors.TOO_LARGE, "body over %d bytes" % MAX_REQUEST),
                         close=not self.draining)
            self._drain()
            return False
        if message.expect_continue and len(self.buffer) < length:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # RFC 9110 10.1.1
        self.pending = (message, endpoint, length)
        self.body_since = self.loop.time()
        return True

    def time_out_body(self):
        """The body did not arrive within the listener's bound: 408, then close."""
        self.pending = None
        self.buffer = bytearray()
        self._refuse(CloudError(errors.REQUEST_TIMEOUT, "request body not received in time"))

    def _hand_over(self):
        """Give the connection, and every byte not consumed yet, to aiohttp."""
        self.fast.connections.discard(self)
        protocol = self.fallback()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        data, self.buffer = bytes(self.buffer), bytearray()
        if data:
            protocol.data_received(data)

    def _answer(self, message, endpoint, body):
        started = time.perf_counter()
        try:
            reply = self._reply(message, endpoint, body)
        except CloudError as exc:
            self._send_error(exc, message, endpoint, started)
            return
        if isinstance(reply, Deferred):  # a signature: off the event loop, in order
            self.busy = True
            self.transport.pause_reading()
            future = self.loop.run_in_executor(None, reply.work)
            future.add_done_callback(lambda f: self._deferred_done(f, message, endpoint,
                                                                   started))
            return
        self._send(reply, message, endpoint, started)

    def _reply(self, message, endpoint, body):
        fast = self.fast
        if fast.client_limits is not None:
            wait = fast.client_limits.take(self.peer)
            if wait:
                raise RateLimited(fast.client_limits.retry_after(wait))
        if fast.watcher is not None:
            fast.watcher.poll()
        if message.method == "POST":
            if message.content_type != OCSP_REQUEST_TYPE:
                raise CloudError(errors.CONTENT_TYPE, OCSP_REQUEST_TYPE + " only")
            return fast.tier.answer(body)
        return fast.tier.answer_path(message.path.split("?", 1)[0][len("/ocsp/"):])

    def _deferred_done(self, future, message, endpoint, started):
        self.busy = False
        if self.transport.is_closing():
            return
        try:
            reply = future.result()
        except (RegistryError, HsmError) as exc:
            log.error("backend failure", exc_info=True,
                      extra={"fields": {"service": SERVICE, "path": message.path,
                                        "error": type(exc).__name__}})
            self._send_error(CloudError(errors.UNAVAILABLE, "try again later"), message,
                             endpoint, started)
        except Exception:  # noqa: BLE001 - internal cause: logged, never sent
            log.error("internal error", exc_info=True,
                      extra={"fields": {"service": SERVICE, "path": message.path}})
            self._send_error(CloudError(errors.INTERNAL), message, endpoint, started)
        else:
            self._send(reply, message, endpoint, started)
        if not self.transport.is_closing() and not self.write_paused:
            self.transport.resume_reading()
            self._process()

    # -- answers ------------------------------------------------------------------------------

    def _send(self, reply, message, endpoint, started):
        headers = [b"Content-Type: " + reply.content_type.encode()]
        headers += [("%s: %s" % item).encode() for item in reply.headers.items()]
        etag = reply.headers.get("ETag")
        if etag is not None and message.if_none_match is not None and \
                message.method != "POST" and etag in message.if_none_match:
            # RFC 9110 13.1.2 / 15.4.5: the cache in front already holds this answer.
            self._write(304, headers[1:], b"", message, endpoint, started)
            return
        self._write(200, headers, reply.body, message, endpoint, started)

    def _send_error(self, exc, message, endpoint, started):
        status = HTTP_STATUS[exc.reason]
        headers = [b"Content-Type: text/plain; charset=utf-8"]
        if isinstance(exc, RateLimited):
            headers.append(b"Retry-After: %d" % exc.retry_after)
        if status == 401:
            headers.append(b"WWW-Authenticate: " + WWW_AUTHENTICATE.encode())
        body = (exc.reason + (": " + exc.detail if exc.detail else "") + "\n").encode()
        self._write(status, headers, body, message, endpoint, started, reason=exc.reason)

    def _refuse(self, exc, close=True):
        """A request that cannot be read on: answer and close (or let _drain close)."""
        self.pending = None
        self._send_error(exc, None, "unmatched", time.perf_counter())
        if close:
            self.buffer = bytearray()
            self.transport.close()

    def _write(self, status, headers, body, message, endpoint, started, reason=None):
        close = message is None or message.should_close
        lines = [b"HTTP/1.1 %d %s" % (status, _REASON.get(status, b"")), b"Date: " +
                 HttpDate.now()] + ([b"Content-Length: %d" % len(body)] if status != 304
                                 else []) + headers
        if close:
            lines.append(b"Connection: close")
        elif message.version < (1, 1):
            lines.append(b"Connection: keep-alive")
        head_only = message is not None and message.method == "HEAD"
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else body))
        elapsed = time.perf_counter() - started
        if self.fast.metrics is not None:
            self.fast.metrics.request_done(SERVICE, endpoint, status, elapsed)
        if log.isEnabledFor(logging.INFO):
            fields = {"service": SERVICE, "method": message.method if message else "",
                      "path": message.path if message else "", "remote": self.peer,
                      "status": status, "ms": round(elapsed * 1000, 3)}
            if reason:
                fields["reason"] = reason
            log.info("request", extra={"fields": fields})
        if message is None:
            return  # a refusal: _refuse closes (or drains first)
        if close:
            self.transport.close()
        else:
            self.last_active = self.loop.time()


class OcspFastSite(web.TCPSite):
    """web.TCPSite whose connections start in OcspConnection (the OCSP fast path), with
    the runner's aiohttp protocol for everything else.  Params as web.TCPSite, plus
    fast: OcspFastPath, and sock: a listening socket to serve instead of binding (the
    workers of `cloud serve --workers N` share their parent's).  `ssl_bounds` (see
    cloud/http/sites.py) may be set before start()."""

    ssl_bounds = {}

    def __init__(self, runner, host, port, fast, sock=None, **kwargs):
        super().__init__(runner, host, port, **kwargs)
        self.fast = fast
        self.sock = sock

    async def start(self):
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        fast, fallback = self.fast, self._runner.server
        factory = lambda: OcspConnection(fast, fallback)  # noqa: E731
        if self.sock is not None:
            self._server = await loop.create_server(
                factory, sock=self.sock, ssl=self._ssl_context, backlog=self._backlog,
                **self.ssl_bounds)
        else:
            self._server = await loop.create_server(
                factory, self._host, self._port, ssl=self._ssl_context,
                backlog=self._backlog, reuse_address=self._reuse_address,
                reuse_port=self._reuse_port, **self.ssl_bounds)
        self._bound_port = self._server.sockets[0].getsockname()[1]

    async def stop(self):
        await super().stop()
        self.fast.close_all()
