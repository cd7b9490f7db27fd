"""A bounded pool of HSM sessions, shared by both backends.

Real HSMs cap concurrent sessions (the line's sizing figure is 200-1000), and every line
station competes for them.  The pool:

- opens sessions lazily, never more than `max_sessions`;
- `acquire(timeout)` waits for a free one and raises HsmBusy when the wait expires;
- a session an operation reports as lost (SessionLost) is closed and discarded, never put
  back; the next acquire opens a replacement;
- counts what happened (`stats()`), so a line report can show session starvation.

`PooledBackend` layers the operation runner on top: an operation takes a session (or the
one the calling thread pinned with `session()`), and when the session turns out to be lost
it is discarded and the operation retried once on a fresh session (after `_session_lost()`
has restored what the loss took with it: the PKCS#11 backend's login).  Operations are
idempotent or create only ephemeral objects, so one retry is safe.
"""

import contextlib
import threading
import time

from fleetid.cloud.hsm.errors import HsmBusy, HsmError, SessionLost
from fleetid.cloud.hsm.interface import HsmBackend, KeySetHandle

DEFAULT_MAX_SESSIONS = 8
DEFAULT_ACQUIRE_TIMEOUT = 5.0


class PooledSession:
    """One pooled session.  `raw` is the backend's native session object (a
    pkcs11.Session for PKCS#11); `serial` numbers sessions in opening order."""

    __slots__ = ("raw", "serial")

    def __init__(self, raw, serial):
        self.raw = raw
        self.serial = serial

    def __repr__(self):
        return "PooledSession(#%d)" % self.serial


class SessionPool:
    """Bounded session pool.

    Params:
      open_session()      -> native session; may raise HsmError (login refused, token gone)
      close_session(raw)  closes a native session; its errors are ignored (it may be dead)
      max_sessions        the bound (>= 1)
      acquire_timeout     default seconds acquire() waits
      clock               monotonic seconds (injected for tests)
    """

    def __init__(self, open_session, close_session, max_sessions=DEFAULT_MAX_SESSIONS,
                 acquire_timeout=DEFAULT_ACQUIRE_TIMEOUT, clock=time.monotonic):
        if not isinstance(max_sessions, int) or max_sessions < 1:
            raise HsmError(HsmError.CONFIG, "max_sessions must be >= 1")
        if acquire_timeout < 0:
            raise HsmError(HsmError.CONFIG, "acquire_timeout must be >= 0")
        self.max_sessions = max_sessions
        self.acquire_timeout = float(acquire_timeout)
        self._open = open_session
        self._close = close_session
        self._clock = clock
        self._cond = threading.Condition()
        self._idle = []  # LIFO: the most recently used session is the warmest
        self._open_count = 0  # open + being opened
        self._in_use = 0
        self._created = 0
        self._discarded = 0
        self._busy_timeouts = 0
        self._closed = False

    def acquire(self, timeout=None):
        """Take a session, opening one if the bound allows.  Returns a PooledSession.

        Raises: HsmBusy after `timeout` (default acquire_timeout) seconds without a free
        session; HsmError(CLOSED) after close(); whatever open_session raises.
        """
        timeout = self.acquire_timeout if timeout is None else float(timeout)
        start = self._clock()
        deadline = start + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise HsmError(HsmError.CLOSED, "session pool closed")
                if self._idle:
                    pooled = self._idle.pop()
                    self._in_use += 1
                    return pooled
                if self._open_count < self.max_sessions:
                    self._open_count += 1  # reserve the slot, open outside the lock
                    serial = self._created + 1
                    self._created += 1
                    break
                remaining = deadline - self._clock()
                if remaining <= 0:
                    self._busy_timeouts += 1
                    raise HsmBusy(self.max_sessions, self._clock() - start)
                self._cond.wait(remaining)
        try:
            raw = self._open()
        except BaseException:
            with self._cond:
                self._open_count -= 1
                self._created -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._in_use += 1
        return PooledSession(raw, serial)

    def release(self, pooled, lost=False):
        """Give a session back; `lost=True` closes and discards it instead."""
        with self._cond:
            self._in_use -= 1
            keep = not lost and not self._closed
            if keep:
                self._idle.append(pooled)
            else:
                self._open_count -= 1
                if lost:
                    self._discarded += 1
            self._cond.notify()
        if not keep:
            self._close_quietly(pooled)

    @contextlib.contextmanager
    def session(self, timeout=None):
        """Context manager around acquire/release; a SessionLost inside discards it."""
        pooled = self.acquire(timeout)
        lost = False
        try:
            yield pooled
        except SessionLost:
            lost = True
            raise
        finally:
            self.release(pooled, lost)

    def stats(self):
        """Counters: max_sessions, open, in_use, idle, created, discarded, busy_timeouts."""
        with self._cond:
            return {
                "max_sessions": self.max_sessions,
                "open": self._open_count,
                "in_use": self._in_use,
                "idle": len(self._idle),
                "created": self._created,
                "discarded": self._discarded,
                "busy_timeouts": self._busy_timeouts,
            }

    def discard_idle(self):
        """Close and discard every idle session (they all died with the login state, e.g.
        C_CloseAllSessions or a token reset); in-use ones are discarded as their
        operations report them lost.  Returns: how many were discarded."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._open_count -= len(idle)
            self._discarded += len(idle)
            self._cond.notify_all()
        for pooled in idle:
            self._close_quietly(pooled)
        return len(idle)

    def close(self):
        """Close idle sessions now and in-use ones as they come back.  Idempotent."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open_count -= len(idle)
            self._cond.notify_all()
        for pooled in idle:
            self._close_quietly(pooled)

    def _close_quietly(self, pooled):
        try:
            self._close(pooled.raw)
        except Exception:  # a lost session may refuse to close; it is gone either way
            pass


class PooledBackend(HsmBackend):
    """Shared machinery of both backends: the pool, per-thread pinning, retry-once."""

    def _init_pool(self, open_session, close_session, max_sessions, acquire_timeout):
        self._pool = SessionPool(open_session, close_session, max_sessions, acquire_timeout)
        self._pinned = threading.local()
        self._device_sets = 0
        self._device_sets_lock = threading.Lock()

    @contextlib.contextmanager
    def session(self, timeout=None):
        current = getattr(self._pinned, "pooled", None)
        if current is not None:  # nested: the thread already holds one
            yield current
            return
        self._pinned.pooled = self._pool.acquire(timeout)
        try:
            yield self._pinned.pooled
        finally:
            # _run may have swapped (or dropped) the pinned session after a loss.
            pooled, self._pinned.pooled = self._pinned.pooled, None
            if pooled is not None:
                self._pool.release(pooled)

    def _run(self, operation):
        """Run operation(raw_session) on the pinned or a pooled session.

        A SessionLost discards that session and the operation runs once more on a fresh
        one; a second loss raises HsmError(SESSION_LOST).
        """
        for attempt in (1, 2):
            pinned = getattr(self._pinned, "pooled", None)
            pooled = pinned if pinned is not None else self._pool.acquire()
            lost = False
            try:
                return self._invoke(operation, pooled.raw)
            except SessionLost as exc:
                lost = True
                if attempt == 2:
                    raise HsmError(HsmError.SESSION_LOST, exc.detail) from None
                self._session_lost()
            finally:
                if pinned is None:
                    self._pool.release(pooled, lost)
                elif lost:
                    # Replace the pinned session in place; the session() block releases
                    # the replacement.
                    self._pinned.pooled = None
                    self._pool.release(pinned, lost=True)
                    if attempt == 1:
                        self._pinned.pooled = self._pool.acquire()
        raise HsmError(HsmError.SESSION_LOST)  # not reached

    def _invoke(self, operation, raw):
        """Hook: how one operation runs on a native session (PKCS#11 serialises here)."""
        return operation(raw)

    def _session_lost(self):
        """Hook: a session was found lost, before the one retry (PKCS#11: restores the
        login state if it went too).  Raises: HsmError when it cannot be restored."""

    def pool_stats(self):
        stats = self._pool.stats()
        with self._device_sets_lock:
            stats["device_key_sets"] = self._device_sets
        return stats

    def _count_device_set(self, delta):
        with self._device_sets_lock:
            self._device_sets += delta

    def _check_handle(self, handle, kind=None):
        """Raise HsmError(BAD_HANDLE) unless `handle` is a live handle of this backend."""
        if not isinstance(handle, KeySetHandle) or handle._owner is not self:
            raise HsmError(HsmError.BAD_HANDLE, "not a key set of this backend")
        if handle._released:
            raise HsmError(HsmError.BAD_HANDLE, "key set released")
        if kind is not None and handle.kind != kind:
            raise HsmError(HsmError.BAD_HANDLE, "expected a %s key set" % kind)
        return handle
