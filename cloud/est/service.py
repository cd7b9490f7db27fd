"""The EST service: enrolment policy between the HTTP handlers
(fleetid.cloud.http.est_app) and the attestation-gated issuing CA (fleetid.cloud.ca).  No
HTTP here: handlers pass the peer's DER certificate and the decoded request; refusals are
CloudErrors (fleetid.cloud.verifier.errors; their HTTP status: fleetid.cloud.http.errors).

Policy
------
- Every EST operation but cacerts / csrattrs needs a client certificate that the fleet
  verifier accepts (chain to a fleet root, attestation extension, registry status,
  revocation, overlap: fleetid.cloud.verifier.service).
- simpleenroll (initial enrolment, RFC 7030 4.2.1): authenticated by the device's factory
  *identity* certificate; the CSR names the same device (CN and serialNumber = the
  device serial) and carries fresh SE attestation evidence for a *new* key; the CA checks
  the evidence against the registry's SE UID for that device and a nonce it issued
  (GET <label>/nonce, single use, expiring).
- simplereenroll (RFC 7030 4.2.2): authenticated by the current *operational*
  certificate (or the previous one inside its overlap window); the CSR subject must be
  the certificate's subject, the key must be new and attested.  The old certificate stays
  valid for `overlap` (capped at its notAfter) or until the device acknowledges the new
  one at the verifier, whichever is first (rotation state: fleetid.cloud.registry.rotation,
  written with the certificate in one registry transaction).
- Labels (RFC 7030 3.2.2) map to issuing CAs (product / batch / region scopes).  A label
  configured with `require_approval` answers 202 + Retry-After (RFC 7030 4.2.3) until an
  operator approves the device (`approve`).  Approvals live in an approval store: in
  this process (InMemoryApprovals, the default) or in the registry's database
  (cloud/registry/shared_state.ApprovalTable), which every EST worker shares.
- A refusal writes nothing: no certificate, no registry change.  (The CA's nonce-burning
  rule still applies: once evidence is authenticated its nonce is used up.)
"""

import datetime
import logging
import threading

from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fleetid.cloud.ca.errors import IssuanceRefused
from fleetid.cloud.ca.issuing import parse_csr
from fleetid.cloud.est import messages
from fleetid.cloud.hsm.errors import HsmError
from fleetid.cloud.pki.errors import PkiError
from fleetid.cloud.registry import IDENTITY, OPERATIONAL, RegistryError
from fleetid.cloud.registry.rotation import RotationState
from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import PendingApproval, RequestRefused
from fleetid.cloud.verifier.service import FleetVerifier, fingerprint_of

_log = logging.getLogger(__name__)

DEFAULT_OVERLAP = datetime.timedelta(days=7)


DEFAULT_RETRY_AFTER = 60

# What a device operator reads when the CA refuses (fleetid.cloud.ca.errors reasons).
ISSUANCE_MESSAGES = {
    "bad_csr": "the CSR must be ECDSA P-256 signed with ecdsa-with-SHA256",
    "bad_pop": "the CSR signature does not verify (no proof of possession)",
    "no_evidence": "attestation required: the CSR carries no secure-element attestation "
                   "evidence (attribute %s); a key made outside a genuine SE cannot be "
                   "certified" % messages.OID_ATTR_EVIDENCE,
    "bad_evidence": "attestation evidence is malformed",
    "unknown_vendor": "attestation evidence does not chain to a trusted SE vendor",
    "bad_statement_signature": "attestation statement is not signed by the SE's "
                               "attestation key",
    "key_mismatch": "the attested key is not the CSR's key",
    "policy": "the attested key's policy is not acceptable (must be generated on chip, "
              "non-exportable, signing)",
    "se_uid_mismatch": "the attesting SE is not this device's SE",
    "nonce_unknown": "attestation nonce was not issued by this CA (fetch a fresh one)",
    "nonce_replayed": "attestation nonce was already used (replayed evidence)",
    "nonce_expired": "attestation nonce expired (fetch a fresh one)",
}

# Refusals of the CSR itself, before any policy (400).
CSR_MESSAGES = {
    "bad_csr": "body is not a DER PKCS#10 request with an ECDSA P-256 key signed with "
               "ecdsa-with-SHA256",
    "bad_pop": "CSR signature does not verify (no proof of possession)",
}


class EstLabel:
    """One EST label: its issuing CA and what cacerts returns.

    name (str); ca (IssuingCa); chain (list of x509.Certificate: the issuing CA
    certificate, then its issuers up to the root); profile ("operational" or a
    CertificateProfile); require_approval (bool); retry_after (seconds, 202 answers).
    """

    def __init__(self, name, ca, chain, profile=OPERATIONAL, require_approval=False,
                 retry_after=DEFAULT_RETRY_AFTER):
        if not messages.LABEL_RE.match(name):
            raise ValueError("bad EST label %r" % (name,))
        self.name = name
        self.ca = ca
        self.chain = list(chain)
        self.profile = profile
        self.require_approval = require_approval
        self.retry_after = retry_after
        self.cacerts_der = messages.certs_only(self.chain)


class InMemoryApprovals:
    """Deferred-enrolment approvals of one process (the interface every approval store
    has: approve, request -> approved?, consume, pending).  Thread-safe."""

    def __init__(self):
        self._approvals = {}  # (label, device serial) -> "pending" | "approved"
        self._lock = threading.Lock()

    def approve(self, label, device_serial):
        with self._lock:
            self._approvals[(label, device_serial)] = "approved"

    def request(self, label, device_serial):
        """True when approved; otherwise recorded as pending and False."""
        with self._lock:
            if self._approvals.get((label, device_serial)) == "approved":
                return True
            self._approvals[(label, device_serial)] = "pending"
            return False

    def consume(self, label, device_serial):
        with self._lock:
            self._approvals.pop((label, device_serial), None)

    def pending(self):
        with self._lock:
            return sorted(k for k, v in self._approvals.items() if v == "pending")


class EstService:
    """EST policy over issuing CAs.  Thread-safe.

    EstService(labels, registry, trust, default_label=None, overlap=DEFAULT_OVERLAP,
               clock=None, verifier=None, approvals=None)
    labels: iterable of EstLabel.  trust: FleetTrust (client authentication).
    verifier: a FleetVerifier accepting identity certificates (default: built here).
    approvals: the approval store (InMemoryApprovals by default; the registry's
    shared_state.ApprovalTable when several EST processes share one registry).
    """

    def __init__(self, labels, registry, trust, default_label=None, overlap=DEFAULT_OVERLAP,
                 clock=None, verifier=None, approvals=None):
        self.labels = {label.name: label for label in labels}
        if not self.labels:
            raise ValueError("EST needs at least one label")
        self.default_label = default_label or next(iter(self.labels))
        if self.default_label not in self.labels:
            raise ValueError("default label %r is not configured" % self.default_label)
        self.registry = registry
        self.overlap = overlap
        self.verifier = verifier or FleetVerifier(trust, registry, clock=clock,
                                                  accept_identity=True)
        self._clock = self.verifier.now
        self.approvals = approvals if approvals is not None else InMemoryApprovals()

    # -- labels and public operations -----------------------------------------------------------

    def label(self, name=None):
        """The EstLabel for `name` (None: the default).  Raises RequestRefused(404)."""
        if name is None:
            name = self.default_label
        label = self.labels.get(name)
        if label is None:
            raise RequestRefused(errors.UNKNOWN_LABEL, "no CA under this label")
        return label

    def cacerts(self, label_name=None):
        """DER certs-only PKCS#7 of the label's CA chain (RFC 7030 4.1)."""
        return self.label(label_name).cacerts_der

    def csrattrs(self, label_name=None):
        """DER CsrAttrs (RFC 7030 4.5)."""
        self.label(label_name)
        return messages.csr_attributes()

    def nonce(self, label_name, client_cert_der):
        """A fresh attestation nonce from the label's CA, for an authenticated device.
        Raises AccessRefused, RequestRefused."""
        label = self.label(label_name)
        self.verifier.verify(client_cert_der)
        return label.ca.issue_nonce(now=self._clock())

    # -- approvals (RFC 7030 4.2.3 deferred enrolment) ------------------------------------------

    def approve(self, label_name, device_serial):
        """Approve the pending (or a future) enrolment of `device_serial` under a label."""
        self.label(label_name)
        self.approvals.approve(label_name, device_serial)

    def pending(self):
        """[(label, device serial)] awaiting approval."""
        return [tuple(p) for p in self.approvals.pending()]

    def _gate(self, label, serial):
        if not label.require_approval:
            return
        if not self.approvals.request(label.name, serial):
            raise PendingApproval(label.retry_after)

    def _consume_approval(self, label, serial):
        if label.require_approval:
            self.approvals.consume(label.name, serial)

    # -- enrolment ------------------------------------------------------------------------------

    def enroll(self, label_name, client_cert_der, csr_der, reenroll=False):
        """simpleenroll (reenroll=False) or simplereenroll (True).

        Params: label_name (None: default); client_cert_der: the TLS peer certificate (DER)
            or None; csr_der: the decoded request body.
        Returns: x509.Certificate (the new operational certificate, recorded in the
            registry).
        Raises: AccessRefused (401/403), RequestRefused (400/403/404), PendingApproval
            (202), RequestRefused(unavailable) when the HSM or registry failed.
        """
        label = self.label(label_name)
        # Parsed and its proof of possession checked once, here; the CA reuses the result.
        try:
            parsed = parse_csr(csr_der)
        except IssuanceRefused as exc:
            raise RequestRefused(errors.BAD_REQUEST, CSR_MESSAGES.get(
                exc.reason, ISSUANCE_MESSAGES.get(exc.reason, exc.reason))) from None
        now = self._clock()
        identity = self.verifier.verify(client_cert_der, now=now)
        if not reenroll and identity.kind != IDENTITY:
            raise RequestRefused(errors.WRONG_CERTIFICATE_KIND,
                                 "simpleenroll takes the factory identity certificate; "
                                 "renew with simplereenroll")
        if reenroll and identity.kind != OPERATIONAL:
            raise RequestRefused(errors.WRONG_CERTIFICATE_KIND,
                                 "simplereenroll takes the current operational certificate; "
                                 "enrol first with simpleenroll")
        self._check_subject(parsed.subject, identity)
        if parsed.spki == identity.certificate.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise RequestRefused(errors.POLICY, "enrolment needs a new key (generate one in "
                                 "a spare SE slot)")
        self._gate(label, identity.serial)
        try:
            certificate = label.ca.issue(parsed.der, identity.se_uid, identity.serial,
                                         label.profile, now=now, parsed_csr=parsed)
        except IssuanceRefused as exc:
            status = errors.BAD_REQUEST if exc.reason == "bad_csr" else errors.POLICY
            raise RequestRefused(status, ISSUANCE_MESSAGES.get(exc.reason, exc.reason)) \
                from None
        except PkiError as exc:
            raise RequestRefused(errors.POLICY, "the CA cannot issue: %s" % exc.reason) \
                from None
        except HsmError:
            raise RequestRefused(errors.UNAVAILABLE, "signing service unavailable") from None
        self._consume_approval(label, identity.serial)
        self._record(identity, certificate, now,
                     messages.OP_SIMPLEREENROLL if reenroll else messages.OP_SIMPLEENROLL)
        return certificate

    def _check_subject(self, subject, identity):
        # RFC 7030 4.2.2: a re-enrolment keeps the subject; for fleetid the same holds for
        # the first operational certificate (the device cannot choose its identity).
        # `subject`: the CSR's, built once by parse_csr (cryptography makes a new Name
        # per access).
        names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        serials = subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        if len(names) != 1 or names[0].value != identity.serial or \
                any(s.value != identity.serial for s in serials):
            raise RequestRefused(errors.POLICY, "the CSR subject must be the authenticated "
                                 "device's subject (CN=%s): subject changes are refused"
                                 % identity.serial)
        if identity.kind == OPERATIONAL and subject != identity.certificate.subject:
            raise RequestRefused(errors.POLICY, "re-enrolment must keep the subject")

    def _record(self, identity, certificate, now, operation):
        """Store the new certificate, its "issuance" audit entry and the device's new
        rotation state (fleetid.cloud.registry.rotation) in ONE registry transaction: a
        crash leaves all or none."""
        der = certificate.public_bytes(serialization.Encoding.DER)
        new_fp = fingerprint_of(der)
        # The rotation state the verifier read for this request (same registry row).
        current = identity.rotation
        if identity.kind == OPERATIONAL:
            state = RotationState.overlap(identity.fingerprint, new_fp,
                                          min(now + self.overlap, identity.not_after))
        elif current.new:  # a second simpleenroll: the previous one overlaps
            state = RotationState.overlap(current.new, new_fp, now + self.overlap)
        else:
            state = RotationState.active(new_fp)
        try:
            self.registry.add_certificate(identity.registry_serial, der, OPERATIONAL,
                                          rotation_state=state.format(), operation=operation,
                                          operator="est:%s" % identity.fingerprint[:16])
        except RegistryError as exc:
            # The client sees 503 only; the operator sees why (reason and the backend's
            # short cause: class name and SQLSTATE on PostgreSQL, never row values).
            _log.warning("re-enrolment of device %s not recorded: registry %s",
                         identity.registry_serial, exc)
            raise RequestRefused(errors.UNAVAILABLE, "registry unavailable") from None
