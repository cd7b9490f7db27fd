"""Group commit (cloud/registry/group_commit.py): concurrent writers of the commit path
share one durable transaction, an op refused inside a batch leaves the others committed,
a failed COMMIT fails every op of its batch and writes nothing, a caller's wait is bounded.
Run on SQLite here and on PostgreSQL by test_registry_postgres.py (GROUP_COMMIT_TESTS).
The kill -9 tests: test_group_commit_crash.py."""

import sqlite3
import threading

import pytest

from fleetid.cloud.registry import (
    COMMITTED,
    INTENT,
    InvalidState,
    RegistryError,
    verify_registry_log,
)
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
from tests.cloud.test_registry import LINE, T0, WITNESS, identity, make_cert, uid


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "r.db", wall_clock=lambda: T0)
    yield reg
    reg.close()


class _Gate:
    """Holds the writer inside an open batch until released, so that the ops submitted
    meanwhile queue up and go into that batch."""

    def __init__(self, registry):
        self.registry = registry
        self.release = threading.Event()
        self.entered = threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self):
        def op(_conn):
            self.entered.set()
            self.release.wait(10)

        try:
            self.registry.group_commit.submit(op)
        except RegistryError:
            pass  # its batch failed: the test looks at the other callers

    def __enter__(self):
        self.thread.start()
        assert self.entered.wait(10)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(10)


def _identity(registry, serial):
    """identity() for a device whose intent has its own UID."""
    return identity(serial, se_uid=registry.get_device(serial).se_uid)


def _in_threads(calls):
    """Run each callable on its own thread; returns [(result, exception)] in order."""
    out = [None] * len(calls)

    def run(i, call):
        try:
            out[i] = (call(), None)
        except Exception as exc:  # noqa: BLE001 - returned to the test
            out[i] = (None, exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    return threads, out


def _join(threads):
    for thread in threads:
        thread.join(20)


def _queued(registry, n):
    """Wait (bounded) until n ops are queued behind the gate."""
    for _ in range(2000):
        if len(registry.group_commit._queue) >= n:
            return
        threading.Event().wait(0.005)
    raise AssertionError("ops did not queue")


def test_concurrent_commits_share_one_durable_transaction(registry, tmp_path):
    serials = [registry.allocate_intent(uid(100 + n), "line-1/st-%d" % n).serial
               for n in range(8)]
    group = registry.group_commit
    batches_before = group.batches
    with _Gate(registry):
        threads, out = _in_threads([
            lambda s=s: registry.commit_identity(*_identity(registry, s)) for s in serials])
        _queued(registry, len(serials))
    _join(threads)
    assert [exc for _r, exc in out] == [None] * len(serials)
    assert group.batches - batches_before == 1  # the gate's batch took all eight
    # One linear chain, in the order the writer ran them; durable for another handle.
    report = verify_registry_log(registry, LINE.public_key(), WITNESS.public_key())
    assert report.entries == 8 and sorted(r.seq for r, _e in out) == list(range(8))
    if isinstance(registry, SqliteRegistry):
        with SqliteRegistry(tmp_path / "r.db") as other:
            assert {other.get_device(s).status for s in serials} == {COMMITTED}


def test_a_lone_writer_runs_its_batch_on_its_own_thread_durably(registry, tmp_path):
    # Nothing running, nothing queued: no hand-off to the writer thread, same transaction.
    group = registry.group_commit
    ran_on = []

    def op(conn):
        ran_on.append(threading.current_thread())
        return registry._take_serial(conn) if isinstance(registry, SqliteRegistry) else 0

    batches = group.batches
    group.submit(op)
    serial = registry.allocate_intent(uid(700), "line-1/st-1").serial
    registry.commit_identity(*_identity(registry, serial))
    assert ran_on == [threading.current_thread()]
    assert group.batches - batches == 3
    if isinstance(registry, SqliteRegistry):
        with SqliteRegistry(tmp_path / "r.db") as other:
            assert other.get_device(serial).status == COMMITTED


def test_an_op_refused_inside_a_batch_leaves_the_others_committed(registry):
    good = [registry.allocate_intent(uid(200 + n), "line-1/st-1").serial for n in range(3)]
    done = registry.allocate_intent(uid(299), "line-1/st-2").serial
    registry.commit_identity(*_identity(registry, done))
    head = registry.head()[0]
    calls = [lambda s=s: registry.commit_identity(*_identity(registry, s)) for s in good]
    # Refused inside the batch: a commit of a device not in flight, a duplicate certificate.
    calls.insert(1, lambda: registry.commit_identity(*_identity(registry, done)))
    calls.insert(3, lambda: registry.add_certificate(done, make_cert(done), "identity"))
    with _Gate(registry):
        threads, out = _in_threads(calls)
        _queued(registry, len(calls))
    _join(threads)
    assert isinstance(out[1][1], InvalidState)
    assert out[3][1].reason == RegistryError.DUPLICATE_CERTIFICATE
    assert [exc for i, (_r, exc) in enumerate(out) if i not in (1, 3)] == [None] * 3
    assert {registry.get_device(s).status for s in good} == {COMMITTED}
    assert registry.head()[0] == head + 3  # the refused ops appended nothing
    verify_registry_log(registry, LINE.public_key(), WITNESS.public_key())


class _CommitFails(SqliteRegistry):
    fail = False

    def _commit(self, conn):
        if self.fail:
            raise sqlite3.OperationalError("disk I/O error")
        super()._commit(conn)


def test_a_failed_batch_commit_fails_every_caller_and_writes_nothing(tmp_path):
    reg = _CommitFails(tmp_path / "r.db", wall_clock=lambda: T0)
    try:
        serials = [reg.allocate_intent(uid(300 + n), "line-1/st-1").serial for n in range(4)]
        reg.fail = True
        with _Gate(reg):
            threads, out = _in_threads([lambda s=s: reg.commit_identity(*_identity(reg, s))
                                        for s in serials])
            _queued(reg, len(serials))
        _join(threads)
        assert {exc.reason for _r, exc in out} == {RegistryError.STORAGE}
        reg.fail = False
        assert {reg.get_device(s).status for s in serials} == {INTENT}
        assert reg.head()[0] == 0
        assert reg.commit_identity(*_identity(reg, serials[0])).seq == 0  # the writer goes on
    finally:
        reg.close()


def test_a_transaction_dropped_under_an_op_fails_the_whole_batch(tmp_path):
    # SQLite rolls the whole transaction back on some errors (disk full, I/O): the ops
    # before it are gone with it, and the ones after it must not run in autocommit mode.
    reg = SqliteRegistry(tmp_path / "r.db", wall_clock=lambda: T0)
    try:
        serials = [reg.allocate_intent(uid(600 + n), "line-1/st-1").serial for n in range(2)]

        def dropped(conn):
            conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")

        calls = [lambda: reg.commit_identity(*_identity(reg, serials[0])),
                 lambda: reg.group_commit.submit(dropped),
                 lambda: reg.commit_identity(*_identity(reg, serials[1]))]
        with _Gate(reg):
            threads, out = [], []
            for call in calls:  # in this order into the batch
                more, result = _in_threads([call])
                threads += more
                out += [result]
                _queued(reg, len(threads))
        _join(threads)
        # The op before it and the op itself fail (nothing of them written); the op after
        # it was not run in the lost transaction but in the next batch, committed.
        assert [exc.reason for (_r, exc), in out[:2]] == [RegistryError.STORAGE] * 2
        assert out[2][0][1] is None
        assert [reg.get_device(s).status for s in serials] == [INTENT, COMMITTED]
        assert reg.head()[0] == 1
        verify_registry_log(reg, LINE.public_key(), WITNESS.public_key())
    finally:
        reg.close()


def test_a_caller_whose_op_never_starts_withdraws_it_and_nothing_is_written(registry):
    registry.group_commit.wait_timeout_s = 0.2
    with _Gate(registry):
        with pytest.raises(RegistryError) as info:
            registry.allocate_intent(uid(400), "line-1/st-1")
        assert info.value.reason == RegistryError.STORAGE
    assert registry.find_by_se_uid(uid(400)) == []
    assert registry.allocate_intent(uid(401), "line-1/st-1").serial == 1  # no gap either


def test_without_group_commit_each_op_is_its_own_transaction(tmp_path):
    with SqliteRegistry(tmp_path / "r.db", group_commit=False) as reg:
        assert reg.group_commit is None
        serial = reg.allocate_intent(uid(500), "line-1/st-1").serial
        assert reg.commit_identity(*_identity(reg, serial)).seq == 0
