"""Group commit: concurrent registry writes share one durable commit.

Without it every write is its own transaction, and each transaction pays its own fsync
(SQLite in WAL mode with synchronous=FULL; a PostgreSQL COMMIT waits for its WAL flush).
With K EST requests or K line stations writing at the same moment, K fsyncs queue one
behind the other.  `GroupCommitWriter` runs the writes of many threads in ONE transaction
on ONE thread:

    caller threads                      the writer thread
    --------------                      -----------------
    submit(op) --queue-->               take the first op; BEGIN (registry._write)
    (blocked)                           SAVEPOINT; op(conn); RELEASE   (op 1)
    submit(op) --queue-->               SAVEPOINT; op(conn); RELEASE   (op 2) ...
    (blocked)                           the batch closes: queue empty (and no linger),
                                        max_batch ops, or max_delay_s since it opened
                                        COMMIT (one fsync for the whole batch)
    <- result / the op's error ---------wake every caller of the batch

Guarantees (the same a caller had with its own transaction):
- `submit` returns only after the COMMIT that holds its op has succeeded: a result in
  the caller's hand is durable, so the line's order "intent durable, then the
  certificate; certificate journaled, then the record" and EST's "record before the
  answer" hold unchanged;
- an op that raises is rolled back to its own savepoint (it wrote nothing) and its
  exception goes to its caller; the other ops of the batch are unaffected;
- a failed BEGIN or COMMIT fails every op of the batch with that RegistryError: none of
  them was written (the database rolled the whole transaction back);
- ops of one batch run one after the other in submission order, each seeing the previous
  ones (the audit chain is appended in that order, one linear chain);
- a kill -9 at any point leaves each op either committed with its whole batch or not at
  all (the database's atomic commit); its caller never saw a result before that.
- every wait is bounded: a caller whose op has not started within `wait_timeout_s`
  withdraws it (RegistryError(STORAGE), nothing written); an op already running is
  bounded by the database's own lock / statement timeouts.

Batching is adaptive: the writer waits (up to max_delay_s) for more ops only when the
previous batch held more than one, i.e. when writers are concurrent.  A lone writer (one
station, one request at a time) pays no added latency.

A caller that finds no batch running and nothing queued runs the batch itself, on its own
thread (the same `_batch`: BEGIN, its op in a savepoint, any ops queued meanwhile, one
COMMIT), instead of handing its op to the writer thread and waiting to be woken: a lone
writer pays no thread hand-off (two wake-ups per op).  Ops that arrive while a batch runs,
on whichever thread, queue for it or for the writer thread's next one, as above; one
batch runs at a time.

The backend supplies `_write()` (a context manager: a write transaction, yielding its
connection, committing on exit), `_savepoint(conn)` (a context manager: one op's
savepoint, rolled back if the op raises) and `_transaction_open(conn)` (False when the
database dropped the transaction under a failed op: the batch then fails as a whole).
"""

import collections
import os
import threading
import time

from fleetid.cloud.registry.errors import RegistryError

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_DELAY_S = 0.002
DEFAULT_WAIT_TIMEOUT_S = 30.0


class _Op:
    __slots__ = ("fn", "result", "error", "done", "started")

    def __init__(self, fn):
        self.fn = fn
        self.result = None
        self.error = None
        self.done = None  # an Event once queued; an op run on its caller's thread needs none
        self.started = False


class GroupCommitWriter:
    """One writer thread that runs registry ops in shared transactions.

    Params: registry: a SqlRegistry (its _write(), _savepoint(), _transaction_open()).
        max_batch: ops per transaction at most.  max_delay_s: how long an open batch
        waits for more ops when writers are concurrent.  wait_timeout_s: how long a
        caller waits for its op to start.
    Attributes: batches, ops (counters: transactions committed or tried, ops run),
        largest (the largest batch so far), cpu_s (the writer thread's CPU time: the
        callers' write work moved there, benchmarks add it back to theirs; a batch run
        on its caller's thread is in that thread's own CPU time, not here).
    """

    def __init__(self, registry, max_batch=DEFAULT_MAX_BATCH, max_delay_s=DEFAULT_MAX_DELAY_S,
                 wait_timeout_s=DEFAULT_WAIT_TIMEOUT_S):
        if max_batch < 1 or max_delay_s < 0:
            raise RegistryError(RegistryError.CONFIG, "group commit: max_batch >= 1, "
                                "max_delay_s >= 0")
        self._registry = registry
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.wait_timeout_s = wait_timeout_s
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = None
        self._pid = None
        self._last_batch = 0
        self._active = False  # a batch is running (on the writer or a caller's thread)
        self._runner = None  # the thread running it
        self.batches = 0
        self.ops = 0
        self.largest = 0
        self.cpu_s = 0.0

    def submit(self, fn):
        """Run fn(conn) inside a write transaction shared with other callers; return its
        result once that transaction is committed (durable).

        Raises: whatever fn raised (its writes rolled back); RegistryError(STORAGE) when
            the batch's BEGIN / COMMIT failed or the op did not start in time (nothing
            written either way); RegistryError(CLOSED) after close().
        """
        op = _Op(fn)
        with self._cond:
            if self._closed:
                raise RegistryError(RegistryError.CLOSED)
            if self._pid != os.getpid():
                # A forked child: the writer thread (and any batch) stayed in the parent.
                self._pid = os.getpid()
                self._thread = None
                self._queue.clear()
                self._active = False
            inline = not self._active and not self._queue
            if inline:
                self._active = True
                self._runner = threading.current_thread()
                op.started = True
            else:
                self._start_writer()
                op.done = threading.Event()
                self._queue.append(op)
                self._cond.notify_all()
        if inline:  # nothing running, nothing queued: this thread runs the batch
            try:
                self._batch(op, on_writer=False)
            finally:
                self._batch_done()
            if op.error is not None:
                raise op.error
            return op.result
        if not op.done.wait(self.wait_timeout_s):
            with self._cond:
                if not op.started:
                    try:
                        self._queue.remove(op)
                    except ValueError:
                        pass
                    raise RegistryError(RegistryError.STORAGE, "group commit: timed out "
                                        "waiting for the writer")
            # Started: the database's own timeouts bound what is left (lock / busy /
            # statement timeouts per op); this bound only catches a writer gone wrong.
            if not op.done.wait(self.wait_timeout_s * self.max_batch):
                raise RegistryError(RegistryError.STORAGE, "group commit: no answer from "
                                    "the writer")
        if op.error is not None:
            raise op.error
        return op.result

    def close(self, timeout_s=10.0):
        """Finish the queued ops and a batch running on a caller's thread, then stop the
        writer thread (bounded waits)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        with self._cond:
            while self._active and self._runner is not threading.current_thread():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)

    # -- the writer thread -----------------------------------------------------------------

    def _take(self, deadline):
        """The next op to run in the open batch, or None when the batch should close."""
        with self._cond:
            while not self._queue:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                self._cond.wait(remaining)
            op = self._queue.popleft()
            op.started = True
            return op

    def _start_writer(self):
        # Under self._cond.
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="registry-group-commit")
            self._thread.start()

    def _batch_done(self):
        """After a batch: let the next one start (ops queued behind it go to the writer
        thread)."""
        with self._cond:
            self._active = False
            self._runner = None
            if self._queue:
                self._start_writer()
            self._cond.notify_all()

    def _run(self):
        while True:
            with self._cond:
                while not self._queue or self._active:
                    if self._closed and not self._queue:
                        return  # closed and drained
                    self._cond.wait()
                first = self._queue.popleft()
                first.started = True
                self._active = True
                self._runner = threading.current_thread()
            try:
                self._batch(first)
            finally:
                self._batch_done()

    def _batch(self, first, on_writer=True):
        cpu = time.thread_time()
        batch = [first]
        failure = RegistryError(RegistryError.STORAGE, "group commit: writer stopped")
        try:
            with self._registry._write() as conn:
                self._apply(conn, first)
                linger = self.max_delay_s if self._last_batch > 1 else 0.0
                deadline = time.monotonic() + linger
                while len(batch) < self.max_batch:
                    op = self._take(deadline)
                    if op is None:
                        break
                    batch.append(op)
                    self._apply(conn, op)
            failure = None  # committed
        except Exception as exc:  # noqa: BLE001 - BEGIN/COMMIT failed: nothing was written
            failure = exc if isinstance(exc, RegistryError) else RegistryError(
                RegistryError.STORAGE, "group commit: %s" % type(exc).__name__)
        finally:
            self._last_batch = len(batch)
            self.batches += 1
            self.ops += len(batch)
            self.largest = max(self.largest, len(batch))
            if on_writer:
                self.cpu_s += time.thread_time() - cpu
            # Also on a BaseException in this thread: no caller is left waiting.
            for op in batch:
                if failure is not None and op.error is None:
                    op.error = failure
                    op.result = None
                if op.done is not None:
                    op.done.set()

    def _apply(self, conn, op):
        registry = self._registry
        try:
            with registry._savepoint(conn):
                op.result = op.fn(conn)
        except registry._db_error as exc:
            op.error = registry._storage_error(exc)
        except Exception as exc:  # noqa: BLE001 - the op's own refusal, for its caller
            op.error = exc
        if op.error is not None and not registry._transaction_open(conn):
            # The database dropped the whole transaction (SQLite does on some I/O
            # errors): the batch so far is gone, and the next ops must not run outside
            # a transaction.  Fail the batch: every op of it, nothing written.
            raise RegistryError(RegistryError.STORAGE, "group commit: transaction lost")
