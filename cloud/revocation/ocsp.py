"""RFC 6960 OCSP responder for always-connected verifiers, built with `cryptography`'s OCSP
support and signed through the HSM by a delegated responder certificate per issuing CA.

    responder = OcspResponder(registry, [OcspSigner(ca_cert, hsm, "ocsp-b42", cert), ...],
                              revoked_cas=...)
    der = responder.respond(request_der)        # signed now, from the registry's state

The listener does not call respond() per request: OcspTier (ocsp_tier.py) answers from
pre-signed responses (ocsp_cache.py) made with sign_response(), and signs per request
only nonces, misses and unknown serials.

Delegation (RFC 6960 4.2.2.2): each issuing CA certifies a responder key kept in the HSM
(`new_ocsp_signer`): extendedKeyUsage id-kp-OCSPSigning, id-pkix-ocsp-nocheck (4.2.2.2.1:
clients need not check the responder certificate's own revocation; it is short-lived
instead, 30 days by default), digitalSignature.  The responder certificate travels in the
response's `certs` so a client holding the CA can verify it (`openssl ocsp -VAfile` not
needed).

Signing through the HSM: `OCSPResponseBuilder.sign` wants a private key object, and the
responder key never leaves the HSM, so the builder signs once with a throwaway key (as
cloud/pki/signing.py does for certificates), its `tbs_response_bytes` are signed by the
HSM, and the BasicOCSPResponse is re-assembled (4.2.1).  The builder also checks that
the certificate it is given matches that key, so it gets a stand-in certificate with the
responder's subject, and the ResponderID is byName (the real responder certificate goes
into `certs`):

    OCSPResponse ::= SEQUENCE {
        responseStatus   ENUMERATED { successful (0), ... },
        responseBytes    [0] EXPLICIT SEQUENCE {
            responseType   OBJECT IDENTIFIER,      -- id-pkix-ocsp-basic
            response       OCTET STRING } }        -- DER BasicOCSPResponse
    BasicOCSPResponse ::= SEQUENCE {
        tbsResponseData  ResponseData,             -- verbatim from the builder
        signatureAlgorithm AlgorithmIdentifier,    -- ecdsa-with-SHA256
        signature        BIT STRING,               -- the HSM's DER ECDSA-Sig-Value
        certs            [0] EXPLICIT SEQUENCE OF Certificate }   -- the responder's

Answers (one revocation state with the CRLs and the compact set, read from the registry
when the response is signed; the cache re-signs on every revocation event):
  * good: the certificate is in the registry and not revoked;
  * revoked: revoked in the registry (time and reason from it), or its issuing CA is
    revoked (batch revocation: reason cACompromise, time of the CA's revocation);
  * unknown: the issuer is one of ours but the serial is not in the registry;
  * responseStatus unauthorized (6) for an issuer that is not ours (2.3), malformedRequest
    (1) for a request that does not parse.
Nonces (RFC 8954 / 6960 4.4.1): a request's nonce of 1..32 octets is echoed (RFC 8954
2.1: Nonce ::= OCTET STRING (SIZE(1..32))); a request whose nonce is empty or longer than
32 octets is answered malformedRequest (2.1: the responder MUST reject it) and nothing is
echoed.  A response signed here has thisUpdate = producedAt = now and nextUpdate =
now + `validity` (the cache's own validity for the answers it keeps).
"""

import base64
import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetid.cloud.pki.profiles import to_utc_seconds, utc_now
from fleetid.cloud.pki.signing import _throwaway_key, sign_certificate
from fleetid.cloud.registry.errors import RegistryError
from fleetid.common import der

OCSP_REQUEST_TYPE = "application/ocsp-request"  # RFC 6960 A.1
OCSP_RESPONSE_TYPE = "application/ocsp-response"  # RFC 6960 A.2
OID_PKIX_OCSP_BASIC = "1.3.6.1.5.5.7.48.1.1"
DEFAULT_VALIDITY = datetime.timedelta(minutes=10)
MAX_REQUEST = 4096
# RFC 8954 2.1: a nonce is 1 to 32 octets; anything else is a malformedRequest.
MIN_NONCE = 1
MAX_NONCE = 32
_REASONS = {flag.value: flag for flag in x509.ReasonFlags
            if flag not in (x509.ReasonFlags.unspecified, x509.ReasonFlags.remove_from_crl)}


def new_ocsp_signer(hsm, ca_label, ca_cert, key_label, now=None,
                    validity=datetime.timedelta(days=30)):
    """Create a delegated OCSP responder key in the HSM and certify it with the issuing
    CA (RFC 6960 4.2.2.2).  Returns: x509.Certificate."""
    not_before = to_utc_seconds(now) if now is not None else utc_now()
    public_key = hsm.generate_signing_key(key_label)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(
                   NameOID.COMMON_NAME, ("OCSP " + _common_name(ca_cert))[:64])]))
               .issuer_name(ca_cert.subject)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before - datetime.timedelta(minutes=5))
               .not_valid_after(min(not_before + validity, ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                            False, False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]),
                              critical=False)
               .add_extension(x509.OCSPNoCheck(), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                   ski), critical=False))
    return sign_certificate(hsm, ca_label, builder, ca_cert.public_key())


def _common_name(cert):
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return names[0].value if names else cert.subject.rfc4514_string()


class OcspSigner:
    """One issuing CA's responder: the CA certificate, the HSM and the responder key's
    label and certificate."""

    def __init__(self, ca_cert, hsm, key_label, responder_cert):
        self.ca_cert = ca_cert
        self.hsm = hsm
        self.key_label = key_label
        self.responder_cert = responder_cert
        self.issuer_text = ca_cert.subject.rfc4514_string()
        self.responder_der = responder_cert.public_bytes(serialization.Encoding.DER)
        key_bits = ca_cert.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        name = ca_cert.subject.public_bytes()
        # CertID hashes (4.1.1): of the issuer's Name DER and of its key's BIT STRING value.
        self.ids = {}
        self.hashes = {}  # algorithm name -> (issuerNameHash, issuerKeyHash)
        for algorithm, fn in (("sha1", hashlib.sha1), ("sha256", hashlib.sha256)):
            self.hashes[algorithm] = (fn(name).digest(), fn(key_bits).digest())
            self.ids[(algorithm,) + self.hashes[algorithm]] = True
        # The builder insists on holding the responder's private key; it holds a stand-in
        # certificate with the responder's subject and the throwaway key instead, and
        # the ResponderID is byName (4.2.2.3), so the TBS names the real responder.
        stand_in_key = _throwaway_key()
        self.stand_in = (x509.CertificateBuilder()
                         .subject_name(responder_cert.subject)
                         .issuer_name(responder_cert.subject)
                         .public_key(stand_in_key.public_key())
                         .serial_number(1)
                         .not_valid_before(responder_cert.not_valid_before_utc)
                         .not_valid_after(responder_cert.not_valid_after_utc)
                         .sign(stand_in_key, hashes.SHA256()))
        self.key_id = ca_cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value.digest

    def matches(self, request):
        return (request.hash_algorithm.name, request.issuer_name_hash,
                request.issuer_key_hash) in self.ids


def _status_only(status):
    # OCSPResponse with no responseBytes (responseStatus other than successful).
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER)


MALFORMED = _status_only(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
UNAUTHORIZED = _status_only(ocsp.OCSPResponseStatus.UNAUTHORIZED)
TRY_LATER = _status_only(ocsp.OCSPResponseStatus.TRY_LATER)


def read_request(request_der):
    """Parse a DER OCSPRequest.  Returns (OCSPRequest, x509.OCSPNonce or None, None), or
    (None, None, the DER malformedRequest response) for a request that does not parse or
    whose nonce is outside 1..32 octets (RFC 8954 2.1)."""
    try:
        request = ocsp.load_der_ocsp_request(bytes(request_der))
    except (ValueError, TypeError, NotImplementedError):
        # NotImplementedError: several certificates in one request, which
        # `cryptography` does not parse (a known limit; clients ask one at a time).
        return None, None, MALFORMED
    try:
        nonce = request.extensions.get_extension_for_class(x509.OCSPNonce).value
    except x509.ExtensionNotFound:
        nonce = None
    except (ValueError, TypeError):  # an extension that does not parse
        return None, None, MALFORMED
    if nonce is not None and not MIN_NONCE <= len(nonce.nonce) <= MAX_NONCE:
        return None, None, MALFORMED
    return request, nonce, None


def _parse_time(text):
    when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when.astimezone(datetime.timezone.utc).replace(microsecond=0)


class OcspResponder:
    """Answers OCSP requests from the registry's revocation state.

    Params: registry: Registry.  signers: OcspSigner list (one per issuing CA).
        revoked_cas: () -> {CA key identifier (20 bytes): revoked_at aware datetime}
        (batch revocation; default none).  validity: nextUpdate - thisUpdate.  clock:
        () -> aware datetime.
    """

    def __init__(self, registry, signers, revoked_cas=None, validity=DEFAULT_VALIDITY,
                 clock=None, known=()):
        # known: certificates outside the registry this responder vouches for (the
        # verifier's TLS server certificate, staple.py): good unless their own key id is
        # in revoked_cas (an entry in the revoked-CA file names any certificate).
        self.known = dict((c.serial_number, c) for c in known)
        self.registry = registry
        self.signers = list(signers)
        self.revoked_cas = revoked_cas or (lambda: {})
        self.validity = validity
        self.clock = clock or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self.responses = 0

    def respond(self, request_der):
        """The DER OCSPResponse for a DER OCSPRequest (never raises for bad input: a
        malformed request gets responseStatus malformedRequest)."""
        request, nonce, refusal = read_request(request_der)
        if refusal is not None:
            return refusal
        signer = self.signer_for(request)
        if signer is None:
            return UNAUTHORIZED
        return self.sign_response(signer, request.hash_algorithm, request.serial_number,
                                  nonce)[0]

    def signer_for(self, request):
        """The OcspSigner whose CA the request's CertID names, or None (not ours)."""
        return next((s for s in self.signers if s.matches(request)), None)

    def sign_response(self, signer, algorithm, serial, nonce=None, validity=None):
        """Read the certificate's status now and sign a response for it (CertID hashed
        with `algorithm`, a cryptography hash instance: SHA1 or SHA256).
        nonce: the request's x509.OCSPNonce to echo, or None.  validity: nextUpdate -
        thisUpdate (default the responder's).
        Returns (DER OCSPResponse, OCSPCertStatus, thisUpdate, nextUpdate)."""
        name_hash, key_hash = signer.hashes[algorithm.name]
        now = self.clock().astimezone(datetime.timezone.utc).replace(microsecond=0)
        next_update = now + (validity or self.validity)
        status, revoked_at, reason = self._status(signer, serial)
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            name_hash, key_hash, serial, algorithm, status, now, next_update, revoked_at,
            reason)
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.NAME, signer.stand_in)
        if nonce is not None:
            builder = builder.add_extension(nonce, critical=False)
        self.responses += 1
        return self._sign(signer, builder), status, now, next_update

    def _status(self, signer, serial):
        ca_revoked = self.revoked_cas().get(signer.key_id)
        if ca_revoked is not None:
            return (ocsp.OCSPCertStatus.REVOKED, ca_revoked.astimezone(
                datetime.timezone.utc).replace(microsecond=0), x509.ReasonFlags.ca_compromise)
        known = self.known.get(serial)
        if known is not None and known.issuer == signer.ca_cert.subject:
            try:
                own_id = known.extensions.get_extension_for_class(
                    x509.SubjectKeyIdentifier).value.digest
            except x509.ExtensionNotFound:
                own_id = None
            when = self.revoked_cas().get(own_id)
            if when is not None:
                return (ocsp.OCSPCertStatus.REVOKED, when.astimezone(
                    datetime.timezone.utc).replace(microsecond=0),
                    x509.ReasonFlags.key_compromise)
            return ocsp.OCSPCertStatus.GOOD, None, None
        try:
            record = self.registry.certificate_status(serial, issuer=signer.issuer_text)
        except RegistryError:  # not found (or ambiguous): not a certificate we vouch for
            return ocsp.OCSPCertStatus.UNKNOWN, None, None
        if record.revoked:
            return (ocsp.OCSPCertStatus.REVOKED, _parse_time(record.revoked_at),
                    _REASONS.get(record.revocation_reason or ""))
        return ocsp.OCSPCertStatus.GOOD, None, None

    def _sign(self, signer, builder):
        draft = builder.sign(_throwaway_key(), hashes.SHA256())
        tbs = draft.tbs_response_bytes
        signature = signer.hsm.sign(signer.key_label, tbs)
        basic = der.encode_sequence([
            tbs, der.ecdsa_with_sha256_algorithm(), der.encode_bit_string(signature),
            der.encode_context(0, der.encode_sequence([signer.responder_der]))])
        response_bytes = der.encode_sequence([der.encode_oid(OID_PKIX_OCSP_BASIC),
                                              der.encode_octet_string(basic)])
        return der.encode_sequence([der.encode_tlv(0x0A, b"\x00"),  # ENUMERATED successful
                                    der.encode_context(0, response_bytes)])


def decode_get_path(path_tail):
    """RFC 6960 A.1: GET {url}/{url-encoding of base64 encoding of the DER OCSPRequest}.
    Returns the request DER.  Raises ValueError."""
    from urllib.parse import unquote

    text = unquote(path_tail)
    return base64.b64decode(text, validate=True)
