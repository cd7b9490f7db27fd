"""The EST server's aiohttp handlers (RFC 7030 3.2.2 paths, RFC 8951 body rules).

    /.well-known/est[/<label>]/cacerts         GET   certs-only PKCS#7 of the CA chain
    /.well-known/est[/<label>]/csrattrs        GET   CsrAttrs
    /.well-known/est[/<label>]/nonce           GET   a fresh attestation nonce (base64),
                                                     client certificate required
    /.well-known/est[/<label>]/simpleenroll    POST  application/pkcs10 -> pkcs7-mime
    /.well-known/est[/<label>]/simplereenroll  POST  application/pkcs10 -> pkcs7-mime

Handlers parse and render only; policy is EstService's.  Served over TLS with
CERT_OPTIONAL (cacerts and csrattrs need no client certificate; the rest answer 401
without one, with a WWW-Authenticate challenge naming the TLS client certificate: RFC 7030
3.2.3 / RFC 7235 3.1, see fleetid.cloud.http.errors).  Status codes come from the one
table in fleetid.cloud.http.errors.  A device's usual nonce GET and simplereenroll are
answered off aiohttp's request path by est_fast.py, with these steps in this order;
any change here is one there too (tests/cloud/test_est_fast.py compares the two).
"""

from aiohttp import web

from fleetid.cloud.est import messages
from fleetid.cloud.http.middleware import make_middleware, read_limited
from fleetid.cloud.http.tls import peer_certificate
from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import CloudError, RequestRefused

EST_SERVICE_KEY = web.AppKey("est_service", object)
MAX_BODY = 64 * 1024  # an attested P-256 CSR is ~2 KB of DER (~3 KB base64)

_GET_OPS = (messages.OP_CACERTS, messages.OP_CSRATTRS, messages.OP_NONCE)
_POST_OPS = (messages.OP_SIMPLEENROLL, messages.OP_SIMPLEREENROLL)


def _b64_response(data, content_type, extra=None):
    headers = {"Content-Transfer-Encoding": "base64"}
    return web.Response(body=messages.encode_base64(data), headers=headers,
                        content_type=content_type, **(extra or {}))


def split_tail(tail):
    """(label or None, operation) of the path after /.well-known/est/ (est_fast.py too).
    Raises RequestRefused (404)."""
    parts = tail.split("/") if tail else []
    if len(parts) == 1:
        return None, parts[0]
    if len(parts) == 2 and parts[0]:
        if not messages.LABEL_RE.match(parts[0]):
            raise RequestRefused(errors.UNKNOWN_LABEL, "no CA under this label")
        return parts[0], parts[1]
    raise RequestRefused(errors.NOT_FOUND, "not an EST operation")


def make_est_app(service, metrics, max_body=MAX_BODY):
    """The EST aiohttp Application over an EstService."""

    async def dispatch(request):
        label, op = split_tail(request.match_info["tail"])
        if op not in _GET_OPS + _POST_OPS:
            raise RequestRefused(errors.NOT_FOUND, "not an EST operation")
        service.label(label)  # 404 for an unknown label before anything else
        wanted = "GET" if op in _GET_OPS else "POST"
        if request.method != wanted:
            exc = CloudError(errors.METHOD, "%s takes %s" % (op, wanted))
            exc.allow = wanted
            raise exc
        if op == messages.OP_CACERTS:
            return _b64_response(service.cacerts(label), messages.CT_PKCS7_MIME)
        if op == messages.OP_CSRATTRS:
            return _b64_response(service.csrattrs(label), messages.CT_CSRATTRS)
        client = peer_certificate(request)
        if client is None:
            raise CloudError(errors.NO_CLIENT_CERT, "present the device certificate (mTLS)")
        if op == messages.OP_NONCE:
            # In a thread, as enrolments: the client check reads the registry and the
            # nonce is written durably (a commit); the event loop must not wait for them.
            nonce = await _in_thread(service.nonce, label, client)
            return _b64_response(nonce, messages.CT_NONCE)
        if request.content_type != messages.CT_PKCS10:
            raise CloudError(errors.CONTENT_TYPE, "send application/pkcs10")
        body = await read_limited(request, max_body)
        csr_der = messages.decode_base64_body(body)
        reenroll = op == messages.OP_SIMPLEREENROLL
        certificate = await _in_thread(service.enroll, label, client, csr_der, reenroll)
        metrics.issued.labels(label or service.default_label, op).inc()
        response = _b64_response(messages.certs_only([certificate]), messages.CT_PKCS7_MIME)
        # RFC 7030 4.2.3: application/pkcs7-mime; smime-type=certs-only
        response.headers["Content-Type"] = "%s; smime-type=%s" % (
            messages.CT_PKCS7_MIME, messages.SMIME_CERTS_ONLY)
        return response

    app = web.Application(middlewares=[make_middleware("est", metrics)],
                          client_max_size=max_body)
    app.router.add_route("*", messages.WELL_KNOWN + "/{tail:.*}", dispatch)
    app[EST_SERVICE_KEY] = service
    return app


async def _in_thread(fn, *args):
    # Issuance signs through the HSM and writes the registry: blocking calls, kept off
    # the event loop so one slow signature does not stall every handshake.
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
