"""The signed compact revocation set for offline and constrained verifiers (format:
common/revset.py), built from the same revocation state as the CRLs and OCSP, signed
through the HSM by a revocation key certified by the fleet root.

    signer = new_revocation_signer(hsm, "fleet-root", root_cert, "revocation-set")
    publisher = RevsetPublisher(registry, signer, issuing_ca_certs, revoked_cas_path)
    wire = publisher.current()                 # GET /revset/current.frs
    delta = publisher.delta(base_number)       # GET /revset/delta/<base>.frd (or None)

What the set holds:
  * a device serial when one of its certificates is revoked for a reason other than
    "superseded" (rotation retires old operational keys with that reason: the device
    stays good) -- offline verifiers check devices, not individual certificates;
  * the key identifier (SKI) of each revoked issuing CA (cloud/verifier/revoked_cas.py):
    one entry revokes a whole batch (device/revset_cache.py refuses any certificate whose
    AKI names it).
Re-published (a higher number) when that state changes -- looked at most every
`poll_interval` seconds, or at once on `invalidate()` (event-driven: `fleetid revoke`
calls the notify hook) -- and when half of the validity has passed.
The publisher keeps the last `history` sets so a device holding one of them gets a delta
(the additions and the new signature) instead of the whole set.
"""

import datetime
import hashlib
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fleetid.cloud.pki.profiles import to_utc_seconds, utc_now
from fleetid.cloud.pki.signing import sign_certificate
from fleetid.cloud.revocation.tier import Reply, Route, Tier
from fleetid.cloud.verifier.errors import BAD_REQUEST, NOT_FOUND, CloudError
from fleetid.common import oids, revset, revset_merge

# Extended key usage of the revocation-set signer (private arc, common/oids.py).
OID_KP_REVOCATION_SET = x509.ObjectIdentifier(oids.OID_KP_REVOCATION_SET)
REVSET_CONTENT_TYPE = "application/vnd.fleetid.revset"
DELTA_CONTENT_TYPE = "application/vnd.fleetid.revset-delta"
CURRENT_PATH = "/revset/current.frs"
SIGNER_LABEL = "revocation-set"  # the set signer's HSM key
SIGNER_FILE = "revset-signer.pem"  # its certificate under <state_dir>/revocation/
DEFAULT_VALIDITY = datetime.timedelta(days=7)
DEFAULT_POLL_INTERVAL = 5.0
# A set number is milliseconds since the epoch (build()): 13 digits until the year 2286;
# 20 ASCII digits bound any 64-bit number and refuse longer paths before int() sees them.
MAX_NUMBER_DIGITS = 20
# Reasons that do not put a device in the set (a retired, not a compromised, key).
NOT_DEVICE_REVOCATIONS = ("superseded",)


def public_point(public_key):
    """65-byte uncompressed point of a P-256 public key."""
    return public_key.public_bytes(serialization.Encoding.X962,
                                   serialization.PublicFormat.UncompressedPoint)


def new_revocation_signer(hsm, root_label, root_cert, key_label, now=None,
                          validity=datetime.timedelta(days=5 * 365)):
    """Create the revocation-set signing key in the HSM and certify it under the root
    (EKU OID_KP_REVOCATION_SET only, digitalSignature, not a CA).
    Returns: x509.Certificate.  Raises: HsmError(EXISTS), PkiError."""
    not_before = to_utc_seconds(now) if now is not None else utc_now()
    public_key = hsm.generate_signing_key(key_label)
    ski = root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                           "fleet revocation set signer")]))
               .issuer_name(root_cert.subject)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(min(not_before + validity, root_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                            False, False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([OID_KP_REVOCATION_SET]), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                   ski), critical=False))
    return sign_certificate(hsm, root_label, builder, root_cert.public_key())


class RevocationSigner:
    """The key that signs compact sets: HSM label, its certificate, the fleet root."""

    def __init__(self, hsm, key_label, certificate, root_cert):
        self.hsm = hsm
        self.key_label = key_label
        self.certificate = certificate
        self.fleet_id = revset.fleet_id(public_point(root_cert.public_key()))
        self.point = public_point(certificate.public_key())

    def sign(self, signed):
        return revset.sign_part(signed, self.hsm.sign(self.key_label, signed))


def ca_key_id(ca_certificate):
    """An issuing CA's 20-byte key identifier (its SKI = its devices' AKI)."""
    return ca_certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest


def highest_serial(registry):
    """The highest device serial the registry has allocated (serials are contiguous from
    1): a doubling then binary search over get_device, so any backend answers."""
    from fleetid.cloud.registry.errors import DeviceNotFound

    def exists(serial):
        try:
            registry.get_device(serial)
            return True
        except DeviceNotFound:
            return False

    if not exists(1):
        return 0
    hi = 1
    while exists(hi * 2):
        hi *= 2
    lo, hi = hi, hi * 2  # exists(lo), not exists(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if exists(mid):
            lo = mid
        else:
            hi = mid
    return lo


class _Built:
    def __init__(self, number, wire, serials, state, built_at, this_update):
        self.number = number
        self.wire = wire
        self.serials = serials
        self.state = state
        self.built_at = built_at
        self.this_update = this_update


class RevsetPublisher:
    """Builds, signs and re-publishes the compact set; serves deltas from recent sets.

    Params: registry: Registry.  signer: RevocationSigner.  issuing_cas: x509 certificates
        of the issuing CAs (their revoked certificates are read by subject).
        revoked_cas: () -> iterable of revoked CA certificates' key identifiers (20 bytes)
        (default: none).  validity: timedelta this_update -> next_update.  poll_interval:
        seconds between registry looks.  history: sets kept for deltas.  clock: () ->
        aware datetime.  monotonic: () -> seconds.  universe: () -> highest serial
        (default: highest_serial(registry)).
    Thread-safe.
    """

    def __init__(self, registry, signer, issuing_cas, revoked_cas=None,
                 validity=DEFAULT_VALIDITY, poll_interval=DEFAULT_POLL_INTERVAL, history=8,
                 clock=None, monotonic=None, universe=None):
        self.registry = registry
        self.signer = signer
        self.issuers = [ca.subject.rfc4514_string() for ca in issuing_cas]
        self.revoked_cas = revoked_cas or (lambda: ())
        self.validity = validity
        self.poll_interval = poll_interval
        self.history = history
        self.clock = clock or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self.monotonic = monotonic or time.monotonic
        self.universe = universe or (lambda: highest_serial(registry))
        self._lock = threading.Lock()
        self._sets = []  # _Built, oldest first
        self._polled_at = None
        self._last_number = 0
        self.build_seconds = 0.0
        # Push delivery (a retained MQTT message, a broadcast, a file for sneakernet):
        # callables (number, wire bytes) run after each new set, outside the lock.
        self.subscribers = []

    def invalidate(self):
        """Look at the registry on the next request (the event-driven path)."""
        with self._lock:
            self._polled_at = None

    def _state(self):
        serials = set()
        for issuer in self.issuers:
            for record in self.registry.revoked_certificates(issuer):
                if record.revocation_reason not in NOT_DEVICE_REVOCATIONS:
                    serials.add(record.device_serial)
        ca_ids = sorted(set(bytes(c) for c in self.revoked_cas()))
        serials = sorted(serials)
        universe = max([self.universe()] + serials[-1:])
        digest = hashlib.sha256(repr((serials, ca_ids, universe)).encode()).digest()
        return serials, ca_ids, universe, digest

    def build(self, serials, ca_ids, universe, now):
        """Encode and sign one set.  Returns the wire bytes (also kept as current)."""
        now = now.astimezone(datetime.timezone.utc).replace(microsecond=0)
        number = max(self._last_number + 1, int(now.timestamp() * 1000))
        self._last_number = number
        this_update = int(now.timestamp())
        started = time.perf_counter()
        signed = revset_merge.encode(self.signer.fleet_id, number, this_update,
                                     this_update + int(self.validity.total_seconds()),
                                     universe, serials, ca_ids)
        wire = self.signer.sign(signed)
        self.build_seconds = time.perf_counter() - started
        return number, wire

    def _current(self):
        latest, new = self._current_locked()
        if new:
            for subscriber in list(self.subscribers):
                try:
                    subscriber(latest.number, latest.wire)
                except Exception:  # noqa: BLE001 - one channel failing must not stop HTTP
                    import logging

                    logging.getLogger("fleetid.cloud.revocation").exception(
                        "compact set subscriber failed")
        return latest

    def _current_locked(self):
        new = False
        with self._lock:
            now = self.clock()
            tick = self.monotonic()
            latest = self._sets[-1] if self._sets else None
            due = latest is None or now >= latest.built_at + self.validity / 2
            if due or self._polled_at is None or tick - self._polled_at >= self.poll_interval:
                self._polled_at = tick
                serials, ca_ids, universe, state = self._state()
                if due or state != latest.state:
                    number, wire = self.build(serials, ca_ids, universe, now)
                    latest = _Built(number, wire, serials, state, now, now)
                    self._sets.append(latest)
                    del self._sets[: -self.history]
                    new = True
            return latest, new

    def current(self):
        """The wire bytes of the current set (rebuilt when due)."""
        return self._current().wire

    def current_number(self):
        return self._current().number

    def delta(self, base_number):
        """The delta from set `base_number` to the current set, or None when that set is
        not kept (the client fetches the whole set) or the current set dropped a serial
        (deltas only add)."""
        latest = self._current()
        with self._lock:
            for built in self._sets:
                if built.number == base_number:
                    break
            else:
                return None
        if built is latest:
            return None
        base = set(built.serials)
        if not base.issubset(latest.serials):
            return None
        added = [s for s in latest.serials if s not in base]
        return revset.encode_delta(base_number, latest.wire, added)

    def status(self):
        """For `fleetid revocation status`: number, this_update, next_update, count,
        ca_count, size."""
        latest = self._current()
        info = revset.parse(latest.wire)
        return {"number": info.number, "this_update": info.this_update,
                "next_update": info.next_update, "revoked": info.count,
                "revoked_cas": info.ca_count, "bytes": len(latest.wire)}


def parse_delta_name(name):
    """The base set number of a delta path component "<number>.frd", or None when it is
    not 1..MAX_NUMBER_DIGITS ASCII digits and ".frd" (str.isdigit() also takes "²" and
    other Unicode digits, which int() then refuses)."""
    if not name.endswith(".frd"):
        return None
    digits = name[:-4]
    if not 1 <= len(digits) <= MAX_NUMBER_DIGITS or \
            any(c not in "0123456789" for c in digits):
        return None
    return int(digits, 10)


class RevsetTier(Tier):
    """The revocation-set tier (tier.py), over plain HTTP (signed, public):

        GET /revset/current.frs        200 the whole set (REVSET_CONTENT_TYPE)
        GET /revset/delta/<base>.frd   200 the delta from set <base>; not_found (404)
                                       when that set is not kept (fetch the whole set);
                                       bad_request (400) when <base> is not 1..20 ASCII
                                       digits
    """

    name = "revset"

    def __init__(self, publisher):
        self.publisher = publisher

    @classmethod
    def init_keys(cls, setup):
        """The set signer, certified by the fleet root: revset-signer.pem."""
        return setup.write_pem(SIGNER_FILE, lambda: new_revocation_signer(
            setup.hsm, setup.root_label, setup.root_cert, SIGNER_LABEL))

    @classmethod
    def build(cls, setup):
        cert = setup.read_pem(SIGNER_FILE)
        if cert is None:
            return None
        signer = RevocationSigner(setup.hsm, SIGNER_LABEL, cert, setup.root_cert)
        return cls(RevsetPublisher(setup.registry, signer, [c for _, c in setup.issuers],
                                    revoked_cas=lambda: list(setup.revoked_cas())))

    def invalidate(self):
        self.publisher.invalidate()

    def routes(self):
        return [Route("GET", CURRENT_PATH, self._current, blocking=True),
                Route("GET", "/revset/delta/{name}", self._delta, blocking=True)]

    def _current(self, _params, _body):
        return Reply(self.publisher.current(), REVSET_CONTENT_TYPE,
                     {"Cache-Control": "public, max-age=%d" % int(self.publisher.poll_interval)})

    def _delta(self, params, _body):
        base = parse_delta_name(params["name"])
        if base is None:
            raise CloudError(BAD_REQUEST, "a delta is /revset/delta/<set number>.frd with 1 "
                             "to %d ASCII digits" % MAX_NUMBER_DIGITS)
        body = self.publisher.delta(base)
        if body is None:
            raise CloudError(NOT_FOUND, "no delta from that set: GET " + CURRENT_PATH)
        return Reply(body, DELTA_CONTENT_TYPE)

    @staticmethod
    def status(base_url, facts, fetch, failed):
        """The served set: number, entries, revoked CAs, universe, size, age."""
        url = base_url + CURRENT_PATH
        try:
            info = revset.parse(fetch(url))
        except Exception as exc:  # noqa: BLE001 - reported, never a traceback
            return failed(url, exc)
        return {"number": info.number, "revoked": info.count, "revoked_cas": info.ca_count,
                "universe": info.universe, "bytes": len(info.data),
                "this_update": info.this_update, "next_update": info.next_update,
                "age_s": facts["now"] - info.this_update}
