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

Bounds: a request head of at most MAX_HEAD bytes (longer, whole or in pieces: 400), a
body of at most MAX_REQUEST; a connection with no complete request head for
`keepalive_timeout` seconds is closed, and one
whose body does not arrive whole within `body_timeout` seconds of its head gets 408
request_timeout and is closed (the listener's ServerTimeouts idle and body, as on the
aiohttp path; checked every SWEEP_SECONDS); one request at a
time per connection (reading pauses while a signature is made in a worker thread, so
pipelined requests are answered in order).
"""

import logging
import time

from aiohttp.http import HttpProcessingError

from fleetid.cloud.http.fast_path import KEEPALIVE_TIMEOUT, MAX_HEAD, FastConnection, \
    FastPath, FastSite, HeadTooLong, HttpDate, error_answer
from fleetid.cloud.http.middleware import failure_error
from fleetid.cloud.revocation.ocsp import MAX_REQUEST, OCSP_REQUEST_TYPE
from fleetid.cloud.revocation.tier import Deferred
from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import CloudError, RateLimited

log = logging.getLogger("fleetid.cloud")

SERVICE = "revocation"
BODY_TIMEOUT = 30.0  # ServerTimeouts' default body bound
MAX_DRAIN = 65536  # a refused body up to this size is read and dropped before closing
_REASON = {200: b"OK", 304: b"Not Modified", 400: b"Bad Request", 413: b"Payload Too Large",
           415: b"Unsupported Media Type", 429: b"Too Many Requests",
           500: b"Internal Server Error", 503: b"Service Unavailable"}


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


class OcspFastPath(FastPath):
    """What the OCSP connections of one listener share.

    Params: tier: the OcspTier (answer(der) / answer_path(text) -> Reply or Deferred).
        client_limits: ClientRateLimits or None.  watcher: EventWatcher polled per
        request, or None.  metrics: Metrics or None.  keepalive_timeout, body_timeout:
        seconds (see the module text).
    """

    def __init__(self, tier, client_limits=None, watcher=None, metrics=None,
                 keepalive_timeout=KEEPALIVE_TIMEOUT, body_timeout=BODY_TIMEOUT):
        super().__init__(keepalive_timeout)
        self.tier = tier
        self.client_limits = client_limits
        self.watcher = watcher
        self.metrics = metrics
        self.body_timeout = body_timeout

    def idle(self, connection, now):
        # A connection answering (a signature in a worker) is not idle; one whose body
        # did not arrive whole in body_timeout gets 408 and is closed.
        if connection.busy:
            return False
        if connection.pending is not None:
            if connection.body_since < now - self.body_timeout:
                connection.time_out_body()
            return False
        return super().idle(connection, now)


class OcspConnection(FastConnection):
    """One client connection while it asks OCSP questions (see the module text)."""

    def __init__(self, fast, fallback):
        super().__init__(fast, fallback)
        self.pending = None  # (message, endpoint, body length) of a head being read
        self.draining = 0  # bytes of a refused body still to read and drop

    # -- asyncio.Protocol ---------------------------------------------------------------------

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
        except HeadTooLong:
            self._refuse(CloudError(errors.BAD_REQUEST, "request head too long"))
            return False
        except HttpProcessingError:
            # Never the parser's own text: it quotes the client's bytes back (as aiohttp's
            # answers did before sites.Runner).
            self._refuse(CloudError(errors.BAD_REQUEST, "malformed request head"))
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

    def _answer(self, message, endpoint, body):
        started = time.perf_counter()
        try:
            reply = self._reply(message, endpoint, body)
        except CloudError as exc:
            self._send_error(exc, message, endpoint, started)
            return
        if isinstance(reply, Deferred):  # a signature: off the event loop, in order
            try:
                future = self.loop.run_in_executor(None, reply.work)
            except Exception as exc:  # noqa: BLE001 - the executor is shut down: logged
                self._send_error(failure_error(exc, SERVICE, message.path), message,
                                 endpoint, started)
                return
            self.busy = True  # only once submitted (else never cleared, never swept)
            self.transport.pause_reading()
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
        except Exception as exc:  # noqa: BLE001 - internal cause: logged, never sent
            self._send_error(failure_error(exc, SERVICE, message.path), message, endpoint,
                             started)
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
        status, headers, body = error_answer(exc)
        self._write(status, headers, body, message, endpoint, started, reason=exc.reason)

    def _refuse(self, exc, close=True):
        """A request that cannot be read on: answer and close (or let _drain close)."""
        self.pending = None
        self._send_error(exc, None, "unmatched", time.perf_counter())
        if close:
            self.buffer = bytearray()
            self.transport.close()

    def _write(self, status, headers, body, message, endpoint, started, reason=None):
        close = message is None or message.should_close or self.fast.stopping
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
            self.fast.discard(self)  # answered: stop() need not wait for the TLS close
        else:
            self.last_active = self.loop.time()


class OcspFastSite(FastSite):
    """The revocation listener's site: connections start in OcspConnection (FastSite)."""

    connection_class = OcspConnection
