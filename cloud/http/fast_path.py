"""What the listeners' fast paths share (est_fast.py, ocsp_fast.py, verifier_fast.py): a lean asyncio
protocol per connection answers a listener's hot routes with aiohttp's own HTTP parser
and hands every other request, with its connection, to the listener's aiohttp app.

    FastPath      one per listener: its connections, the idle sweep (one timer per
                  listener, not one per request), request heads parsed by aiohttp once
                  per distinct head, the stop (running answers delivered, bounded)
    FastSite      web.TCPSite whose connections start in the fast path's protocol
    HeadFacts     what a fast path needs of a parsed request head
    HttpDate      the Date header, formatted once per second
    status_line   an answer's status line
    FastConnection  the protocols' common part: leaving the FastPath, the hand-over

A connection class used here has `loop`, `transport`, `peer` (the client's address),
`last_active` (the loop time of its last complete request), `write_paused` and
`_process()` (answer what is buffered), and takes (fast, fallback) where fallback is
aiohttp's protocol factory (the runner's web.Server); its FastPath has `metrics`.
"""

import asyncio
import email.utils
import logging
import time
from http import HTTPStatus

from aiohttp import web
from aiohttp.http import HttpProcessingError, HttpRequestParser

from fleetid.cloud.http import sites
from fleetid.cloud.http.errors import error_parts
from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import CloudError
from fleetid.common.errors import FleetidError

log = logging.getLogger("fleetid.cloud")

MAX_HEAD = 8190  # aiohttp's own max_line_size / max_field_size default
KEEPALIVE_TIMEOUT = 75.0  # aiohttp's default keepalive_timeout
SWEEP_SECONDS = 1.0  # how often idle connections are looked for
MAX_HEADS = 1024  # distinct request heads remembered (parse_head)
MAX_CACHED_HEAD = 1024  # longer heads are parsed each time, not remembered


def error_answer(exc):
    """(status, header lines, body bytes) of a CloudError for a fast path: the aiohttp
    routes' answer (cloud/http/errors.error_parts), as raw lines."""
    status, headers, text = error_parts(exc)
    lines = [b"Content-Type: text/plain; charset=utf-8"]
    lines += [("%s: %s" % item).encode() for item in headers.items()]
    return status, lines, text.encode()


_STATUS_LINES = {}


def status_line(status):
    """b"HTTP/1.1 <status> <reason phrase>" (made once per status)."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s" % (status,
                                                             HTTPStatus(status).phrase.encode())
    return line


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


class NoFlowControl:
    """The parser's payload reader may ask its protocol to pause: heads only here."""

    @staticmethod
    def pause_reading(*args, **kwargs):
        pass

    @staticmethod
    def resume_reading(*args, **kwargs):
        pass


class HeadFacts:
    """What a fast path needs of a parsed request head (aiohttp RawRequestMessage)."""

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


class HeadTooLong(HttpProcessingError, FleetidError):
    """A complete request head over MAX_HEAD bytes (arrived in one read): a fast path does
    with it what it does with an incomplete head that long.  An HttpProcessingError, as
    the fast paths catch aiohttp's parse errors, and a FleetidError like every error of
    fleetid's own."""


class FastConnection(asyncio.Protocol):
    """What a fast path's connection shares: it leaves its FastPath when closed, and hands
    itself to aiohttp for anything the fast path does not answer."""

    __slots__ = ()
    busy = False  # a worker thread is answering its request (a subclass sets it)

    def __init__(self, fast, fallback):
        self.fast = fast
        self.fallback = fallback  # aiohttp's protocol factory (the runner's web.Server)
        self.transport = None
        self.buffer = bytearray()  # bytes received and not yet answered or handed over
        self.write_paused = False  # the transport's write buffer is over its high-water mark

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.loop = asyncio.get_running_loop()
        self.last_active = self.loop.time()
        self.fast.add(self)

    def connection_lost(self, exc):
        self.fast.discard(self)

    def client_certificate(self):
        """The DER of this connection's TLS client certificate; CloudError
        no_client_certificate (401) without one, as the apps answer."""
        ssl_object = self.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None:
            raise CloudError(errors.NO_CLIENT_CERT, "present the device certificate (mTLS)")
        return der

    # A client that pipelines requests and reads no answer: while the transport's write
    # buffer is over its high-water mark nothing is read or answered (memory stays
    # bounded; the idle sweep closes a client that never reads).

    def pause_writing(self):
        self.write_paused = True
        self.transport.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        if not self.busy and not self.transport.is_closing():
            self.transport.resume_reading()
            self._process()

    def served(self, service, endpoint, status, message, started, reason=None,
               identity=None):
        """Count and log (the JSON access line, when INFO is enabled) one answered
        request as the app's middleware does: before its answer leaves, so a client
        that has its answer finds it in the metrics."""
        elapsed = time.perf_counter() - started
        if self.fast.metrics is not None:
            self.fast.metrics.request_done(service, endpoint, status, elapsed)
        if log.isEnabledFor(logging.INFO):
            fields = {"service": service, "method": message.method, "path": message.path,
                      "remote": self.peer, "status": status, "ms": round(elapsed * 1000, 3)}
            if reason:
                fields["reason"] = reason
            if identity is not None:
                fields["device"] = identity.serial
                fields["fingerprint"] = identity.fingerprint
            log.info("request", extra={"fields": fields})

    def send(self, status, headers, body, message, close):
        """Write one answer; then close the connection (leaving the FastPath: stop() need
        not wait for the TLS close) or note it active."""
        lines = [status_line(status), b"Date: " + HttpDate.now(),
                 b"Content-Length: %d" % len(body)] + headers
        if close:
            lines.append(b"Connection: close")
        elif message.version < (1, 1):
            lines.append(b"Connection: keep-alive")
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        if close:
            self.transport.close()
            self.fast.discard(self)
        else:
            self.last_active = self.loop.time()

    def _hand_over(self):
        """Give the connection and what it has buffered to the app."""
        data, self.buffer = bytes(self.buffer), bytearray()
        self.give_to_app(data)

    def give_to_app(self, data):
        """Give the connection, and `data` (the bytes not consumed yet), to aiohttp's
        protocol (self.fallback(): the runner's web.Server)."""
        self.fast.discard(self)
        protocol = self.fallback()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if data:
            protocol.data_received(data)


class FastPath:
    """A listener's fast-path connections.  Params: keepalive_timeout: seconds with no
    complete request head after which a connection is closed (as aiohttp's bound)."""

    def __init__(self, keepalive_timeout=KEEPALIVE_TIMEOUT):
        self.keepalive_timeout = keepalive_timeout
        self.connections = set()
        self.stopping = False  # stop() began: answers go with Connection: close
        self._sweeper = None
        self._drained = None  # stop()'s future: no busy connection is left
        self._heads = {}  # request head bytes -> HeadFacts (clients repeat their heads)

    def parse_head(self, head):
        """HeadFacts of a complete request head (through "\\r\\n\\r\\n"), parsed by
        aiohttp's HttpRequestParser; the same bytes parse the same, so a head seen before
        is not parsed again (at most MAX_HEADS kept, each of at most MAX_CACHED_HEAD
        bytes: the heads clients repeat are small, and distinct big ones from anyone
        would hold memory).  Raises HttpProcessingError (HeadTooLong over MAX_HEAD)."""
        if len(head) > MAX_HEAD:
            raise HeadTooLong(message="request head too long")
        facts = self._heads.get(head)
        if facts is None:
            # A parser of its own per head: it is then never left waiting for a body.
            parser = HttpRequestParser(NoFlowControl, asyncio.get_running_loop(), 2**16,
                                       max_line_size=MAX_HEAD, max_field_size=MAX_HEAD)
            messages, _, _ = parser.feed_data(head)
            if not messages:
                raise HttpProcessingError(message="not a complete request head")
            facts = HeadFacts(messages[0][0])
            if len(head) <= MAX_CACHED_HEAD:
                if len(self._heads) >= MAX_HEADS:
                    self._heads.clear()
                self._heads[head] = facts
        return facts

    def add(self, connection):
        if self.stopping:  # accepted before the listener closed, its handshake after
            connection.transport.close()
            return
        self.connections.add(connection)
        if self._sweeper is None:
            self._sweeper = connection.loop.call_later(SWEEP_SECONDS, self._sweep)

    def discard(self, connection):
        """`connection` left: closed, handed to aiohttp, or (stopping) answered."""
        self.connections.discard(connection)
        if self._drained is not None and not self._drained.done() \
                and not any(c.busy for c in self.connections):
            self._drained.set_result(None)

    def idle(self, connection, now):
        """Whether the sweep closes `connection` (a subclass may act on it first)."""
        return not connection.busy and connection.last_active < now - self.keepalive_timeout

    def _sweep(self):
        self._sweeper = None
        if not self.connections:
            return
        loop = next(iter(self.connections)).loop
        now = loop.time()
        for connection in list(self.connections):
            if self.idle(connection, now):
                connection.transport.close()
                self.connections.discard(connection)
        if self.connections:
            self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep)

    async def stop(self, timeout):
        """Close the connections once their listener accepts no more: the idle ones at
        once; one whose request runs in a worker thread (busy) sends its answer with
        Connection: close and closes (the certificate it issued is delivered), waited for
        at most `timeout` seconds (the runner's shutdown timeout, which aiohttp gives its
        own handlers), after which it is closed all the same."""
        self.stopping = True
        for connection in list(self.connections):
            if not connection.busy:
                connection.transport.close()
                self.connections.discard(connection)
        if self.connections:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._drained, timeout)
            except asyncio.TimeoutError:
                pass
        self.close_all()

    def close_all(self):
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self.connections):
            connection.transport.close()
        self.connections.clear()


class FastSite(web.TCPSite):
    """web.TCPSite whose connections start in `connection_class(fast, fallback)` (a
    subclass names it), with the runner's aiohttp protocol as the fallback.  Params as
    web.TCPSite, plus fast: the FastPath, and sock: a listening socket to serve instead
    of binding (the workers of `cloud serve --workers N` share their parent's).
    `ssl_bounds` (see cloud/http/sites.py) may be set before start()."""

    connection_class = None
    ssl_bounds = {}

    def __init__(self, runner, host, port, fast, sock=None, **kwargs):
        super().__init__(runner, host, port, **kwargs)
        self.fast = fast
        self.sock = sock

    async def start(self):
        fast, fallback, connection = self.fast, self._runner.server, self.connection_class
        await sites.create_server(self, lambda: connection(fast, fallback), self.sock)

    async def stop(self):
        await super().stop()  # the listener accepts no more connections
        await self.fast.stop(self._runner._shutdown_timeout)
