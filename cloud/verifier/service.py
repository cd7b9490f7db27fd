"""The verifier service: decides whether a client certificate authenticates a genuine,
live device of this fleet.  No I/O of its own besides the registry; the HTTP layer
(app.py) and the EST server call it with the DER certificate TLS delivered.

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

Cache.  Path building (4) and the attestation re-check (9: three ECDSA verifications of
vendor evidence) are the expensive steps; their results depend only on the certificate,
the trust store and the registry's SE UID.  They are cached per certificate fingerprint
(LRU, bounded), the attestation verdict together with the SE UID it was checked against
(a changed registry UID misses the cache).  Everything that revocation can change is
checked on every call: the revoked-CA set (5) against the cached chain, and the registry
read (6-8, 10: ONE registry.certificate_and_device call, the certificate and its device
in one query), so a revocation written by any process sharing the registry takes effect
on the next request (no staleness window); revoke_certificate also drops the entry.
Validity (2) uses the certificate itself on every call.  The parsed facts of a DER
(certificate object, device serial, issuer text, EKU verdict) are memoised by fingerprint
as well: they cannot change for the same bytes.  When every cached piece is present,
verify() runs these checks straight (_verify_cached), in the same order, without building
the step closures that explain() needs.

Rotation state (registry `devices.rotation_state`, owned by the EST service):
    "active:<fp>"                         one operational certificate, nothing pending
    "overlap:<old fp>:<new fp>:<deadline>" the old certificate is accepted until deadline
    "acked:<old fp>:<new fp>"             the device switched: the old one is refused
Fingerprints are SHA-256 of the certificate DER, hex; deadline is RFC 3339 UTC.
"""

import collections
import datetime
import hashlib
import threading

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetid.cloud.ca.errors import AttestationError
from fleetid.cloud.ca.evidence import EvidenceVerifier
from fleetid.cloud.registry import COMMITTED, IDENTITY, OPERATIONAL, RegistryError
from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import AccessRefused

DEFAULT_CACHE_SIZE = 100000


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def fingerprint_of(cert_der):
    """SHA-256 of a certificate's DER, lower-case hex."""
    return hashlib.sha256(bytes(cert_der)).hexdigest()


def format_deadline(moment):
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_deadline(text):
    """Inverse of format_deadline ("YYYY-MM-DDTHH:MM:SSZ").  Raises ValueError."""
    if len(text) != 20 or text[10] != "T" or text[19] != "Z":
        raise ValueError("deadline %r" % (text,))
    # fromisoformat is ~20x cheaper than strptime; the shape check above keeps it strict.
    return datetime.datetime.fromisoformat(text[:19]).replace(tzinfo=datetime.timezone.utc)


class RotationState:
    """Parsed `devices.rotation_state` (module docstring).  kind in (None, "active",
    "overlap", "acked"); old / new fingerprints; deadline (aware datetime or None)."""

    __slots__ = ("kind", "old", "new", "deadline")

    def __init__(self, kind=None, old=None, new=None, deadline=None):
        self.kind, self.old, self.new, self.deadline = kind, old, new, deadline

    @classmethod
    def parse(cls, text):
        if not text:
            return cls()
        parts = text.split(":", 3)
        try:
            if parts[0] == "active" and len(parts) == 2:
                return cls("active", new=parts[1])
            if parts[0] == "overlap" and len(parts) == 4:
                return cls("overlap", parts[1], parts[2], parse_deadline(parts[3]))
            if parts[0] == "acked" and len(parts) == 3:
                return cls("acked", parts[1], parts[2])
        except ValueError:
            pass
        return cls("unknown")

    def format(self):
        if self.kind == "active":
            return "active:%s" % self.new
        if self.kind == "overlap":
            return "overlap:%s:%s:%s" % (self.old, self.new, format_deadline(self.deadline))
        if self.kind == "acked":
            return "acked:%s:%s" % (self.old, self.new)
        raise ValueError("cannot format rotation state %r" % (self.kind,))


class DeviceIdentity:
    """What handlers get for an authenticated peer.

    serial (str, the certificate CN: the device serial the CA wrote), registry_serial
    (int), se_uid (bytes), fingerprint (hex SHA-256 of the DER), kind ("identity" /
    "operational"), certificate (x509.Certificate), issuer (RFC 4514), not_after (aware
    datetime), in_overlap (bool: an old certificate accepted during its overlap window),
    rotation_state (the registry's rotation state text read for this verdict, or None).
    """

    __slots__ = ("serial", "registry_serial", "se_uid", "fingerprint", "kind", "certificate",
                 "issuer", "not_after", "in_overlap", "rotation_state")

    def __init__(self, serial, registry_serial, se_uid, fingerprint, kind, certificate,
                 in_overlap=False, issuer=None, rotation_state=None, not_after=None):
        self.serial = serial
        self.registry_serial = registry_serial
        self.se_uid = se_uid
        self.fingerprint = fingerprint
        self.kind = kind
        self.certificate = certificate
        self.issuer = issuer or certificate.issuer.rfc4514_string()
        self.not_after = not_after or certificate.not_valid_after_utc
        self.in_overlap = in_overlap
        self.rotation_state = rotation_state

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
    revoked CAs: fingerprints given here, added at run time (`revoke_ca`), and those of
    `revoked_ca_file` (a revoked_cas.RevokedCaFile, re-read when it changes, so a
    `fleetid cloud revoke-ca` reaches running servers)."""

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
        if fingerprint in self.revoked_ca:
            return True
        return (self.revoked_ca_file is not None
                and fingerprint in self.revoked_ca_file.fingerprints())

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
        self._facts = {}  # fp -> (certificate, device serial, issuer text, EKU refusal)
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

    def revoke_ca(self, ca_certificate, reason="unspecified", operator=""):
        """Revoke a CA (a batch intermediate) for this verifier: every device chaining
        through it is refused from the next request on (the revoked set is checked on
        every call, cached chains included).  The revocation is written to the registry's
        audit chain first (a ca_revoke entry).  For a revocation every process sees, use
        revoked_cas.revoke (`fleetid cloud revoke-ca`).  Raises RegistryError."""
        from fleetid.cloud import audit

        fp = ca_certificate.fingerprint(_SHA256()).hex()
        self.registry.append_audit(audit.ca_revoke_entry(
            ca_fingerprint=fp, subject=ca_certificate.subject.rfc4514_string(),
            reason=reason, operator=operator, when=self.now()))
        with self._lock:
            self.trust.revoked_ca.add(fp)

    def revoke_certificate(self, certificate, reason, operator=""):
        """Revoke a device certificate in the registry (audit entry included) and drop its
        cached verdict.  Raises RegistryError."""
        der = certificate.public_bytes(serialization.Encoding.DER)
        self.registry.mark_revoked(certificate.serial_number, reason, operator=operator,
                                   issuer=certificate.issuer.rfc4514_string())
        self.invalidate(fingerprint_of(der))

    # -- the checks ----------------------------------------------------------------------------

    def _steps(self, cert_der, now, explaining=False):
        """Generator of (name, callable) in check order; each callable raises AccessRefused
        or returns a detail string (only worked out when `explaining`: verify() discards
        them).  Shared by verify() and explain()."""
        state = {}

        def parse():
            fp = fingerprint_of(cert_der)
            facts = self._facts.get(fp)
            if facts is None:
                # cryptography parses lazily: touch every field used later inside the try,
                # so a malformed certificate is refused here and nowhere else.
                try:
                    cert = x509.load_der_x509_certificate(bytes(cert_der))
                    cert.public_key()
                    cert.not_valid_before_utc, cert.not_valid_after_utc, cert.serial_number
                    cert.subject.rfc4514_string()
                    # Immutable facts of this exact DER (keyed by its hash): parsed once.
                    facts = (cert, device_serial_of(cert), cert.issuer.rfc4514_string(),
                             _eku_problem(cert), cert.not_valid_before_utc,
                             cert.not_valid_after_utc)
                except AccessRefused:
                    raise
                except Exception:  # noqa: BLE001 - untrusted DER
                    raise AccessRefused(errors.MALFORMED_CERT, "not a DER X.509 certificate") \
                        from None
                if len(self._facts) >= self._cache_size:
                    self._facts.clear()
                self._facts[fp] = facts
            state["cert"], state["serial"], state["issuer"], state["eku"] = facts[:4]
            state["fp"] = fp
            return "device %s, certificate serial %x" % (state["serial"],
                                                         state["cert"].serial_number)

        def validity():
            cert = state["cert"]
            if now < cert.not_valid_before_utc:
                raise AccessRefused(errors.NOT_YET_VALID, "valid from %s"
                                    % format_deadline(cert.not_valid_before_utc))
            if now > cert.not_valid_after_utc:
                raise AccessRefused(errors.EXPIRED, "expired at %s"
                                    % format_deadline(cert.not_valid_after_utc))
            if not explaining:
                return None
            return "valid until %s" % format_deadline(cert.not_valid_after_utc)

        def eku():
            if state["eku"] is not None:
                raise state["eku"]
            return "clientAuth"

        def registry_record():
            cert = state["cert"]
            record, device = self._registry_read(cert.serial_number, state["issuer"],
                                                 state["fp"])
            state["record"], state["device"] = record, device
            if record.kind == IDENTITY and not self.accept_identity:
                raise AccessRefused(errors.WRONG_CERTIFICATE_KIND,
                                    "identity certificates are for enrolment only")
            return "device %d, %s certificate" % (device.serial, record.kind)

        def revocation():
            record = state["record"]
            if record.revoked:
                raise AccessRefused(errors.REVOKED, "revoked at %s (%s)"
                                    % (record.revoked_at, record.revocation_reason))
            return "not revoked"

        def device_status():
            device = state["device"]
            if device.status != COMMITTED:
                raise AccessRefused(errors.DEVICE_STATUS, "device is %s" % device.status)
            return "committed"

        def cached_chain():
            entry = state["entry"] = self._cache_get(state["fp"])
            if entry is not None and entry[0] is not None:
                state["chain_fps"] = entry[0]
                state["chain"] = None
                self.cache_hits += 1
                state["cached"] = True
                return "chain: cached verdict"
            self.cache_misses += 1
            state["cached"] = False
            detail = chain()
            self._cache_put(state["fp"], chain_fps=state["chain_fps"])
            return detail

        def cached_attestation():
            entry = state.get("entry")
            if entry is None:
                entry = self._cache_get(state["fp"])
            if entry is not None and entry[1] == state["device"].se_uid:
                return "attestation: cached verdict"
            detail = attestation()
            self._cache_put(state["fp"], se_uid=state["device"].se_uid)
            return detail

        def chain():
            cert = state["cert"]
            verifier = (verification.PolicyBuilder().store(self.trust.store).time(now)
                        .build_client_verifier())
            try:
                verified = verifier.verify(cert, self.trust.intermediates)
            except Exception:  # noqa: BLE001 - VerificationError or malformed input
                raise AccessRefused(errors.CHAIN, "does not chain to a fleet root") from None
            state["chain"] = list(verified.chain)
            state["chain_fps"] = tuple(c.fingerprint(_SHA256()).hex() for c in verified.chain)
            return "chain of %d to %s" % (len(verified.chain),
                                          verified.chain[-1].subject.rfc4514_string())

        def ca_revocation():
            # Runs on every call (cheap), also when the chain verdict came from the cache.
            for fp in state["chain_fps"][1:]:
                if self.trust.is_revoked_ca(fp):
                    ca = self.trust.by_fingerprint.get(fp)
                    name = ca.subject.rfc4514_string() if ca is not None else fp
                    raise AccessRefused(errors.CA_REVOKED, "CA %s is revoked" % name)
            return "no CA of the chain revoked"

        def attestation():
            try:
                statement = self.trust.evidence.verify_certificate(
                    state["cert"], expected_se_uid=state["device"].se_uid)
            except AttestationError as exc:
                raise AccessRefused(errors.ATTESTATION, exc.reason) from None
            return "key in SE %s (vendor chain ok)" % statement.se_uid.hex()

        def overlap():
            state["in_overlap"] = False
            state["in_overlap"], detail = _overlap(state["fp"], state["record"],
                                                   state["device"], now)
            return detail

        return state, [
            ("certificate", parse), ("validity", validity), ("eku", eku),
            ("chain", cached_chain), ("ca_revocation", ca_revocation),
            ("registry", registry_record), ("revocation", revocation),
            ("device_status", device_status), ("attestation", cached_attestation),
            ("overlap", overlap),
        ], {"chain": chain, "attestation": attestation}

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

    def _verify_cached(self, fp, facts, entry, now):
        """verify() when the parse facts, the chain verdict and an attestation verdict are
        cached: the same checks in the same order as _steps, without building the step
        closures.  Returns DeviceIdentity, or None when the attestation verdict was made
        against another SE UID than the registry now holds (the caller runs the full
        steps).  Raises AccessRefused, RegistryError."""
        cert, serial, issuer, eku, not_before, not_after = facts
        if now < not_before:
            raise AccessRefused(errors.NOT_YET_VALID, "valid from %s"
                                % format_deadline(not_before))
        if now > not_after:
            raise AccessRefused(errors.EXPIRED, "expired at %s" % format_deadline(not_after))
        if eku is not None:
            raise eku
        self.cache_hits += 1
        trust = self.trust
        for ca_fp in entry[0][1:]:
            if trust.is_revoked_ca(ca_fp):
                ca = trust.by_fingerprint.get(ca_fp)
                name = ca.subject.rfc4514_string() if ca is not None else ca_fp
                raise AccessRefused(errors.CA_REVOKED, "CA %s is revoked" % name)
        record, device = self._registry_read(cert.serial_number, issuer, fp)
        if record.kind == IDENTITY and not self.accept_identity:
            raise AccessRefused(errors.WRONG_CERTIFICATE_KIND,
                                "identity certificates are for enrolment only")
        if record.revoked:
            raise AccessRefused(errors.REVOKED, "revoked at %s (%s)"
                                % (record.revoked_at, record.revocation_reason))
        if device.status != COMMITTED:
            raise AccessRefused(errors.DEVICE_STATUS, "device is %s" % device.status)
        if entry[1] != device.se_uid:
            self.cache_hits -= 1  # counted again by the full steps
            return None
        in_overlap, _detail = _overlap(fp, record, device, now)
        return DeviceIdentity(serial, device.serial, device.se_uid, fp, record.kind, cert,
                              in_overlap=in_overlap, issuer=issuer,
                              rotation_state=device.rotation_state, not_after=not_after)

    def verify(self, cert_der, now=None):
        """Authenticate a client certificate.

        Params: cert_der: the DER certificate TLS received.  now: aware datetime
            (default: the injected clock).
        Returns: DeviceIdentity.
        Raises: AccessRefused(reason, detail); RegistryError(STORAGE) if the registry
            failed (the HTTP layer answers 503).
        """
        now = now or self._clock()
        if not cert_der:
            raise AccessRefused(errors.NO_CLIENT_CERT)
        fp = fingerprint_of(cert_der)
        facts = self._facts.get(fp)
        entry = self._cache_get(fp) if facts is not None else None
        if entry is not None and entry[0] is not None and entry[1] is not None:
            try:
                identity = self._verify_cached(fp, facts, entry, now)
            except AccessRefused as exc:
                if self.on_verdict:
                    self.on_verdict(exc.reason, False)
                raise
            if identity is not None:
                if self.on_verdict:
                    self.on_verdict("ok", True)
                return identity
        state, steps, _ = self._steps(cert_der, now, explaining=False)
        try:
            for _name, step in steps:
                step()
        except AccessRefused as exc:
            if self.on_verdict:
                self.on_verdict(exc.reason, False)
            raise
        if self.on_verdict:
            self.on_verdict("ok", state.get("cached", False))
        device = state["device"]
        return DeviceIdentity(state["serial"], device.serial, device.se_uid, state["fp"],
                              state["record"].kind, state["cert"],
                              in_overlap=state.get("in_overlap", False),
                              issuer=state["issuer"], rotation_state=device.rotation_state)

    def explain(self, cert_der, now=None):
        """Run every check it can and say what each found (for `fleetid cloud check-cert`).

        Unlike verify(), a failure does not stop the checks that do not depend on it, and
        nothing is cached.  Returns: list of CheckResult, in check order; the verdict is
        all(r.ok for r in results if r.ok is not None).
        """
        now = now or self._clock()
        state, steps, sub = self._steps(cert_der, now, explaining=True)
        results = []
        order = ["certificate", "validity", "eku", "chain", "ca_revocation", "registry",
                 "revocation", "device_status", "attestation", "overlap"]
        table = dict(steps)
        table.update(sub)
        needs = {"validity": ["certificate"], "eku": ["certificate"],
                 "chain": ["certificate"], "ca_revocation": ["chain"],
                 "registry": ["certificate"], "revocation": ["registry"],
                 "device_status": ["registry"], "attestation": ["registry"],
                 "overlap": ["registry"]}
        passed = set()
        for name in order:
            missing = [n for n in needs.get(name, []) if n not in passed]
            if missing:
                results.append(CheckResult(name, None, "not run: %s failed" % missing[0]))
                continue
            try:
                detail = table[name]()
                passed.add(name)
                results.append(CheckResult(name, True, detail))
            except AccessRefused as exc:
                if name == "registry" and "device" in state:
                    passed.add(name)
                results.append(CheckResult(name, False, "%s: %s" % (exc.reason, exc.detail)))
            except RegistryError as exc:
                results.append(CheckResult(name, False, "registry error: %s" % exc.reason))
        return results


def _overlap(fp, record, device, now):
    """Check 10 (module docstring).  Returns (in_overlap, detail); raises AccessRefused."""
    rotation = RotationState.parse(device.rotation_state)
    if record.kind != OPERATIONAL or rotation.kind in (None, "active"):
        if rotation.kind == "active" and record.kind == OPERATIONAL and rotation.new != fp:
            raise AccessRefused(errors.SUPERSEDED, "an older operational certificate")
        return False, "current"
    if fp == rotation.new:
        return False, "current"
    if rotation.kind == "overlap" and fp == rotation.old:
        if now > rotation.deadline:
            raise AccessRefused(errors.SUPERSEDED, "overlap window closed at %s"
                                % format_deadline(rotation.deadline))
        return True, "previous certificate, overlap until %s" % format_deadline(
            rotation.deadline)
    raise AccessRefused(errors.SUPERSEDED, "replaced by a newer certificate")


def _SHA256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()
