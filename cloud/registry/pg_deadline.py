"""A client-side deadline on PostgreSQL operations.

The server's statement_timeout and lock_timeout bound a query only while the server
runs: a paused server (SIGSTOP, a frozen VM, a network that drops packets without a
reset) never answers, and libpq waits on its socket for ever.  `Deadlines` watches every
operation of a PostgresRegistry: one that is still running `seconds` after it began has
its connection's socket shut down (shutdown(2) on a duplicate of libpq's descriptor),
so the waiting read returns at once, psycopg raises OperationalError (RegistryError
STORAGE: the request is answered "unavailable"), the connection is marked broken, and
the next operation opens a new one (bounded by connect_timeout).  Nothing is written by a
cut operation: its transaction never committed, and the server rolls it back when it
sees the closed connection.

One watchdog thread per registry, started on first use, wakes every `poll` seconds.
"""

import contextlib
import os
import socket
import threading
import time


class Deadlines:
    """Deadlines(seconds, poll=0.2): `with deadlines.watch(conn): ...` bounds the block's
    database calls on `conn` (a psycopg connection) to `seconds`."""

    def __init__(self, seconds, poll=0.2):
        self.seconds = seconds
        self.poll = poll
        self.cut = 0  # operations cut so far (for tests and metrics)
        self._lock = threading.Lock()
        self._open = {}  # token -> (monotonic deadline, connection)
        self._thread = None

    @contextlib.contextmanager
    def watch(self, conn):
        token = object()
        with self._lock:
            self._open[token] = (time.monotonic() + self.seconds, conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="fleetid-pg-deadline")
                self._thread.start()
        try:
            yield conn
        finally:
            with self._lock:
                self._open.pop(token, None)

    def _run(self):
        while True:
            time.sleep(self.poll)
            now = time.monotonic()
            with self._lock:
                late = [(token, conn) for token, (deadline, conn) in self._open.items()
                        if deadline <= now]
                for token, _conn in late:
                    del self._open[token]
            for _token, conn in late:
                self.cut += 1
                cut_connection(conn)


def cut_connection(conn):
    """Shut down the socket under a psycopg connection (both directions), so a call
    blocked on it returns with an error.  Never raises."""
    try:
        duplicate = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except Exception:  # noqa: BLE001 - already closed: nothing is waiting on it
        return
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        duplicate.close()
