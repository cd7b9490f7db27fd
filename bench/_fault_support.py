"""Fault injection on the shared parts, for bench/faults.py and the fault tests (no tests
in this module; nothing here imports pytest or tests/).

- `close_all_sessions(backend)`: C_CloseAllSessions on the token of a running
  Pkcs11Backend, through the same loaded module (dlopen hands back the instance the
  backend initialised): every session of this process on that token ends, and with the
  last one the login state (PKCS#11 v2.40 5.6), as a token reset or an HSM daemon restart
  would.
- `kill_broker(broker)` / `restart_broker(broker)`: mosquitto killed (SIGKILL, no clean
  shutdown) and started again on the same two ports.
- `FaultRow`: one line of the fault table (requests ok / typed error / wrongly accepted,
  records lost or forked, seconds to recover).
"""

import ctypes
import os
import signal
import time

from bench._pg_support import child_pids

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
CKR_OK = 0


def close_all_sessions(backend):
    """C_CloseAllSessions(slot) on `backend`'s token (a Pkcs11Backend) from this process.
    Returns: the CK_RV (0 = CKR_OK)."""
    library = ctypes.CDLL(backend.module)
    function = library.C_CloseAllSessions
    function.argtypes = [ctypes.c_ulong]
    function.restype = ctypes.c_ulong
    return function(backend._token.slot.slot_id)


def kill_broker(broker):
    """SIGKILL the broker's mosquitto (a crash: no clean disconnects, no persistence) and
    reap it.  Returns: the pid killed."""
    pid = broker.pid
    os.kill(pid, signal.SIGKILL)
    broker.wait(10)
    return pid


def restart_broker(broker, down_s=0.5, timeout=10.0):
    """mosquitto killed, `down_s` seconds down, started again on the same ports (the
    clients must find it where it was).  Returns: the new pid."""
    broker.fixed_port, broker.fixed_service_port = broker.port, broker.service_port
    kill_broker(broker)
    time.sleep(down_s)
    broker.start(timeout)
    return broker.pid


class FaultRow:
    """One fault's figures: requests made during the fault (ok, typed_error, wrong_accept),
    records lost or forked (must be 0), seconds from the fault to the first request served
    again (recover_s), and a note."""

    FIELDS = ("fault", "ok", "typed_error", "wrong_accept", "lost_or_forked", "recover_s",
              "note")

    def __init__(self, fault, ok=0, typed_error=0, wrong_accept=0, lost_or_forked=0,
                 recover_s=None, note=""):
        self.fault = fault
        self.ok = ok
        self.typed_error = typed_error
        self.wrong_accept = wrong_accept
        self.lost_or_forked = lost_or_forked
        self.recover_s = recover_s
        self.note = note
        self.baseline = (None, None)  # (name, seconds) measured in the same run
        self.untyped = 0  # answers that are neither a success nor a typed refusal

    def as_dict(self):
        row = {name: getattr(self, name) for name in self.FIELDS}
        row["baseline"], row["baseline_s"] = self.baseline
        return row

    @property
    def passed(self):
        return (self.wrong_accept == 0 and self.lost_or_forked == 0 and self.untyped == 0
                and self.recover_s is not None)


def format_table(rows):
    """The fault table as text lines."""
    head = "%-26s %5s %7s %7s %9s %9s  %s" % ("fault", "ok", "typed", "wrong", "lost/fork",
                                              "recover", "note")
    lines = [head, "-" * len(head)]
    for row in rows:
        recover = "never" if row.recover_s is None else "%.2f s" % row.recover_s
        lines.append("%-26s %5d %7d %7d %9d %9s  %s" % (
            row.fault, row.ok, row.typed_error, row.wrong_accept, row.lost_or_forked,
            recover, row.note))
    return lines


# -- PostgreSQL (a bench/_pg_support.ThrowawayPostgres) ---------------------------------


def pg_processes(pg):
    """The postmaster and every process it started."""
    postmaster = pg.postmaster_pid()
    return [postmaster] + child_pids(postmaster)


def pg_signal_all(pg, sig):
    """Send `sig` to every PostgreSQL process (SIGSTOP: the whole server paused)."""
    for pid in pg_processes(pg):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def pg_stop(pg):
    """pg_ctl stop -m fast (clients disconnected, a clean shutdown)."""
    import subprocess

    subprocess.run(pg.as_user + [pg.pg_ctl, "-D", pg.data, "-w", "-m", "fast", "stop"],
                   check=True, capture_output=True, timeout=60)


def pg_start(pg):
    """pg_ctl start with the options ThrowawayPostgres started it with."""
    import subprocess

    options = "-k %s -c listen_addresses='' -c max_connections=%d" % (
        pg.base, pg.max_connections)
    if not pg.durable:
        options += " -c fsync=off -c synchronous_commit=off"
    subprocess.run(pg.as_user + [pg.pg_ctl, "-D", pg.data, "-w", "-l",
                                 os.path.join(pg.base, "log"), "-o", options, "start"],
                   check=True, capture_output=True, timeout=60)


def worker_pids(serve_pid):
    """The worker processes of a `fleetid cloud serve --workers N` parent."""
    return child_pids(serve_pid)
