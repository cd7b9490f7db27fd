"""The PostgreSQL registry backend (psycopg 3), for fleets whose verifier / CA processes
share one registry across machines.  Same contract as SqliteRegistry; same schema text
(schema.schema_for("postgresql")), same `?` queries rewritten to %s.

How the guarantees of the interface are kept on PostgreSQL:
- one transaction per operation (`with conn.transaction()`), READ COMMITTED; the commit
  path's ops of concurrent callers share one (group commit, each op in its own savepoint);
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
- lock_timeout / statement_timeout bound every wait (RegistryError(STORAGE) after them),
  and a client-side deadline (pg_deadline.py) bounds it when the server does not answer
  at all (paused);
- one connection per thread.

URI: anything libpq accepts ("postgresql://user@host:5432/db", "host=/run/pg dbname=x").
Passwords come from the environment (PGPASSWORD) or ~/.pgpass, never the config file.
"""

import contextlib
import select
import time

from fleetid.cloud.registry.errors import DeviceNotFound, RegistryError
from fleetid.cloud.registry.interface import certificate_from_row, device_from_row
from fleetid.cloud.registry.pg_deadline import Deadlines
from fleetid.cloud.registry.schema import placeholders
from fleetid.cloud.registry.sql_common import AUDIT_COLUMNS, SnapshotLines, SqlRegistry
from fleetid.cloud.registry.sql_rows import (
    CERT_NAMES,
    DEVICE_NAMES,
    HEAD_QUERY,
    JOINED_QUERY,
    JOINED_QUERY_ISSUER,
    cert_serial_text,
    one_certificate,
)

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.rows import dict_row
except ImportError:  # pragma: no cover - optional dependency (fleetid[postgres])
    psycopg = None

_JOINED_QUERY = placeholders(JOINED_QUERY, "postgresql")
_JOINED_QUERY_ISSUER = placeholders(JOINED_QUERY_ISSUER, "postgresql")
_SCHEMA_LOCK = 0x666C6565  # pg_advisory_xact_lock key for schema creation ("flee")


# deadlock_detected, serialization_failure: the server rolled the transaction back.
_CONFLICTS = ("40P01", "40001")


def _storage_error(exc):
    # Only the class name and SQLSTATE: server messages can quote row values.
    sqlstate = getattr(exc, "sqlstate", None)
    error = RegistryError(RegistryError.STORAGE, "%s (%s)" % (
        type(exc).__name__, sqlstate or "-"))
    error.retryable = sqlstate in _CONFLICTS
    return error


class PostgresRegistry(SqlRegistry):
    """Registry on PostgreSQL.  `PostgresRegistry(conninfo, wall_clock=time.time,
    lock_timeout_s=10.0, connect_timeout_s=10)`; creates the schema on first open.

    Raises RegistryError(CONFIG) if psycopg is not installed, RegistryError(STORAGE) if
    the server cannot be reached, RegistryError(SCHEMA) for another schema version.
    """

    dialect = "postgresql"
    _db_error = psycopg.Error if psycopg is not None else Exception
    _storage_error = staticmethod(_storage_error)
    _lock_clause = " FOR UPDATE"

    def __init__(self, conninfo, wall_clock=time.time, lock_timeout_s=10.0,
                 connect_timeout_s=10, query_deadline_s=None, group_commit=True,
                 apply_schema=True):
        if psycopg is None:
            raise RegistryError(RegistryError.CONFIG, "psycopg is not installed "
                                "(pip install 'fleetid[postgres]')")
        super().__init__(wall_clock, group_commit)
        self.conninfo = conninfo
        self.lock_timeout_s = lock_timeout_s
        self.connect_timeout_s = connect_timeout_s
        # statement_timeout (3 x lock_timeout) and a second more: the server's own
        # timeouts answer first whenever it runs.
        self.deadlines = Deadlines(query_deadline_s or lock_timeout_s * 3 + 1.0)
        if apply_schema:  # False: `fleetid registry migrate` reads the version first
            self._apply_schema()

    # -- connections and transactions -------------------------------------------------------------

    def _new_connection(self):
        ms = int(self.lock_timeout_s * 1000)
        return psycopg.connect(
            self.conninfo, autocommit=True, row_factory=dict_row,
            connect_timeout=self.connect_timeout_s,
            options="-c lock_timeout=%d -c statement_timeout=%d" % (ms, ms * 3))

    def _usable(self, conn):
        """Whether the thread's connection can take the next operation.  An idle
        autocommit connection has nothing to read unless the server ended it (a restart
        or pg_terminate_backend sends FATAL 57P01, then closes it), so pending input,
        found by a zero-timeout poll without a round trip (poll, not select: a server
        process's descriptors pass 1024), retires the connection and the operation opens
        a new one instead of failing as "unavailable" on the dead one.  The registry
        never LISTENs; the rare asynchronous notice or parameter report costs one
        reconnection."""
        if conn is None or conn.closed:
            return False
        try:
            idle = select.poll()
            idle.register(conn.pgconn.socket, select.POLLIN)
            if not idle.poll(0):
                return True
        except (psycopg.Error, OSError):
            pass
        conn.close()
        return False

    @contextlib.contextmanager
    def _write(self):
        conn = self._conn()
        try:
            with self.deadlines.watch(conn), conn.transaction():
                yield conn
        except psycopg.Error as exc:
            raise _storage_error(exc) from None

    @contextlib.contextmanager
    def _read(self):
        conn = self._conn()
        try:
            with self.deadlines.watch(conn):
                yield conn
        except psycopg.Error as exc:
            raise _storage_error(exc) from None

    def _transaction_open(self, conn):
        return conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS

    @contextlib.contextmanager
    def _savepoint(self, conn):
        # One group-commit op inside the batch transaction: a nested transaction() is a
        # SAVEPOINT, rolled back to if the op raises.
        with conn.transaction():
            yield

    @contextlib.contextmanager
    def _unique(self, conn, error):
        try:
            with conn.transaction():  # a savepoint: the violation must not poison the outer
                yield
        except pg_errors.UniqueViolation:
            raise error from None

    def _lock_schema(self, conn):
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))

    def _table_exists(self, conn, name):
        # A catalog read: no error (which would end the transaction), no lock taken.
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL AS present",
                            (name,)).fetchone()["present"]

    def _take_serial(self, conn):
        return conn.execute("UPDATE serial_counter SET next_serial = next_serial + 1 "
                            "WHERE id = 1 RETURNING next_serial - 1 AS serial"
                            ).fetchone()["serial"]

    def _allocated_intent(self, conn, serial, *_unused):
        return self._device(conn, serial)

    # -- reads with a backend-specific path -------------------------------------------------------

    def certificate_and_device(self, cert_serial, issuer=None):
        # One statement (one snapshot, one round trip): the certificate joined with its
        # device.  The column names of the two tables do not overlap.
        cert_serial = cert_serial_text(cert_serial)
        params = [cert_serial]
        query = _JOINED_QUERY
        if issuer is not None:
            query = _JOINED_QUERY_ISSUER
            params.append(issuer)
        with self._read() as conn:
            rows = conn.execute(query, params).fetchall()
        row = one_certificate(rows, cert_serial)
        if row["serial"] is None:  # LEFT JOIN: no device row (foreign key prevents it)
            raise DeviceNotFound(row["device_serial"])
        return (certificate_from_row({k: row[k] for k in CERT_NAMES}),
                device_from_row({k: row[k] for k in DEVICE_NAMES}))

    def audit_snapshot(self):
        """(count, head, lines) read in ONE REPEATABLE READ transaction on a dedicated
        connection (see SqliteRegistry.audit_snapshot).  `lines` closes it when done."""
        try:
            conn = self._new_connection()
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            row = conn.execute(HEAD_QUERY).fetchone()
            rows = conn.execute("SELECT %s FROM audit_log ORDER BY seq" % AUDIT_COLUMNS)
        except psycopg.Error as exc:
            raise _storage_error(exc) from None
        return row["entry_count"], row["head_hash"], SnapshotLines(self, conn, rows, end="ROLLBACK")
