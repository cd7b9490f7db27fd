"""THE table of the fleet cloud: domain reason (fleetid.cloud.verifier.errors) -> HTTP
status, and the error response every listener renders through it (EST server and
verifier alike)."""

from aiohttp import web

from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import CloudError, PendingApproval, RateLimited

# THE table: domain reason -> HTTP status.
HTTP_STATUS = {
    errors.NO_CLIENT_CERT: 401,
    errors.MALFORMED_CERT: 401,
    errors.CHAIN: 401,
    errors.EXPIRED: 401,
    errors.NOT_YET_VALID: 401,
    errors.EKU: 403,
    errors.CA_REVOKED: 403,
    errors.UNKNOWN_DEVICE: 403,
    errors.DEVICE_STATUS: 403,
    errors.REVOKED: 403,
    errors.SUPERSEDED: 403,
    errors.ATTESTATION: 403,
    errors.BAD_BASE64: 400,
    errors.BAD_REQUEST: 400,
    errors.UNKNOWN_LABEL: 404,
    errors.NOT_FOUND: 404,
    errors.METHOD: 405,
    errors.CONTENT_TYPE: 415,
    errors.TOO_LARGE: 413,
    errors.REQUEST_TIMEOUT: 408,
    errors.DOCUMENT_LIMIT: 400,
    errors.POLICY: 403,
    errors.WRONG_CERTIFICATE_KIND: 403,
    errors.PENDING: 202,
    errors.UNAVAILABLE: 503,
    errors.RATE_LIMITED: 429,
    errors.INTERNAL: 500,
}


# RFC 7235 3.1: a 401 MUST carry a WWW-Authenticate challenge.  The credential both the
# EST server (RFC 7030 3.2.3: TLS client authentication, no HTTP-based auth here) and the
# verifier take is the TLS client certificate, which no registered HTTP scheme names; a
# Basic challenge would invite passwords nothing checks.  So the challenge is a scheme of
# our own (an RFC 7235 token) that says what to present: clients that know no scheme
# simply show the 401, and the body says "present the device certificate (mTLS)".
WWW_AUTHENTICATE = 'TLS-Client-Certificate realm="fleetid"'


def http_status(exc):
    """HTTP status for a CloudError (500 for anything else: an internal cause)."""
    if isinstance(exc, CloudError):
        return HTTP_STATUS[exc.reason]
    return HTTP_STATUS[errors.INTERNAL]


def error_parts(exc):
    """(status, headers dict, text body) of a CloudError's answer: the status from the
    table, Retry-After on 202 and 429, the challenge on 401, Allow on 405.  The aiohttp
    routes (error_response) and the fast paths (cloud/http/fast_path.py) render it."""
    status = http_status(exc)
    headers = {}
    if isinstance(exc, (PendingApproval, RateLimited)):
        headers["Retry-After"] = str(exc.retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    if status == 405:
        headers["Allow"] = getattr(exc, "allow", "GET, POST")
    return status, headers, exc.reason + (": " + exc.detail if exc.detail else "") + "\n"


def error_response(exc):
    """Response for a CloudError (error_parts)."""
    status, headers, body = error_parts(exc)
    return web.Response(status=status, text=body, headers=headers, content_type="text/plain")
