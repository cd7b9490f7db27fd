"""The cloud's aiohttp middleware (every listener but metrics and CRL runs it): error
rendering through the one status table (fleetid.cloud.http.errors), request metrics, one
JSON access line per request; JSON-lines logging for the process; the bounded body read
and the bounds on every wait a client can impose (ServerTimeouts).

Rendering rule: a CloudError renders as its status (errors.HTTP_STATUS) with a text body
"<reason>: <detail>"; anything else is logged with its traceback and answered with a
generic 500 (or 503 for storage / HSM failures): internal causes never reach a client.
"""

import asyncio
import json
import logging
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from fleetid.cloud.hsm.errors import HsmError
from fleetid.cloud.http.errors import error_response
from fleetid.cloud.registry import RegistryError
from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import CloudError

log = logging.getLogger("fleetid.cloud")


def failure_error(exc, service, path):
    """The CloudError answered for an exception that is not one: 503 unavailable for a
    registry or HSM failure, 500 internal for anything else; the cause is logged with its
    traceback, never sent.  The app's middleware and the fast paths answer through it."""
    if isinstance(exc, (RegistryError, HsmError)):
        log.error("backend failure", exc_info=exc, extra={"fields": {
            "service": service, "path": path, "error": type(exc).__name__}})
        return CloudError(errors.UNAVAILABLE, "try again later")
    log.error("internal error", exc_info=exc, extra={"fields": {"service": service,
                                                                "path": path}})
    return CloudError(errors.INTERNAL)
# request["device"]: the authenticated DeviceIdentity (set by the verifier's middleware).
DEVICE = web.RequestKey("device", object) if hasattr(web, "RequestKey") else "device"
# app[BODY_TIMEOUT]: seconds read_limited waits for a whole body (CloudServer sets it from
# its ServerTimeouts; an app without it uses ServerTimeouts' default).
BODY_TIMEOUT = web.AppKey("body_timeout", float) if hasattr(web, "AppKey") else "body_timeout"


class ServerTimeouts:
    """How long a listener waits for a client, at each step where a slow or vanished
    client could otherwise hold a connection (and its memory) for ever.

    Params (seconds, each > 0):
        handshake: the whole TLS handshake, from the TCP accept (asyncio's
            ssl_handshake_timeout; its own default is 60 s).  A client that stops
            mid-handshake is dropped after it.  The default leaves a slow board room:
            a full handshake with every key operation in an SE050-class SE takes ~0.3 s
            on a host (README, TLS 1.3 client); a microcontroller is slower (not measured here).
        idle: a complete request head, counted from the connection's start or from the
            previous answer; bytes arriving do not extend it, so a head dribbled a byte at
            a time (slowloris) is dropped after it too.  (aiohttp's keepalive_timeout: it
            closes a connection whose handler still waits for a request head.)
        body: the whole request body, once its head is in (read_limited): the client gets
            408 and the connection is closed.
        linger: after an answer given before the body was read whole (413, 408), how
            long the rest is read and dropped so the client sees the answer before the
            close (aiohttp's lingering_time, 10 s by default, during which a client
            streaming a huge body keeps the server reading); also how long a TLS
            connection the server closes waits for the client's close_notify (the loop's
            ssl_shutdown_timeout, 30 s by default).
        stop: on stop, how long requests in flight may take to be answered, waited for
            twice (the fast paths', then aiohttp's handlers: the runner's
            shutdown_timeout, 60 s by default).  The default keeps a whole stop inside
            the worker supervisor's 15 s and the systemd units' TimeoutStopSec=30.
    Raises: ValueError for a bound that is not a positive number.
    """

    def __init__(self, handshake=20.0, idle=30.0, body=30.0, linger=2.0, stop=5.0):
        for name, value in (("handshake", handshake), ("idle", idle), ("body", body),
                            ("linger", linger), ("stop", stop)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError("ServerTimeouts.%s must be a positive number of seconds"
                                 % name)
        self.handshake = float(handshake)
        self.idle = float(idle)
        self.body = float(body)
        self.linger = float(linger)
        self.stop = float(stop)

    def runner_options(self):
        """Keyword arguments for aiohttp's AppRunner (its request handler's bounds)."""
        return {"keepalive_timeout": self.idle, "lingering_time": self.linger,
                "shutdown_timeout": self.stop}

    def __repr__(self):
        return "ServerTimeouts(handshake=%g, idle=%g, body=%g, linger=%g, stop=%g)" % (
            self.handshake, self.idle, self.body, self.linger, self.stop)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the record's `fields`."""

    def format(self, record):
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, sort_keys=True, default=str)


class ClientHttpErrorFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a bad chunk size, a broken header) as an
    ERROR with a traceback ("Error handling request"), though the fault is the client's
    and the client got its 400: this makes it one WARNING line naming the cause, so
    malformed input cannot fill the log with tracebacks or pass for a server failure."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "malformed HTTP from a client: %s", (
                (exc.message or type(exc).__name__).strip().splitlines()[0],)
            record.exc_info = record.exc_text = None
        return True


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
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientHttpErrorFilter) for f in server_log.filters):
        server_log.addFilter(ClientHttpErrorFilter())
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
            if exc.reason == errors.REQUEST_TIMEOUT:
                response.force_close()  # RFC 9110 15.5.9: 408, then close
        except web.HTTPException as exc:
            response = exc
        except Exception as exc:  # noqa: BLE001 - internal cause: logged, never sent
            answer = failure_error(exc, service_name, request.path)
            response = error_response(answer)
            fields["reason"] = answer.reason
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

    The whole body must arrive within the app's BODY_TIMEOUT (ServerTimeouts.body).

    Raises: CloudError(TOO_LARGE); CloudError(REQUEST_TIMEOUT) when the body is not in
        within the bound; CloudError(BAD_REQUEST) when the client closed before sending it
        whole (it is gone: the answer is for the access log, not a server fault).
    """
    length = request.content_length
    if length is not None and length > limit:
        raise CloudError(errors.TOO_LARGE, "body over %d bytes" % limit)
    if request.client_max_size != limit:
        request = request.clone(client_max_size=limit)
    timeout = request.config_dict.get(BODY_TIMEOUT) or ServerTimeouts().body
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except web.HTTPRequestEntityTooLarge:
        raise CloudError(errors.TOO_LARGE, "body over %d bytes" % limit) from None
    except TimeoutError:
        raise CloudError(errors.REQUEST_TIMEOUT, "body not received within %g s"
                         % timeout) from None
    except ConnectionError:
        raise CloudError(errors.BAD_REQUEST, "connection closed before the whole body") \
            from None
