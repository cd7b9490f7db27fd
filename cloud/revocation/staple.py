"""An OCSP "staple" for the verifier's own TLS server certificate, delivered without TLS
stapling.

Why not TLS stapling (RFC 6066 8, status_request): Python's `ssl` module has no server-side
hook for it -- OpenSSL's SSL_CTX_set_tlsext_status_cb / SSL_set_tlsext_status_ocsp_resp
are not bound by the standard library (pyOpenSSL binds them, with
Context.set_ocsp_server_callback, but aiohttp's server needs a standard-library
SSLContext, and the verifier's TLS stack is that one).  So the same OCSP response a TLS
staple would carry is delivered on the same connection instead:

  * every response of the verifier carries it in the header `Fleetid-OCSP-Staple`
    (base64 DER OCSPResponse), so a device checks the server's certificate on its first
    request, with no second connection to an OCSP responder;
  * GET /ocsp/staple on the revocation listener serves the same bytes (DER,
    application/ocsp-response) for clients that want it before talking to the verifier.

A device must treat the header as it would a TLS staple: verify the response under a
responder certificate issued by the server certificate's issuer (id-kp-OCSPSigning), match
the CertID to the certificate the TLS handshake presented, check thisUpdate / nextUpdate,
and stop (send nothing sensitive) when it says revoked or is missing.  The difference from
real stapling: the check happens after the handshake, before the first request body
matters -- so the device's first request must be one that carries no secret (whoami).

The response is made by an OcspResponder whose signer is a delegated responder under the
server certificate's issuer (the fleet root on the embedded set-up), with the server
certificate as a known certificate; it is cached and re-made at half its validity.
"""

import base64
import datetime
import threading

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from fleetid.cloud.revocation.ocsp import (
    OCSP_RESPONSE_TYPE,
    OcspResponder,
    OcspSigner,
    new_ocsp_signer,
)
from fleetid.cloud.revocation.tier import Reply, Route, Tier

STAPLE_HEADER = "Fleetid-OCSP-Staple"
RESPONDER_LABEL = "ocsp-server-issuer"  # HSM key and <state_dir>/revocation/<label>.pem


class ServerStaple:
    """The cached OCSP response for one server certificate.

    Params: responder: OcspResponder able to answer for the certificate's issuer.
        server_cert / issuer_cert: x509 certificates.  clock: () -> aware datetime.
    """

    def __init__(self, responder, server_cert, issuer_cert, clock=None):
        self.responder = responder
        self.server_cert = server_cert
        self.request = ocsp.OCSPRequestBuilder().add_certificate(
            server_cert, issuer_cert, hashes.SHA1()).build().public_bytes(
            serialization.Encoding.DER)
        self.clock = clock or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self._lock = threading.Lock()
        self._der = None
        self._refresh_at = None

    def invalidate(self):
        with self._lock:
            self._der = None

    def der(self):
        """The current DER OCSPResponse (re-made at half its validity or on invalidate)."""
        with self._lock:
            now = self.clock()
            if self._der is None or now >= self._refresh_at:
                der = self.responder.respond(self.request)
                answer = ocsp.load_der_ocsp_response(der)
                this_update = answer.this_update_utc
                self._refresh_at = this_update + (answer.next_update_utc - this_update) / 2
                self._der = der
            return self._der

    def header_value(self):
        return base64.b64encode(self.der()).decode()


class StapleTier(Tier):
    """The staple tier (tier.py): GET /ocsp/staple -> the staple, DER (listed before the
    OCSP tier: its /ocsp/{request} route would take the path otherwise).  The header on
    the verifier's responses: cloud/http/revocation_app.attach_staple_header."""

    name = "staple"

    def __init__(self, staple):
        self.staple = staple

    @classmethod
    def init_keys(cls, setup):
        """The responder for the verifier's server certificate, under the root (which
        issues that certificate)."""
        return setup.write_pem(RESPONDER_LABEL + ".pem", lambda: new_ocsp_signer(
            setup.hsm, setup.root_label, setup.root_cert, RESPONDER_LABEL))

    @classmethod
    def build(cls, setup):
        cert = setup.read_pem(RESPONDER_LABEL + ".pem")
        server_cert, root = setup.server_cert, setup.root_cert
        if cert is None or server_cert is None or server_cert.issuer != root.subject:
            return None
        responder = OcspResponder(
            setup.registry, [OcspSigner(root, setup.hsm, RESPONDER_LABEL, cert)],
            revoked_cas=setup.revoked_cas, known=[server_cert])
        return cls(ServerStaple(responder, server_cert, root))

    def invalidate(self):
        self.staple.invalidate()

    def routes(self):
        return [Route("GET", "/ocsp/staple", self._get, blocking=True)]

    def _get(self, _params, _body):
        return Reply(self.staple.der(), OCSP_RESPONSE_TYPE, {"Cache-Control": "no-cache"})
