"""The verifier's aiohttp application: every request is authenticated by the TLS client
certificate and the fleet checks of fleetid.cloud.verifier.service.FleetVerifier;
handlers receive `request[DEVICE]`, a DeviceIdentity.  A request without a client
certificate is refused here (401 no_client_certificate): the listener shares its TLS
context (and session cache) with EST, where the certificate is optional
(cloud/server.py), so the handshake alone does not require one.

    GET  /v1/whoami              the authenticated identity (JSON)
    POST /v1/telemetry           JSON object, <= 64 KiB; 202 {"accepted": n}
    POST /v1/rotation/ack        the device switched to the certificate it connects with;
                                 closes the previous certificate's overlap window
    GET  /v1/revocation/status   this device's certificate and registry status
    GET  /healthz                liveness (still needs a client certificate: one port,
                                 one rule)

Metrics are served by a separate app (make_metrics_app) on its own, plain-HTTP,
loopback listener: scraping must not need a device certificate.
"""

import collections

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fleetid.cloud.http.middleware import DEVICE, make_middleware, read_limited
from fleetid.cloud.http.tls import peer_certificate
from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import CloudError, RequestRefused
from fleetid.common import mqttmsg

MAX_TELEMETRY = 64 * 1024
VERIFIER_KEY = web.AppKey("verifier", object)
TELEMETRY_KEY = web.AppKey("telemetry", object)


class TelemetrySink:
    """Keeps the last `keep` telemetry records in memory (the demo sink; a fleet plugs a
    queue or a time-series store in here: any object with `put(identity, document)`)."""

    def __init__(self, keep=10000):
        self.records = collections.deque(maxlen=keep)

    def put(self, identity, document):
        self.records.append((identity.serial, document))


def make_verifier_app(verifier, metrics, telemetry=None):
    """The verifier Application over a FleetVerifier (and its registry)."""
    telemetry = telemetry if telemetry is not None else TelemetrySink()

    @web.middleware
    async def authenticate(request, handler):
        der = peer_certificate(request)
        if der is None:
            raise CloudError(errors.NO_CLIENT_CERT, "present the device certificate (mTLS)")
        request[DEVICE] = verifier.verify(der)
        return await handler(request)

    async def whoami(request):
        return web.json_response(request[DEVICE].as_json())

    async def ingest(request):
        if request.content_type != "application/json":
            raise CloudError(errors.CONTENT_TYPE, "send application/json")
        body = await read_limited(request, MAX_TELEMETRY)
        try:  # the fleet's one bounded decoder (size, then nesting depth, then json)
            document = mqttmsg.decode_document(body, MAX_TELEMETRY, mqttmsg.MAX_DEPTH)
        except mqttmsg.MessageError as exc:
            if exc.reason == mqttmsg.MessageError.TOO_DEEP:
                raise RequestRefused(errors.DOCUMENT_LIMIT, exc.detail) from None
            raise RequestRefused(errors.BAD_REQUEST, "body is not JSON") from None
        if not isinstance(document, dict):
            raise RequestRefused(errors.BAD_REQUEST, "telemetry must be a JSON object")
        telemetry.put(request[DEVICE], document)
        return web.json_response({"accepted": 1}, status=202)

    async def rotation_ack(request):
        identity = request[DEVICE]
        state = verifier.acknowledge_rotation(identity)
        return web.json_response({"rotation": state.kind or "none",
                                  "current": identity.fingerprint})

    async def revocation_status(request):
        identity = request[DEVICE]
        record, device = verifier.registry.certificate_and_device(
            identity.certificate.serial_number, issuer=identity.issuer)
        return web.json_response({
            "fingerprint": identity.fingerprint, "revoked": record.revoked,
            "device_status": device.status, "rotation_state": device.rotation_state,
            "in_overlap": identity.in_overlap,
        })

    async def healthz(request):
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[make_middleware("verifier", metrics), authenticate],
                          client_max_size=MAX_TELEMETRY)
    app.router.add_get("/v1/whoami", whoami)
    app.router.add_post("/v1/telemetry", ingest)
    app.router.add_post("/v1/rotation/ack", rotation_ack)
    app.router.add_get("/v1/revocation/status", revocation_status)
    app.router.add_get("/healthz", healthz)
    app[VERIFIER_KEY] = verifier
    app[TELEMETRY_KEY] = telemetry
    return app


def make_metrics_app(metrics):
    """Plain-HTTP app exposing /metrics (Prometheus text format)."""

    async def scrape(request):
        return web.Response(body=generate_latest(metrics.scrape),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app
