"""Certificate revocation on the SQL backends: `mark_revoked` (one certificate, one
transaction) and `mark_devices_revoked` (every certificate of many devices, ONE
transaction: a bulk revocation of 10,000 devices pays a few dozen durable commits instead
of one per certificate), one writer for both so their rows and audit entries cannot drift
apart.

Set-based: whatever the number of devices, the transaction locks them (a query per 500
serials), reads their unrevoked certificates under those locks (the same), updates the
rows (executemany, pipelined by psycopg on PostgreSQL) and appends the entries (the
chain's head row read under its lock once and moved once): a handful of round trips per
chunk, not several per certificate.
Mixed into sql_common.SqlRegistry, whose helpers it calls (`_write`, `_q`, `_now`,
`_lock_clause`).

How a revocation stays single on PostgreSQL (READ COMMITTED, other processes writing):
every device concerned is locked (SELECT ... FOR UPDATE) before anything is written, in
serial order (two bulk revocations over the same devices cannot deadlock), and the
certificates are read (again, for the single form) under that lock, so a revocation
committed by another process in between is seen: skipped by the bulk form,
RegistryError(STATE) for the single one. The
devices are locked before the first audit append (which locks the chain head), the order
every single-device write uses. On SQLite, BEGIN IMMEDIATE already holds the database's
write lock.
"""

import time

from fleetid.cloud import audit
from fleetid.cloud.registry.errors import DeviceNotFound, RegistryError
from fleetid.cloud.registry.interface import (
    IDENTITY,
    REVOKED,
    certificate_from_row,
    check_text,
    device_from_row,
    wrap_audit_error,
)
from fleetid.cloud.registry.sql_rows import (
    CERT_COLUMNS,
    DEVICE_COLUMNS,
)

CONFLICT_RUNS = 4  # runs of a revocation the server ended over a lock conflict
_GROUP = 500  # values per IN (...) list: far below SQLite's variable limit (999 before 3.32)


def _in_list(values):
    return "(%s)" % ", ".join("?" * len(values))


class SqlRevocation:
    """mark_revoked and mark_devices_revoked for SqlRegistry (see the module docstring)."""

    @wrap_audit_error
    def mark_revoked(self, cert_serial, reason, operator="", issuer=None):
        check_text("reason", reason, allow_empty=False)
        return self._revocation(lambda conn: self._revoke_one(conn, cert_serial, issuer,
                                                              reason, operator))

    @wrap_audit_error
    def mark_devices_revoked(self, serials, reason, operator=""):
        check_text("reason", reason, allow_empty=False)
        serials = list(serials)
        if not serials:
            return {}
        return self._revocation(lambda conn: self._revoke_devices(conn, serials, reason,
                                                                  operator))

    def _revocation(self, work):
        """work(conn) in a write transaction of its own, run again (CONFLICT_RUNS
        in all at most) when the database rolled it back over a lock conflict with
        another writer (RegistryError.retryable: nothing of it was written, and the new
        run reads afresh).  On PostgreSQL a revocation holds its devices' rows while it
        waits for the audit chain's head, which a group-commit batch of EST writes may
        hold while it waits for one of those rows: the server's deadlock detection ends
        one side, and a revocation is not dropped for it."""
        for run in range(1, CONFLICT_RUNS + 1):
            try:
                with self._write() as conn:
                    return work(conn)
            except RegistryError as exc:
                if not exc.retryable or run == CONFLICT_RUNS:
                    raise
            time.sleep(0.05 * run)

    def _revoke_one(self, conn, cert_serial, issuer, reason, operator):
        """Revoke one certificate inside the open write transaction (CertificateNotFound,
        RegistryError(AMBIGUOUS), RegistryError(STATE) when already revoked).  Returns
        its AuditEntry."""
        cert = self._certs(conn, cert_serial, issuer)
        devices = self._locked_devices(conn, {cert.device_serial})
        if self._lock_clause:  # read again under the device lock: a concurrent revocation
            cert = self._certs(conn, cert_serial, issuer)
        if cert.revoked:
            raise RegistryError(RegistryError.STATE, "already revoked")
        [entry] = self._write_revocations(conn, [cert], devices, reason, operator)
        return entry

    def _revoke_devices(self, conn, serials, reason, operator):
        """Every unrevoked certificate of each device of `serials`, newest first (the
        identity one last), read inside the write transaction once the devices are locked
        (so none recorded meanwhile is missed).  Returns {serial: [cert serial hex]} (a
        serial listed twice: [] the second time)."""
        devices = self._locked_devices(conn, set(serials))
        wanted = sorted(devices)
        unrevoked = {}
        for start in range(0, len(wanted), _GROUP):
            part = wanted[start:start + _GROUP]
            query = ("SELECT %s FROM certificates WHERE device_serial IN %s AND revoked_at "
                     "IS NULL ORDER BY added_at DESC, fingerprint DESC"
                     % (CERT_COLUMNS, _in_list(part)))
            for row in conn.execute(self._q(query), part).fetchall():
                unrevoked.setdefault(row["device_serial"], []).append(
                    certificate_from_row(row))
        done, certs = {}, []
        for serial in serials:
            mine = unrevoked.pop(serial, [])
            certs.extend(mine)
            done[serial] = [cert.cert_serial for cert in mine]
        self._write_revocations(conn, certs, devices, reason, operator)
        return done

    def _write_revocations(self, conn, certs, devices, reason, operator):
        """The rows and audit entries of revoking `certs` (none revoked, each once), in
        order: what one mark_revoked per certificate writes.  Returns the AuditEntries."""
        if not certs:
            return []
        revoked, identities, fields = [], [], []
        for cert in certs:
            now = self._now()
            device = devices[cert.device_serial]
            revoked.append((now, reason, cert.fingerprint))
            if cert.kind == IDENTITY and device.identity_fingerprint == cert.fingerprint:
                identities.append((REVOKED, now, device.serial))
            fields.append(audit.revoke_entry(
                serial=device.serial, cert_serial=cert.cert_serial,
                cert_fingerprint=cert.fingerprint, reason=reason, operator=operator,
                when=now))
        conn.cursor().executemany(self._q("UPDATE certificates SET revoked_at = ?, "
                                          "revocation_reason = ? WHERE fingerprint = ?"),
                                  revoked)
        if identities:
            conn.cursor().executemany(self._q("UPDATE devices SET status = ?, updated_at = ? "
                                              "WHERE serial = ?"), identities)
        return self._append_all(conn, fields)

    def _append_all(self, conn, fields_list):
        """Seal `fields_list` (no checkpoint among them) into the chain in order, as as many
        _append calls would: the head row read under its lock once and moved once."""
        return self._seal_into(conn, fields_list, *self._head(conn))

    def _locked_devices(self, conn, serials):
        """{serial: DeviceRecord} of `serials`, each row locked on PostgreSQL (FOR UPDATE,
        in serial order).  Raises DeviceNotFound."""
        serials = sorted(serials)
        devices = {}
        for start in range(0, len(serials), _GROUP):
            part = serials[start:start + _GROUP]
            query = "SELECT %s FROM devices WHERE serial IN %s ORDER BY serial%s" % (
                DEVICE_COLUMNS, _in_list(part), self._lock_clause)
            for row in conn.execute(self._q(query), part).fetchall():
                device = device_from_row(row)
                devices[device.serial] = device
        for serial in serials:
            if serial not in devices:
                raise DeviceNotFound(serial)
        return devices
