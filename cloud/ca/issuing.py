"""The issuing CA: certifies only keys that attestation proves live in a genuine SE.

Used in-process by the factory line (step 5) and, later, behind the EST endpoints.  The CA
key stays in the HSM; certificates are built with `cryptography` and signed through the
HSM (fleetid.cloud.pki.signing).

    ca = IssuingCa(hsm, "ca-widget-b42-eu", ca_cert, vendor_roots, crl_url="http://...")
    nonce = ca.issue_nonce()                  # -> the station gives it to SE ATTEST
    cert = ca.issue(csr_der, se_uid, "WX-000042", "identity")

`issue` checks, in this order (first failure wins; reason codes in errors.py):
     1. the CSR is DER PKCS#10 with a P-256 key and ecdsa-with-SHA256      bad_csr
     2. its signature verifies with its own key (proof of possession)      bad_pop
     3. it carries exactly one evidence attribute (OID_ATTR_EVIDENCE)      no_evidence /
                                                                           bad_evidence
     4. the EvidenceBundle decodes                                         bad_evidence
     5. the MAK chain validates to a trusted SE vendor root (now)          unknown_vendor
     6. every statement is signed by that MAK                              bad_statement_signature
     7. a statement attests the CSR's key                                  key_mismatch
     8. its policy flags (generated on chip, non-exportable, sign)         policy
     9. its SE UID == expected_se_uid                                      se_uid_mismatch
    10. its nonce was issued by this CA, is unexpired and unused           nonce_unknown /
                                                                           nonce_expired /
                                                                           nonce_replayed

Nonce burning.  Once step 6 has passed, the statements are authentic: a genuine chip
signed them over the nonce.  From then on the request *uses up* its nonce(s) whatever
the outcome: a statement that fails 7-9 burns the nonce of every statement in the bundle
(it cannot be retried with another CSR, key or claimed UID: no grinding over one piece of
evidence), and a successful check consumes the nonce and binds it to the CSR key.
Failures at steps 1-6 do not touch the nonce store: before step 6 nothing proves the
sender ever held evidence for that nonce, and burning on unauthenticated input would let
anyone who saw a nonce (they are not secret) cancel a station's request.  An HSM failure
after step 10 also leaves the nonce consumed: the caller fetches a new nonce.
No other state changes on a refusal.

The CA sets the subject, SAN and validity from `serial` and `profile`; it ignores the
CSR's own subject and requested extensions (the device does not choose its identity).
"""

import datetime
import hashlib
import os

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import SignatureAlgorithmOID

from fleetid.cloud.ca import errors
from fleetid.cloud.ca.errors import AttestationError, IssuanceRefused, NonceRefused
from fleetid.cloud.ca.evidence import (
    EvidenceVerifier,
    attestation_extension,
    check_statement,
    public_point,
    utc,
)
from fleetid.cloud.ca.nonces import InMemoryNonceStore
from fleetid.cloud.pki import profiles
from fleetid.cloud.pki.errors import PkiError
from fleetid.cloud.pki.signing import CertificateSigner
from fleetid.common import der
from fleetid.common.errors import DerError
from fleetid.common.oids import OID_ATTR_EVIDENCE

NONCE_BYTES = 32  # within ATTEST's 1..64 (se_consts.ATTEST_NONCE_MAX)
DEFAULT_NONCE_TTL = datetime.timedelta(minutes=5)


def _system_clock():
    return datetime.datetime.now(datetime.timezone.utc)


def _refuse(reason, detail=""):
    raise IssuanceRefused(reason, detail)


class ParsedCsr:
    """A CSR whose proof of possession parse_csr checked: der (bytes), spki (DER
    SubjectPublicKeyInfo of its key),
    public_key (its key), point (the key's 65-byte uncompressed P-256 point), subject
    (its x509.Name).  Hand it to IssuingCa.issue(parsed_csr=...) so the request is not
    parsed and its signature not verified twice (the EST service checks the CSR before
    the CA does).  The key and subject are kept because cryptography builds a new
    object on every csr.public_key() / csr.subject access."""

    __slots__ = ("der", "spki", "public_key", "point", "subject")

    def __init__(self, der_bytes, spki, public_key, point, subject):
        self.der, self.spki = der_bytes, spki
        self.public_key, self.point, self.subject = public_key, point, subject


def parse_csr(csr_der):
    """Parse a CSR and check its proof of possession.

    Returns: ParsedCsr.
    Raises: IssuanceRefused(bad_csr / bad_pop).
    """
    if not isinstance(csr_der, (bytes, bytearray, memoryview)):
        _refuse(errors.BAD_CSR, "CSR must be bytes")
    csr_der = bytes(csr_der)
    try:
        csr = x509.load_der_x509_csr(csr_der)
        public_key = csr.public_key()
        algorithm = csr.signature_algorithm_oid
        subject = csr.subject  # parsed lazily: a malformed subject is refused here
    except Exception:  # noqa: BLE001 - untrusted DER: ValueError, InvalidVersion,
        # UnsupportedAlgorithm, ...; every parse failure is a refusal.
        _refuse(errors.BAD_CSR, "not a DER PKCS#10 request")
    try:
        point = public_point(public_key)
    except ValueError:
        _refuse(errors.BAD_CSR, "key is not P-256")
    if algorithm != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        _refuse(errors.BAD_CSR, "signature algorithm is not ecdsa-with-SHA256")
    try:
        valid = csr.is_signature_valid
    except Exception:  # noqa: BLE001 - a signature that cannot be checked is no proof
        valid = False
    if not valid:
        _refuse(errors.BAD_POP)
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ParsedCsr(csr_der, spki, public_key, point, subject)


_EVIDENCE_OID_TLV = der.encode_oid(OID_ATTR_EVIDENCE)
_ATTRIBUTES_TAG = 0xA0  # [0] IMPLICIT SET OF Attribute, constructed (RFC 2986 4.1)


def evidence_from_csr(csr_der):
    """The DER EvidenceBundle carried in the CSR's evidence attribute (OID_ATTR_EVIDENCE).

    Exactly one such attribute with exactly one value is accepted.  Walks the request
    with the strict DER reader of fleetid.common.der (RFC 2986 4.1: CertificationRequest
    -> certificationRequestInfo -> attributes [0] IMPLICIT SET OF Attribute { type,
    values SET OF ANY }); only the attribute types are compared, no value of another
    attribute is decoded.
    Raises: IssuanceRefused(no_evidence / bad_evidence / bad_csr).
    """
    found = []
    try:
        outer = der.DerReader(bytes(csr_der))
        request = outer.read_sequence()
        outer.finish()
        info = request.read_sequence()
        info.read_integer()                   # version
        info.read_raw(der.TAG_SEQUENCE)       # subject
        info.read_raw(der.TAG_SEQUENCE)       # subjectPKInfo
        attributes = info.read_context(0) if not info.at_end() else der.DerReader(b"")
        info.finish()
        while not attributes.at_end():
            attribute = attributes.read_sequence()
            oid_tlv = attribute.read_raw(der.TAG_OID)
            values = attribute.read_set()
            attribute.finish()
            if oid_tlv == _EVIDENCE_OID_TLV:
                found.append(der.set_elements(values))
    except DerError:
        _refuse(errors.BAD_CSR, "attributes")
    if not found:
        _refuse(errors.NO_EVIDENCE)
    if len(found) != 1 or len(found[0]) != 1:
        _refuse(errors.BAD_EVIDENCE, "evidence attribute must hold exactly one bundle")
    return found[0][0]


class IssuingCa:
    """An attestation-gated issuing CA.  Thread-safe (stations call it in parallel)."""

    def __init__(self, hsm, ca_label, ca_certificate, vendor_roots, nonce_store=None,
                 clock=None, nonce_ttl=DEFAULT_NONCE_TTL, crl_url=None, evidence_verifier=None,
                 verify_signatures="always"):
        """Params: hsm: HsmBackend holding the CA key.  ca_label: its label.
            ca_certificate: x509.Certificate of this CA (its key must be the HSM key).
            vendor_roots: iterable of trusted SE vendor root x509.Certificates.
            nonce_store: a NonceStore (default: InMemoryNonceStore()).
            clock: callable returning an aware datetime (default: system UTC time).
            nonce_ttl: timedelta a nonce stays usable.  crl_url: this CA's CRL
            distribution point (str) or None.  evidence_verifier: an EvidenceVerifier
            (default: one over vendor_roots).  verify_signatures: "always" (check every
            HSM signature before releasing the certificate) or "first" (the hot-path
            policy of an EST CA: see fleetid.cloud.pki.signing.CertificateSigner).
        Raises: PkiError(KEY_MISMATCH) if the HSM key is not the certificate's key,
            PkiError(BAD_INPUT) if the certificate is not a CA; KeyNotFound.
        """
        ca_key = ca_certificate.public_key()
        if hsm.public_key(ca_label).public_numbers() != ca_key.public_numbers():
            raise PkiError(PkiError.KEY_MISMATCH, "HSM key %r is not the CA's key" % ca_label)
        self.signer = CertificateSigner(hsm, ca_label, ca_key, verify=verify_signatures)
        try:
            constraints = ca_certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.value.ca:
            raise PkiError(PkiError.BAD_INPUT, "the issuing certificate is not a CA")
        if not isinstance(nonce_ttl, datetime.timedelta) or nonce_ttl <= datetime.timedelta(0):
            raise PkiError(PkiError.BAD_INPUT, "nonce_ttl must be a positive timedelta")
        self.hsm = hsm
        self.ca_label = ca_label
        self.ca_certificate = ca_certificate
        self.crl_url = crl_url
        self.nonce_ttl = nonce_ttl
        self.nonce_store = nonce_store if nonce_store is not None else InMemoryNonceStore()
        self.evidence_verifier = evidence_verifier or EvidenceVerifier(vendor_roots)
        self._clock = clock or _system_clock

    def _now(self, now):
        try:
            return utc(self._clock() if now is None else now)
        except ValueError:
            raise PkiError(PkiError.BAD_INPUT, "times must be timezone-aware") from None

    def issue_nonce(self, now=None):
        """A fresh attestation nonce (32 random bytes), usable once within nonce_ttl.

        Params: now: aware datetime (default: the injected clock).
        Returns: bytes, to be passed to the SE's ATTEST.
        """
        now = self._now(now)
        while True:
            nonce = os.urandom(NONCE_BYTES)
            try:
                self.nonce_store.add(nonce, now, now + self.nonce_ttl)
                return nonce
            except ValueError:  # a 256-bit collision: draw again
                continue

    def issue(self, csr_der, expected_se_uid, serial, profile, now=None, parsed_csr=None):
        """Verify an attested CSR and issue a device certificate (checks: module docstring).

        Params: csr_der: DER PKCS#10 request built and signed by the SE.
            expected_se_uid: bytes, the UID the line read from this chip / the registry
            holds for this device.  serial: the device serial (str, becomes CN,
            serialNumber and urn:fleetid:device:<serial>).  profile: "identity",
            "operational" or a CertificateProfile.  now: aware datetime (default: clock).
            parsed_csr: the ParsedCsr of exactly these bytes from parse_csr (skips a
            second parse and signature check), or None.
        Returns: x509.Certificate with the attestation extension (non-critical,
            OID_EXT_ATTESTATION, a minimal EvidenceBundle: the key's statement + the MAK
            certificate and vendor intermediates).
        Raises: IssuanceRefused(reason) for any refusal; PkiError(BAD_INPUT / VALIDITY)
            for caller mistakes (checked before anything else, no state touched);
            HsmError / KeyNotFound if signing fails.
        """
        now = self._now(now)
        profile = profiles.get_profile(profile)
        profiles.check_device_serial(serial)
        if not isinstance(expected_se_uid, (bytes, bytearray)) or not expected_se_uid:
            raise PkiError(PkiError.BAD_INPUT, "expected_se_uid must be non-empty bytes")
        if now.replace(microsecond=0) + profile.validity > self.ca_certificate.not_valid_after_utc:
            raise PkiError(PkiError.VALIDITY, "%s certificate would outlive the CA" % profile.name)

        if not isinstance(parsed_csr, ParsedCsr) or parsed_csr.der != csr_der:
            parsed_csr = parse_csr(csr_der)
        bundle_der = evidence_from_csr(parsed_csr.der)
        try:
            evidence = self.evidence_verifier.authenticate(bundle_der, now)
        except AttestationError as exc:
            raise IssuanceRefused(exc.reason, exc.detail) from None

        # The statements are authentic from here on: the nonce(s) get used up.
        signed = self._use_nonces(evidence, parsed_csr.point, parsed_csr.spki,
                                  expected_se_uid, now)

        extension = attestation_extension(evidence.minimal_bundle(signed))
        builder = profiles.device_builder(
            profile, serial, parsed_csr.public_key, self.ca_certificate, now,
            crl_url=self.crl_url,
            extra_extensions=[(extension, False)],
        )
        return self.signer.sign(builder)

    def _use_nonces(self, evidence, point, spki, expected_se_uid, now):
        """Consume the nonce of the authenticated statement for the CSR's key (`point`),
        bound to that key (or, when that statement is refused, every nonce of the
        evidence, so a refused request cannot be replayed), then refuse if anything failed.
        Returns: the key's SignedAttestation.  Raises: IssuanceRefused."""
        refusal = None
        try:
            signed = evidence.statement_for_point(point)
            check_statement(signed, expected_se_uid)
            to_consume = [signed.statement.nonce]
        except AttestationError as exc:
            refusal = exc
            to_consume = evidence.nonces()
        bound_key = hashlib.sha256(spki).digest()
        nonce_refusal = None
        for nonce in to_consume:
            try:
                self.nonce_store.consume(nonce, now, bound_key)
            except NonceRefused as exc:
                nonce_refusal = nonce_refusal or exc
        if refusal is not None:
            raise IssuanceRefused(refusal.reason, refusal.detail)
        if nonce_refusal is not None:
            raise IssuanceRefused(nonce_refusal.reason)
        return signed
