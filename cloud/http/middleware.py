"""The cloud's aiohttp middleware (every listener but metrics and CRL runs it): error
rendering through the one status table (fleetid.cloud.http.errors), request metrics, one
JSON access line per request; JSON-lines logging for the process; the bounded body read.

Rendering rule: a CloudError renders as its status (errors.HTTP_STATUS) with a text body
"<reason>: <detail>"; anything else is logged with its traceback and answered with a
generic 500 (or 503 for storage / HSM failures): internal causes never reach a client.
"""

import json
import logging
import time

from aiohttp import web

from fleetid.cloud.hsm.errors import HsmError
from fleetid.cloud.http.errors import error_response
from fleetid.cloud.registry import RegistryError
from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import CloudError

log = logging.getLogger("fleetid.cloud")
# request["device"]: the authenticated DeviceIdentity (set by the verifier's middleware).
DEVICE = web.RequestKey("device", object) if hasattr(web, "RequestKey") else "device"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the record's `fields`."""

    def format(self, record):
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, sort_keys=True, default=str)


def configure_json_logging(level=logging.INFO, stream=None):
    """Make every log line of the process one JSON object on `stream` (default stderr).

    fleetid.cloud logs at `level`; everything else (aiohttp's own loggers, e.g. a
    `LineTooLong` for an oversized header, asyncio, the ssl module) goes through the root
    logger with the same JSON formatter, so no plain-text traceback lands in the log (the
    traceback, if any, is the "exc" field of its JSON line).  Returns the handler.
    """
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))
    return handler


def make_middleware(service_name, metrics):
    """aiohttp middleware: error mapping (the one table), metrics and an access log line
    per request."""

    @web.middleware
    async def middleware(request, handler):
        started = time.perf_counter()
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource else "unmatched"
        fields = {}
        try:
            response = await handler(request)
        except CloudError as exc:
            response = error_response(exc)
            fields["reason"] = exc.reason
        except web.HTTPException as exc:
            response = exc
        except (RegistryError, HsmError) as exc:
            log.error("backend failure", exc_info=True,
                      extra={"fields": dict(fields, service=service_name, path=request.path,
                                            error=type(exc).__name__)})
            response = error_response(CloudError(errors.UNAVAILABLE, "try again later"))
            fields["reason"] = errors.UNAVAILABLE
        except Exception:  # noqa: BLE001 - internal cause: logged, never sent
            log.error("internal error", exc_info=True,
                      extra={"fields": dict(fields, service=service_name, path=request.path)})
            response = error_response(CloudError(errors.INTERNAL))
            fields["reason"] = errors.INTERNAL
        elapsed = time.perf_counter() - started
        metrics.request_done(service_name, endpoint, response.status, elapsed)
        # The access line is built only when someone reads it (a disabled INFO level
        # costs one level check per request, not a dict and a JSON encoding).
        if log.isEnabledFor(logging.INFO):
            fields.update(service=service_name, method=request.method, path=request.path,
                          remote=request.remote, status=response.status,
                          ms=round(elapsed * 1000, 3))
            identity = request.get(DEVICE)
            if identity is not None:
                fields["device"] = identity.serial
                fields["fingerprint"] = identity.fingerprint
            log.info("request", extra={"fields": fields})
        if isinstance(response, web.HTTPException):
            raise response
        return response

    return middleware


async def read_limited(request, limit):
    """The whole request body, at most `limit` bytes; more is refused with 413.

    The body is read to its end however it arrives (Content-Length or chunked, in as many
    TCP segments as the network splits it into): aiohttp's Request.read() does that and
    stops with HTTPRequestEntityTooLarge as soon as more than `client_max_size` bytes
    came in, so no more than the limit (plus one network chunk) is ever buffered.  A
    declared Content-Length over the limit is refused before reading anything.

    Raises: CloudError(TOO_LARGE).
    """
    length = request.content_length
    if length is not None and length > limit:
        raise CloudError(errors.TOO_LARGE, "body over %d bytes" % limit)
    if request.client_max_size != limit:
        request = request.clone(client_max_size=limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise CloudError(errors.TOO_LARGE, "body over %d bytes" % limit) from None
