"""`fleetid cloud serve` in its own process, for the benchmarks that run it (bench/fleet.py,
workers.py, faults.py, the EST HTTPS bench) and the process tests, which re-export it
(tests/cloud/test_workers_postgres.py).  Imports fleetid's runtime dependencies only
(never tests/, pytest or hypothesis).

    serve = CloudServe(config, log_path, workers=2, cwd=folder)
    serve.ports["est"], serve.workers           # once it listens (its ready line)
    serve.stop()                                # SIGTERM, bounded wait; the exit status
"""

import json
import os
import select
import signal
import subprocess
import sys
import time


class ServeFailed(RuntimeError):
    """The server exited or printed no ready line in time; the message ends with the tail
    of its log."""


class CloudServe:
    """One `fleetid cloud serve --config CONFIG --workers N [ARGS]` (the supervisor and its
    workers, sharing the listening sockets).  stderr (the JSON log) is appended to
    `log_path` (None: discarded); the soft keystore's passphrase is the benchmarks'
    (bench/_support.KEYSTORE_PASS).

    Attributes once listening: proc (the Popen), pid, info (the ready line: "listening",
    "workers", ...), ports (info["listening"]), workers (the worker pids; [pid] when the
    process serves alone).
    Raises: ServeFailed when no ready line comes within `timeout` seconds (the process is
    stopped first).
    """

    def __init__(self, config, log_path=None, workers=1, args=(), cwd=None, timeout=120.0):
        from bench._support import KEYSTORE_PASS

        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetid.cli.main", "cloud", "serve", "--config",
             str(config), "--workers", str(workers)] + list(args),
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
            stderr=self._log if self._log else subprocess.DEVNULL, cwd=cwd,
            env=dict(os.environ, FLEETID_KEYSTORE_PASS=KEYSTORE_PASS, PYTHONUNBUFFERED="1"))
        self.pid = self.proc.pid
        line = self._ready_line(timeout)
        if not line.endswith(b"\n"):
            self.stop()
            raise ServeFailed("fleetid cloud serve did not start (log %s):\n%s"
                              % (log_path, self.log()[-3000:]))
        self.info = json.loads(line.split(b"\n")[0])
        self.ports = self.info["listening"]
        self.workers = self.info.get("workers") or [self.pid]

    def _ready_line(self, timeout):
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break  # exited
                line += chunk
        return line

    def log(self):
        """The server's log so far ("" when discarded)."""
        if not self.log_path:
            return ""
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, wait=60):
        """SIGTERM, then SIGKILL after `wait` seconds.  Returns: the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log:
            self._log.close()
        self.proc.stdout.close()
        return self.proc.returncode
