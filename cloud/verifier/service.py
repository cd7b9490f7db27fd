"""The verifier service: decides whether a client certificate authenticates a genuine,
live device of this fleet.  No I/O of its own besides the registry; the HTTP layer
(fleetid.cloud.http.verifier_app) and the EST service call it with the DER certificate
TLS delivered.

Checks, in order (first failure wins; reason codes in errors.py):

    1. the certificate parses                                      malformed_certificate
    2. now within [notBefore, notAfter]                            not_yet_valid / expired
    3. EKU contains clientAuth                                     eku
    4. the chain validates to a fleet root with
       cryptography.x509.verification (client-auth policy; the
       fleet's intermediates offered as the untrusted pool)        chain
    5. no CA of that chain is revoked (batch revocation)           ca_revoked
    6. the registry knows this exact certificate (issuer+serial,
       same SHA-256 fingerprint) and its device; an identity
       certificate only if accept_identity                         unknown_device /
                                                                   wrong_certificate_kind
    7. the certificate is not revoked                              revoked
    8. the device is "committed" (not held / in flight / revoked)  device_status
    9. the attestation extension re-checks offline: SE vendor
       chain, MAK signature, attested key == certificate key,
       policy flags, SE UID == the registry's UID for the device  attestation
   10. overlap: a certificate superseded by re-enrolment is
       accepted until the device acknowledges the new one or the
       overlap deadline passes, whichever is first                 superseded

The list is CHECKS (end of module), each check a FleetVerifier method: verify() runs it
in order and stops at the first refusal; explain() runs every check whose prerequisites
passed and reports each.  There is no second copy of the order.

Cache (verify() only).  Path building (4) and the attestation re-check (9: three ECDSA
verifications of vendor evidence) are the expensive steps; their results depend only on
the certificate, the trust store and the registry's SE UID.  They are cached per
certificate fingerprint (LRU, bounded), the attestation verdict together with the SE UID
it was checked against (a changed registry UID misses the cache).  Everything that
revocation can change is checked on every call: the revoked-CA set (5) against the cached
chain, and the registry read (6-8, 10: ONE registry.certificate_and_device call, the
certificate and its device in one query), so a revocation written by any process sharing
the registry takes effect on the next request (no staleness window); revoke_certificate
also drops the entry.  Validity (2) is checked on every call.  The parsed facts of a DER
(its fingerprint, certificate object, device serial, issuer text, EKU verdict, validity)
are memoised by the DER bytes themselves, and a parsed rotation state by its stored
text: they cannot change for the same bytes or text.

Rotation state: fleetid.cloud.registry.rotation (its formats are described there once).
"""

import collections
import datetime
import hashlib
import re
import threading

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetid.cloud.ca.errors import AttestationError
from fleetid.cloud.ca.evidence import EvidenceVerifier
from fleetid.cloud.registry import COMMITTED, IDENTITY, OPERATIONAL, RegistryError
from fleetid.cloud.registry.rotation import ACTIVE, OVERLAP, RotationState, format_deadline
from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import AccessRefused

DEFAULT_CACHE_SIZE = 100000


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def fingerprint_of(cert_der):
    """SHA-256 of a certificate's DER, lower-case hex."""
    return hashlib.sha256(bytes(cert_der)).hexdigest()


class DeviceIdentity:
    """What handlers get for an authenticated peer.

    serial (str, the certificate CN: the device serial the CA wrote), registry_serial
    (int), se_uid (bytes), fingerprint (hex SHA-256 of the DER), kind ("identity" /
    "operational"), certificate (x509.Certificate), issuer (RFC 4514), not_after (aware
    datetime), in_overlap (bool: an old certificate accepted during its overlap window),
    rotation (the device's RotationState read for this verdict; RotationState() if none).
    """

    __slots__ = ("serial", "registry_serial", "se_uid", "fingerprint", "kind", "certificate",
                 "issuer", "not_after", "in_overlap", "rotation")

    def __init__(self, serial, registry_serial, se_uid, fingerprint, kind, certificate,
                 in_overlap=False, issuer=None, rotation=None, not_after=None):
        self.serial = serial
        self.registry_serial = registry_serial
        self.se_uid = se_uid
        self.fingerprint = fingerprint
        self.kind = kind
        self.certificate = certificate
        self.issuer = issuer or certificate.issuer.rfc4514_string()
        self.not_after = not_after or certificate.not_valid_after_utc
        self.in_overlap = in_overlap
        self.rotation = rotation if rotation is not None else RotationState()

    def as_json(self):
        return {
            "serial": self.serial, "registry_serial": self.registry_serial,
            "se_uid": self.se_uid.hex(), "fingerprint": self.fingerprint, "kind": self.kind,
            "issuer": self.issuer, "not_after": format_deadline(self.not_after),
            "in_overlap": self.in_overlap,
        }


class CheckResult:
    """One line of an explanation: name, ok (True / False / None = not run), detail."""

    __slots__ = ("name", "ok", "detail")

    def __init__(self, name, ok, detail=""):
        self.name, self.ok, self.detail = name, ok, detail

    def __repr__(self):
        return "CheckResult(%s, %s, %r)" % (self.name, self.ok, self.detail)


def load_certificates(data):
    """Certificates from PEM (one or many) or a single DER blob."""
    data = bytes(data)
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificates(data)
    return [x509.load_der_x509_certificate(data)]


def _eku_problem(certificate):
    """None if the certificate allows clientAuth, else the AccessRefused to raise."""
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return AccessRefused(errors.EKU, "no extended key usage")
    except Exception:  # noqa: BLE001 - malformed extensions
        return AccessRefused(errors.MALFORMED_CERT, "extensions")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        return AccessRefused(errors.EKU, "clientAuth not permitted")
    return None


def device_serial_of(certificate):
    """The device serial a fleet certificate names (its CN).  Raises AccessRefused."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise AccessRefused(errors.MALFORMED_CERT, "subject has no single CN")
    return names[0].value


class FleetTrust:
    """The trust configuration: fleet roots, fleet intermediates, SE vendor roots and the
    revoked CAs: fingerprints given here and those of `revoked_ca_file` (a
    revoked_cas.RevokedCaFile, re-read when it changes, so a revocation written by
    RevocationService in another process reaches running servers)."""

    def __init__(self, roots, intermediates, vendor_roots, revoked_ca_fingerprints=(),
                 revoked_ca_file=None):
        self.revoked_ca_file = revoked_ca_file
        self.roots = list(roots)
        self.intermediates = list(intermediates)
        self.vendor_roots = list(vendor_roots)
        self.revoked_ca = set(f.lower() for f in revoked_ca_fingerprints)
        if not self.roots:
            raise ValueError("a fleet needs at least one root")
        self.store = verification.Store(self.roots)
        self.by_fingerprint = {c.fingerprint(_SHA256()).hex(): c
                               for c in self.roots + self.intermediates}
        self.evidence = EvidenceVerifier(self.vendor_roots)

    def is_revoked_ca(self, fingerprint):
        """Whether the CA with this SHA-256 fingerprint (hex) is revoked."""
        return any(fingerprint in revoked for revoked in self.revoked_ca_sets())

    def revoked_ca_sets(self):
        """The sets of revoked CA fingerprints now: the configured ones and the file's
        (one stat of the file per call; a CA is revoked when it is in any of them)."""
        if self.revoked_ca_file is None:
            return (self.revoked_ca,)
        return self.revoked_ca, self.revoked_ca_file.fingerprints()

    def ca_bundle_pem(self):
        """PEM of roots + intermediates: what the TLS stack loads as client CAs."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM)
                        for c in self.roots + self.intermediates)


class FleetVerifier:
    """Runs the checks of the module docstring.  Thread-safe.

    FleetVerifier(trust, registry, clock=None, accept_identity=True, cache_size=...)
    clock: callable -> aware datetime.  accept_identity: whether factory identity
    certificates authenticate at the verifier (they always do at EST simpleenroll).
    `on_verdict(reason_or_"ok", cached)` is an optional hook (metrics).
    """

    def __init__(self, trust, registry, clock=None, accept_identity=True,
                 cache_size=DEFAULT_CACHE_SIZE, on_verdict=None):
        self.trust = trust
        self.registry = registry
        self._clock = clock or utc_now
        self.accept_identity = accept_identity
        self._cache = collections.OrderedDict()  # fp -> [chain fps, attested SE UID]
        # DER -> (fp, certificate, device serial, issuer text, EKU refusal, notBefore,
        # notAfter); rotation-state text -> RotationState
        self._facts = {}
        self._rotations = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.on_verdict = on_verdict
        self.cache_hits = 0
        self.cache_misses = 0

    def now(self):
        return self._clock()

    # -- cache ---------------------------------------------------------------------------------
    # fp -> [chain fingerprints (leaf first), SE UID the attestation was checked against]

    def _cache_get(self, fp):
        with self._lock:
            entry = self._cache.get(fp)
            if entry is not None:
                self._cache.move_to_end(fp)
            return entry

    def _cache_put(self, fp, chain_fps=None, se_uid=None):
        with self._lock:
            entry = self._cache.get(fp)
            if entry is None:
                entry = self._cache[fp] = [None, None]
            if chain_fps is not None:
                entry[0] = chain_fps
            if se_uid is not None:
                entry[1] = se_uid
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def invalidate(self, fingerprint=None):
        """Drop one cached verdict (or all of them)."""
        with self._lock:
            if fingerprint is None:
                self._cache.clear()
            else:
                self._cache.pop(fingerprint, None)

    def acknowledge_rotation(self, identity):
        """The device behind `identity` switched to the certificate it authenticated with:
        close the previous certificate's overlap window (one registry transaction, see
        Registry.acknowledge_rotation) and drop that certificate's cached verdict.
        Returns the RotationState after the call.  Raises RegistryError."""
        state = self.registry.acknowledge_rotation(identity.registry_serial,
                                                   identity.fingerprint)
        if state.old:
            self.invalidate(state.old)
        return state

    # -- the checks: CHECKS (end of module) in order, for verify() and explain() alike -------

    def _check_certificate(self, v, now):
        # Keyed by the DER itself: the same bytes have the same fingerprint and facts, so
        # a certificate seen before costs a dict lookup instead of a SHA-256 per request
        # (and no memory: the parsed certificate holds a reference to these same bytes).
        facts = _memoised(self._facts, bytes(v.der), _der_facts, self._cache_size)
        v.fp, v.cert, v.serial, v.issuer, v.eku, v.not_before, v.not_after = facts
        if v.explaining:
            return "device %s, certificate serial %x" % (v.serial, v.cert.serial_number)
        return None

    def _check_validity(self, v, now):
        if now < v.not_before:
            raise AccessRefused(errors.NOT_YET_VALID, "valid from %s"
                                % format_deadline(v.not_before))
        if now > v.not_after:
            raise AccessRefused(errors.EXPIRED, "expired at %s"
                                % format_deadline(v.not_after))
        return "valid until %s" % format_deadline(v.not_after) if v.explaining else None

    def _check_eku(self, v, now):
        if v.eku is not None:
            raise v.eku
        return "clientAuth"

    def _check_chain(self, v, now):
        if not v.use_cache:
            return self._build_chain(v, now)
        entry = v.entry = self._cache_get(v.fp)
        if entry is not None and entry[0] is not None:
            v.chain_fps = entry[0]
            self.cache_hits += 1
            v.cached = True
            return "chain: cached verdict"
        self.cache_misses += 1
        detail = self._build_chain(v, now)
        self._cache_put(v.fp, chain_fps=v.chain_fps)
        return detail

    def _build_chain(self, v, now):
        verifier = (verification.PolicyBuilder().store(self.trust.store).time(now)
                    .build_client_verifier())
        try:
            verified = verifier.verify(v.cert, self.trust.intermediates)
        except verification.VerificationError as exc:
            raise AccessRefused(errors.CHAIN, chain_refusal(exc)) from None
        except Exception:  # noqa: BLE001 - malformed input
            raise AccessRefused(errors.CHAIN, "does not chain to a fleet root") from None
        v.chain_fps = tuple(c.fingerprint(_SHA256()).hex() for c in verified.chain)
        return "chain of %d to %s" % (len(verified.chain),
                                      verified.chain[-1].subject.rfc4514_string())

    def _check_ca_revocation(self, v, now):
        # Runs on every call (cheap: one stat of the revoked-CA file), also when the chain
        # verdict came from the cache.
        revoked_sets = self.trust.revoked_ca_sets()
        cas = v.chain_fps[1:]
        if any(revoked and not revoked.isdisjoint(cas) for revoked in revoked_sets):
            for fp in cas:  # the first revoked CA in chain order names the refusal
                if any(fp in revoked for revoked in revoked_sets):
                    ca = self.trust.by_fingerprint.get(fp)
                    name = ca.subject.rfc4514_string() if ca is not None else fp
                    raise AccessRefused(errors.CA_REVOKED, "CA %s is revoked" % name)
        return "no CA of the chain revoked"

    def _check_registry(self, v, now):
        v.record, v.device = self._registry_read(v.cert.serial_number, v.issuer, v.fp)
        if v.record.kind == IDENTITY and not self.accept_identity:
            raise AccessRefused(errors.WRONG_CERTIFICATE_KIND,
                                "identity certificates are for enrolment only")
        if v.explaining:
            return "device %d, %s certificate" % (v.device.serial, v.record.kind)
        return None

    def _check_revocation(self, v, now):
        record = v.record
        if record.revoked:
            raise AccessRefused(errors.REVOKED, "revoked at %s (%s)"
                                % (record.revoked_at, record.revocation_reason))
        return "not revoked"

    def _check_device_status(self, v, now):
        if v.device.status != COMMITTED:
            raise AccessRefused(errors.DEVICE_STATUS, "device is %s" % v.device.status)
        return "committed"

    def _check_attestation(self, v, now):
        se_uid = v.device.se_uid
        if v.use_cache:
            entry = v.entry if v.entry is not None else self._cache_get(v.fp)
            if entry is not None and entry[1] == se_uid:
                return "attestation: cached verdict"
        try:
            statement = self.trust.evidence.verify_certificate(v.cert, expected_se_uid=se_uid)
        except AttestationError as exc:
            raise AccessRefused(errors.ATTESTATION, exc.reason) from None
        if v.use_cache:
            self._cache_put(v.fp, se_uid=se_uid)
        return "key in SE %s (vendor chain ok)" % statement.se_uid.hex()

    def _check_overlap(self, v, now):
        # RotationState is immutable: parsed once per stored text.
        v.rotation = _memoised(self._rotations, v.device.rotation_state, RotationState.parse,
                               self._cache_size)
        v.in_overlap, detail = _overlap(v.fp, v.record.kind, v.rotation, now)
        return detail

    def _registry_read(self, cert_serial, issuer, fp):
        """(CertificateRecord, DeviceRecord) of this exact certificate: ONE registry read
        (certificate_and_device).  Raises AccessRefused(UNKNOWN_DEVICE), RegistryError."""
        try:
            record, device = self.registry.certificate_and_device(cert_serial, issuer=issuer)
        except RegistryError as exc:
            if exc.reason in (RegistryError.CERTIFICATE_NOT_FOUND, RegistryError.AMBIGUOUS):
                raise AccessRefused(errors.UNKNOWN_DEVICE,
                                    "certificate not in the registry") from None
            if exc.reason == RegistryError.DEVICE_NOT_FOUND:
                raise AccessRefused(errors.UNKNOWN_DEVICE, "device unknown") from None
            raise
        if record.fingerprint != fp:
            raise AccessRefused(errors.UNKNOWN_DEVICE, "a different certificate holds "
                                "this issuer and serial")
        return record, device

    def verify(self, cert_der, now=None):
        """Authenticate a client certificate: every check of CHECKS in order, the first
        failure refuses (cached verdicts where the module docstring allows).

        Params: cert_der: the DER certificate TLS received.  now: aware datetime
            (default: the injected clock).
        Returns: DeviceIdentity.
        Raises: AccessRefused(reason, detail); RegistryError(STORAGE) if the registry
            failed (the HTTP layer answers 503).
        """
        now = now or self._clock()
        if not cert_der:
            raise AccessRefused(errors.NO_CLIENT_CERT)
        v = _Verdict(cert_der, use_cache=True, explaining=False)
        try:
            for _name, check, _needs in CHECKS:
                check(self, v, now)
        except AccessRefused as exc:
            if self.on_verdict:
                self.on_verdict(exc.reason, False)
            raise
        if self.on_verdict:
            self.on_verdict("ok", v.cached)
        device = v.device
        return DeviceIdentity(v.serial, device.serial, device.se_uid, v.fp, v.record.kind,
                              v.cert, in_overlap=v.in_overlap, issuer=v.issuer,
                              rotation=v.rotation, not_after=v.not_after)

    def explain(self, cert_der, now=None):
        """Run every check of CHECKS it can and say what each found (for `fleetid cloud
        check-cert`).

        Unlike verify(), a failure does not stop the checks that do not depend on it, and
        no verdict is taken from or put in the cache.  Returns: list of CheckResult, in
        check order; the verdict is all(r.ok for r in results if r.ok is not None).
        """
        now = now or self._clock()
        v = _Verdict(cert_der, use_cache=False, explaining=True)
        results = []
        passed = set()
        for name, check, needs in CHECKS:
            missing = [n for n in needs if n not in passed]
            if missing:
                results.append(CheckResult(name, None, "not run: %s failed" % missing[0]))
                continue
            try:
                detail = check(self, v, now)
                passed.add(name)
                results.append(CheckResult(name, True, detail))
            except AccessRefused as exc:
                if name == "registry" and v.device is not None:
                    passed.add(name)  # records read: the checks on them can still run
                results.append(CheckResult(name, False, "%s: %s" % (exc.reason, exc.detail)))
            except RegistryError as exc:
                results.append(CheckResult(name, False, "registry error: %s" % exc.reason))
        return results


class _Verdict:
    """What the checks of one verify() / explain() call found so far."""

    __slots__ = ("der", "use_cache", "explaining", "fp", "cert", "serial", "issuer", "eku",
                 "not_before", "not_after", "entry", "chain_fps", "cached", "record",
                 "device", "in_overlap", "rotation")

    def __init__(self, der, use_cache, explaining):
        self.der, self.use_cache, self.explaining = der, use_cache, explaining
        self.entry = self.record = self.device = self.rotation = None
        self.cached = self.in_overlap = False


# THE check list (module docstring): (name, check, the checks it needs).  verify() runs it
# in order and stops at the first refusal; explain() runs every check whose needs passed.
CHECKS = (
    ("certificate", FleetVerifier._check_certificate, ()),
    ("validity", FleetVerifier._check_validity, ("certificate",)),
    ("eku", FleetVerifier._check_eku, ("certificate",)),
    ("chain", FleetVerifier._check_chain, ("certificate",)),
    ("ca_revocation", FleetVerifier._check_ca_revocation, ("chain",)),
    ("registry", FleetVerifier._check_registry, ("certificate",)),
    ("revocation", FleetVerifier._check_revocation, ("registry",)),
    ("device_status", FleetVerifier._check_device_status, ("registry",)),
    ("attestation", FleetVerifier._check_attestation, ("registry",)),
    ("overlap", FleetVerifier._check_overlap, ("registry",)),
)


# cryptography.x509.verification's VerificationError text: "validation failed: <cause>",
# the cause ending with "(encountered processing <Certificate(subject=<Name(...)>, ...)>)"
# when one certificate of the path broke the policy.
_VALIDATION_FAILED = "validation failed: "
_ENCOUNTERED = re.compile(r"\s*\(encountered processing "
                          r"<Certificate\(subject=<Name\((.*?)\)>.*\)$")


def chain_refusal(exc):
    """The detail of a CHAIN refusal from cryptography's VerificationError: "does not chain
    to a fleet root" only when no path exists, else the policy check that failed and in
    which certificate (e.g. a leaf without subjectAltName).  Secret-free: it describes the
    client's own certificates."""
    cause = str(exc)
    if cause.startswith(_VALIDATION_FAILED):
        cause = cause[len(_VALIDATION_FAILED):]
    where = _ENCOUNTERED.search(cause)
    if where is not None:
        cause = "%s (in %s)" % (cause[:where.start()], where.group(1))
    # "candidates exhausted": no issuer in the store or the pool signs it (another fleet,
    # a bad signature); any other cause is a policy check (RFC 5280 profile, client-auth
    # rules) that a certificate of an otherwise built path failed.
    if cause.startswith("candidates exhausted"):
        return "does not chain to a fleet root (%s)" % cause
    return "refused by the client-auth path policy: %s" % cause


def _memoised(cache, key, make, size):
    """cache[key], made by make(key) on a miss; the dict is emptied when it holds `size`
    (the verifier's per-certificate memos: a plain dict costs less per request than an
    LRU, and a fleet's working set refills it at once)."""
    value = cache.get(key)
    if value is None:
        value = make(key)
        if len(cache) >= size:
            cache.clear()
        cache[key] = value
    return value


def _der_facts(der):
    """(fingerprint,) + _parse_facts(der): what the verifier derives once per DER."""
    return (fingerprint_of(der),) + _parse_facts(der)


def _parse_facts(cert_der):
    """The immutable facts of one DER (parsed once per fingerprint): (certificate, device
    serial, issuer text, EKU refusal or None, notBefore, notAfter).  cryptography parses
    lazily: every field used later is touched here, so a malformed certificate is refused
    here and nowhere else.  Raises AccessRefused."""
    try:
        cert = x509.load_der_x509_certificate(bytes(cert_der))
        cert.public_key()
        cert.not_valid_before_utc, cert.not_valid_after_utc, cert.serial_number
        cert.subject.rfc4514_string()
        return (cert, device_serial_of(cert), cert.issuer.rfc4514_string(),
                _eku_problem(cert), cert.not_valid_before_utc, cert.not_valid_after_utc)
    except AccessRefused:
        raise
    except Exception:  # noqa: BLE001 - untrusted DER
        raise AccessRefused(errors.MALFORMED_CERT, "not a DER X.509 certificate") from None


def _overlap(fp, kind, rotation, now):
    """Check 10 (module docstring) of a certificate of `kind` against the device's
    RotationState.  Returns (in_overlap, detail); raises AccessRefused."""
    if kind != OPERATIONAL or rotation.kind in (None, ACTIVE):
        if rotation.kind == ACTIVE and kind == OPERATIONAL and rotation.new != fp:
            raise AccessRefused(errors.SUPERSEDED, "an older operational certificate")
        return False, "current"
    if fp == rotation.new:
        return False, "current"
    if rotation.kind == OVERLAP and fp == rotation.old:
        if now > rotation.deadline:
            raise AccessRefused(errors.SUPERSEDED, "overlap window closed at %s"
                                % format_deadline(rotation.deadline))
        return True, "previous certificate, overlap until %s" % format_deadline(
            rotation.deadline)
    raise AccessRefused(errors.SUPERSEDED, "replaced by a newer certificate")


def _SHA256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()
