"""The Registry operations shared by the SQL backends (sqlite_backend, postgres_backend).

`SqlRegistry` holds every operation whose SQL flow is the same on both databases, written
with `?` placeholders and column-name row access (sqlite3.Row and psycopg's dict_row both
give it).  A backend subclass supplies what really differs:

- `dialect` ("sqlite" / "postgresql"): placeholder rewriting (`_q`, schema.placeholders);
- `_db_error` (the driver's base exception) and `_storage_error(exc)` (its mapping to
  RegistryError(STORAGE));
- `_lock_clause`: appended to the reads that must lock their row inside a write
  transaction ("" on SQLite, whose BEGIN IMMEDIATE already holds the write lock;
  " FOR UPDATE" on PostgreSQL);
- `_new_connection()`, `_write()` (how a write transaction begins and ends),
  `_unique(conn, error)` (a unique-constraint violation of the statements inside becomes
  `error`, without spoiling the transaction), `_take_serial(conn)`, `_lock_schema(conn)`,
  `_allocated_intent(...)`, `certificate_and_device()` and `audit_snapshot()`,
  `_savepoint(conn)` (one group-commit op's savepoint), `_transaction_open(conn)`.

Group commit (group_commit.py): the writes of the commit path (allocate_intent,
commit_identity, add_certificate: the line's and EST's per-device writes) go through one
writer thread that runs concurrent callers' ops in one transaction with one durable
commit (`_batched`).  `group_commit=False` gives every op its own transaction again.
"""

import contextlib
import threading

from fleetid.cloud import audit
from fleetid.cloud.registry import migrations, schema
from fleetid.cloud.registry.group_commit import GroupCommitWriter
from fleetid.cloud.registry.errors import (
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
    row_facts,
    wrap_audit_error,
)
from fleetid.cloud.registry.rotation import RotationState
from fleetid.cloud.registry.sql_revoke import SqlRevocation
from fleetid.cloud.registry.sql_rows import (
    AUDIT_INSERT,
    CERT_COLUMNS,
    DEVICE_COLUMNS,
    HEAD_QUERY,
    HEAD_UPDATE,
    SET_ROTATION,
    audit_row,
    cert_serial_text,
    one_certificate,
)

def _check_intent_text(station, operator, batch, hsm_session):
    for name, value in (("station", station), ("operator", operator), ("batch", batch),
                        ("hsm_session", hsm_session)):
        check_text(name, value)


class SqlRegistry(SqlRevocation, Registry):
    """The common part of the SQL backends; see the module docstring.  Revocation
    (mark_revoked, mark_devices_revoked) is in sql_revoke.py."""

    dialect = None
    _db_error = Exception
    _lock_clause = ""

    def __init__(self, wall_clock, group_commit=True):
        self.wall_clock = wall_clock
        self._local = threading.local()
        self._connections = []
        self._connections_lock = threading.Lock()
        self._closed = False
        options = {} if group_commit is True else group_commit
        self.group_commit = (GroupCommitWriter(self, **options)
                             if group_commit or isinstance(group_commit, dict) else None)

    @staticmethod
    def _storage_error(exc):  # pragma: no cover - every backend defines its own
        raise NotImplementedError

    def _q(self, query):
        return schema.placeholders(query, self.dialect)

    # -- connections and transactions -------------------------------------------------------------

    def _usable(self, conn):
        return conn is not None

    def _conn(self):
        if self._closed:
            raise RegistryError(RegistryError.CLOSED)
        old = getattr(self._local, "conn", None)
        if self._usable(old):
            return old
        try:
            conn = self._new_connection()
        except self._db_error as exc:
            raise self._storage_error(exc) from None
        with self._connections_lock:
            if old is not None and old in self._connections:
                self._connections.remove(old)  # retired by _usable: closed already
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _read(self):
        conn = self._conn()
        try:
            yield conn
        except self._db_error as exc:
            raise self._storage_error(exc) from None

    def _lock_schema(self, conn):
        pass

    def _table_exists(self, conn, name):  # pragma: no cover - every backend defines its own
        raise NotImplementedError

    def schema_version(self):
        """The database's schema version (int), read without writing or locking anything;
        None for a database without the registry's tables.  Raises RegistryError(SCHEMA)
        for an unreadable version, RegistryError(STORAGE)."""
        with self._read() as conn:
            if not self._table_exists(conn, "registry_meta"):
                return None
            return migrations.current_version(conn)

    def _apply_schema(self):
        # Read-only first: a registry opened beside live writers (a second worker, a
        # `fleetid revoke` during load) runs no DDL when the schema is current.  On
        # PostgreSQL even `CREATE INDEX IF NOT EXISTS` takes a SHARE lock on its table,
        # and taken table after table inside one transaction it deadlocked with a
        # re-enrolment's row writes (issue 19).
        version = self.schema_version()
        if version is not None and version >= schema.SCHEMA_VERSION:
            migrations.check_known(version)
            return
        self.migrate()

    def migrate(self):
        """Create the schema (fresh database) and apply the pending migrations, in one
        transaction under the schema lock (concurrent first starts migrate once).
        Returns (version before (None: fresh), version after, versions applied).
        Raises RegistryError(SCHEMA) for a newer or unreadable version,
        RegistryError(STORAGE)."""
        with self._write() as conn:
            self._lock_schema(conn)
            before = (migrations.current_version(conn)
                      if self._table_exists(conn, "registry_meta") else None)
            if before is None:
                for statement in schema.statements(self.dialect):
                    conn.execute(statement)
            applied = migrations.upgrade(conn, self.dialect, self._q)
        return before, schema.SCHEMA_VERSION, applied

    def _transaction_open(self, conn):
        """Is the write transaction on `conn` still open (group commit, after a failed op)?"""
        return True

    def _batched(self, fn):
        """fn(conn) in a write transaction, durable when this returns: through the group
        commit writer (shared with concurrent callers) or, without it, its own."""
        if self.group_commit is None:
            with self._write() as conn:
                return fn(conn)
        if self._closed:
            raise RegistryError(RegistryError.CLOSED)
        return self.group_commit.submit(fn)

    def close(self):
        if self.group_commit is not None:
            self.group_commit.close()
        with self._connections_lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except self._db_error:
                pass

    # -- helpers inside a transaction -------------------------------------------------------------

    def _device(self, conn, serial, lock=False):
        row = conn.execute(self._q("SELECT %s FROM devices WHERE serial = ?%s" % (
            DEVICE_COLUMNS, self._lock_clause if lock else "")), (serial,)).fetchone()
        if row is None:
            raise DeviceNotFound(serial)
        return device_from_row(row)

    def _head(self, conn):
        """(entry count, head hash) of the chain, its row locked for this transaction."""
        row = conn.execute(HEAD_QUERY + self._lock_clause).fetchone()
        return row["entry_count"], row["head_hash"]

    def _append(self, conn, fields):
        count, head = self._head(conn)
        if fields.get("type") == audit.CHECKPOINT:
            covers = fields.get("covers")
            if not isinstance(covers, int) or not 1 <= covers <= count:
                raise RegistryError(RegistryError.BAD_INPUT, "checkpoint covers %r" % (covers,))
            row = conn.execute(self._q("SELECT entry_hash FROM audit_log WHERE seq = ?"),
                               (covers - 1,)).fetchone()
            if row is None or row["entry_hash"] != fields.get("head"):
                raise RegistryError(RegistryError.MISMATCH, "checkpoint head")
        return self._seal_into(conn, [fields], count, head)[0]

    def _seal_into(self, conn, fields_list, count, head):
        """Seal `fields_list` into the chain after (count, head), in order: the entries
        inserted, the head row moved once.  Returns the AuditEntries."""
        entries = []
        for fields in fields_list:
            entry = audit.seal(fields, count + len(entries), head)
            head = entry.hash_hex
            entries.append(entry)
        if len(entries) == 1:
            conn.execute(self._q(AUDIT_INSERT), audit_row(entries[0]))
        else:
            conn.cursor().executemany(self._q(AUDIT_INSERT), [audit_row(e) for e in entries])
        conn.execute(self._q(HEAD_UPDATE), (count + len(entries), head))
        return entries

    def _certs(self, conn, cert_serial, issuer):
        cert_serial = cert_serial_text(cert_serial)
        query = "SELECT %s FROM certificates WHERE cert_serial = ?" % CERT_COLUMNS
        params = [cert_serial]
        if issuer is not None:
            query += " AND issuer = ?"
            params.append(issuer)
        rows = conn.execute(self._q(query), params).fetchall()
        return certificate_from_row(one_certificate(rows, cert_serial))

    def _insert_cert(self, conn, cert):
        with self._unique(conn, RegistryError(RegistryError.DUPLICATE_CERTIFICATE,
                                              cert["fingerprint"])):
            conn.execute(self._q("INSERT INTO certificates (%s) VALUES (%s)"
                                 % (", ".join(cert), ", ".join("?" * len(cert)))),
                         tuple(cert.values()))

    def _insert_intent(self, conn, serial, uid_hex, station, operator, batch, hsm_session, now):
        with self._unique(conn, DuplicateSerial(serial)):
            conn.execute(self._q(
                "INSERT INTO devices (serial, se_uid, status, station, operator, batch, "
                "hsm_session, intent_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                (serial, uid_hex, INTENT, station, operator, batch, hsm_session, now, now))

    # -- serials and intents ----------------------------------------------------------------------

    def allocate_serial(self):
        with self._write() as conn:
            serial = self._take_serial(conn)
        return serial

    def write_intent(self, serial, se_uid, station, operator="", batch="", hsm_session=""):
        check_serial(serial)
        uid_hex = check_se_uid(se_uid)
        _check_intent_text(station, operator, batch, hsm_session)
        now = self._now()
        with self._write() as conn:
            next_serial = conn.execute(
                "SELECT next_serial FROM serial_counter WHERE id = 1").fetchone()["next_serial"]
            if serial >= next_serial:
                raise RegistryError(RegistryError.NOT_ALLOCATED, str(serial))
            self._insert_intent(conn, serial, uid_hex, station, operator, batch, hsm_session,
                                now)
            return self._device(conn, serial)

    def allocate_intent(self, se_uid, station, operator="", batch="", hsm_session=""):
        uid_hex = check_se_uid(se_uid)
        _check_intent_text(station, operator, batch, hsm_session)
        now = self._now()

        def op(conn):
            serial = self._take_serial(conn)
            self._insert_intent(conn, serial, uid_hex, station, operator, batch, hsm_session,
                                now)
            return self._allocated_intent(conn, serial, uid_hex, station, operator, batch,
                                          hsm_session, now)

        return self._batched(op)

    def _allocated_intent(self, conn, serial, uid_hex, station, operator, batch, hsm_session,
                          now):
        # What the row now holds (every other column NULL), without reading it back.
        return DeviceRecord(serial=serial, se_uid=bytes.fromhex(uid_hex), status=INTENT,
                            station=station, operator=operator, batch=batch,
                            hsm_session=hsm_session, intent_at=now, updated_at=now)

    def list_in_flight(self):
        with self._read() as conn:
            rows = conn.execute(self._q("SELECT %s FROM devices WHERE status = ? ORDER BY serial"
                                        % DEVICE_COLUMNS), (INTENT,)).fetchall()
        return [device_from_row(r) for r in rows]

    @wrap_audit_error
    def commit_identity(self, record, audit_entry):
        check_serial(record.serial)
        now = self._now()
        cert = certificate_row(record.serial, record.identity_cert_der, IDENTITY, now)

        def op(conn):
            device = self._device(conn, record.serial, lock=True)
            check_commit(device, record, audit_entry, cert)
            with self._unique(conn, DuplicateSeUid(device.se_uid.hex())):
                conn.execute(self._q(
                    "UPDATE devices SET status = ?, committed_at = ?, updated_at = ?, slot = ?, "
                    "aid = ?, issuing_ca = ?, attestation_hash = ?, identity_fingerprint = ?, "
                    "station = ?, operator = ?, batch = ?, hsm_session = ? WHERE serial = ?"),
                    (COMMITTED, now, now, record.slot, bytes(record.aid).hex(), cert["issuer"],
                     record.attestation_hash, cert["fingerprint"], record.station,
                     record.operator, record.batch, record.hsm_session, record.serial))
            # Added before the SE got it (add_certificate)?
            row = conn.execute(self._q("SELECT %s FROM certificates WHERE fingerprint = ?"
                                       % CERT_COLUMNS), (cert["fingerprint"],)).fetchone()
            existing = None if row is None else certificate_from_row(row)
            if not identity_cert_present(existing, record, cert):
                self._insert_cert(conn, cert)
            return self._append(conn, audit_entry)

        return self._batched(op)

    @wrap_audit_error
    def hold(self, serial, reason, station="", operator=""):
        check_text("reason", reason, allow_empty=False)
        now = self._now()
        with self._write() as conn:
            device = self._device(conn, serial, lock=True)
            if device.status == REVOKED:
                raise InvalidState(serial, device.status, "hold")
            conn.execute(self._q("UPDATE devices SET status = ?, hold_reason = ?, "
                                 "updated_at = ? WHERE serial = ?"), (HELD, reason, now, serial))
            fields = build_hold(device, reason, station, operator, now)
            return self._append(conn, fields)

    @wrap_audit_error
    def reconcile(self, serial, outcome, reason, station="", operator="", cert_serial=None,
                  cert_fingerprint=None):
        check_text("outcome", outcome, allow_empty=False)
        now = self._now()
        with self._write() as conn:
            device = self._device(conn, serial, lock=True)
            if device.status != INTENT:
                raise InvalidState(serial, device.status, "reconcile")
            conn.execute(self._q("UPDATE devices SET status = ?, hold_reason = ?, "
                                 "updated_at = ? WHERE serial = ?"),
                         (HELD, "reconciled: " + outcome, now, serial))
            fields = audit.reconcile_entry(
                serial=serial, outcome=outcome, reason=reason, station=station,
                operator=operator, when=now, se_uid=device.se_uid, cert_serial=cert_serial,
                cert_fingerprint=cert_fingerprint)
            return self._append(conn, fields)

    # -- devices and certificates -----------------------------------------------------------------

    def get_device(self, serial):
        with self._read() as conn:
            return self._device(conn, serial)

    def find_by_se_uid(self, se_uid):
        uid_hex = check_se_uid(se_uid)
        with self._read() as conn:
            rows = conn.execute(self._q("SELECT %s FROM devices WHERE se_uid = ? "
                                        "ORDER BY serial DESC" % DEVICE_COLUMNS),
                                (uid_hex,)).fetchall()
        return [device_from_row(r) for r in rows]

    @wrap_audit_error
    def add_certificate(self, serial, cert_der, kind, rotation_state=None,
                        operation="recorded", operator=""):
        if rotation_state is not None:
            check_text("rotation state", rotation_state)
        now = self._now()
        cert = certificate_row(serial, cert_der, kind, now)
        fields = audit.issuance_entry(serial=serial, kind=kind, operation=operation, when=now,
                                      operator=operator, facts=row_facts(cert))

        def op(conn):
            if rotation_state is None:
                self._device(conn, serial)
            elif conn.execute(self._q(SET_ROTATION), (rotation_state, now, serial)).rowcount != 1:
                raise DeviceNotFound(serial)  # the UPDATE checked the device and locked its row
            self._insert_cert(conn, cert)
            self._append(conn, fields)

        self._batched(op)
        return certificate_from_row(cert)

    def certificates(self, serial):
        with self._read() as conn:
            self._device(conn, serial)
            rows = conn.execute(self._q("SELECT %s FROM certificates WHERE device_serial = ? "
                                        "ORDER BY added_at, fingerprint" % CERT_COLUMNS),
                                (serial,)).fetchall()
        return [certificate_from_row(r) for r in rows]

    def certificate_status(self, cert_serial, issuer=None):
        with self._read() as conn:
            return self._certs(conn, cert_serial, issuer)

    def revoked_certificates(self, issuer):
        with self._read() as conn:
            rows = conn.execute(self._q("SELECT %s FROM certificates WHERE issuer = ? AND "
                                        "revoked_at IS NOT NULL ORDER BY cert_serial"
                                        % CERT_COLUMNS), (issuer,)).fetchall()
        return [certificate_from_row(r) for r in rows]

    def certificate_serials(self, issuer, valid_at=None, page=5000):
        last = ""
        while True:
            with self._read() as conn:
                rows = conn.execute(self._q(
                    "SELECT cert_serial FROM certificates WHERE issuer = ? AND cert_serial > ? "
                    "AND not_after > ? ORDER BY cert_serial LIMIT %d" % int(page)),
                    (issuer, last, valid_at or "")).fetchall()
            for row in rows:
                yield int(row["cert_serial"], 16)
            if len(rows) < page:
                return
            last = rows[-1]["cert_serial"]

    def set_rotation_state(self, serial, state):
        check_text("rotation state", state)
        with self._write() as conn:
            self._device(conn, serial, lock=True)
            conn.execute(self._q(SET_ROTATION), (state, self._now(), serial))

    @wrap_audit_error
    def acknowledge_rotation(self, serial, cert_fingerprint):
        with self._write() as conn:
            device = self._device(conn, serial, lock=True)
            current = RotationState.parse(device.rotation_state)
            state = current.acknowledged(cert_fingerprint)
            if state is None:
                return current
            now = self._now()
            conn.execute(self._q(SET_ROTATION), (state.format(), now, serial))
            self._append(conn, audit.rotation_ack_entry(
                serial=serial, cert_fingerprint=state.new, previous_fingerprint=state.old,
                when=now))
            return state

    # -- the audit chain --------------------------------------------------------------------------

    @wrap_audit_error
    def append_audit(self, fields):
        if fields.get("type") not in audit.DEVICELESS_TYPES:
            raise RegistryError(RegistryError.BAD_INPUT,
                                "device entries are written by the operation they record")
        with self._write() as conn:
            return self._append(conn, fields)

    def head(self):
        with self._read() as conn:
            row = conn.execute(HEAD_QUERY).fetchone()
        return row["entry_count"], row["head_hash"]

    def iter_audit_lines(self, start=0, batch=1000):
        seq = start
        while True:
            with self._read() as conn:
                rows = conn.execute(self._q("SELECT seq, entry FROM audit_log WHERE seq >= ? "
                                            "ORDER BY seq LIMIT ?"), (seq, batch)).fetchall()
            for row in rows:
                yield row["entry"].encode("ascii") + b"\n"
            if len(rows) < batch:
                return
            seq = rows[-1]["seq"] + 1

    def audit_entries_for(self, serial):
        check_serial(serial)
        with self._read() as conn:
            rows = conn.execute(self._q("SELECT %s FROM audit_log WHERE device_serial = ? "
                                        "ORDER BY seq" % AUDIT_COLUMNS), (serial,)).fetchall()
        return [_checked_row(r) for r in rows]

    def last_checkpoint(self):
        with self._read() as conn:
            row = conn.execute(self._q("SELECT %s FROM audit_log WHERE entry_type = ? "
                                       "ORDER BY seq DESC LIMIT 1" % AUDIT_COLUMNS),
                               (audit.CHECKPOINT,)).fetchone()
        return None if row is None else _checked_row(row)


AUDIT_COLUMNS = "seq, entry_type, device_serial, entry_hash, entry"


def stored_row(row):
    """An audit_log row (selected with AUDIT_COLUMNS) as an audit.StoredRow."""
    return audit.StoredRow(row["entry"].encode("ascii") + b"\n", row["seq"],
                           row["entry_type"], row["device_serial"], row["entry_hash"])


def _checked_row(row):
    # A row found through an index column must be what that column says: parse its entry
    # (own hash) and check every column against it.
    stored = stored_row(row)
    entry = audit.parse_entry(stored.line, stored.seq)
    audit.check_columns(entry, stored, stored.seq)
    return entry


class SnapshotLines:
    """Iterator over one read transaction's audit rows (audit.StoredRow: the line and its
    indexed columns, selected with AUDIT_COLUMNS); owns its connection (closed when
    exhausted or on close(), after `end` - e.g. "ROLLBACK" - if given)."""

    def __init__(self, registry, conn, cursor, end=None):
        self._registry = registry
        self._conn = conn
        self._cursor = cursor
        self._end = end

    def __iter__(self):
        return self

    def __next__(self):
        if self._conn is None:
            raise StopIteration
        try:
            row = self._cursor.fetchone()
        except self._registry._db_error as exc:
            self.close()
            raise self._registry._storage_error(exc) from None
        if row is None:
            self.close()
            raise StopIteration
        return stored_row(row)

    def close(self):
        if self._conn is not None:
            # The cursor first: a statement left mid-walk keeps SQLite's handle (and WAL) open.
            try:
                self._cursor.close()
            except self._registry._db_error:
                pass
            if self._end is not None:
                try:
                    self._conn.execute(self._end)
                except self._registry._db_error:
                    pass
            self._conn.close()
            self._conn = None
