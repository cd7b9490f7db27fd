"""The PostgreSQL registry backend (psycopg 3), for fleets whose verifier / CA processes
share one registry across machines.  Same contract as SqliteRegistry; same schema text
(schema.schema_for("postgresql")), same `?` queries rewritten to %s.

How the guarantees of the interface are kept on PostgreSQL:
- one transaction per operation (`with conn.transaction()`), READ COMMITTED;
- serial allocation is one `UPDATE serial_counter ... RETURNING` (row lock; never repeats,
  committed before the call returns);
- every audit append first locks the `audit_head` row (SELECT ... FOR UPDATE): appends
  from any number of processes form one linear chain;
- a commit locks its device row (SELECT ... FOR UPDATE) before checking its status, so two
  stations cannot both commit one intent;
- the unique indexes (one committed identity per SE UID, certificate fingerprint,
  issuer + serial) are enforced by the server; their violations map to the interface's
  errors;
- the schema is applied under a transaction-level advisory lock (concurrent first starts);
- lock_timeout / statement_timeout bound every wait (RegistryError(STORAGE) after them);
- one connection per thread.

URI: anything libpq accepts ("postgresql://user@host:5432/db", "host=/run/pg dbname=x").
Passwords come from the environment (PGPASSWORD) or ~/.pgpass, never the config file.
"""

import contextlib
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

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.rows import dict_row
except ImportError:  # pragma: no cover - optional dependency (fleetid[postgres])
    psycopg = None

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
    "WHERE c.cert_serial = %%s" % (", ".join("c." + n for n in _CERT_NAMES),
                                  ", ".join("d." + n for n in _DEVICE_NAMES)))
_JOINED_QUERY_ISSUER = _JOINED_QUERY + " AND c.issuer = %s"
_SCHEMA_LOCK = 0x666C6565  # pg_advisory_xact_lock key for schema creation ("flee")


def _q(query):
    return schema.placeholders(query, "postgresql")


def _storage_error(exc):
    # Only the class name and SQLSTATE: server messages can quote row values.
    return RegistryError(RegistryError.STORAGE, "%s (%s)" % (
        type(exc).__name__, getattr(exc, "sqlstate", None) or "-"))


class PostgresRegistry(Registry):
    """Registry on PostgreSQL.  `PostgresRegistry(conninfo, wall_clock=time.time,
    lock_timeout_s=10.0, connect_timeout_s=10)`; creates the schema on first open.

    Raises RegistryError(CONFIG) if psycopg is not installed, RegistryError(STORAGE) if
    the server cannot be reached, RegistryError(SCHEMA) for another schema version.
    """

    dialect = "postgresql"

    def __init__(self, conninfo, wall_clock=time.time, lock_timeout_s=10.0,
                 connect_timeout_s=10):
        if psycopg is None:
            raise RegistryError(RegistryError.CONFIG, "psycopg is not installed "
                                "(pip install 'fleetid[postgres]')")
        self.conninfo = conninfo
        self.wall_clock = wall_clock
        self.lock_timeout_s = lock_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._local = threading.local()
        self._connections = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._apply_schema()

    # -- connections and transactions -------------------------------------------------------------

    def _new_connection(self):
        ms = int(self.lock_timeout_s * 1000)
        return psycopg.connect(
            self.conninfo, autocommit=True, row_factory=dict_row,
            connect_timeout=self.connect_timeout_s,
            options="-c lock_timeout=%d -c statement_timeout=%d" % (ms, ms * 3))

    def _conn(self):
        if self._closed:
            raise RegistryError(RegistryError.CLOSED)
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            try:
                conn = self._new_connection()
            except psycopg.Error as exc:
                raise _storage_error(exc) from None
            with self._connections_lock:
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _write(self):
        conn = self._conn()
        try:
            with conn.transaction():
                yield conn
        except psycopg.Error as exc:
            raise _storage_error(exc) from None

    @contextlib.contextmanager
    def _read(self):
        conn = self._conn()
        try:
            yield conn
        except psycopg.Error as exc:
            raise _storage_error(exc) from None

    def _apply_schema(self):
        with self._write() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in schema.statements(self.dialect):
                conn.execute(statement)
            row = conn.execute(
                "SELECT value FROM registry_meta WHERE name = 'schema_version'").fetchone()
            if row is None or row["value"] != str(schema.SCHEMA_VERSION):
                raise RegistryError(RegistryError.SCHEMA, "version %s"
                                    % (row and row["value"]))

    def close(self):
        with self._connections_lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except psycopg.Error:
                pass

    # -- helpers inside a transaction -------------------------------------------------------------

    def _device(self, conn, serial, lock=False):
        row = conn.execute(_q("SELECT %s FROM devices WHERE serial = ?%s" % (
            _DEVICE_COLUMNS, " FOR UPDATE" if lock else "")), (serial,)).fetchone()
        if row is None:
            raise DeviceNotFound(serial)
        return device_from_row(row)

    def _append(self, conn, fields, device_serial):
        head_row = conn.execute(
            "SELECT entry_count, head_hash FROM audit_head WHERE id = 1 FOR UPDATE").fetchone()
        count, head = head_row["entry_count"], head_row["head_hash"]
        if fields.get("type") == audit.CHECKPOINT:
            covers = fields.get("covers")
            if not isinstance(covers, int) or not 1 <= covers <= count:
                raise RegistryError(RegistryError.BAD_INPUT, "checkpoint covers %r" % (covers,))
            row = conn.execute(_q("SELECT entry_hash FROM audit_log WHERE seq = ?"),
                               (covers - 1,)).fetchone()
            if row is None or row["entry_hash"] != fields.get("head"):
                raise RegistryError(RegistryError.MISMATCH, "checkpoint head")
        entry = audit.seal(fields, count, head)
        conn.execute(
            _q("INSERT INTO audit_log (seq, entry_type, device_serial, entry_hash, entry) "
               "VALUES (?, ?, ?, ?, ?)"),
            (count, entry.type, device_serial, entry.hash_hex, entry.line[:-1].decode("ascii")))
        conn.execute(_q("UPDATE audit_head SET entry_count = ?, head_hash = ? WHERE id = 1"),
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
        rows = conn.execute(_q(query), params).fetchall()
        if not rows:
            raise CertificateNotFound(cert_serial)
        if len(rows) > 1:
            raise RegistryError(RegistryError.AMBIGUOUS, "serial %s: give the issuer"
                                % cert_serial)
        return certificate_from_row(rows[0])

    def _insert_cert(self, conn, cert):
        try:
            with conn.transaction():  # a savepoint: the violation must not poison the outer
                conn.execute(_q("INSERT INTO certificates (%s) VALUES (%s)"
                                % (", ".join(cert), ", ".join("?" * len(cert)))),
                             tuple(cert.values()))
        except pg_errors.UniqueViolation:
            raise RegistryError(RegistryError.DUPLICATE_CERTIFICATE,
                                cert["fingerprint"]) from None

    # -- serials and intents ----------------------------------------------------------------------

    def allocate_serial(self):
        with self._write() as conn:
            row = conn.execute("UPDATE serial_counter SET next_serial = next_serial + 1 "
                               "WHERE id = 1 RETURNING next_serial - 1 AS serial").fetchone()
        return row["serial"]

    def write_intent(self, serial, se_uid, station, operator="", batch="", hsm_session=""):
        check_serial(serial)
        uid_hex = check_se_uid(se_uid)
        for name, value in (("station", station), ("operator", operator), ("batch", batch),
                            ("hsm_session", hsm_session)):
            check_text(name, value)
        now = self._now()
        with self._write() as conn:
            next_serial = conn.execute(
                "SELECT next_serial FROM serial_counter WHERE id = 1").fetchone()["next_serial"]
            if serial >= next_serial:
                raise RegistryError(RegistryError.NOT_ALLOCATED, str(serial))
            try:
                with conn.transaction():
                    conn.execute(_q(
                        "INSERT INTO devices (serial, se_uid, status, station, operator, batch, "
                        "hsm_session, intent_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                        (serial, uid_hex, INTENT, station, operator, batch, hsm_session, now,
                         now))
            except pg_errors.UniqueViolation:
                raise DuplicateSerial(serial) from None
            return self._device(conn, serial)

    def allocate_intent(self, se_uid, station, operator="", batch="", hsm_session=""):
        uid_hex = check_se_uid(se_uid)
        for name, value in (("station", station), ("operator", operator), ("batch", batch),
                            ("hsm_session", hsm_session)):
            check_text(name, value)
        now = self._now()
        with self._write() as conn:
            serial = conn.execute("UPDATE serial_counter SET next_serial = next_serial + 1 "
                                  "WHERE id = 1 RETURNING next_serial - 1 AS serial"
                                  ).fetchone()["serial"]
            try:
                with conn.transaction():
                    conn.execute(_q(
                        "INSERT INTO devices (serial, se_uid, status, station, operator, batch, "
                        "hsm_session, intent_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                        (serial, uid_hex, INTENT, station, operator, batch, hsm_session, now,
                         now))
            except pg_errors.UniqueViolation:
                raise DuplicateSerial(serial) from None
            return self._device(conn, serial)

    def list_in_flight(self):
        with self._read() as conn:
            rows = conn.execute(_q("SELECT %s FROM devices WHERE status = ? ORDER BY serial"
                                   % _DEVICE_COLUMNS), (INTENT,)).fetchall()
        return [device_from_row(r) for r in rows]

    @wrap_audit_error
    def commit_identity(self, record, audit_entry):
        check_serial(record.serial)
        now = self._now()
        cert = certificate_row(record.serial, record.identity_cert_der, IDENTITY, now)
        with self._write() as conn:
            device = self._device(conn, record.serial, lock=True)
            check_commit(device, record, audit_entry, cert)
            try:
                with conn.transaction():
                    conn.execute(_q(
                        "UPDATE devices SET status = ?, committed_at = ?, updated_at = ?, "
                        "slot = ?, aid = ?, issuing_ca = ?, attestation_hash = ?, "
                        "identity_fingerprint = ?, station = ?, operator = ?, batch = ?, "
                        "hsm_session = ? WHERE serial = ?"),
                        (COMMITTED, now, now, record.slot, bytes(record.aid).hex(),
                         cert["issuer"], record.attestation_hash, cert["fingerprint"],
                         record.station, record.operator, record.batch, record.hsm_session,
                         record.serial))
            except pg_errors.UniqueViolation:
                raise DuplicateSeUid(device.se_uid.hex()) from None
            row = conn.execute(_q("SELECT %s FROM certificates WHERE fingerprint = ?"
                                  % _CERT_COLUMNS), (cert["fingerprint"],)).fetchone()
            existing = None if row is None else certificate_from_row(row)
            if not identity_cert_present(existing, record, cert):
                self._insert_cert(conn, cert)
            return self._append(conn, audit_entry, record.serial)

    @wrap_audit_error
    def hold(self, serial, reason, station="", operator=""):
        check_text("reason", reason, allow_empty=False)
        now = self._now()
        with self._write() as conn:
            device = self._device(conn, serial, lock=True)
            if device.status == REVOKED:
                raise InvalidState(serial, device.status, "hold")
            conn.execute(_q("UPDATE devices SET status = ?, hold_reason = ?, updated_at = ? "
                            "WHERE serial = ?"), (HELD, reason, now, serial))
            fields = build_hold(device, reason, station, operator, now)
            return self._append(conn, fields, serial)

    @wrap_audit_error
    def reconcile(self, serial, outcome, reason, station="", operator="", cert_serial=None,
                  cert_fingerprint=None):
        check_text("outcome", outcome, allow_empty=False)
        now = self._now()
        with self._write() as conn:
            device = self._device(conn, serial, lock=True)
            if device.status != INTENT:
                raise InvalidState(serial, device.status, "reconcile")
            conn.execute(_q("UPDATE devices SET status = ?, hold_reason = ?, updated_at = ? "
                            "WHERE serial = ?"), (HELD, "reconciled: " + outcome, now, serial))
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
            device = self._device(conn, cert.device_serial, lock=True)
            # Re-read under the device lock: a concurrent revocation is seen.
            cert = self._certs(conn, cert_serial, issuer)
            if cert.revoked:
                raise RegistryError(RegistryError.STATE, "already revoked")
            conn.execute(_q("UPDATE certificates SET revoked_at = ?, revocation_reason = ? "
                            "WHERE fingerprint = ?"), (now, reason, cert.fingerprint))
            if cert.kind == IDENTITY and device.identity_fingerprint == cert.fingerprint:
                conn.execute(_q("UPDATE devices SET status = ?, updated_at = ? "
                                "WHERE serial = ?"), (REVOKED, now, device.serial))
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
            rows = conn.execute(_q("SELECT %s FROM devices WHERE se_uid = ? "
                                   "ORDER BY serial DESC" % _DEVICE_COLUMNS),
                                (uid_hex,)).fetchall()
        return [device_from_row(r) for r in rows]

    def add_certificate(self, serial, cert_der, kind, rotation_state=None):
        if rotation_state is not None:
            check_text("rotation state", rotation_state)
        now = self._now()
        cert = certificate_row(serial, cert_der, kind, now)
        with self._write() as conn:
            self._device(conn, serial, lock=rotation_state is not None)
            self._insert_cert(conn, cert)
            if rotation_state is not None:
                conn.execute(_q("UPDATE devices SET rotation_state = ?, updated_at = ? "
                                "WHERE serial = ?"), (rotation_state, now, serial))
        return certificate_from_row(cert)

    def certificates(self, serial):
        with self._read() as conn:
            self._device(conn, serial)
            rows = conn.execute(_q("SELECT %s FROM certificates WHERE device_serial = ? "
                                   "ORDER BY added_at, fingerprint" % _CERT_COLUMNS),
                                (serial,)).fetchall()
        return [certificate_from_row(r) for r in rows]

    def certificate_status(self, cert_serial, issuer=None):
        with self._read() as conn:
            return self._certs(conn, cert_serial, issuer)

    def certificate_and_device(self, cert_serial, issuer=None):
        # One statement (one snapshot, one round trip): the certificate joined with its
        # device.  The column names of the two tables do not overlap.
        cert_serial = (audit.cert_serial_hex(cert_serial) if isinstance(cert_serial, int)
                       else audit.to_hex(cert_serial))
        params = [cert_serial]
        query = _JOINED_QUERY
        if issuer is not None:
            query = _JOINED_QUERY_ISSUER
            params.append(issuer)
        with self._read() as conn:
            rows = conn.execute(query, params).fetchall()
        if not rows:
            raise CertificateNotFound(cert_serial)
        if len(rows) > 1:
            raise RegistryError(RegistryError.AMBIGUOUS, "serial %s: give the issuer"
                                % cert_serial)
        row = rows[0]
        if row["serial"] is None:  # LEFT JOIN: no device row (foreign key prevents it)
            raise DeviceNotFound(row["device_serial"])
        return (certificate_from_row({k: row[k] for k in _CERT_NAMES}),
                device_from_row({k: row[k] for k in _DEVICE_NAMES}))

    def set_rotation_state(self, serial, state):
        check_text("rotation state", state)
        with self._write() as conn:
            self._device(conn, serial, lock=True)
            conn.execute(_q("UPDATE devices SET rotation_state = ?, updated_at = ? "
                            "WHERE serial = ?"), (state, self._now(), serial))

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
            row = conn.execute(
                "SELECT entry_count, head_hash FROM audit_head WHERE id = 1").fetchone()
        return row["entry_count"], row["head_hash"]

    def iter_audit_lines(self, start=0, batch=1000):
        seq = start
        while True:
            with self._read() as conn:
                rows = conn.execute(_q("SELECT seq, entry FROM audit_log WHERE seq >= ? "
                                       "ORDER BY seq LIMIT ?"), (seq, batch)).fetchall()
            for row in rows:
                yield row["entry"].encode("ascii") + b"\n"
            if len(rows) < batch:
                return
            seq = rows[-1]["seq"] + 1

    def audit_snapshot(self):
        """(count, head, lines) read in ONE REPEATABLE READ transaction on a dedicated
        connection (see SqliteRegistry.audit_snapshot).  `lines` closes it when done."""
        try:
            conn = self._new_connection()
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            row = conn.execute(
                "SELECT entry_count, head_hash FROM audit_head WHERE id = 1").fetchone()
            rows = conn.execute("SELECT entry FROM audit_log ORDER BY seq")
        except psycopg.Error as exc:
            raise _storage_error(exc) from None
        return row["entry_count"], row["head_hash"], _SnapshotLines(conn, rows)

    def audit_entries_for(self, serial):
        with self._read() as conn:
            rows = conn.execute(_q("SELECT seq, entry FROM audit_log WHERE device_serial = ? "
                                   "ORDER BY seq"), (serial,)).fetchall()
        return [audit.parse_entry(r["entry"].encode("ascii"), r["seq"]) for r in rows]

    def last_checkpoint(self):
        with self._read() as conn:
            row = conn.execute(_q("SELECT seq, entry FROM audit_log WHERE entry_type = ? "
                                  "ORDER BY seq DESC LIMIT 1"), (audit.CHECKPOINT,)).fetchone()
        return None if row is None else audit.parse_entry(row["entry"].encode("ascii"),
                                                          row["seq"])


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
        except psycopg.Error as exc:
            self.close()
            raise _storage_error(exc) from None
        if row is None:
            self.close()
            raise StopIteration
        return row["entry"].encode("ascii") + b"\n"

    def close(self):
        if self._conn is not None:
            try:
                self._conn.execute("ROLLBACK")
            except psycopg.Error:
                pass
            self._conn.close()
            self._conn = None
