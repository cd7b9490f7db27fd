"""One revocation state behind every tier, and the events that propagate it.

The state is the registry (revoked certificates, each with its audit entry written in the
same transaction) plus the revoked-CA file (cloud/verifier/revoked_cas.py, batch
revocation, with its ca_revoke audit entry).  Every tier reads that state:

    tier               reads                                      sees a revocation
    verifier (mTLS)    registry + revoked-CA file per request     at once
    OCSP               registry + revoked-CA file per request     at the next query
    CRL per CA         registry, re-built by CrlPublisher         next fetch after the event
                                                                  (<= poll_interval without)
    compact set        registry + revoked CAs, CompactPublisher   next set after the event
                                                                  (<= poll_interval without)

Propagation is event-driven with a bounded fallback: `revoke_*` bumps a sequence number in
`<state_dir>/revocation.events` (one line, written atomically); `EventWatcher` (one stat
per request in each publishing process) invalidates the publishers when it changes, and
the publishers also look at the registry at most every `poll_interval` seconds whatever
happens (a lost event costs at most that interval).
"""

import datetime
import os

from cryptography import x509

from fleetid.cloud.pki.profiles import ca_scope
from fleetid.cloud.verifier import revoked_cas as revoked_cas_file

EVENTS_FILE = "revocation.events"


class RevocationError(Exception):
    """A revocation request that cannot be carried out (`reason`: "unknown_device",
    "unknown_batch", "nothing_to_revoke")."""

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason


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


_MAP_CACHE = {}  # path -> (file identity, map): OCSP asks on every request


def revoked_ca_map(path):
    """{CA key identifier (20 bytes): revoked_at (aware datetime)} from the revoked-CA
    file (entries carry the CA certificate).  Re-read only when the file changed (one
    stat per call); a file that vanishes keeps the last map (fail closed, as
    revoked_cas.RevokedCaFile)."""
    try:
        st = os.stat(path)
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        identity = None
    cached = _MAP_CACHE.get(path)
    if cached is not None and (identity is None or cached[0] == identity):
        return cached[1]
    out = _read_map(path)
    if identity is not None:
        _MAP_CACHE[path] = (identity, out)
    return out


def _read_map(path):
    entries, _ = revoked_cas_file.load(path)
    out = {}
    for entry in entries:
        pem = entry.get("certificate")
        if not pem:
            continue
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
            key_id = cert.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier).value.digest
        except (ValueError, x509.ExtensionNotFound):
            continue
        when = datetime.datetime.fromisoformat(entry["revoked_at"].replace("Z", "+00:00"))
        out[key_id] = when
    return out


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
        for listener in self.listeners:
            listener()
        return seq

    def revoke_device(self, serial, reason, operator=""):
        """Revoke every unrevoked certificate of device `serial` (the identity one last:
        it marks the device revoked), each with its audit entry.
        Returns: list of revoked certificate serials (hex).  Raises RevocationError,
        RegistryError."""
        from fleetid.cloud.registry.errors import DeviceNotFound

        try:
            self.registry.get_device(serial)
        except DeviceNotFound:
            raise RevocationError("unknown_device", str(serial)) from None
        done = []
        for record in reversed(self.registry.certificates(serial)):
            if record.revoked:
                continue
            self.registry.mark_revoked(record.cert_serial, reason, operator=operator,
                                       issuer=record.issuer)
            done.append(record.cert_serial)
        self._announce()
        return done

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
        cert = self.batch_ca(batch)
        entry, new = revoked_cas_file.revoke(self.revoked_cas_path, cert, self.registry,
                                             reason, operator)
        self._announce()
        return entry, new

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
