"""Certificate revocation on the SQL backends: `mark_revoked` (one certificate, one
transaction) and `mark_revoked_many` (many certificates, ONE transaction: a bulk
revocation of 10,000 devices pays a few dozen durable commits instead of one per
certificate), one code path for both so their rows and audit entries cannot drift apart.

Mixed into sql_common.SqlRegistry, whose helpers it calls (`_write`, `_certs`, `_device`,
`_append`, `_q`, `_lock_clause`).  How a revocation stays single on PostgreSQL (READ
COMMITTED, other processes writing): every device concerned is locked (SELECT ... FOR
UPDATE) before anything is written, in serial order (two bulk revocations over the same
devices cannot deadlock), and each certificate is read again under that lock, so a
revocation committed by another process in between is seen: skipped by the bulk form,
RegistryError(STATE) for the single one.  The devices are locked before the first audit
append (which locks the chain head), the order every single-device write uses.  On
SQLite, BEGIN IMMEDIATE already holds the database's write lock.
"""

from fleetid.cloud import audit
from fleetid.cloud.registry.errors import RegistryError
from fleetid.cloud.registry.interface import IDENTITY, REVOKED, check_text, wrap_audit_error


class SqlRevocation:
    """mark_revoked and mark_revoked_many for SqlRegistry (see the module docstring)."""

    @wrap_audit_error
    def mark_revoked(self, cert_serial, reason, operator="", issuer=None):
        check_text("reason", reason, allow_empty=False)
        with self._write() as conn:
            [entry] = self._revoke_listed(conn, [(cert_serial, issuer)], reason, operator,
                                          strict=True)
            return entry

    @wrap_audit_error
    def mark_revoked_many(self, certificates, reason, operator=""):
        check_text("reason", reason, allow_empty=False)
        certificates = list(certificates)
        if not certificates:
            return []
        with self._write() as conn:
            return self._revoke_listed(conn, certificates, reason, operator, strict=False)

    def _revoke_listed(self, conn, certificates, reason, operator, strict):
        """Revoke each (cert_serial, issuer) of `certificates` in order inside the open
        write transaction.  Every certificate is found before anything is written (an
        unknown one raises and the transaction writes nothing).  One already revoked
        (before, by another process, or earlier in this list) raises RegistryError(STATE)
        when `strict`, else gives None.  Returns [AuditEntry or None], one per item."""
        found = [self._certs(conn, serial, issuer) for serial, issuer in certificates]
        devices = {serial: self._device(conn, serial, lock=True)
                   for serial in sorted({cert.device_serial for cert in found})}
        if self._lock_clause:  # read again under the device locks: concurrent revocations
            found = [self._certs(conn, serial, issuer) for serial, issuer in certificates]
        entries, done = [], set()
        for cert in found:
            if cert.revoked or cert.fingerprint in done:
                if strict:
                    raise RegistryError(RegistryError.STATE, "already revoked")
                entries.append(None)
                continue
            done.add(cert.fingerprint)
            entries.append(self._revoke_one(conn, cert, devices[cert.device_serial], reason,
                                            operator))
        return entries

    def _revoke_one(self, conn, cert, device, reason, operator):
        now = self._now()
        conn.execute(self._q("UPDATE certificates SET revoked_at = ?, "
                             "revocation_reason = ? WHERE fingerprint = ?"),
                     (now, reason, cert.fingerprint))
        if cert.kind == IDENTITY and device.identity_fingerprint == cert.fingerprint:
            conn.execute(self._q("UPDATE devices SET status = ?, updated_at = ? "
                                 "WHERE serial = ?"), (REVOKED, now, device.serial))
        fields = audit.revoke_entry(serial=device.serial, cert_serial=cert.cert_serial,
                                    cert_fingerprint=cert.fingerprint, reason=reason,
                                    operator=operator, when=now)
        return self._append(conn, fields)
