"""The SQLite registry backend (the default).

One database file holds devices, certificates, the serial counter and the audit chain, so
one SQLite transaction covers "identity record + audit entry" (interface.commit_identity).

Settings, and why:
- WAL journal: readers (verifier, CLI) never block the writing stations;
- synchronous=FULL: in WAL mode NORMAL may lose the last commits on power loss, and an
  allocated serial or a committed identity must survive (never repeat a serial);
- foreign_keys=ON: certificates refer to their device;
- busy timeout: another process writing waits, bounded, then RegistryError(STORAGE);
- one connection per thread (threads never share one), and writes open with
  BEGIN IMMEDIATE under an in-process lock: stations in this process queue on the lock
  instead of spinning on SQLite's busy handler, and the write lock is taken before the
  audit head is read, so concurrent appends form one chain.
"""

import contextlib
import os
import sqlite3
import threading
import time

from fleetid.cloud.line import audit
from fleetid.cloud.registry import schema
from fleetid.cloud.registry.errors import (
    CertificateNotFound,
    DeviceNotFound,
    DuplicateSerial,
    DuplicateSeUid,
    InvalidState,
    RegistryError,
)
from fleetid.cloud.registry.interface import (
    COMMITTED,
    HELD,
    IDENTITY,
    INTENT,
    REVOKED,
    DeviceRecord,
    Registry,
    build_hold,
    certificate_from_row,
    certificate_row,
    check_commit,
    check_se_uid,
    check_serial,
    check_text,
    device_from_row,
    identity_cert_present,
    wrap_audit_error,
)

_DEVICE_COLUMNS = (
    "serial, se_uid, status, station, operator, batch, hsm_session, intent_at, updated_at, "
    "committed_at, hold_reason, slot, aid, issuing_ca, attestation_hash, "
    "identity_fingerprint, rotation_state"
)
_CERT_COLUMNS = (
    "fingerprint, device_serial, kind, cert_serial, issuer, not_before, not_after, added_at, "
    "der, revoked_at, revocation_reason"
)

_DEVICE_NAMES = tuple(c.strip() for c in _DEVICE_COLUMNS.split(","))
_CERT_NAMES = tuple(c.strip() for c in _CERT_COLUMNS.split(","))
_JOINED_QUERY = (
    "SELECT %s, %s FROM certificates c LEFT JOIN devices d ON d.serial = c.device_serial "
    "WHERE c.cert_serial = ?" % (", ".join("c." + n for n in _CERT_NAMES),
                                 ", ".join("d." + n for n in _DEVICE_NAMES)))
_JOINED_QUERY_ISSUER = _JOINED_QUERY + " AND c.issuer = ?"
_MEMO_SIZE = 100000  # memoised certificate_and_device answers per thread


def _storage_error(exc):
    # The sqlite3 message names the failing operation (no data values): safe to keep.
    return RegistryError(RegistryError.STORAGE, "%s: %s" % (type(exc).__name__, exc))


class SqliteRegistry(Registry):
    """Registry in one SQLite file.  `SqliteRegistry(path, wall_clock=time.time,
    busy_timeout_s=10.0)`; creates the schema on first open.

    Raises RegistryError(SCHEMA) for a database of another schema version,
    RegistryError(CONFIG) for ":memory:" (each thread would get its own database: use
    MemoryRegistry).
    """

    dialect = "sqlite"

    def __init__(self, path, wall_clock=time.time, busy_timeout_s=10.0):
        path = os.fspath(path)
        if path == ":memory:" or not path:
            raise RegistryError(RegistryError.CONFIG, "use MemoryRegistry for in-memory")
        self.path = path
        self.wall_clock = wall_clock
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections = []
        self._connections_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self._apply_schema()

    # -- connections and transactions -------------------------------------------------------------

    def _new_connection(self):
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=%d" % int(self.busy_timeout_s * 1000))
        return conn

    def _conn(self):
        if self._closed:
            raise RegistryError(RegistryError.CLOSED)
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self._new_connection()
            except sqlite3.Error as exc:
                raise _storage_error(exc) from None
            with self._connections_lock:
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    def _commit(self, conn):
        """COMMIT.  A method of its own so fault-injection tests can make it fail."""
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def _write(self):
        conn = self._conn()
        # Counted before the write (committed or not): certificate_and_device's memo is
        # dropped by any write of this thread's connection (data_version misses those).
        self._local.writes = getattr(self._local, "writes", 0) + 1
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    self._commit(conn)
                finally:
                    if conn.in_transaction:
                        try:
                            conn.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass
            except sqlite3.Error as exc:
                raise _storage_error(exc) from None

    @contextlib.contextmanager
    def _read(self):
        conn = self._conn()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise _storage_error(exc) from None

    def _apply_schema(self):
        with self._write() as conn:
            for statement in schema.statements(self.dialect):
                conn.execute(statement)
            row = conn.execute(
                "SELECT value FROM registry_meta WHERE name = 'schema_version'").fetchone()
            if row is None or row[0] != str(schema.SCHEMA_VERSION):
                raise RegistryError(RegistryError.SCHEMA, "version %s" % (row and row[0]))

    def close(self):
        with self._connections_lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    # -- helpers inside a transaction -------------------------------------------------------------

    def _device(self, conn, serial):
        row = conn.execute("SELECT %s FROM devices WHERE serial = ?" % _DEVICE_COLUMNS,
                           (serial,)).fetchone()
        if row is None:
            raise DeviceNotFound(serial)
        return device_from_row(row)

    def _append(self, conn, fields, device_serial):
        count, head = conn.execute(
            "SELECT entry_count, head_hash FROM audit_head WHERE id = 1").fetchone()
        if fields.get("type") == audit.CHECKPOINT:
            covers = fields.get("covers")
            if not isinstance(covers, int) or not 1 <= covers <= count:
                raise RegistryError(RegistryError.BAD_INPUT, "checkpoint covers %r" % (covers,))
            row = conn.execute("SELECT entry_hash FROM audit_log WHERE seq = ?",
                               (covers - 1,)).fetchone()
            if row is None or row[0] != fields.get("head"):
                raise RegistryError(RegistryError.MISMATCH, "checkpoint head")
        entry = audit.seal(fields, count, head)
        conn.execute(
            "INSERT INTO audit_log (seq, entry_type, device_serial, entry_hash, entry) "
            "VALUES (?, ?, ?, ?, ?)",
            (count, entry.type, device_serial, entry.hash_hex, entry.line[:-1].decode("ascii")))
        conn.execute("UPDATE audit_head SET entry_count = ?, head_hash = ? WHERE id = 1",
                     (count + 1, entry.hash_hex))
        return entry

    def _certs(self, conn, cert_serial, issuer):
        cert_serial = (audit.cert_serial_hex(cert_serial) if isinstance(cert_serial, int)
                       else audit.to_hex(cert_serial))
        query = "SELECT %s FROM certificates WHERE cert_serial = ?" % _CERT_COLUMNS
        params = [cert_serial]
        if issuer is not None:
            query += " AND issuer = ?"
            params.append(issuer)
        rows = conn.execute(query, params).fetchall()
        if not rows:
            raise CertificateNotFound(cert_serial)
        if len(rows) > 1:
            raise RegistryError(RegistryError.AMBIGUOUS, "serial %s: give the issuer"
                                % cert_serial)
        return certificate_from_row(rows[0])

    # -- serials and intents ----------------------------------------------------------------------

    def allocate_serial(self):
        with self._write() as conn:
            serial = conn.execute(
                "SELECT next_serial FROM serial_counter WHERE id = 1").fetchone()[0]
            conn.execute("UPDATE serial_counter SET next_serial = ? WHERE id = 1", (serial + 1,))
        return serial

    def write_intent(self, serial, se_uid, station, operator="", batch="", hsm_session=""):
        check_serial(serial)
        uid_hex = check_se_uid(se_uid)
        for name, value in (("station", station), ("operator", operator), ("batch", batch),
                            ("hsm_session", hsm_session)):
            check_text(name, value)
        now = self._now()
        with self._write() as conn:
            next_serial = conn.execute(
                "SELECT next_serial FROM serial_counter WHERE id = 1").fetchone()[0]
            if serial >= next_serial:
                raise RegistryError(RegistryError.NOT_ALLOCATED, str(serial))
            try:
                conn.execute(
                    "INSERT INTO devices (serial, se_uid, status, station, operator, batch, "
                    "hsm_session, intent_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (serial, uid_hex, INTENT, station, operator, batch, hsm_session, now, now))
            except sqlite3.IntegrityError:
                raise DuplicateSerial(serial) from None
            return self._device(conn, serial)

    def allocate_intent(self, se_uid, station, operator="", batch="", hsm_session=""):
        uid_hex = check_se_uid(se_uid)
        for name, value in (("station", station), ("operator", operator), ("batch", batch),
                            ("hsm_session", hsm_session)):
            check_text(name, value)
        now = self._now()
        with self._write() as conn:
            serial = conn.execute(
                "SELECT next_serial FROM serial_counter WHERE id = 1").fetchone()[0]
            conn.execute("UPDATE serial_counter SET next_serial = ? WHERE id = 1", (serial + 1,))
            try:
                conn.execute(
                    "INSERT INTO devices (serial, se_uid, status, station, operator, batch, "
                    "hsm_session, intent_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (serial, uid_hex, INTENT, station, operator, batch, hsm_session, now, now))
            except sqlite3.IntegrityError:
                raise DuplicateSerial(serial) from None
        # What the row now holds (every other column NULL), without reading it back.
        return DeviceRecord(serial=serial, se_uid=bytes.fromhex(uid_hex), status=INTENT,
                            station=station, operator=operator, batch=batch,
                            hsm_session=hsm_session, intent_at=now, updated_at=now)

    def list_in_flight(self):
        with self._read() as conn:
            rows = conn.execute("SELECT %s FROM devices WHERE status = ? ORDER BY serial"
                                % _DEVICE_COLUMNS, (INTENT,)).fetchall()
        return [device_from_row(r) for r in rows]

    @wrap_audit_error
    def commit_identity(self, record, audit_entry):
        check_serial(record.serial)
        now = self._now()
        cert = certificate_row(record.serial, record.identity_cert_der, IDENTITY, now)
        with self._write() as conn:
            device = self._device(conn, record.serial)
            check_commit(device, record, audit_entry, cert)
            try:
                conn.execute(
                    "UPDATE devices SET status = ?, committed_at = ?, updated_at = ?, slot = ?, "
                    "aid = ?, issuing_ca = ?, attestation_hash = ?, identity_fingerprint = ?, "
                    "station = ?, operator = ?, batch = ?, hsm_session = ? WHERE serial = ?",
                    (COMMITTED, now, now, record.slot, bytes(record.aid).hex(), cert["issuer"],
                     record.attestation_hash, cert["fingerprint"], record.station,
                     record.operator, record.batch, record.hsm_session, record.serial))
            except sqlite3.IntegrityError:
                raise DuplicateSeUid(device.se_uid.hex()) from None
            try:
                self._insert_cert(conn, cert)
            except RegistryError:  # added before the SE got it (add_certificate)?
                existing = self._cert_by_fingerprint(conn, cert["fingerprint"])
                if not identity_cert_present(existing, record, cert):
                    raise
            return self._append(conn, audit_entry, record.serial)

    def _cert_by_fingerprint(self, conn, fingerprint):
        row = conn.execute("SELECT %s FROM certificates WHERE fingerprint = ?" % _CERT_COLUMNS,
                           (fingerprint,)).fetchone()
        return None if row is None else certificate_from_row(row)

    def _insert_cert(self, conn, cert):
        try:
            conn.execute("INSERT INTO certificates (%s) VALUES (%s)"
                         % (", ".join(cert), ", ".join("?" * len(cert))), tuple(cert.values()))
        except sqlite3.IntegrityError:
            raise RegistryError(RegistryError.DUPLICATE_CERTIFICATE,
                                cert["fingerprint"]) from None

    @wrap_audit_error
    def hold(self, serial, reason, station="", operator=""):
        check_text("reason", reason, allow_empty=False)
        now = self._now()
        with self._write() as conn:
            device = self._device(conn, serial)
            if device.status == REVOKED:
                raise InvalidState(serial, device.status, "hold")
            conn.execute("UPDATE devices SET status = ?, hold_reason = ?, updated_at = ? "
                         "WHERE serial = ?", (HELD, reason, now, serial))
            fields = build_hold(device, reason, station, operator, now)
            return self._append(conn, fields, serial)

    @wrap_audit_error
    def reconcile(self, serial, outcome, reason, station="", operator="", cert_serial=None,
                  cert_fingerprint=None):
        check_text("outcome", outcome, allow_empty=False)
        now = self._now()
        with self._write() as conn:
            device = self._device(conn, serial)
            if device.status != INTENT:
                raise InvalidState(serial, device.status, "reconcile")
            conn.execute("UPDATE devices SET status = ?, hold_reason = ?, updated_at = ? "
                         "WHERE serial = ?", (HELD, "reconciled: " + outcome, now, serial))
            fields = audit.reconcile_entry(
                serial=serial, outcome=outcome, reason=reason, station=station,
                operator=operator, when=now, se_uid=device.se_uid, cert_serial=cert_serial,
                cert_fingerprint=cert_fingerprint)
            return self._append(conn, fields, serial)

    @wrap_audit_error
    def mark_revoked(self, cert_serial, reason, operator="", issuer=None):
        check_text("reason", reason, allow_empty=False)
        now = self._now()
        with self._write() as conn:
            cert = self._certs(conn, cert_serial, issuer)
            if cert.revoked:
                raise RegistryError(RegistryError.STATE, "already revoked")
            conn.execute("UPDATE certificates SET revoked_at = ?, revocation_reason = ? "
                         "WHERE fingerprint = ?", (now, reason, cert.fingerprint))
            device = self._device(conn, cert.device_serial)
            if cert.kind == IDENTITY and device.identity_fingerprint == cert.fingerprint:
                conn.execute("UPDATE devices SET status = ?, updated_at = ? WHERE serial = ?",
                             (REVOKED, now, device.serial))
            fields = audit.revoke_entry(serial=device.serial, cert_serial=cert.cert_serial,
                                        cert_fingerprint=cert.fingerprint, reason=reason,
                                        operator=operator, when=now)
            return self._append(conn, fields, device.serial)

    # -- devices and certificates -----------------------------------------------------------------

    def get_device(self, serial):
        with self._read() as conn:
            return self._device(conn, serial)

    def find_by_se_uid(self, se_uid):
        uid_hex = check_se_uid(se_uid)
        with self._read() as conn:
            rows = conn.execute("SELECT %s FROM devices WHERE se_uid = ? ORDER BY serial DESC"
                                % _DEVICE_COLUMNS, (uid_hex,)).fetchall()
        return [device_from_row(r) for r in rows]

    def add_certificate(self, serial, cert_der, kind, rotation_state=None):
        if rotation_state is not None:
            check_text("rotation state", rotation_state)
        now = self._now()
        cert = certificate_row(serial, cert_der, kind, now)
        with self._write() as conn:
            self._device(conn, serial)
            self._insert_cert(conn, cert)
            if rotation_state is not None:
                conn.execute("UPDATE devices SET rotation_state = ?, updated_at = ? "
                             "WHERE serial = ?", (rotation_state, now, serial))
        return certificate_from_row(cert)

    def certificates(self, serial):
        with self._read() as conn:
            self._device(conn, serial)
            rows = conn.execute("SELECT %s FROM certificates WHERE device_serial = ? "
                                "ORDER BY added_at, fingerprint" % _CERT_COLUMNS,
                                (serial,)).fetchall()
        return [certificate_from_row(r) for r in rows]

    def certificate_status(self, cert_serial, issuer=None):
        with self._read() as conn:
            return self._certs(conn, cert_serial, issuer)

    def certificate_and_device(self, cert_serial, issuer=None):
        # The verifier's per-request read: one statement (one snapshot), the certificate
        # joined with its device, plain tuples (no sqlite3.Row), the SQL text constant so
        # sqlite3's statement cache reuses the prepared statement.
        #
        # Read-through memo, exact (no staleness window): answers are kept per thread
        # with the database version they were read at, and every call first asks SQLite
        # whether anything was committed since: `PRAGMA data_version` changes when any
        # other connection (another thread's, another process's) commits, and the
        # per-thread write count covers this thread's own connection (which
        # data_version does not report).  Any commit at all drops every memoised
        # answer.  The check is ~10x cheaper than the joined query; the records are
        # immutable.
        cert_serial = (audit.cert_serial_hex(cert_serial) if isinstance(cert_serial, int)
                       else audit.to_hex(cert_serial))
        conn = self._conn()
        local = self._local
        try:
            token = (conn.execute("PRAGMA data_version").fetchone()[0],
                     getattr(local, "writes", 0))
        except sqlite3.Error as exc:
            raise _storage_error(exc) from None
        memo = getattr(local, "memo", None)
        if memo is None or memo[0] != token or len(memo[1]) >= _MEMO_SIZE:
            memo = local.memo = (token, {})
        key = (cert_serial, issuer)
        found = memo[1].get(key)
        if found is not None:
            return found
        try:
            cursor = conn.cursor()
            cursor.row_factory = None
            if issuer is None:
                rows = cursor.execute(_JOINED_QUERY, (cert_serial,)).fetchall()
            else:
                rows = cursor.execute(_JOINED_QUERY_ISSUER, (cert_serial, issuer)).fetchall()
        except sqlite3.Error as exc:
            raise _storage_error(exc) from None
        if not rows:
            raise CertificateNotFound(cert_serial)
        if len(rows) > 1:
            raise RegistryError(RegistryError.AMBIGUOUS, "serial %s: give the issuer"
                                % cert_serial)
        row = rows[0]
        split = len(_CERT_NAMES)
        if row[split] is None:  # LEFT JOIN: no device row (the foreign key prevents it)
            raise DeviceNotFound(row[1])
        found = memo[1][key] = (certificate_from_row(zip(_CERT_NAMES, row[:split])),
                                device_from_row(zip(_DEVICE_NAMES, row[split:])))
        return found

    def set_rotation_state(self, serial, state):
        check_text("rotation state", state)
        with self._write() as conn:
            self._device(conn, serial)
            conn.execute("UPDATE devices SET rotation_state = ?, updated_at = ? WHERE serial = ?",
                         (state, self._now(), serial))

    # -- the audit chain --------------------------------------------------------------------------

    @wrap_audit_error
    def append_audit(self, fields):
        if fields.get("type") != audit.CHECKPOINT:
            raise RegistryError(RegistryError.BAD_INPUT,
                                "device entries are written by the operation they record")
        with self._write() as conn:
            return self._append(conn, fields, None)

    def head(self):
        with self._read() as conn:
            count, head = conn.execute(
                "SELECT entry_count, head_hash FROM audit_head WHERE id = 1").fetchone()
        return count, head

    def iter_audit_lines(self, start=0, batch=1000):
        seq = start
        while True:
            with self._read() as conn:
                rows = conn.execute("SELECT seq, entry FROM audit_log WHERE seq >= ? "
                                    "ORDER BY seq LIMIT ?", (seq, batch)).fetchall()
            for row in rows:
                yield row[1].encode("ascii") + b"\n"
            if len(rows) < batch:
                return
            seq = rows[-1][0] + 1

    def audit_snapshot(self):
        """(count, head, lines): the head row and every stored line read in ONE read
        transaction (a WAL snapshot on a dedicated connection), so a verification running
        beside live stations compares like with like.  `lines` iterates the stored lines;
        it closes its connection when exhausted or on close()."""
        try:
            conn = self._new_connection()
            conn.execute("BEGIN")
            count, head = conn.execute(
                "SELECT entry_count, head_hash FROM audit_head WHERE id = 1").fetchone()
            cursor = conn.execute("SELECT entry FROM audit_log ORDER BY seq")
        except sqlite3.Error as exc:
            raise _storage_error(exc) from None
        return count, head, _SnapshotLines(conn, cursor)

    def audit_entries_for(self, serial):
        with self._read() as conn:
            rows = conn.execute("SELECT seq, entry FROM audit_log WHERE device_serial = ? "
                                "ORDER BY seq", (serial,)).fetchall()
        return [audit.parse_entry(row[1].encode("ascii"), row[0]) for row in rows]

    def last_checkpoint(self):
        with self._read() as conn:
            row = conn.execute("SELECT seq, entry FROM audit_log WHERE entry_type = ? "
                               "ORDER BY seq DESC LIMIT 1", (audit.CHECKPOINT,)).fetchone()
        return None if row is None else audit.parse_entry(row[1].encode("ascii"), row[0])


class _SnapshotLines:
    """Iterator over one read transaction's audit lines; owns its connection."""

    def __init__(self, conn, cursor):
        self._conn = conn
        self._cursor = cursor

    def __iter__(self):
        return self

    def __next__(self):
        if self._conn is None:
            raise StopIteration
        try:
            row = self._cursor.fetchone()
        except sqlite3.Error as exc:
            self.close()
            raise _storage_error(exc) from None
        if row is None:
            self.close()
            raise StopIteration
        return row[0].encode("ascii") + b"\n"

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None
