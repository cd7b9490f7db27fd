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
from fleetid.cloud.revocation.staple import STAPLE_HEADER
from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import CloudError

SERVICE = "revocation"


def _handler(route):
    async def handle(request):
        body = b""
        if route.method == "POST":
            if route.content_type is not None and request.content_type != route.content_type:
                raise CloudError(errors.CONTENT_TYPE, route.content_type + " only")
            body = await read_limited(request, route.body_limit)
        params = dict(request.match_info)
        if route.blocking:  # signs or reads storage: off the event loop
            reply = await asyncio.get_running_loop().run_in_executor(
                None, route.handle, params, body)
        else:
            reply = route.handle(params, body)
        return web.Response(body=reply.body, content_type=reply.content_type,
                            headers=reply.headers)
    return handle


def make_revocation_app(tiers, watcher=None, metrics=None):
    """The aiohttp Application serving `tiers` (Tier instances, in route order).
    watcher: an EventWatcher polled per request (the event-driven path), or None."""
    middlewares = []
    if watcher is not None:
        @web.middleware
        async def poll_events(request, handler):
            watcher.poll()
            return await handler(request)

        middlewares.append(poll_events)
    middlewares.append(make_middleware(SERVICE, metrics or Metrics()))
    app = web.Application(middlewares=middlewares)
    for tier in tiers:
        for route in tier.routes():
            if route.method == "GET":
                app.router.add_get(route.path, _handler(route))  # HEAD too
            else:
                app.router.add_route(route.method, route.path, _handler(route))
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
