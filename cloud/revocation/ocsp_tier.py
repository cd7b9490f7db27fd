"""The OCSP tier (tier.py) on the revocation listener: the responder (ocsp.py) behind the
pre-signed cache (ocsp_cache.py), its routes and its status probe."""

import hashlib

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from fleetid.cloud.revocation.ocsp import (
    MALFORMED,
    OCSP_REQUEST_TYPE,
    OCSP_RESPONSE_TYPE,
    MAX_REQUEST,
    OcspResponder,
    OcspSigner,
    decode_get_path,
    new_ocsp_signer,
)
from fleetid.cloud.revocation.ocsp_cache import OcspCache
from fleetid.cloud.revocation.tier import Deferred, Reply, Route, Tier


class OcspTier(Tier):
    """The OCSP tier (tier.py): RFC 6960 / RFC 5019 over plain HTTP, answered from the
    pre-signed cache (ocsp_cache.py) and signed per request for nonces, misses and
    unknown serials.

        POST /ocsp, /ocsp/     body: DER OCSPRequest (application/ocsp-request, at most
                               MAX_REQUEST bytes)
        GET  /ocsp/<base64>    RFC 6960 A.1 / RFC 5019 5 (a path that does not decode: a
                               malformedRequest OCSP answer, as the RFC wants)
    Both answer application/ocsp-response; a cached answer carries RFC 5019 6.2 headers
    (Cache-Control max-age up to nextUpdate, ETag, Last-Modified, Expires), the others
    Cache-Control no-store.  The routes are client-limited (the listener's token bucket
    per client address: revocation_app.py).

    Params: responder: OcspResponder.  cache: an OcspCache over it (default: one with
        its defaults).
    """

    name = "ocsp"

    def __init__(self, responder, cache=None):
        self.responder = responder
        self.cache = cache if cache is not None else OcspCache(responder)
        self.clock = responder.clock

    def invalidate(self):
        self.cache.invalidate()

    def start(self):
        self.cache.start()

    def stop(self):
        self.cache.stop()

    @classmethod
    def init_keys(cls, setup):
        """One delegated responder per issuing CA: ocsp-<CA key label>.pem."""
        written = []
        for ca_key, ca_cert in setup.issuers:
            written += setup.write_pem("ocsp-%s.pem" % ca_key, lambda: new_ocsp_signer(
                setup.hsm, ca_key, ca_cert, "ocsp-" + ca_key))
        return written

    @classmethod
    def build(cls, setup):
        signers = []
        for ca_key, ca_cert in setup.issuers:
            cert = setup.read_pem("ocsp-%s.pem" % ca_key)
            if cert is not None:
                signers.append(OcspSigner(ca_cert, setup.hsm, "ocsp-" + ca_key, cert))
        if not signers:
            return None
        responder = OcspResponder(setup.registry, signers, revoked_cas=setup.revoked_cas)
        return cls(responder, OcspCache(responder, epoch=setup.revocation_epoch))

    def routes(self):
        return [Route("POST", "/ocsp", self._post, OCSP_REQUEST_TYPE, MAX_REQUEST,
                      client_limited=True),
                Route("POST", "/ocsp/", self._post, OCSP_REQUEST_TYPE, MAX_REQUEST,
                      client_limited=True),
                Route("GET", "/ocsp/{request:.+}", self._get, client_limited=True)]

    def answer(self, request_der):
        """Reply (from the cache) or Deferred (a signature is needed) for a DER request:
        what both routes, and any other listener, serve."""
        answer = self.cache.prepare(request_der)
        if answer.query is None:
            return self._reply(answer)
        return Deferred(lambda: self._reply(self.cache.sign(answer.query)))

    def _reply(self, answer):
        return Reply(answer.der, OCSP_RESPONSE_TYPE,
                     answer.headers(self.clock().timestamp()))

    def _post(self, _params, body):
        return self.answer(body)

    def _get(self, params, _body):
        return self.answer_path(params["request"])

    def answer_path(self, path_tail):
        """answer() for a GET: `path_tail` is what follows /ocsp/ (RFC 6960 A.1: the
        URL-encoded base64 of the DER request); one that does not decode gets a
        malformedRequest answer."""
        try:
            data = decode_get_path(path_tail)
        except ValueError:
            return Reply(MALFORMED, OCSP_RESPONSE_TYPE, {"Cache-Control": "no-store"})
        return self.answer(data)

    @staticmethod
    def status(base_url, facts, fetch, failed):
        """A probe about serial 1 of the first issuing CA: any answer (good / unknown /
        revoked) shows the responder is up, signed and how long its answers last."""
        url = base_url + "/ocsp"
        if not facts["ca_certs"]:
            return {"error": "NoIssuingCa", "url": url, "cause": "no issuing CA configured"}
        ca = facts["ca_certs"][0]
        point = ca.public_key().public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint)
        request = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            hashlib.sha1(ca.subject.public_bytes()).digest(), hashlib.sha1(point).digest(), 1,
            hashes.SHA1()).build().public_bytes(serialization.Encoding.DER)
        try:
            answer = ocsp.load_der_ocsp_response(fetch(url, request, OCSP_REQUEST_TYPE))
        except Exception as exc:  # noqa: BLE001 - reported, never a traceback
            return failed(url, exc)
        if answer.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            return {"response_status": answer.response_status.name}
        return {"response_status": "SUCCESSFUL",
                "this_update": answer.this_update_utc.isoformat(),
                "next_update": answer.next_update_utc.isoformat(),
                "responder": answer.certificates[0].subject.rfc4514_string(),
                "freshness": "pre-signed, refreshed ahead of nextUpdate (nonces signed "
                             "per request)"}
