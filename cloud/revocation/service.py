"""One revocation state behind every tier, and the events that propagate it.

The state is the registry (revoked certificates, each with its audit entry written in the
same transaction) plus the revoked-CA file (cloud/verifier/revoked_cas.py, batch
revocation, with its ca_revoke audit entry).  Every tier reads that state:

    tier               reads                                      sees a revocation
    verifier (mTLS)    registry + revoked-CA file per request     at once
    OCSP               pre-signed cache (ocsp_cache.py), checked  at the next query after
                       against the revoked set on every event     the event
    CRL per CA         registry, re-built by CrlPublisher         next fetch after the event
                                                                  (<= poll_interval without)
    compact set        registry + revoked CAs, RevsetPublisher   next set after the event
                                                                  (<= poll_interval without)

RevocationService is the only writer of that state (every `fleetid revoke` form and its
`fleetid cloud revoke*` aliases call it).  Propagation is event-driven with a bounded
fallback: each of its writes bumps a sequence number in
`<state_dir>/revocation.events` (one line, written atomically); `EventWatcher` (one stat
per request in each publishing process) invalidates the publishers when it changes, and
the publishers also look at the registry at most every `poll_interval` seconds whatever
happens (a lost event costs at most that interval).

Processes that do not share the state directory (workers on other hosts over one
PostgreSQL registry) see the same events through the registry: each announcement also
bumps the registry's revocation event sequence (shared_state.RevocationEvents), and
`RegistryEventWatcher` reads it at most every `interval` seconds (1 s by default).
"""

import os
import time

from cryptography import x509

from fleetid.cloud.pki.profiles import ca_scope
from fleetid.cloud.verifier import revoked_cas as revoked_cas_file
from fleetid.common.errors import FleetidError

EVENTS_FILE = "revocation.events"
# Devices per transaction in revoke_devices.  200 (about 400 certificates) take 50-200 ms
# (bench/revocation.py --bulk: SQLite, PostgreSQL), the time the registry's other writers
# (the line, EST) may wait for the chunk's locks; the commit is paid once per chunk.
CHUNK = 200
# Transactions per chunk: the devices are revoked again after each, for a certificate
# recorded meanwhile (RevocationService._revoke_chunk).
CHUNK_PASSES = 3

class RevocationError(FleetidError):
    """A revocation request that cannot be carried out (`reason`: "unknown_device",
    "unknown_batch", "not_a_ca", "fleet_root", "not_a_server", "not_root_issued",
    "bad_reason")."""

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


def _is_ca(certificate):
    """True when the certificate's basicConstraints say CA."""
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _directly_issued(certificate, issuer):
    from cryptography.exceptions import InvalidSignature

    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def bump_event(path):
    """Increase the event sequence in `path` (atomic replace).  Returns the new value."""
    seq = read_event(path) + 1
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % seq)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return seq


def read_event(path):
    """The event sequence in `path` (0 when absent or unreadable)."""
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


class EventWatcher:
    """Calls `on_change()` when the event file changed since the last look.
    poll() is one stat: call it per request."""

    def __init__(self, path, on_change):
        self.path = path
        self.on_change = on_change
        self._seen = self._identity()

    def _identity(self):
        try:
            st = os.stat(self.path)
            return (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    def poll(self):
        identity = self._identity()
        if identity != self._seen:
            self._seen = identity
            self.on_change()
            return True
        return False


class RegistryEventWatcher:
    """Calls `on_change()` when the registry's revocation event sequence
    (shared_state.RevocationEvents) moved since the last look; looks at most every
    `interval` seconds, so poll() per request costs one query per interval.  A registry
    that cannot be read counts as no change (the publishers' poll_interval still
    bounds the delay)."""

    def __init__(self, events, on_change, interval=1.0, clock=time.monotonic):
        self.events = events
        self.on_change = on_change
        self.interval = interval
        self.clock = clock
        self._looked = None
        self._seen = self._read()

    def _read(self):
        from fleetid.cloud.registry.errors import RegistryError

        try:
            return self.events.current()
        except RegistryError:
            return None

    def poll(self):
        now = self.clock()
        if self._looked is not None and now - self._looked < self.interval:
            return False
        self._looked = now
        seq = self._read()
        if seq is None or seq == self._seen:
            return False
        self._seen = seq
        self.on_change()
        return True


class AnyWatcher:
    """Several watchers polled as one: poll() is true when any saw a change."""

    def __init__(self, watchers):
        self.watchers = list(watchers)

    def poll(self):
        return any([watcher.poll() for watcher in self.watchers])


class RevocationService:
    """Writes revocations into the one state and announces them.

    Params: registry: Registry.  ca_certs: the issuing CAs' certificates (batch lookup).
        revoked_cas_path: the revoked-CA file.  events_path: the event file.
        listeners: callables run after each revocation in this process (publishers'
        invalidate).
    """

    def __init__(self, registry, ca_certs, revoked_cas_path, events_path, listeners=()):
        self.registry = registry
        self.ca_certs = list(ca_certs)
        self.revoked_cas_path = revoked_cas_path
        self.events_path = events_path
        self.listeners = list(listeners)

    def _announce(self):
        seq = bump_event(self.events_path)
        from fleetid.cloud.registry.shared_state import shared_tables

        shared = shared_tables(self.registry)
        if shared is not None:  # other hosts' processes poll the registry's sequence
            shared.revocation_events.bump()
        for listener in self.listeners:
            listener()
        return seq

    def revoke_device(self, serial, reason, operator=""):
        """Revoke every unrevoked certificate of device `serial` (the identity one last:
        it marks the device revoked), each with its audit entry, in one transaction.
        Returns: list of revoked certificate serials (hex).  Raises RevocationError,
        RegistryError."""
        self._check_devices([serial])
        done = self._revoke_chunk([serial], reason, operator)
        self._announce()
        return done[serial]

    def revoke_devices(self, serials, reason, operator="", progress=None, chunk=CHUNK):
        """Revoke every device of `serials` (registry serials) as revoke_device does, and
        announce them in ONE event: the tiers rebuild once for the whole list.

        Every serial is checked first: an unknown one raises RevocationError
        ("unknown_device") before anything is written.  The devices are revoked `chunk`
        at a time, each chunk ONE transaction (Registry.mark_devices_revoked: one durable
        commit per chunk, not one per certificate; the chain gets the same entries in the
        same order).  A crash loses at most the chunk being written, whole; run again,
        the devices already revoked are skipped (an empty list each).  What was committed
        is announced even when a later chunk fails.
        Params: progress: called with 1 for each device once its chunk is committed (a
        progress bar's update).  chunk: devices per transaction (a bigger chunk holds the
        registry's write lock, and on PostgreSQL its devices' rows, longer).
        Returns: {serial: list of revoked certificate serials (hex)}.
        Raises RevocationError, RegistryError."""
        serials = list(serials)
        self._check_devices(serials)
        done = {}
        try:
            step = max(1, chunk)
            for start in range(0, len(serials), step):
                part = serials[start:start + step]
                done.update(self._revoke_chunk(part, reason, operator))
                if progress is not None:
                    for _ in part:
                        progress(1)
        finally:
            if done:  # what was written is announced even when a later write failed
                self._announce()
        return done

    def _check_devices(self, serials):
        from fleetid.cloud.registry.errors import DeviceNotFound

        for serial in serials:
            try:
                self.registry.get_device(serial)
            except DeviceNotFound:
                raise RevocationError("unknown_device", str(serial)) from None

    def _revoke_chunk(self, serials, reason, operator):
        """Every unrevoked certificate of each device of `serials` in one transaction
        (Registry.mark_devices_revoked); then again, for a certificate an EST re-enrolment
        recorded after that transaction (its checks passed before it), up to
        CHUNK_PASSES transactions, the last one finding nothing.  Returns {serial: [cert
        serial hex]} (a serial listed twice: the later, empty, list)."""
        lists = {}
        for _ in range(CHUNK_PASSES):
            done = self.registry.mark_devices_revoked(serials, reason, operator=operator)
            for serial, revoked in done.items():
                lists.setdefault(serial, []).extend(revoked)
            if not any(done.values()):
                break
        return lists

    def revoke_certificate(self, cert_serial, reason, operator="", issuer=None):
        """Revoke one certificate (int serial; `issuer` RFC 4514 when the serial alone is
        ambiguous) with its audit entry; revoking a device's identity certificate also
        marks the device revoked.  Returns the CertificateRecord after the write.
        Raises RegistryError."""
        self.registry.mark_revoked(cert_serial, reason, operator=operator, issuer=issuer)
        record = self.registry.certificate_status(cert_serial, issuer=issuer)
        self._announce()
        return record

    def revoke_ca(self, certificate, reason, operator="", roots=()):
        """Revoke an issuing (batch) CA certificate: its ca_revoke audit entry, then its
        line in the revoked-CA file; every tier refuses every device under it.
        roots: the fleet roots, which cannot be revoked this way.
        Returns (entry dict, newly revoked).  Raises RevocationError ("not_a_ca",
        "fleet_root", "bad_reason"), RegistryError, OSError."""
        if not _is_ca(certificate):
            raise RevocationError("not_a_ca", certificate.subject.rfc4514_string())
        if certificate in roots:
            raise RevocationError("fleet_root", certificate.subject.rfc4514_string())
        return self._record_revoked_cert(certificate, reason, operator)

    def revoke_server_cert(self, certificate, reason, operator="", roots=()):
        """Revoke one of the cloud's own TLS server certificates (verifier / EST listener,
        broker) issued by a fleet root: its audit entry, then its line in the revoked-CA
        file, the file of root-issued certificates the root's CRL lists
        (cloud/revocation/arl.py) and the server's OCSP staple reads (staple.py).  The
        agents, which check every server's chain against their cached root CRL, refuse
        that server from their next root CRL refresh on.  The audit entry is the
        ca_revoke record (a root-issued certificate's fingerprint and subject).
        roots: the fleet roots; the certificate must be directly issued by one of them.
        Returns (entry dict, newly revoked).  Raises RevocationError ("not_a_server":
        a CA or no serverAuth; "not_root_issued"; "bad_reason"), RegistryError, OSError."""
        from cryptography.x509.oid import ExtendedKeyUsageOID

        subject = certificate.subject.rfc4514_string()
        try:
            usages = certificate.extensions.get_extension_for_class(
                x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = ()
        if _is_ca(certificate) or ExtendedKeyUsageOID.SERVER_AUTH not in usages:
            raise RevocationError("not_a_server", subject)
        if not any(_directly_issued(certificate, root) for root in roots):
            raise RevocationError("not_root_issued", subject)
        return self._record_revoked_cert(certificate, reason, operator)

    def _record_revoked_cert(self, certificate, reason, operator):
        """The shared tail of revoke_ca and revoke_server_cert: the ca_revoke audit entry
        and the certificate's line in the revoked-CA file, then the announcement.
        Returns (entry dict, newly revoked).  Raises RevocationError ("bad_reason"),
        RegistryError, OSError."""
        try:
            entry, new = revoked_cas_file.revoke(self.revoked_cas_path, certificate,
                                                 self.registry, reason, operator)
        except ValueError as exc:
            raise RevocationError("bad_reason", str(exc)) from None
        self._announce()
        return entry, new

    def batch_ca(self, batch):
        """The issuing CA certificate whose scope names `batch` (or whose subject is it)."""
        for cert in self.ca_certs:
            scope = ca_scope(cert) or {}
            if scope.get("batch") == batch or cert.subject.rfc4514_string() == batch:
                return cert
        raise RevocationError("unknown_batch", batch)

    def revoke_batch(self, batch, reason, operator=""):
        """Revoke a batch: its issuing CA, one entry (audit + revoked-CA file) that every
        tier honours for every device under it.  Returns (entry dict, newly revoked)."""
        return self.revoke_ca(self.batch_ca(batch), reason, operator)

    def status(self):
        """The shared state: revoked certificates per issuing CA, revoked CAs, the event
        sequence."""
        per_ca = {}
        for cert in self.ca_certs:
            name = cert.subject.rfc4514_string()
            per_ca[name] = len(self.registry.revoked_certificates(name))
        cas, _ = revoked_cas_file.load(self.revoked_cas_path)
        return {"revoked_certificates": per_ca,
                "revoked_cas": [{"subject": e.get("subject"), "revoked_at": e.get("revoked_at"),
                                 "reason": e.get("reason")} for e in cas],
                "event": read_event(self.events_path)}
