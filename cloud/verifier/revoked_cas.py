"""Revoked fleet CAs (batch intermediates), persisted beside the cloud's state.

Revoking a batch means refusing every device whose chain passes through that batch's
issuing CA (each product / batch / region has its own issuing CA, so revoking that CA
revokes the batch).  The registry records device certificates, not CAs, so the revoked
CAs live in one append-only file, `<state_dir>/revoked-cas.jsonl` (cloud/config.py
`revoked_cas_file`), one JSON object per line:

    {"fingerprint": "<SHA-256 of the CA certificate DER, hex>", "subject": "<RFC 4514>",
     "reason": "<RFC 5280 5.3.1 CRLReason name>", "revoked_at": "<RFC 3339 UTC>",
     "operator": "<who>"}

The writers (RevocationService.revoke_ca: `fleetid revoke --batch/--cert`, and
revoke_server_cert: `fleetid revoke --server-cert`, a root-issued TLS server certificate of
the cloud's, which the root's CRL and the server's OCSP staple then list) append a line
and fsync; readers (every verifier and EST process) look at the file's identity
(inode, size, mtime) on each check and re-read it when it changed, so a running server
refuses the batch from its next request on; `decoded` is the one reader of the CA
certificates the entries carry (OCSP, revocation set, root CRL).
Entries are only ever added: a line that does not parse is skipped (and reported by
`load`), and a file that vanishes or cannot be read keeps the set loaded so far
(fail closed: a revocation is never undone by losing the file).
"""

import datetime
import json
import os
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

# RFC 5280 5.3.1 CRLReason names (removeFromCRL is not a revocation and is refused).
REASONS = ("unspecified", "keyCompromise", "cACompromise", "affiliationChanged",
           "superseded", "cessationOfOperation", "certificateHold", "privilegeWithdrawn",
           "aACompromise")
FILE_NAME = "revoked-cas.jsonl"
# access(2) by the effective ids, as open() and stat() go: by the real ones a process
# started with split ids could take an existing file for absent.
_EFFECTIVE = os.access in os.supports_effective_ids


def ca_fingerprint(certificate):
    """SHA-256 of a certificate's DER, lower-case hex."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def load(path):
    """Parse the file.  Returns (list of entry dicts, number of lines skipped).
    A missing file is an empty list.  Raises OSError for other read failures."""
    entries, skipped = [], 0
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return entries, skipped
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            fingerprint = entry["fingerprint"]
            if not isinstance(fingerprint, str) or len(fingerprint) != 64:
                raise ValueError("fingerprint")
            int(fingerprint, 16)
        except (ValueError, KeyError, TypeError):
            skipped += 1
            continue
        entry["fingerprint"] = fingerprint.lower()
        entries.append(entry)
    return entries, skipped


def decoded(path):
    """The entries that carry their CA certificate, decoded: a list of
    (entry dict, x509.Certificate, revoked_at aware datetime).  The one reader of the
    certificates in the file (the OCSP, compact-set and root-CRL tiers use it); an entry
    whose certificate or time does not parse is skipped.  Raises OSError as `load`."""
    out = []
    for entry in load(path)[0]:
        pem = entry.get("certificate")
        if not pem:
            continue
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
            when = datetime.datetime.fromisoformat(
                str(entry["revoked_at"]).replace("Z", "+00:00"))
        except (ValueError, KeyError):
            continue
        out.append((entry, cert, when))
    return out


_MAP_CACHE = {}  # path -> (file identity, map): OCSP asks on every request


def revoked_ca_map(path):
    """{CA key identifier (20 bytes): revoked_at (aware datetime)} from the file.
    Re-read only when the file changed (one stat per call); a file that vanishes keeps
    the last map (fail closed, as RevokedCaFile)."""
    try:
        st = os.stat(path)
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        identity = None
    cached = _MAP_CACHE.get(path)
    if cached is not None and (identity is None or cached[0] == identity):
        return cached[1]
    out = {}
    for _entry, cert, when in decoded(path):
        try:
            key_id = cert.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            continue
        out[key_id] = when
    if identity is not None:
        _MAP_CACHE[path] = (identity, out)
    return out


def append(path, certificate, reason="unspecified", operator="", now=None):
    """Record `certificate` (an x509 CA certificate) as revoked: one line appended and
    fsynced.  Returns the entry dict.  Idempotent: an already listed CA is not added
    again (the existing entry is returned).
    Raises ValueError for an unknown reason, OSError when the file cannot be written."""
    if reason not in REASONS:
        raise ValueError("reason must be one of %s" % ", ".join(REASONS))
    fingerprint = ca_fingerprint(certificate)
    for entry in load(path)[0]:
        if entry["fingerprint"] == fingerprint:
            return entry
    now = now or datetime.datetime.now(datetime.timezone.utc)
    entry = {"fingerprint": fingerprint, "subject": certificate.subject.rfc4514_string(),
             "reason": reason, "operator": operator,
             "revoked_at": now.astimezone(datetime.timezone.utc).strftime(
                 "%Y-%m-%dT%H:%M:%SZ"),
             "certificate": certificate.public_bytes(serialization.Encoding.PEM).decode()}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, json.dumps(entry, sort_keys=True).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def revoke(path, certificate, registry, reason="unspecified", operator="", now=None):
    """Revoke a CA for good: a "ca_revoke" entry in the registry's audit chain, then the
    line in the revoked-CA file (`append`).  The audit entry comes first: a revocation
    that takes effect is never missing from the audit trail (if the file write then
    fails, the caller reports it and the same call is repeated; the entry says what was
    intended, and the repeat adds the file line).  An already listed CA writes nothing.

    Returns (entry dict, newly revoked bool).
    Raises ValueError (unknown reason), RegistryError (audit append), OSError (file).
    """
    from fleetid.cloud import audit

    if reason not in REASONS:
        raise ValueError("reason must be one of %s" % ", ".join(REASONS))
    fingerprint = ca_fingerprint(certificate)
    for entry in load(path)[0]:
        if entry["fingerprint"] == fingerprint:
            return entry, False
    now = now or datetime.datetime.now(datetime.timezone.utc)
    registry.append_audit(audit.ca_revoke_entry(
        ca_fingerprint=fingerprint, subject=certificate.subject.rfc4514_string(),
        reason=reason, operator=operator, when=now))
    return append(path, certificate, reason, operator, now=now), True


class RevokedCaFile:
    """The revoked-CA fingerprints of a file, re-read when the file changes.

    RevokedCaFile(path).fingerprints() -> frozenset of hex fingerprints.  Thread-safe.
    """

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._identity = None
        self._fingerprints = frozenset()
        self.skipped = 0
        self.fingerprints()

    def fingerprints(self):
        """The current set (a stat per call; a re-read only when the file changed)."""
        if self._identity is None and not os.access(self.path, os.F_OK, effective_ids=_EFFECTIVE):
            # No file yet (no CA ever revoked): one access(2), without the cost of the
            # FileNotFoundError a stat raises (the verifier asks on every request).
            return self._fingerprints
        try:
            st = os.stat(self.path)
            identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            return self._fingerprints  # vanished / unreadable: keep what we had
        if identity == self._identity:
            return self._fingerprints
        with self._lock:
            if identity != self._identity:
                try:
                    entries, self.skipped = load(self.path)
                except OSError:
                    return self._fingerprints
                # Only ever grows (module docstring).
                self._fingerprints = self._fingerprints | frozenset(
                    e["fingerprint"] for e in entries)
                self._identity = identity
        return self._fingerprints
