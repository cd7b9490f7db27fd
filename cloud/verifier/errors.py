"""Domain errors of the fleet cloud's verifier and EST services, and their reason codes.
The one table mapping a reason to an HTTP status is fleetid.cloud.http.errors.HTTP_STATUS
(the services know no HTTP; the middleware renders their errors through that table).

A refusal carries a `reason` (a short code from the table below) and a `detail` (a short,
secret-free sentence a device operator can act on).  Both may reach the client: they
describe *the client's* request.  Internal causes (exceptions, storage errors, stack
traces) never do: the handlers log them and answer 500/503 with a generic body.
"""

from fleetid.common.errors import FleetidError


class CloudError(FleetidError):
    """Base of the cloud's request-level errors.  `reason` is one of REASONS."""

    def __init__(self, reason, detail=""):
        if reason not in REASONS:
            raise ValueError("unknown cloud reason %r" % (reason,))
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


class AccessRefused(CloudError):
    """The peer's certificate does not authenticate a device we accept."""


class RequestRefused(CloudError):
    """The request itself is refused (malformed, not allowed, policy)."""


class PendingApproval(CloudError):
    """The request is deferred until an operator approves it (EST 202, RFC 7030 4.2.3).

    `retry_after` is the number of seconds the client should wait."""

    def __init__(self, retry_after, detail="awaiting approval"):
        super().__init__(PENDING, detail)
        self.retry_after = int(retry_after)


class RateLimited(CloudError):
    """The client is over its request rate (a token bucket per address: 429 with
    Retry-After).  `retry_after` is whole seconds."""

    def __init__(self, retry_after, detail="too many requests"):
        super().__init__(RATE_LIMITED, detail)
        self.retry_after = int(retry_after)


# -- reason codes ------------------------------------------------------------------------------
# Client authentication (verifier and EST).
NO_CLIENT_CERT = "no_client_certificate"
MALFORMED_CERT = "malformed_certificate"
CHAIN = "chain"  # does not validate to the fleet's roots (another fleet, bad signature)
EXPIRED = "expired"  # past notAfter (no overlap window makes an expired certificate valid)
NOT_YET_VALID = "not_yet_valid"
EKU = "eku"  # no clientAuth extended key usage
CA_REVOKED = "ca_revoked"  # a CA of the chain (a batch intermediate) is revoked
UNKNOWN_DEVICE = "unknown_device"  # the certificate or its device is not in the registry
DEVICE_STATUS = "device_status"  # the device is held / in flight / revoked
REVOKED = "revoked"  # this certificate is revoked
SUPERSEDED = "superseded"  # an older certificate after its overlap window closed
ATTESTATION = "attestation"  # the attestation extension does not check out
# Requests (EST).
BAD_BASE64 = "bad_base64"
BAD_REQUEST = "bad_request"  # not DER / not a CSR / CSR signature invalid / bad JSON
UNKNOWN_LABEL = "unknown_label"
NOT_FOUND = "not_found"
METHOD = "method_not_allowed"
CONTENT_TYPE = "unsupported_content_type"
TOO_LARGE = "too_large"
DOCUMENT_LIMIT = "document_limit"  # a JSON body nested deeper than the bound (mqttmsg.MAX_DEPTH)
POLICY = "policy"  # the CA's or the EST policy's refusal (attestation, subject change, ...)
WRONG_CERTIFICATE_KIND = "wrong_certificate_kind"
PENDING = "pending_approval"
UNAVAILABLE = "unavailable"  # storage / HSM failure: the client may retry later
RATE_LIMITED = "rate_limited"  # over the per-client rate: retry after `retry_after` s
INTERNAL = "internal_error"
REQUEST_TIMEOUT = "request_timeout"  # the request body did not arrive within the bound

REASONS = frozenset([
    NO_CLIENT_CERT, MALFORMED_CERT, CHAIN, EXPIRED, NOT_YET_VALID, EKU, CA_REVOKED,
    UNKNOWN_DEVICE, DEVICE_STATUS, REVOKED, SUPERSEDED, ATTESTATION, BAD_BASE64, BAD_REQUEST,
    UNKNOWN_LABEL, NOT_FOUND, METHOD, CONTENT_TYPE, TOO_LARGE, DOCUMENT_LIMIT, POLICY,
    WRONG_CERTIFICATE_KIND, PENDING, UNAVAILABLE, RATE_LIMITED, INTERNAL, REQUEST_TIMEOUT,
])
