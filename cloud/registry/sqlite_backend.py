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
  audit head is read, so concurrent appends form one chain;
- between the in-process lock and BEGIN IMMEDIATE, a cross-process writer lock (flock
  on `<db>-writelock`, sqlite_writelock.py, held until COMMIT / ROLLBACK): processes
  writing one database (`--workers N`) take turns within a millisecond instead of
  sleeping in SQLite's growing busy-handler delays.  SQLite's locks still decide
  correctness; writers without the flock still work;
- group commit (group_commit.py): the commit path's writes of concurrent threads run in
  one BEGIN IMMEDIATE ... COMMIT on the writer thread, each in a SAVEPOINT: one WAL
  fsync per batch instead of one per write.
"""

import contextlib
import os
import sqlite3
import threading
import time

from fleetid.cloud.registry.errors import DeviceNotFound, RegistryError
from fleetid.cloud.registry.interface import certificate_from_row, device_from_row
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
from fleetid.cloud.registry.sqlite_writelock import WriterLock

_MEMO_SIZE = 100000  # memoised certificate_and_device answers per thread


def _storage_error(exc):
    # The sqlite3 message names the failing operation (no data values): safe to keep.
    return RegistryError(RegistryError.STORAGE, "%s: %s" % (type(exc).__name__, exc))


class SqliteRegistry(SqlRegistry):
    """Registry in one SQLite file.  `SqliteRegistry(path, wall_clock=time.time,
    busy_timeout_s=10.0, group_commit=True)`; creates the schema on first open.
    group_commit: True, False or GroupCommitWriter options (dict): the commit path's
    writes share transactions, one WAL fsync per batch (sql_common, group_commit.py).

    Raises RegistryError(SCHEMA) for a database of another schema version,
    RegistryError(CONFIG) for ":memory:" (each thread would get its own database: use
    MemoryRegistry).
    """

    dialect = "sqlite"
    _db_error = sqlite3.Error
    _storage_error = staticmethod(_storage_error)

    def __init__(self, path, wall_clock=time.time, busy_timeout_s=10.0, group_commit=True,
                 apply_schema=True):
        path = os.fspath(path)
        if path == ":memory:" or not path:
            raise RegistryError(RegistryError.CONFIG, "use MemoryRegistry for in-memory")
        super().__init__(wall_clock, group_commit)
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._write_lock = threading.Lock()
        self._flock = WriterLock(path)
        if apply_schema:  # False: `fleetid registry migrate` reads the version first
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
            locked = self._flock.acquire(self.busy_timeout_s)
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
            finally:
                if locked:
                    self._flock.release()

    def close(self):
        super().close()
        # Under the in-process write lock: a write still running must not unlock a
        # closed (and maybe reused) descriptor.  Bounded: past the bound the lock file
        # stays open until the process ends.
        if self._write_lock.acquire(timeout=2 * self.busy_timeout_s + 1.0):
            try:
                self._flock.close()
            finally:
                self._write_lock.release()

    def _transaction_open(self, conn):
        return conn.in_transaction

    @contextlib.contextmanager
    def _savepoint(self, conn):
        # One group-commit op inside the batch transaction (SQLite "SAVEPOINT"): an op
        # that raises leaves nothing behind, the batch goes on.
        conn.execute("SAVEPOINT group_op")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK TO group_op")
            conn.execute("RELEASE group_op")
            raise
        conn.execute("RELEASE group_op")

    @contextlib.contextmanager
    def _unique(self, conn, error):
        try:
            yield
        except sqlite3.IntegrityError:
            raise error from None

    def _table_exists(self, conn, name):
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                            (name,)).fetchone() is not None

    def _take_serial(self, conn):
        serial = conn.execute(
            "SELECT next_serial FROM serial_counter WHERE id = 1").fetchone()[0]
        conn.execute("UPDATE serial_counter SET next_serial = ? WHERE id = 1", (serial + 1,))
        return serial

    # -- reads with a backend-specific path -------------------------------------------------------

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
        # immutable.  The memo is keyed by the serial as given (an int from the
        # verifier): a hit needs no conversion to the stored text.
        conn = self._conn()
        local = self._local
        cursor = getattr(local, "version_cursor", None)
        if cursor is None or cursor.connection is not conn:  # one per connection, reused
            cursor = local.version_cursor = conn.cursor()
        try:
            token = (cursor.execute("PRAGMA data_version").fetchone()[0],
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
        cert_serial = cert_serial_text(cert_serial)
        try:
            cursor = conn.cursor()
            cursor.row_factory = None
            if issuer is None:
                rows = cursor.execute(JOINED_QUERY, (cert_serial,)).fetchall()
            else:
                rows = cursor.execute(JOINED_QUERY_ISSUER, (cert_serial, issuer)).fetchall()
        except sqlite3.Error as exc:
            raise _storage_error(exc) from None
        row = one_certificate(rows, cert_serial)
        split = len(CERT_NAMES)
        if row[split] is None:  # LEFT JOIN: no device row (the foreign key prevents it)
            raise DeviceNotFound(row[1])
        found = memo[1][key] = (certificate_from_row(zip(CERT_NAMES, row[:split])),
                                device_from_row(zip(DEVICE_NAMES, row[split:])))
        return found

    def audit_snapshot(self):
        """(count, head, lines): the head row and every stored line read in ONE read
        transaction (a WAL snapshot on a dedicated connection), so a verification running
        beside live stations compares like with like.  `lines` iterates the stored lines;
        it closes its connection when exhausted or on close()."""
        try:
            conn = self._new_connection()
            conn.execute("BEGIN")
            count, head = conn.execute(HEAD_QUERY).fetchone()
            cursor = conn.execute("SELECT %s FROM audit_log ORDER BY seq" % AUDIT_COLUMNS)
        except sqlite3.Error as exc:
            raise _storage_error(exc) from None
        return count, head, SnapshotLines(self, conn, cursor)
