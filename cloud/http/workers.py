"""N worker processes serving the same listening sockets, and the parent that supervises
them (`fleetid cloud serve --workers N`).

The parent binds every listener once (`bind_listeners`), then forks the workers; each
worker inherits the bound sockets and accepts on them (the kernel hands each new
connection to one of the processes waiting in accept), so N processes serve one port
without SO_REUSEPORT and without a port per worker.  A connection a dying worker had
already accepted is lost with it (the client sees a reset and retries); connections
still in the listen queue are taken by the others.

The parent does no request work.  It:
- waits (bounded: `ready_timeout`) until every worker reports ready on a pipe;
- restarts a worker that exits or is killed (same index), after `restart_delay`
  doubled per quick death (a worker that dies within `min_uptime` of its start), and
  gives up - stops every worker, exit status 1 - after `max_quick_deaths` quick deaths
  in a row (a crash loop: a bad configuration, a database that refuses every start);
- on SIGTERM / SIGINT sends SIGTERM to every worker, waits at most `stop_timeout`
  for them to finish their requests and exit, then SIGKILLs what is left.

Every state the workers share lives outside them (the registry's database, the HSM, the
state directory's files): see cloud/registry/shared_state.py.  Workers are forked from a
parent that holds no database connection or HSM session (the caller closes them first).
"""

import logging
import os
import select
import signal
import socket
import time

from fleetid.common.errors import FleetidError

log = logging.getLogger("fleetid.cloud.workers")

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 10.0
MIN_UPTIME_S = 3.0
MAX_QUICK_DEATHS = 5
_POLL_S = 0.1


class ListenerBindError(FleetidError, OSError):
    """One listener could not be bound: fields listener, host, port, cause (the OS's
    words).  Also an OSError (errno of the bind failure)."""

    def __init__(self, listener, host, port, exc):
        cause = os.strerror(exc.errno) if exc.errno else str(exc)
        super().__init__(exc.errno, cause)
        self.listener = listener
        self.host = host
        self.port = port
        self.cause = cause


def bind_listeners(listeners, backlog=1024):
    """Bind and listen on every (name, host, port) of `listeners` (port 0: a free one).
    Returns {name: socket}.  Raises ListenerBindError (the sockets bound before it are
    closed)."""
    bound = {}
    try:
        for name, host, port in listeners:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(backlog)
            except OSError as exc:
                sock.close()
                raise ListenerBindError(name, host, port, exc) from None
            sock.set_inheritable(True)
            sock.setblocking(False)
            bound[name] = sock
    except ListenerBindError:
        for sock in bound.values():
            sock.close()
        raise
    return bound


class SupervisorError(FleetidError):
    """The workers could not be started or kept running (`reason`: "not_ready",
    "crash_loop")."""

    def __init__(self, reason, detail):
        super().__init__("%s: %s" % (reason, detail))
        self.reason = reason
        self.detail = detail


class Supervisor:
    """Forks `workers` processes running `run_worker(index, ready)` and keeps them
    running (module docstring).  `ready()` is what a worker calls once it serves.
    `run_worker` returns when the worker is told to stop (SIGTERM); an exception in it
    is logged and the process exits 1."""

    def __init__(self, workers, run_worker, ready_timeout=READY_TIMEOUT_S,
                 stop_timeout=STOP_TIMEOUT_S, restart_delay=RESTART_DELAY_S,
                 min_uptime=MIN_UPTIME_S, max_quick_deaths=MAX_QUICK_DEATHS):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        self.run_worker = run_worker
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.restart_delay = restart_delay
        self.min_uptime = min_uptime
        self.max_quick_deaths = max_quick_deaths
        self.pids = {}  # pid -> index
        self.started_at = {}  # index -> monotonic start time
        self.restarts = 0
        self._quick_deaths = 0
        self._stopping = False
        self._ready_r, self._ready_w = os.pipe()
        self._partial = b""  # a ready line read in part (_ready_lines)

    # -- the worker side --------------------------------------------------------------------------

    def _spawn(self, index):
        parent = os.getpid()
        pid = os.fork()
        if pid:
            self.pids[pid] = index
            self.started_at[index] = time.monotonic()
            return pid
        status = 1
        try:  # the child: never returns into the parent's code
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _term_with_parent(parent)
            os.close(self._ready_r)
            self.run_worker(index, lambda: os.write(self._ready_w, b"%d\n" % index))
            status = 0
        except BaseException:  # noqa: BLE001 - logged; the parent restarts the worker
            log.error("worker %d failed", index, exc_info=True)
        finally:
            logging.shutdown()
            os._exit(status)

    # -- the parent side --------------------------------------------------------------------------

    def start(self):
        """Fork every worker and wait until all report ready.  Returns their pids.
        SIGTERM / SIGINT from here on stop the workers (run() then returns at once).
        Raises SupervisorError("not_ready") after ready_timeout (workers stopped)."""
        self._previous = {sig: signal.signal(sig, self._on_signal)
                          for sig in (signal.SIGTERM, signal.SIGINT)}
        for index in range(self.workers):
            self._spawn(index)
        waiting = set(range(self.workers))
        deadline = time.monotonic() + self.ready_timeout
        while waiting and not self._stopping:
            left = deadline - time.monotonic()
            waiting -= self._ready_lines(max(0.0, min(left, _POLL_S)))
            exited = self._reap(restart=False) if waiting and left > 0 else []
            if waiting and (exited or left <= 0):
                # The pipe again: a worker that said it was ready and exited since the
                # last read (its line is in the pipe before its exit can be seen) did start.
                waiting -= self._ready_lines(0.0)
                failed = waiting & set(exited) if left > 0 else waiting
                if failed:
                    self.stop()
                    raise SupervisorError("not_ready", "worker(s) %s did not start"
                                          % sorted(failed))
                try:  # started, then gone: restarted as run() does
                    for index in exited:
                        self._restart(index)
                except SupervisorError:
                    self.stop()
                    raise
        return sorted(self.pids)

    def _ready_lines(self, timeout):
        """The indexes of the workers whose ready line came within `timeout` seconds (a
        partial line waits in self._partial for the next call)."""
        readable, _, _ = select.select([self._ready_r], [], [], timeout)
        if not readable:
            return set()
        *lines, self._partial = (self._partial + os.read(self._ready_r, 4096)).split(b"\n")
        return {int(line) for line in lines if line}

    def _reap(self, restart=True):
        """Collect exited workers; restart them when `restart`.  Returns the indexes of
        those that exited.  Raises SupervisorError("crash_loop")."""
        exited = []
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = self.pids.pop(pid, None)
            if index is None:
                continue
            exited.append(index)
            log.log(logging.INFO if self._stopping else logging.WARNING,
                    "worker %d (pid %d) exited: %s", index, pid, _status_text(status))
            if restart and not self._stopping:
                self._restart(index)
        return exited

    def _restart(self, index):
        if time.monotonic() - self.started_at[index] < self.min_uptime:
            self._quick_deaths += 1
        else:
            self._quick_deaths = 0
        if self._quick_deaths >= self.max_quick_deaths:
            raise SupervisorError("crash_loop", "worker %d died %d times within %.0f s of "
                                  "its start" % (index, self._quick_deaths, self.min_uptime))
        delay = min(self.restart_delay * (2 ** self._quick_deaths), MAX_RESTART_DELAY_S)
        self._sleep(delay)
        if not self._stopping:
            self.restarts += 1
            pid = self._spawn(index)
            log.warning("worker %d restarted (pid %d)", index, pid)

    def _sleep(self, seconds):
        end = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < end:
            time.sleep(min(_POLL_S, end - time.monotonic()))

    def run(self):
        """Supervise until SIGTERM / SIGINT, then stop every worker.  Returns 0, or 1
        after a crash loop (every worker stopped)."""
        try:
            while not self._stopping:
                self._reap()
                self._drain_ready()
                time.sleep(_POLL_S)
            return 0
        except SupervisorError as exc:
            log.error("workers stopped: %s", exc)
            return 1
        finally:
            self.stop()

    def _on_signal(self, signum, frame):
        self._stopping = True

    def _drain_ready(self):
        # Restarted workers report ready too: keep the pipe from filling.
        while select.select([self._ready_r], [], [], 0)[0]:
            if not os.read(self._ready_r, 4096):
                break

    def stop(self):
        """SIGTERM every worker, wait at most stop_timeout, SIGKILL the rest, reap all;
        the signal handlers start() installed are put back."""
        self._stopping = True
        for sig, handler in getattr(self, "_previous", {}).items():
            signal.signal(sig, handler)
        self._previous = {}
        for pid in list(self.pids):
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while self.pids and time.monotonic() < deadline:
            if not self._reap(restart=False):
                time.sleep(_POLL_S)
        for pid in list(self.pids):
            log.error("worker pid %d did not stop in %.0f s: killed", pid, self.stop_timeout)
            _kill(pid, signal.SIGKILL)
        while self.pids:
            pid, _ = os.waitpid(next(iter(self.pids)), 0)
            self.pids.pop(pid, None)


def _term_with_parent(parent):
    """Linux: SIGTERM this worker when its parent (pid `parent`) dies, even by SIGKILL,
    so no worker outlives its supervisor.  Best effort elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent already died between fork and prctl
        os._exit(1)


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _status_text(status):
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "exit status %d" % os.waitstatus_to_exitcode(status)
