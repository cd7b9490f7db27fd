"""EST client of the device agent (RFC 7030, with RFC 8951's clarifications), CPython host
adapter: enrolment and re-enrolment of an operational certificate whose key is generated,
attested and used inside the secure element.

    est = EstClient(se, "127.0.0.1", 8444, trust_roots_der=[fleet_root_der], label="widget")
    result = est.enroll(current_slot=1, new_slot=2)                # simpleenroll (identity)
    result = est.enroll(current_slot=2, new_slot=3, reenroll=True) # simplereenroll

One enrolment, step by step (docs/ARCHITECTURE.md "Device agent workflows", overlap
re-keying):

    1. GET <label>/nonce over mTLS with the current certificate (key in `current_slot`):
       a fresh, single-use CA nonce for the attestation.
    2. GENERATE KEY in the spare slot `new_slot` (a stale key from an abandoned attempt is
       deleted first), ATTEST it with the nonce (signed by the manufacturer attestation
       key), read the MAK certificate chain.
    3. PKCS#10 CSR (RFC 2986) with the device's current subject and the evidence
       attribute (common/attestation.py), signed inside the SE with the new key (proof
       of possession).
    4. POST <label>/simpleenroll or simplereenroll, base64 body, application/pkcs10
       (RFC 7030 4.2.1 / 4.2.2), authenticated by the current certificate (mTLS).
       202 + Retry-After (RFC 7030 4.2.3): wait (capped) and send the same request again,
       within a bounded total wait.
    5. 200: a certs-only PKCS#7 (RFC 7030 4.2.3, base64 per RFC 8951 3) of one
       certificate, checked before it is stored as the agent checks it
       (device/certcheck.py: chain to the fleet root in the SE through GET cacerts,
       signatures verified by the SE, the new key, validity, clientAuth, the identity
       certificate's names); PUT CERT beside the key.  A refused certificate: the new
       key is deleted, nothing is stored, EstClientError(WRONG_CERTIFICATE).

The old key and certificate stay where they are: the verifier accepts both during the
overlap window, and the device switches when the verifier acknowledges the new one.
Failures raise EstClientError (typed by `reason`, the HTTP status and the server's
reason text when there was an answer); the SE and TLS layers' errors pass through as
TlsClientError / ApduError.  The TLS is the portable TLS 1.3 client with the SE-held key
(device/host/se_https.py); the session tickets the server sends are kept by this client
(per key) so the requests after the first resume (PSK-DHE: no SIGN, no chain check).
"""

import base64
import binascii
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from fleetid.common import se_consts as C
from fleetid.common.errors import FleetidError, ReferenceNotFound
from fleetid.device import enrol
from fleetid.device.host.se_https import SeTlsClient, TicketCache

WELL_KNOWN = "/.well-known/est"  # RFC 7030 3.2.2
CT_PKCS10 = "application/pkcs10"  # RFC 7030 4.2.1
CT_PKCS7_MIME = "application/pkcs7-mime"  # RFC 7030 4.2.3 (certs-only)
DEFAULT_MAX_WAIT_S = 300  # total time spent waiting on 202 answers
DEFAULT_MAX_RETRY_AFTER_S = 120  # one Retry-After is capped at this
DEFAULT_MAX_ATTEMPTS = 10
OPERATIONAL_POLICY = C.POLICY_SIGN


class EstClientError(FleetidError):
    """An EST operation failed.

    reason: REFUSED (the server answered an error status: `status` and `detail` hold the
    HTTP status and the server's "<reason>: <detail>" text), PENDING (still 202 after the
    bounded wait), BAD_RESPONSE (the answer is not what RFC 7030 says), WRONG_CERTIFICATE
    (the issued certificate is not for the new key / subject), SE (the SE failed).
    """

    REFUSED = "refused"
    PENDING = "pending"
    BAD_RESPONSE = "bad_response"
    WRONG_CERTIFICATE = "wrong_certificate"
    SE = "se"

    def __init__(self, reason, detail="", status=None):
        text = reason + (" %d" % status if status is not None else "")
        super().__init__(text + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail
        self.status = status

    @property
    def server_reason(self):
        """The server's reason code (first word of its answer), or None."""
        if self.reason != self.REFUSED or not self.detail:
            return None
        return self.detail.split(":", 1)[0].strip()


class EnrolmentResult:
    """slot (the new key's slot), certificate (x509.Certificate), certificate_der,
    operation ("simpleenroll" / "simplereenroll"), attempts (requests sent), waited_s."""

    def __init__(self, slot, certificate, operation, attempts, waited_s):
        self.slot = slot
        self.certificate = certificate
        self.certificate_der = certificate.public_bytes(serialization.Encoding.DER)
        self.operation = operation
        self.attempts = attempts
        self.waited_s = waited_s


def decode_base64_body(body):
    """RFC 8951 3: base64 with or without line breaks / whitespace."""
    try:
        return base64.b64decode(b"".join(bytes(body).split()), validate=True)
    except (binascii.Error, ValueError):
        raise EstClientError(EstClientError.BAD_RESPONSE, "body is not base64") from None


def spare_slot(current_slot):
    """The slot a rotation from `current_slot` puts its new key in: the identity slot
    rotates to operational A; A and B alternate."""
    return C.SLOT_OPERATIONAL_B if current_slot == C.SLOT_OPERATIONAL_A \
        else C.SLOT_OPERATIONAL_A


class EstClient:
    """EST over mTLS with SE-held keys.

    Params: se: SeSession (selected).  host, port: the EST server.  trust_roots_der:
        DER roots for the server's certificate (the SE's fleet root anchor).
        label: EST label (None: the server's default).  sleep: (seconds) -> None (injected
        for tests).  max_wait_s / max_retry_after_s / max_attempts: the bounds on 202.
        tls_kwargs: extra SeTlsClient arguments (connect_timeout, io_timeout, now,
        tickets: a TicketCache to share with other clients of the same device).
    """

    def __init__(self, se, host, port, trust_roots_der, label=None, sleep=time.sleep,
                 max_wait_s=DEFAULT_MAX_WAIT_S, max_retry_after_s=DEFAULT_MAX_RETRY_AFTER_S,
                 max_attempts=DEFAULT_MAX_ATTEMPTS, **tls_kwargs):
        self.se = se
        self.host = host
        self.port = port
        self.trust_roots_der = list(trust_roots_der)
        self.label = label
        self.sleep = sleep
        self.max_wait_s = max_wait_s
        self.max_retry_after_s = max_retry_after_s
        self.max_attempts = max_attempts
        tls_kwargs.setdefault("tickets", TicketCache())
        self.tls_kwargs = tls_kwargs

    def _path(self, op):
        return "%s/%s%s" % (WELL_KNOWN, self.label + "/" if self.label else "", op)

    def _client(self, slot):
        try:
            cert_der = self.se.get_cert(slot)
        except ReferenceNotFound:
            raise EstClientError(EstClientError.SE, "no certificate in slot %d" % slot) \
                from None
        return SeTlsClient(self.se, slot, [cert_der], self.trust_roots_der,
                           **self.tls_kwargs)

    @staticmethod
    def _refused(response):
        text = response.body[:300].decode("utf-8", "replace").strip()
        return EstClientError(EstClientError.REFUSED, text, status=response.status)

    # -- operations -----------------------------------------------------------------------

    def cacerts(self, slot):
        """GET cacerts (RFC 7030 4.1) over the connection authenticated by `slot`.
        Returns: list of x509.Certificate.  Raises EstClientError, TlsClientError."""
        response = self._client(slot).request(self.host, self.port, "GET",
                                              self._path("cacerts"))
        if response.status != 200:
            raise self._refused(response)
        return self._certs(response)

    def nonce(self, slot, client=None):
        """GET <label>/nonce: a fresh attestation nonce (bytes) from the label's CA."""
        client = client or self._client(slot)
        response = client.request(self.host, self.port, "GET", self._path("nonce"))
        if response.status != 200:
            raise self._refused(response)
        value = decode_base64_body(response.body)
        if not 1 <= len(value) <= 64:
            raise EstClientError(EstClientError.BAD_RESPONSE, "nonce of %d bytes" % len(value))
        return value

    def build_csr(self, current_cert, new_slot, nonce):
        """Key in `new_slot` (generated inside the SE), attested with `nonce`; the CSR with
        `current_cert`'s subject and the evidence attribute, signed in the SE.
        Returns: (65-byte public point, CSR DER)."""
        subject = current_cert.subject
        names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        serials = subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        if len(names) != 1:
            raise EstClientError(EstClientError.SE, "the current certificate has no single CN")
        # An abandoned earlier attempt's key in new_slot (never certified) is replaced.
        point, _signed, csr = enrol.build_attested_csr(
            self.se, new_slot, nonce, names[0].value, serials[0].value if serials else None,
            policy=OPERATIONAL_POLICY, replace=True)
        return point, csr

    def enroll(self, current_slot, new_slot=None, reenroll=False):
        """simpleenroll (authenticated by the identity certificate) or simplereenroll
        (by the current operational certificate): new key in `new_slot` (default:
        spare_slot(current_slot)), attested with a fresh nonce, certificate stored beside it.

        Returns: EnrolmentResult.
        Raises: EstClientError (refused with status and reason, pending after the bounded
            wait, bad response, wrong certificate), TlsClientError, ApduError / LinkError.
        """
        new_slot = spare_slot(current_slot) if new_slot is None else new_slot
        if new_slot == current_slot or new_slot == C.SLOT_MAK:
            raise ValueError("new_slot must be a spare slot, not %d" % new_slot)
        client = self._client(current_slot)
        nonce = self.nonce(current_slot, client)
        point, csr = self.build_csr(client.certificate, new_slot, nonce)
        op = "simplereenroll" if reenroll else "simpleenroll"
        body = base64.encodebytes(csr)  # RFC 7030 4.2.1: base64 (line breaks allowed)
        attempts, waited = 0, 0.0
        while True:
            attempts += 1
            response = client.request(self.host, self.port, "POST", self._path(op), body,
                                      {"Content-Type": CT_PKCS10,
                                       "Content-Transfer-Encoding": "base64"})
            if response.status == 200:
                break
            if response.status != 202:
                raise self._refused(response)
            # RFC 7030 4.2.3: 202 with Retry-After (delay-seconds); send the same request.
            delay = self._retry_after(response)
            if attempts >= self.max_attempts or waited + delay > self.max_wait_s:
                raise EstClientError(EstClientError.PENDING, "still pending after %d "
                                     "requests and %.0f s" % (attempts, waited), status=202)
            self.sleep(delay)
            waited += delay
        try:
            cert = self._checked(response, current_slot, point, client.certificate)
        except EstClientError:
            enrol.clear_slot(self.se, new_slot)  # nothing refused stays in the SE
            raise
        self.se.put_cert(new_slot, cert.public_bytes(serialization.Encoding.DER))
        return EnrolmentResult(new_slot, cert, op, attempts, waited)

    def _checked(self, response, current_slot, point, current):
        # The one certificate of the answer, checked (device/certcheck.py) before storing.
        from fleetid.device import certcheck

        certs = self._certs(response)
        if len(certs) != 1:
            raise EstClientError(EstClientError.BAD_RESPONSE, "%d certificates" % len(certs))
        cert = certs[0]
        if cert.subject != current.subject:
            raise EstClientError(EstClientError.WRONG_CERTIFICATE, "the subject changed")
        checker = certcheck.CertificateChecker(self.se)
        cas = checker.verified_cas([c.public_bytes(serialization.Encoding.DER)
                                    for c in self.cacerts(current_slot)], int(time.time()))
        try:
            checker.check_issued(cert.public_bytes(serialization.Encoding.DER), cas, point,
                                 certcheck.parse_certificate(
                                     self.se.get_cert(C.SLOT_IDENTITY)), int(time.time()))
        except certcheck.CertificateRefused as exc:
            detail = "the certificate is not for the new key" \
                if exc.reason == certcheck.REASON_KEY else str(exc)
            raise EstClientError(EstClientError.WRONG_CERTIFICATE, detail) from None
        return cert

    def _retry_after(self, response):
        value = response.header("Retry-After", "")
        try:
            delay = int(value)
        except ValueError:
            # RFC 7231 7.1.3 also allows an HTTP-date; the CA sends seconds, so a date (or
            # nothing) falls back to the cap rather than guessing clocks.
            delay = self.max_retry_after_s
        return float(min(max(delay, 1), self.max_retry_after_s))

    @staticmethod
    def _certs(response):
        content_type = response.header("Content-Type", "")
        if not content_type.startswith(CT_PKCS7_MIME):
            raise EstClientError(EstClientError.BAD_RESPONSE, "content type %r" % content_type)
        data = decode_base64_body(response.body)
        try:
            return pkcs7.load_der_pkcs7_certificates(data)
        except ValueError:
            raise EstClientError(EstClientError.BAD_RESPONSE, "not a certs-only PKCS#7") \
                from None


__all__ = ["EstClient", "EstClientError", "EnrolmentResult", "spare_slot",
           "decode_base64_body"]
