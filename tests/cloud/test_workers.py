"""The worker supervisor of `fleetid cloud serve --workers N` (cloud/http/workers.py) on
its own: bounded start, restart, crash-loop and stop; and the CLI's refusal of several
workers over a registry kept in one process.  The workers over PostgreSQL, with real
servers: test_workers_postgres.py."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fleetid.cloud.http.workers import ListenerBindError, Supervisor, SupervisorError, \
    bind_listeners


def _serve_until_term(index, ready):
    ready()
    while True:
        time.sleep(0.05)


def test_workers_share_one_bound_port_and_a_killed_one_is_restarted():
    sockets = bind_listeners([("est", "127.0.0.1", 0)])
    port = sockets["est"].getsockname()[1]

    def answer(index, ready):
        ready()
        listener = sockets["est"]
        listener.setblocking(True)
        while True:
            conn, _ = listener.accept()
            conn.sendall(b"%d" % os.getpid())
            conn.close()

    supervisor = Supervisor(2, answer, ready_timeout=30, stop_timeout=5, restart_delay=0.01)
    try:
        pids = supervisor.start()
        assert len(pids) == 2
        answers = set()
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                answers.add(int(conn.recv(16)))
        assert answers <= set(pids) and answers
        os.kill(pids[0], signal.SIGKILL)
        end = time.monotonic() + 10
        while supervisor.restarts == 0 and time.monotonic() < end:
            supervisor._reap()
            time.sleep(0.05)
        assert supervisor.restarts == 1 and len(supervisor.pids) == 2
        assert pids[0] not in supervisor.pids
    finally:
        supervisor.stop()
        sockets["est"].close()
    assert supervisor.pids == {}


def test_a_worker_that_never_gets_ready_fails_the_start_in_bounded_time():
    supervisor = Supervisor(1, lambda index, ready: time.sleep(60), ready_timeout=1,
                            stop_timeout=1)
    started = time.monotonic()
    with pytest.raises(SupervisorError) as info:
        supervisor.start()
    assert info.value.reason == "not_ready"
    assert supervisor.pids == {} and time.monotonic() - started < 20


def test_a_crash_loop_stops_every_worker_with_status_1():
    def crash(index, ready):
        if index == 1:
            raise RuntimeError("bad configuration")
        ready()
        _serve_until_term(index, lambda: None)

    supervisor = Supervisor(2, crash, ready_timeout=1, stop_timeout=2, restart_delay=0.01,
                            max_quick_deaths=3)
    with pytest.raises(SupervisorError):
        supervisor.start()  # worker 1 died before it was ready
    supervisor = Supervisor(1, lambda index, ready: ready() or time.sleep(0.05),
                            ready_timeout=10, stop_timeout=2, restart_delay=0.01,
                            max_quick_deaths=3)
    supervisor.start()
    assert supervisor.run() == 1  # exits 0 at once, every time: given up after 3
    assert supervisor.pids == {}


def test_a_worker_ready_then_gone_before_the_parent_looks_has_started():
    # The parent sees the exit only after the ready line is in the pipe (waitid WNOWAIT:
    # exited, not reaped), as on a loaded machine.  It used to reap first and call the
    # worker "did not start"; it started, and its quick deaths are run()'s to count.
    class LateParent(Supervisor):
        def _spawn(self, index):
            pid = super()._spawn(index)
            deadline = time.monotonic() + 10
            while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
                assert time.monotonic() < deadline, "the worker did not exit"
                time.sleep(0.005)
            return pid

    supervisor = LateParent(1, lambda index, ready: ready(), ready_timeout=10,
                            stop_timeout=2, restart_delay=0.01, max_quick_deaths=3)
    assert len(supervisor.start()) == 1
    assert supervisor.run() == 1
    assert supervisor.pids == {}


def test_a_worker_gone_after_ready_while_another_starts_is_restarted_by_start():
    def worker(index, ready):
        if index == 1:
            time.sleep(0.5)  # still starting when worker 0 is gone
            _serve_until_term(index, ready)
        else:
            ready()  # and gone at once

    supervisor = Supervisor(2, worker, ready_timeout=10, stop_timeout=2, restart_delay=0.01,
                            max_quick_deaths=1000)
    try:
        assert len(supervisor.start()) == 2
        assert supervisor.restarts >= 1  # worker 0, restarted while worker 1 started
    finally:
        supervisor.stop()
    assert supervisor.pids == {}


def test_stop_kills_a_worker_that_ignores_sigterm_after_the_bound():
    def stubborn(index, ready):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _serve_until_term(index, ready)

    supervisor = Supervisor(1, stubborn, ready_timeout=10, stop_timeout=1)
    supervisor.start()
    started = time.monotonic()
    supervisor.stop()
    assert supervisor.pids == {} and 1 <= time.monotonic() - started < 10


def test_a_busy_port_is_named():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ListenerBindError) as info:
            bind_listeners([("metrics", "127.0.0.1", 0), ("verifier", "127.0.0.1", port)])
    assert (info.value.listener, info.value.port) == ("verifier", port)
    assert info.value.cause == "Address already in use"


def test_serve_refuses_several_workers_over_a_memory_registry(tmp_path):
    env = dict(os.environ, FLEETID_KEYSTORE_PASS="test-pass", FLEETID_CLOUD_REGISTRY="memory:")
    done = subprocess.run(
        [sys.executable, "-m", "fleetid.cli.main", "cloud", "serve", "--state-dir",
         str(tmp_path / "state"), "--workers", "2"], stdin=subprocess.DEVNULL,
        capture_output=True, env=env, cwd=str(tmp_path), timeout=120, check=False)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert err.splitlines()[-1].startswith("Error: ConfigError: --workers 2 needs a registry "
                                           "in a database"), err
    assert not (tmp_path / "state" / "keystore.json").exists()  # refused before anything


_ORPHAN_SCRIPT = """
import sys, time
from fleetid.cloud.http.workers import Supervisor

def work(index, ready):
    ready()
    while True:
        time.sleep(0.05)

supervisor = Supervisor(2, work, ready_timeout=30)
print(" ".join(str(p) for p in supervisor.start()), flush=True)
supervisor.run()
"""


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_no_worker_outlives_a_killed_supervisor():
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT], stdout=subprocess.PIPE)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parent.kill()  # SIGKILL: the supervisor cannot stop them itself
        parent.wait(10)
        end = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait(10)
