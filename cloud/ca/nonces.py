"""Attestation nonces: issued by the CA, single use, expiring, bound to a key when used.

The storage interface (`NonceStore`) is what the issuing CA declares; this module has the
in-memory implementation (one process: the factory line in-process, tests) and
`RegistryNonceStore`, the store of several stateless CA processes: one row per nonce in
the registry's database (cloud/registry/shared_state.NonceTable, table ca_nonces), with
`consume` a single conditional UPDATE
(`... SET consumed_at=?, bound_key=? WHERE nonce=? AND consumed_at IS NULL AND
expires_at > ?`), so two processes can never both consume one nonce.

Times are aware UTC datetimes from the CA's injected clock (wall time, because nonces
must expire consistently across processes sharing a registry).
"""

import threading

from fleetid.cloud.ca import errors


class NonceStore:
    """Interface of a nonce store.  Every method must be safe to call from many threads."""

    def add(self, nonce, issued_at, expires_at):
        """Record a freshly issued nonce (bytes).  Raises ValueError if it exists."""
        raise NotImplementedError

    def consume(self, nonce, now, bound_key):
        """Atomically mark `nonce` used at `now`, binding it to `bound_key` (bytes, the
        SHA-256 of the SubjectPublicKeyInfo it attested).  Consumption is final: a later
        call with the same nonce is NONCE_REPLAYED, whatever the key.

        Raises: NonceRefused(NONCE_UNKNOWN / NONCE_REPLAYED / NONCE_EXPIRED).  An expired
        nonce is not consumed (it is dead anyway).
        """
        raise NotImplementedError

    def purge(self, now):
        """Forget nonces that expired before `now` and were never used; return how many.
        (Consumed ones are kept for the replay check and the audit trail.)"""
        raise NotImplementedError


class InMemoryNonceStore(NonceStore):
    """A NonceStore in a dict, guarded by one lock.  `max_outstanding` bounds memory: when
    that many unused nonces are live, expired ones are purged, and if none can be the
    oldest outstanding one is dropped (its holder gets NONCE_UNKNOWN)."""

    def __init__(self, max_outstanding=100000):
        self._lock = threading.Lock()
        self._entries = {}  # nonce -> [issued_at, expires_at, consumed_at, bound_key]
        self._max_outstanding = max_outstanding
        self._outstanding = 0  # entries not consumed yet

    def add(self, nonce, issued_at, expires_at):
        nonce = bytes(nonce)
        with self._lock:
            if nonce in self._entries:
                raise ValueError("nonce already issued")
            if self._outstanding >= self._max_outstanding:
                self._purge_locked(issued_at)
            if self._outstanding >= self._max_outstanding:
                outstanding = [n for n, e in self._entries.items() if e[2] is None]
                oldest = min(outstanding, key=lambda n: self._entries[n][0])
                del self._entries[oldest]
                self._outstanding -= 1
            self._entries[nonce] = [issued_at, expires_at, None, None]
            self._outstanding += 1

    def consume(self, nonce, now, bound_key):
        nonce = bytes(nonce)
        with self._lock:
            entry = self._entries.get(nonce)
            if entry is None:
                raise errors.NonceRefused(errors.NONCE_UNKNOWN)
            if entry[2] is not None:
                raise errors.NonceRefused(errors.NONCE_REPLAYED)
            if now >= entry[1]:
                raise errors.NonceRefused(errors.NONCE_EXPIRED)
            entry[2] = now
            entry[3] = bytes(bound_key)
            self._outstanding -= 1

    def purge(self, now):
        with self._lock:
            return self._purge_locked(now)

    def _purge_locked(self, now):
        dead = [n for n, e in self._entries.items() if e[2] is None and now >= e[1]]
        for nonce in dead:
            del self._entries[nonce]
        self._outstanding -= len(dead)
        return len(dead)

    def binding(self, nonce):
        """(consumed_at, bound_key) of a nonce, or None if unknown / unused (for tests
        and audit)."""
        with self._lock:
            entry = self._entries.get(bytes(nonce))
            if entry is None or entry[2] is None:
                return None
            return entry[2], entry[3]

    def __len__(self):
        with self._lock:
            return len(self._entries)


class RegistryNonceStore(NonceStore):
    """A NonceStore over a table of the registry's database shared by every CA process
    (SQLite on one host, PostgreSQL across hosts): a nonce issued by one process is
    consumed by any other, exactly once.

    `table`: cloud/registry/shared_state.NonceTable (or anything with its add /
    consume -> None-or-reason / purge / binding calls; the CA does not import the
    registry).  Storage failures propagate as the table raises them
    (RegistryError(STORAGE)): the caller answers "unavailable", nothing is accepted.
    """

    PURGE_EVERY = 1000  # adds between two purges of expired unused nonces (per process)

    def __init__(self, table):
        self.table = table
        self._lock = threading.Lock()
        self._adds = 0

    def add(self, nonce, issued_at, expires_at):
        self.table.add(bytes(nonce), issued_at, expires_at)
        with self._lock:
            self._adds += 1
            due = self._adds % self.PURGE_EVERY == 0
        if due:  # keeps the table to the live nonces and the consumed ones
            self.table.purge(issued_at)

    def consume(self, nonce, now, bound_key):
        reason = self.table.consume(bytes(nonce), now, bytes(bound_key))
        if reason is not None:
            raise errors.NonceRefused(reason)

    def purge(self, now):
        return self.table.purge(now)

    def binding(self, nonce):
        """(consumed_at, bound_key) of a consumed nonce, or None (tests and audit)."""
        return self.table.binding(bytes(nonce))
