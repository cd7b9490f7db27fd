"""The SQLite registry's cross-process writer lock (cloud/registry/sqlite_writelock.py):
every write takes it and lets it go however the transaction ends, a wait for it is
bounded by the busy timeout and fails RegistryError(STORAGE), a killed holder blocks
nobody, a stopped one only until it continues, writers without it still work, and
without fcntl the registry goes on with SQLite's busy handler alone."""

import fcntl
import os
import select
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest

from fleetid.cloud.registry import RegistryError
from fleetid.cloud.registry import sqlite_writelock
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UID = bytes(range(16))

# A holder in another process: a registry write transaction left open until stdin says.
HOLDER = """
import sys
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
registry = SqliteRegistry(sys.argv[1], group_commit=False)
with registry._write() as conn:
    conn.execute("UPDATE serial_counter SET next_serial = next_serial + 1000 WHERE id = 1")
    print("held", flush=True)
    sys.stdin.readline()
print("done", flush=True)
"""


def _uid(n):
    return n.to_bytes(16, "big")


def _readline(child, timeout_s=30.0):
    ready, _, _ = select.select([child.stdout], [], [], timeout_s)
    assert ready, "child silent for %g s" % timeout_s
    return child.stdout.readline()


@pytest.fixture
def holder(tmp_path):
    """Start a process holding the registry's write transaction (and its writer lock)."""
    path = str(tmp_path / "registry.db")
    SqliteRegistry(path).close()
    child = subprocess.Popen([sys.executable, "-c", HOLDER, path], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert _readline(child) == b"held\n"
        yield path, child
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
        child.wait(10)


def _lock_file_fd(path):
    return os.open(path + "-writelock", os.O_RDWR | os.O_CREAT, 0o600)


def _free(path):
    """Is the writer lock free (another open file description can take it)?"""
    fd = _lock_file_fd(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _refused(registry):
    """An intent the registry refuses with RegistryError(STORAGE) (the lock is busy).
    Returns the seconds the refusal took."""
    started = time.monotonic()
    with pytest.raises(RegistryError) as caught:
        registry.allocate_intent(UID, "station-1")
    assert caught.value.reason == RegistryError.STORAGE
    return time.monotonic() - started


def test_lock_file_beside_the_database_0600(tmp_path):
    path = str(tmp_path / "registry.db")
    with SqliteRegistry(path) as registry:
        registry.allocate_intent(UID, "station-1")
    mode = os.lstat(path + "-writelock").st_mode
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600


@pytest.mark.parametrize("group_commit", [True, False])
def test_a_write_waits_for_the_lock_bounded_then_storage_error(tmp_path, group_commit):
    path = str(tmp_path / "registry.db")
    registry = SqliteRegistry(path, busy_timeout_s=0.3, group_commit=group_commit)
    fd = _lock_file_fd(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert 0.3 <= _refused(registry) < 5.0  # the 0.3 s bound, room for a loaded machine
        assert registry.find_by_se_uid(UID) == []  # nothing written
        # Released during the wait: the write goes on at once.
        registry.busy_timeout_s = 5.0
        threading.Timer(0.2, fcntl.flock, (fd, fcntl.LOCK_UN)).start()
        started = time.monotonic()
        assert registry.allocate_intent(UID, "station-1").se_uid == UID
        assert 0.2 <= time.monotonic() - started < 4.0  # not the 5 s bound
    finally:
        os.close(fd)
        registry.close()


def test_released_after_commit_and_after_an_exception(tmp_path):
    path = str(tmp_path / "registry.db")
    with SqliteRegistry(path, busy_timeout_s=0.3) as registry:
        registry.allocate_intent(UID, "station-1")
        assert _free(path)
        with pytest.raises(RegistryError) as caught:  # raised inside the transaction
            registry.write_intent(10 ** 6, _uid(2), "station-1")
        assert caught.value.reason == RegistryError.NOT_ALLOCATED
        assert _free(path)
        with pytest.raises(ZeroDivisionError):
            with registry._write() as conn:
                conn.execute("UPDATE serial_counter SET next_serial = 7 WHERE id = 1")
                1 / 0
        assert _free(path)
        assert registry.allocate_serial() != 7  # rolled back


def test_a_killed_holder_blocks_nobody(holder):
    path, child = holder
    with SqliteRegistry(path, busy_timeout_s=5.0) as registry:
        assert not _free(path)
        child.kill()  # SIGKILL in the transaction, the writer lock held
        child.wait(10)
        started = time.monotonic()
        assert registry.allocate_intent(UID, "station-1").se_uid == UID
        # Well inside the 5 s bound a lock kept by the dead holder would have cost (a
        # loaded machine may take a while to run the write, not 5 s).
        assert time.monotonic() - started < 4.0
        assert registry.allocate_serial() < 1000  # the killed transaction left nothing


def test_a_stopped_holder_storage_error_within_the_bound_then_recovery(holder):
    path, child = holder
    with SqliteRegistry(path, busy_timeout_s=0.5) as registry:
        os.kill(child.pid, signal.SIGSTOP)
        for _ in range(2):  # twice: the wait is bounded each time, not only the first
            assert 0.5 <= _refused(registry) < 5.0  # bounded: not held until SIGCONT
        os.kill(child.pid, signal.SIGCONT)
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert _readline(child) == b"done\n"
        assert registry.allocate_intent(UID, "station-1").se_uid == UID  # 0.5 s bound
        assert registry.allocate_serial() > 1000  # after the holder's commit


def test_writers_without_the_lock_still_serialised_by_sqlite(tmp_path):
    path = str(tmp_path / "registry.db")
    registry = SqliteRegistry(path, busy_timeout_s=0.3)
    raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        raw.execute("BEGIN IMMEDIATE")  # an older writer: SQLite's lock, no flock
        _refused(registry)
        assert _free(path)  # released after the failed BEGIN
        registry.close()  # a longer SQLite busy timeout: a new registry
        registry = SqliteRegistry(path, busy_timeout_s=5.0)
        threading.Timer(0.2, raw.execute, ("COMMIT",)).start()
        assert registry.allocate_intent(UID, "station-1").se_uid == UID  # waited in SQLite
    finally:
        raw.close()
        registry.close()


def test_without_fcntl_sqlite_busy_handler_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_writelock, "fcntl", None)
    path = str(tmp_path / "registry.db")
    with SqliteRegistry(path) as registry:
        assert registry.allocate_intent(UID, "station-1").se_uid == UID
        assert registry.allocate_serial() > 0
    assert not os.path.exists(path + "-writelock")


def _wait_exit(pid, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("process %d did not finish" % pid)


def test_a_forked_child_takes_its_own_lock(tmp_path):
    lock = sqlite_writelock.WriterLock(str(tmp_path / "registry.db"))
    assert lock.acquire(1.0)
    try:
        pid = os.fork()
        if pid == 0:  # the child: the parent's lock must not count as its own
            try:
                lock.acquire(0.2)
                os._exit(1)
            except RegistryError:
                os._exit(0)
            finally:
                os._exit(2)
        assert os.waitstatus_to_exitcode(_wait_exit(pid, 30)) == 0
    finally:
        lock.release()
        lock.close()


@pytest.mark.parametrize("obstacle", ["directory", "symlink"])
def test_an_unusable_lock_file_falls_back_to_sqlite(tmp_path, obstacle, caplog):
    path = str(tmp_path / "registry.db")
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    if obstacle == "directory":
        os.mkdir(path + "-writelock")
    else:  # never followed: the target is not locked (nor created, nor changed)
        os.symlink(target, path + "-writelock")
    with SqliteRegistry(path) as registry:
        assert registry.allocate_intent(UID, "station-1").se_uid == UID
        assert registry.allocate_serial() > 0
    assert "writer lock" in caplog.text and "busy handler alone" in caplog.text
    assert target.read_bytes() == b""


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_created_by_root_the_lock_file_belongs_to_the_database_owner(tmp_path):
    path = str(tmp_path / "registry.db")
    SqliteRegistry(path).close()
    os.chown(path, 4242, 4343)
    with SqliteRegistry(path) as registry:
        registry.allocate_serial()
    info = os.stat(path + "-writelock")
    assert (info.st_uid, info.st_gid) == (4242, 4343)


def test_a_child_forked_by_a_holder_does_not_keep_its_lock_after_it_is_killed(tmp_path):
    # P takes the lock and forks Q, then P is killed -9 while Q lives on.  Q's inherited
    # descriptor shares P's open file: had Q kept it open, the lock would outlive P.
    path = str(tmp_path / "registry.db")
    read_end, write_end = os.pipe()
    holder = os.fork()
    if holder == 0:  # P
        try:
            os.close(read_end)
            lock = sqlite_writelock.WriterLock(path)
            lock.acquire(1.0)
            child = os.fork()
            if child == 0:  # Q: lives on, holding nothing of its own
                time.sleep(30)
                os._exit(0)
            os.write(write_end, b"%d\n" % child)
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(write_end)
    assert select.select([read_end], [], [], 10)[0], "the holder did not start"
    child = int(os.read(read_end, 64))
    os.close(read_end)
    os.kill(holder, signal.SIGKILL)
    _wait_exit(holder, 10)
    lock = sqlite_writelock.WriterLock(path)
    try:
        assert lock.acquire(2.0)  # RegistryError(STORAGE) while Q kept P's lock
        lock.release()
    finally:
        lock.close()
        os.kill(child, signal.SIGKILL)
        time.sleep(0.05)
