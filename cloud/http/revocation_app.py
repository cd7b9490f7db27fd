"""The revocation listener (the CRL port, plain HTTP: everything on it is signed and
public): the routes of every revocation tier (cloud/revocation/tiers.py), through the
cloud's middleware, so a refusal is rendered from the one status table (errors.py).

    app = make_revocation_app(tiers.tiers, watcher=tiers.watcher, metrics=metrics)

Each request first polls the revocation event file (one stat), so a revocation written
by another process reaches every tier on the very next request.
"""

import asyncio

from aiohttp import web

from fleetid.cloud.http.metrics import Metrics
from fleetid.cloud.http.middleware import make_middleware, read_limited
from fleetid.cloud.http.rate_limit import ClientRateLimits
from fleetid.cloud.revocation.staple import STAPLE_HEADER
from fleetid.cloud.revocation.tier import Deferred
from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import CloudError, RateLimited

SERVICE = "revocation"
# Per client address (a token bucket each, rate_limit.py), on the client-limited routes
# (OCSP): a device asks about its own certificate and its peers' now and then; a gateway
# in front of many devices more.  Cached answers cost little; the limit bounds what a
# client makes the responder sign (nonces, unknown serials).
CLIENT_RATE = 50.0  # requests per second
CLIENT_BURST = 200
DEFAULT_LIMITS = object()


def _handler(route, client_limits):
    limits = client_limits if route.client_limited else None

    async def handle(request):
        if limits is not None:
            wait = limits.take(request.remote)
            if wait:
                raise RateLimited(limits.retry_after(wait))
        body = b""
        if route.method == "POST":
            if route.content_type is not None and request.content_type != route.content_type:
                raise CloudError(errors.CONTENT_TYPE, route.content_type + " only")
            body = await read_limited(request, route.body_limit)
        params = request.match_info
        loop = asyncio.get_running_loop()
        if route.blocking:  # signs or reads storage: off the event loop
            reply = await loop.run_in_executor(None, route.handle, dict(params), body)
        else:
            reply = route.handle(params, body)
            if isinstance(reply, Deferred):  # answered from memory unless it must sign
                reply = await loop.run_in_executor(None, reply.work)
        return web.Response(body=reply.body, content_type=reply.content_type,
                            headers=reply.headers)
    return handle


def make_revocation_app(tiers, watcher=None, metrics=None, client_limits=DEFAULT_LIMITS):
    """The aiohttp Application serving `tiers` (Tier instances, in route order).
    watcher: an EventWatcher polled per request (the event-driven path), or None.
    client_limits: ClientRateLimits for the client-limited routes (OCSP's), the default
    CLIENT_RATE / CLIENT_BURST per address, or None (no limit).  The tiers' start() and
    stop() run with the app's start-up and clean-up."""
    if client_limits is DEFAULT_LIMITS:
        client_limits = ClientRateLimits(CLIENT_RATE, CLIENT_BURST)
    middlewares = []
    if watcher is not None:
        @web.middleware
        async def poll_events(request, handler):
            watcher.poll()
            return await handler(request)

        middlewares.append(poll_events)
    middlewares.append(make_middleware(SERVICE, metrics or Metrics()))
    app = web.Application(middlewares=middlewares)
    tiers = list(tiers)

    async def start_tiers(_app):
        for tier in tiers:
            tier.start()

    async def stop_tiers(_app):
        for tier in tiers:
            await asyncio.get_running_loop().run_in_executor(None, tier.stop)

    app.on_startup.append(start_tiers)
    app.on_cleanup.append(stop_tiers)
    for tier in tiers:
        for route in tier.routes():
            if route.method == "GET":
                app.router.add_get(route.path, _handler(route, client_limits))  # HEAD too
            else:
                app.router.add_route(route.method, route.path, _handler(route, client_limits))
    return app


def attach_staple_header(app, staple):
    """Add the staple (cloud/revocation/staple.py, a ServerStaple) as a header to every
    response of an aiohttp app -- the verifier's -- before it starts."""

    async def add(request, response):
        try:
            response.headers[STAPLE_HEADER] = staple.header_value()
        except Exception:  # noqa: BLE001 - no staple is better than no answer
            pass

    app.on_response_prepare.append(add)
    return app
