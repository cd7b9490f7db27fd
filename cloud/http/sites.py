"""aiohttp sites whose TLS handshake and TLS shutdown are bounded (the cloud's listeners).

aiohttp's TCPSite and SockSite call the loop's create_server without
ssl_handshake_timeout or ssl_shutdown_timeout; these two do the same start() with both.
"""

import asyncio

from aiohttp import web


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


class BoundedTcpSite(web.TCPSite):
    # TCPSite.start() with the TLS bounds of ssl_bounds (set as .ssl_bounds).

    async def start(self):
        await web.BaseSite.start(self)
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server, self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port, **self.ssl_bounds)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


class BoundedSockSite(web.SockSite):
    # SockSite.start() (a socket bound by serve_workers' parent) with the same bounds.

    async def start(self):
        await web.BaseSite.start(self)
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server, sock=self._sock, ssl=self._ssl_context,
            backlog=self._backlog, **self.ssl_bounds)
