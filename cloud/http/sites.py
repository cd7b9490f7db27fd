"""How the cloud's listeners are served: aiohttp sites whose TLS handshake and TLS
shutdown are bounded, the runner whose answers neither echo a malformed request nor name
Python's and aiohttp's versions, the event loop, and the run-until-signalled loop.

aiohttp's TCPSite and SockSite call the loop's create_server without
ssl_handshake_timeout or ssl_shutdown_timeout; the two sites here do the same start()
with both.  (fleetid.cloud.server re-exports event_loop_factory and serve_forever.)
"""

import asyncio
from http import HTTPStatus

from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler

SERVER_NAME = "fleetid"  # the Server header of every answer (aiohttp's: Python/x aiohttp/y)


class _Handler(RequestHandler):
    """aiohttp's connection handler, but its own answers to a request it could not parse
    (400, 413, 431, ...) carry only the status phrase: aiohttp's text quotes the offending
    bytes back to whoever sent them.  Its 500 is aiohttp's (a fixed text)."""

    __slots__ = ()

    def handle_error(self, request, status=500, exc=None, message=None):
        if status != HTTPStatus.INTERNAL_SERVER_ERROR:
            message = "%d %s" % (status, HTTPStatus(status).phrase)
        response = super().handle_error(request, status, exc, message)
        response.headers[hdrs.SERVER] = SERVER_NAME
        return response


class _Server(web.Server):
    def __call__(self):
        return _Handler(self, loop=self._loop, **self._kwargs)


async def _name_server(request, response):
    response.headers[hdrs.SERVER] = SERVER_NAME


class Runner(web.AppRunner):
    """web.AppRunner whose app's answers say `Server: fleetid` and whose connections are
    _Handler's (above).  The fast paths write their own answers, with no Server header."""

    def __init__(self, app, **kwargs):
        app.on_response_prepare.append(_name_server)
        super().__init__(app, **kwargs)

    async def _make_server(self):
        server = await super()._make_server()
        server.__class__ = _Server  # the same object; only its handler class changes
        return server


def ssl_bounds(ssl_context, timeouts):
    # aiohttp's sites pass neither bound to create_server, so the loop's defaults apply:
    # asyncio's 60 s for a client that stops mid-handshake, and 30 s (asyncio, uvloop)
    # waiting for the client's close_notify after the server closed, during which
    # uvloop's transport keeps reading and decrypting whatever the client still streams
    # (a client sending a huge body after its 413 kept the server busy for the whole body).
    if ssl_context is None:
        return {}
    bounds = {"ssl_handshake_timeout": timeouts.handshake,
              "ssl_shutdown_timeout": timeouts.linger}
    return dict((k, v) for k, v in bounds.items() if v)


async def create_server(site, protocol_factory, sock=None):
    """A site's start(): the loop's server for `protocol_factory` on `sock` (a socket
    bound by serve_workers' parent) or on the site's host and port, with its TLS context
    and the bounds of ssl_bounds (set as site.ssl_bounds)."""
    await web.BaseSite.start(site)  # registers the site with its runner
    loop = asyncio.get_running_loop()
    if sock is not None:
        site._server = await loop.create_server(
            protocol_factory, sock=sock, ssl=site._ssl_context, backlog=site._backlog,
            **site.ssl_bounds)
    else:
        site._server = await loop.create_server(
            protocol_factory, site._host, site._port, ssl=site._ssl_context,
            backlog=site._backlog, reuse_address=site._reuse_address,
            reuse_port=site._reuse_port, **site.ssl_bounds)
    if isinstance(site, web.TCPSite):  # its name (the URL aiohttp logs) with the bound port
        sockets = site._server.sockets
        site._bound_port = sockets[0].getsockname()[1] if sockets else site._port


class BoundedTcpSite(web.TCPSite):
    # TCPSite.start() with the TLS bounds of ssl_bounds (set as .ssl_bounds).

    async def start(self):
        await create_server(self, self._runner.server)


class BoundedSockSite(web.SockSite):
    # SockSite.start() (a socket bound by serve_workers' parent) with the same bounds.

    async def start(self):
        await create_server(self, self._runner.server, self._sock)


EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def event_loop_factory(kind="auto"):
    """The event loop constructor for the servers: "uvloop" (libuv, with a compiled TLS
    transport: in bench/mtls.py about 10-15% more mTLS connections per CPU-second than
    asyncio's), "asyncio" (the standard library's), or "auto" (uvloop when installed,
    else asyncio).
    Raises ValueError for an unknown kind, ImportError for "uvloop" when not installed."""
    if kind not in EVENT_LOOPS:
        raise ValueError("event_loop must be one of %s" % (EVENT_LOOPS,))
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def serve_forever(server, ready=None, event_loop="auto"):
    """Run `server` until SIGINT / SIGTERM.  `ready(ports)` is called once listening.
    event_loop: see event_loop_factory."""
    import signal

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ports = await server.start()
        if ready:
            ready(ports)
        try:
            await stop.wait()
        finally:
            await server.stop()

    with asyncio.Runner(loop_factory=event_loop_factory(event_loop)) as runner:
        runner.run(main())
