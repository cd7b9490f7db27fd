"""The state several stateless cloud processes share, in the registry's database (schema
version 2, schema.MIGRATIONS): attestation nonces, EST pending approvals and the
revocation event sequence.  With these in the registry (SQLite on one host, PostgreSQL
across hosts) any worker can answer any request: a nonce issued by one is consumed by
another, an approval given through one is honoured by all, a revocation announced by one
is seen by every other at its next poll.

Each table is a small object over a SqlRegistry's connections and transactions (its
`_write()` / `_read()`: one connection per thread, bounded lock waits, driver errors ->
RegistryError(STORAGE)).  They return plain values and know nothing of the CA or EST:
cloud/ca/nonces.RegistryNonceStore and cloud/est/service.py put their policy on top.

    tables = shared_tables(registry)        # None for a registry without SQL (memory:)
    nonces = tables.nonces("ca-default")    # one CA's nonces (its key label)
    nonces.add(b"...", issued_at, expires_at)
    nonces.consume(b"...", now, bound_key)  # -> None or a refusal reason
    tables.approvals.request("b42", "0000002a")     # -> True when approved
    tables.revocation_events.bump(); tables.revocation_events.current()

Times are stored as fixed-width RFC 3339 UTC text (microseconds), so text order is
time order in both databases and "expired" is one comparison inside the UPDATE.
"""

import datetime

from fleetid.cloud.registry.errors import RegistryError
from fleetid.common.errors import FleetidError

# The refusal reasons of NonceTable.consume (the same strings as cloud/ca/errors.py).
NONCE_UNKNOWN = "nonce_unknown"
NONCE_REPLAYED = "nonce_replayed"
NONCE_EXPIRED = "nonce_expired"

PENDING = "pending"
APPROVED = "approved"


def time_text(when):
    """An aware datetime as fixed-width UTC text ("2026-12-07T15:01:19.000000Z").
    Raises RegistryError(BAD_INPUT) for a naive datetime."""
    if not isinstance(when, datetime.datetime) or when.tzinfo is None:
        raise RegistryError(RegistryError.BAD_INPUT, "times must be aware datetimes")
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _now_text():
    return time_text(datetime.datetime.now(datetime.timezone.utc))


class NonceTable:
    """Attestation nonces, one row each (table ca_nonces), of the issuing CA named `ca`
    (its key label): another CA's nonce is unknown here, as with a store per CA."""

    def __init__(self, registry, ca):
        self._registry = registry
        self._q = registry._q
        self.ca = ca

    def add(self, nonce, issued_at, expires_at):
        """Record a fresh nonce (bytes).  Raises ValueError if it exists,
        RegistryError(STORAGE)."""
        registry = self._registry
        row = (bytes(nonce).hex(), self.ca, time_text(issued_at), time_text(expires_at))

        def op(conn):
            with registry._unique(conn, ValueError("nonce already issued")):
                conn.execute(self._q("INSERT INTO ca_nonces (nonce, ca, issued_at, "
                                     "expires_at) VALUES (?, ?, ?, ?)"), row)

        # Through the group commit writer, as consume: the nonce GETs of a rotation storm
        # share durable commits instead of one fsync each (durable when this returns).
        registry._batched(op)

    def consume(self, nonce, now, bound_key):
        """Mark `nonce` used at `now`, bound to `bound_key` (bytes), in ONE conditional
        UPDATE (unused and unexpired): two processes can never both consume one nonce.
        Returns None when consumed, else NONCE_UNKNOWN / NONCE_REPLAYED / NONCE_EXPIRED
        (nothing written).  Raises RegistryError(STORAGE)."""
        key, now_text = bytes(nonce).hex(), time_text(now)

        def op(conn):
            cursor = conn.execute(self._q(
                "UPDATE ca_nonces SET consumed_at = ?, bound_key = ? WHERE nonce = ? AND ca = ? "
                "AND consumed_at IS NULL AND expires_at > ?"),
                (now_text, bytes(bound_key).hex(), key, self.ca, now_text))
            if cursor.rowcount == 1:
                return None
            row = conn.execute(self._q("SELECT consumed_at FROM ca_nonces WHERE nonce = ? "
                                       "AND ca = ?"), (key, self.ca)).fetchone()
            if row is None:
                return NONCE_UNKNOWN
            return NONCE_REPLAYED if row["consumed_at"] is not None else NONCE_EXPIRED

        # Through the group commit writer when the registry has one: concurrent requests'
        # consumptions share one durable commit (as their certificate records do), each in
        # its own savepoint; the answer is returned only once that commit is done, and the
        # database's write lock still serialises the conditional UPDATE between processes.
        return self._registry._batched(op)

    def purge(self, now):
        """Delete nonces that expired unused before `now`; returns how many.  Consumed
        ones stay (the replay check and the audit trail)."""
        with self._registry._write() as conn:
            cursor = conn.execute(self._q("DELETE FROM ca_nonces WHERE ca = ? AND "
                                          "consumed_at IS NULL AND expires_at <= ?"),
                                  (self.ca, time_text(now)))
            return cursor.rowcount

    def binding(self, nonce):
        """(consumed_at text, bound_key bytes) of a consumed nonce, or None."""
        with self._registry._read() as conn:
            row = conn.execute(self._q("SELECT consumed_at, bound_key FROM ca_nonces "
                                       "WHERE nonce = ? AND ca = ?"),
                               (bytes(nonce).hex(), self.ca)).fetchone()
        if row is None or row["consumed_at"] is None:
            return None
        return row["consumed_at"], bytes.fromhex(row["bound_key"])


class ApprovalTable:
    """EST deferred enrolments (RFC 7030 4.2.3), one row per (label, device serial):
    "pending" (asked, not approved) or "approved" (until the enrolment uses it)."""

    def __init__(self, registry):
        self._registry = registry
        self._q = registry._q

    def approve(self, label, device_serial):
        """Approve (label, device_serial), pending or not yet asked."""
        with self._registry._write() as conn:
            self._set(conn, label, device_serial, APPROVED)

    def _set(self, conn, label, device_serial, state):
        cursor = conn.execute(self._q("UPDATE est_approvals SET state = ?, updated_at = ? "
                                      "WHERE label = ? AND device_serial = ?"),
                              (state, _now_text(), label, str(device_serial)))
        if cursor.rowcount == 0:
            conn.execute(self._q("INSERT INTO est_approvals (label, device_serial, state, "
                                 "updated_at) VALUES (?, ?, ?, ?)"),
                         (label, str(device_serial), state, _now_text()))

    def request(self, label, device_serial):
        """True when (label, device_serial) is approved; otherwise records it as pending
        (once) and returns False."""
        try:
            with self._registry._write() as conn:
                row = conn.execute(self._q(
                    "SELECT state FROM est_approvals WHERE label = ? AND device_serial = ?%s"
                    % self._registry._lock_clause), (label, str(device_serial))).fetchone()
                if row is not None and row["state"] == APPROVED:
                    return True
                if row is None:
                    with self._registry._unique(conn, _Raced()):
                        conn.execute(self._q(
                            "INSERT INTO est_approvals (label, device_serial, state, "
                            "updated_at) VALUES (?, ?, ?, ?)"),
                            (label, str(device_serial), PENDING, _now_text()))
        except _Raced:  # another worker recorded the same pending request first
            pass
        return False

    def consume(self, label, device_serial):
        """Forget (label, device_serial) after its enrolment: the next one asks again."""
        with self._registry._write() as conn:
            conn.execute(self._q("DELETE FROM est_approvals WHERE label = ? AND "
                                 "device_serial = ?"), (label, str(device_serial)))

    def pending(self):
        """[(label, device serial)] awaiting approval, sorted."""
        with self._registry._read() as conn:
            rows = conn.execute(self._q("SELECT label, device_serial FROM est_approvals "
                                        "WHERE state = ? ORDER BY label, device_serial"),
                                (PENDING,)).fetchall()
        return [(r["label"], r["device_serial"]) for r in rows]


class _Raced(FleetidError):
    """Internal: a concurrent insert of the same pending row (harmless)."""


class RevocationEvents:
    """The revocation event sequence (one row): RevocationService bumps it after every
    revocation; every process's publishers compare it with the last value they saw."""

    def __init__(self, registry):
        self._registry = registry
        self._q = registry._q

    def bump(self):
        """Increase the sequence (one UPDATE, row-locked); returns the new value."""
        with self._registry._write() as conn:
            conn.execute(self._q("UPDATE revocation_events SET seq = seq + 1, updated_at = ? "
                                 "WHERE id = 1"), (_now_text(),))
            return conn.execute("SELECT seq FROM revocation_events WHERE id = 1"
                                ).fetchone()["seq"]

    def current(self):
        """The sequence now (int)."""
        with self._registry._read() as conn:
            return conn.execute("SELECT seq FROM revocation_events WHERE id = 1"
                                ).fetchone()["seq"]


class SharedTables:
    """The tables of one SqlRegistry: nonces(ca) -> NonceTable, approvals,
    revocation_events."""

    def __init__(self, registry):
        self._registry = registry
        self.approvals = ApprovalTable(registry)
        self.revocation_events = RevocationEvents(registry)

    def nonces(self, ca):
        """The NonceTable of the issuing CA whose key label is `ca`."""
        return NonceTable(self._registry, ca)


def shared_tables(registry):
    """SharedTables over `registry` when it is a SQL registry (SQLite / PostgreSQL),
    else None (memory: keeps this state in the process)."""
    from fleetid.cloud.registry.sql_common import SqlRegistry

    return SharedTables(registry) if isinstance(registry, SqlRegistry) else None
