"""HTTP plumbing shared by the verifier and the EST server: TLS contexts, the peer
certificate, error rendering through the one status table, Prometheus metrics and
structured (JSON lines) logs.

Rendering rule: a CloudError renders as its status (errors.HTTP_STATUS) with a text body
"<reason>: <detail>"; anything else is logged with its traceback and answered with a
generic 500 (or 503 for storage / HSM failures): internal causes never reach a client.
"""

import json
import logging
import ssl
import time

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from fleetid.cloud.config import ConfigError
from fleetid.cloud.hsm.errors import HsmError
from fleetid.cloud.registry import RegistryError
from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import CloudError, PendingApproval

# TLS 1.2 suites for clients whose key signs in an SE (tlslite-ng: TLS 1.2 client auth
# only; ARCHITECTURE "mTLS with an SE-held key"): ECDHE-ECDSA with AES-GCM (RFC 5289).
TLS12_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"

SESSION_TICKETS = 1

log = logging.getLogger("fleetid.cloud")
# request["device"]: the authenticated DeviceIdentity (set by the verifier's middleware).
DEVICE = web.RequestKey("device", object) if hasattr(web, "RequestKey") else "device"


def server_ssl_context(cert_file, key_file, client_ca_pem, require_client_cert=True):
    """A server SSLContext: TLS 1.2 (ECDHE-ECDSA-AES-GCM only) and TLS 1.3, client
    certificates verified against `client_ca_pem` (bytes: the fleet's roots and
    intermediates).  require_client_cert False = CERT_OPTIONAL (EST: cacerts needs no
    client certificate; enrolment answers 401 without one).
    Raises fleetid.cloud.config.ConfigError when the certificate or key cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError("tls_cert %s / tls_key %s: not a certificate and its private key "
                          "(%s)" % (cert_file, key_file,
                                    getattr(exc, "reason", None) or exc.strerror or exc)) \
            from None
    context.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    # The fleet's issuing CAs are configured trust (client_ca_pem), and every accepted
    # certificate is validated again to a fleet root by FleetVerifier
    # (cryptography.x509.verification, cached per certificate) before any handler runs.
    # So OpenSSL may stop at the trusted issuing CA (RFC 5280 6.1: any trust anchor)
    # instead of re-checking the CA's own signature by the root on every handshake.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    # TLS 1.3 (RFC 8446 4.6.1): one ticket per connection is what a reconnecting device
    # uses (OpenSSL's default is 2: the second is sealed and sent for nothing).
    context.num_tickets = SESSION_TICKETS
    # Stateful resumption: with OP_NO_TICKET, OpenSSL's TLS 1.3 tickets are session ids
    # into this context's in-memory session cache (RFC 8446 4.6.1 lets the ticket be a
    # database lookup key) instead of a sealed copy of the session.  Why: a stateless
    # ticket is built by encoding the session, client certificate included, and decoding
    # it again (OpenSSL 3.0 construct_stateless_ticket), and a resumption decrypts and
    # decodes it once more; profiled, that was ~10% of a full handshake's server CPU.
    # Security: the session never leaves the server (no ticket-encryption key to leak or
    # rotate; Python's ssl never rotates its random ticket key), and OpenSSL removes a
    # TLS 1.3 session from the cache when it is resumed (single use: a replayed ticket
    # falls back to a full handshake).  Resumption is per process either way (Python's
    # ticket key is random per context), and the verifier re-runs its checks on every
    # request of a resumed connection as well (the registry is read each time).  Cost:
    # OpenSSL's default cache bound (20480 sessions, oldest evicted: a device beyond it
    # makes a full handshake) and the session timeout.
    context.options |= ssl.OP_NO_TICKET
    return context


def peer_certificate(request):
    """DER of the TLS client certificate, or None (plain HTTP or none presented)."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if ssl_object is None:
        return None
    return ssl_object.getpeercert(binary_form=True)


class Metrics:
    """Prometheus metrics of one server process (own CollectorRegistry, so tests and
    several apps in one process do not collide)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("fleetid_http_requests_total", "HTTP requests",
                                ["service", "endpoint", "status"], registry=self.registry)
        self.verdicts = Counter("fleetid_verifier_verdicts_total",
                                "Client certificate verdicts by reason (ok = accepted)",
                                ["reason"], registry=self.registry)
        self.cache = Counter("fleetid_verifier_cache_total", "Verdict cache lookups",
                             ["result"], registry=self.registry)
        self.issued = Counter("fleetid_est_issued_total", "Certificates issued through EST",
                              ["label", "operation"], registry=self.registry)
        self.latency = Histogram("fleetid_http_request_seconds", "Request handling time",
                                 ["service", "endpoint"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                          0.1, 0.25, 1.0))

        # labels() costs a lock and a tuple lookup per call: the children of the label
        # sets seen so far are kept here (a handful: endpoints x statuses).
        self._children = {}

    def _child(self, metric, *labels):
        key = (id(metric),) + labels
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def on_verdict(self, reason, cached):
        self._child(self.verdicts, reason).inc()
        self._child(self.cache, "hit" if cached else "miss").inc()

    def request_done(self, service, endpoint, status, elapsed):
        """Count one answered request and observe its handling time."""
        self._child(self.requests, service, endpoint, str(status)).inc()
        self._child(self.latency, service, endpoint).observe(elapsed)


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


def error_response(exc):
    """Response for a CloudError (status from the table, text body, Retry-After on 202)."""
    status = errors.http_status(exc)
    headers = {}
    if isinstance(exc, PendingApproval):
        headers["Retry-After"] = str(exc.retry_after)
    if status == 405:
        headers["Allow"] = getattr(exc, "allow", "GET, POST")
    body = exc.reason + (": " + exc.detail if exc.detail else "") + "\n"
    return web.Response(status=status, text=body, headers=headers, content_type="text/plain")


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
