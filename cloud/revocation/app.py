"""The CRL route: GET /crl/<label>.crl -> the DER CRL of that issuing CA
(`application/pkix-crl`, RFC 2585 4.2), at the distribution point URL the certificates
name (cloud/pki/profiles.py writes it from the configured base URL and crl_path()).

Served over plain HTTP on its own listener: a CRL is signed and public, and a device that
checks revocation before it trusts a TLS server cannot need that TLS first (RFC 5280
4.2.1.13 uses http URIs for the same reason).

    GET  /crl/<label>.crl    200 DER, Cache-Control max-age up to the next refresh;
                             404 for an unknown label; 503 when the CRL cannot be built
    HEAD as GET, no body (aiohttp drops it)
"""

import datetime
import logging

from aiohttp import web

from fleetid.cloud.revocation.crl import CRL_CONTENT_TYPE

PUBLISHER_KEY = web.AppKey("crl_publisher", object)
_log = logging.getLogger("fleetid.cloud.revocation")


def make_crl_app(publisher):
    """The aiohttp Application serving `publisher`'s CRLs (a CrlPublisher)."""

    async def get_crl(request):
        name = request.match_info["name"]
        if not name.endswith(".crl") or name[:-4] not in publisher.issuers:
            raise web.HTTPNotFound(text="no CRL here\n")
        label = name[:-4]
        try:
            crl = publisher.current(label)
            body = publisher.current_der(label)
        except Exception:  # noqa: BLE001 - HSM / registry trouble: no stale answer, no cause
            _log.exception("CRL for %s could not be built", label)
            raise web.HTTPServiceUnavailable(text="CRL temporarily unavailable\n") from None
        now = datetime.datetime.now(datetime.timezone.utc)
        refresh = crl.last_update_utc + publisher.next_update / 2
        max_age = max(0, min(int((refresh - now).total_seconds()),
                             int(publisher.poll_interval)))
        headers = {"Cache-Control": "public, max-age=%d" % max_age,
                   "Last-Modified": crl.last_update_utc.strftime("%a, %d %b %Y %H:%M:%S GMT")}
        return web.Response(body=body, content_type=CRL_CONTENT_TYPE, headers=headers)

    app = web.Application()
    app[PUBLISHER_KEY] = publisher
    app.router.add_get("/crl/{name}", get_crl)  # add_get also answers HEAD
    return app
