"""Bulk revocation in chunks (RevocationService.revoke_devices over
Registry.mark_devices_revoked: one transaction per chunk of devices) on the in-memory fake,
SQLite and PostgreSQL (the throwaway server of test_registry_postgres.py):

- its results, rows and audit chain are the per-certificate path's (one mark_revoked
  transaction per certificate, as revoke_devices ran before), byte for byte, and the
  chain verifies (verify_registry_log);
- bad input writes nothing;
- a failure or a kill -9 inside a chunk loses that whole chunk and nothing else, what was
  committed is announced, and a rerun completes the list with one chain;
- on PostgreSQL a single revocation of the same certificate by another process, in either
  order, never revokes it twice.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from bench.revocation import per_certificate
from fleetid.cloud import audit
from fleetid.cloud.registry import REVOKED, DeviceNotFound, RegistryError, \
    verify_registry_log
from fleetid.cloud.registry.memory import MemoryRegistry
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
from fleetid.cloud.revocation.service import RevocationError, RevocationService, read_event
from tests.cloud import test_registry as contract
from tests.cloud.test_registry_postgres import pg_cluster  # noqa: F401 - the fixture

try:
    import psycopg
except ImportError:  # pragma: no cover
    psycopg = None

BACKENDS = ["memory", "sqlite", "postgresql"]


@pytest.fixture
def make_registry(request, tmp_path):
    """make_registry(kind) -> a new empty registry of that kind (clock fixed at T0);
    make_registry.target(registry) -> what opens the same database in another process."""
    made = []

    def make(kind):
        if kind == "memory":
            reg = MemoryRegistry(wall_clock=lambda: contract.T0)
        elif kind == "sqlite":
            reg = SqliteRegistry(tmp_path / ("r%d.db" % len(made)),
                                 wall_clock=lambda: contract.T0)
        else:
            reg = _pg_registry(request.getfixturevalue("pg_cluster").new_database())
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.close()


def _pg_registry(conninfo, **options):
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    return PostgresRegistry(conninfo, wall_clock=lambda: contract.T0, **options)


def _certificates(count):
    """(identity DER, operational DER) for devices 1..count: made once, stored in every
    registry of a test so that their rows and chains can be compared byte for byte."""
    return [(contract.make_cert(n), contract.make_cert(n, cert_serial=0x55000000 + n))
            for n in range(1, count + 1)]


def _populate(registry, ders):
    """Devices 1..len(ders), each committed with its identity certificate and one
    operational certificate added after it."""
    for identity_der, operational_der in ders:
        serial = contract.start_device(registry)
        registry.commit_identity(*contract.identity(serial, cert_der=identity_der))
        registry.add_certificate(serial, operational_der, "operational")


def _service(registry, folder):
    folder.mkdir(exist_ok=True)
    return RevocationService(registry, [], str(folder / "revoked-cas.jsonl"),
                             str(folder / "revocation.events"))


def _state(registry, count):
    """Everything the revocation changes: devices, certificates, the chain."""
    return ([registry.get_device(n) for n in range(1, count + 1)],
            [registry.certificates(n) for n in range(1, count + 1)],
            registry.head(), list(registry.iter_audit_lines()))


def _verify(registry):
    return verify_registry_log(registry, contract.LINE.public_key(),
                               contract.WITNESS.public_key())


@pytest.mark.parametrize("kind", BACKENDS)
def test_chunks_give_the_per_certificate_paths_results_rows_and_chain(make_registry, kind,
                                                                      tmp_path):
    ders = _certificates(7)
    one, chunked = make_registry(kind), make_registry(kind)
    for reg in (one, chunked):
        _populate(reg, ders)
        reg.mark_revoked("%x" % (0x7F000000 + 3), "superseded")  # device 3's identity
        reg.mark_revoked("%x" % (0x55000000 + 5), "superseded")  # device 5's operational
    # Devices 3 and 5 half revoked already, device 2 listed twice (the later: []).
    serials = [1, 2, 3, 4, 5, 2, 6, 7]
    expected = per_certificate(one, serials, "keyCompromise", "alice")
    ticks = []
    service = _service(chunked, tmp_path / "state")
    got = service.revoke_devices(serials, "keyCompromise", operator="alice",
                                 progress=ticks.append, chunk=3)
    assert got == expected
    assert sorted(got[1]) == ["%x" % (0x55000000 + 1), "%x" % (0x7F000000 + 1)]
    assert got[2] == [] and got[3] == ["%x" % (0x55000000 + 3)]
    assert got[5] == ["%x" % (0x7F000000 + 5)]
    assert ticks == [1] * len(serials)
    assert read_event(service.events_path) == 1  # one announcement for the list
    assert _state(chunked, 7) == _state(one, 7)
    assert {chunked.get_device(n).status for n in range(1, 8)} == {REVOKED}
    assert _verify(chunked).by_type == {"injection": 7, "issuance": 7, "revoke": 14}


@pytest.mark.parametrize("kind", BACKENDS)
def test_bad_input_writes_nothing(make_registry, kind, tmp_path):
    reg = make_registry(kind)
    _populate(reg, _certificates(3))
    before = _state(reg, 3)
    service = _service(reg, tmp_path / "state")
    with pytest.raises(RevocationError) as info:
        service.revoke_devices([1, 2, 99, 3], "keyCompromise")
    assert info.value.reason == "unknown_device" and info.value.detail == "99"
    with pytest.raises(DeviceNotFound):  # found first: devices 1 and 2 stay unrevoked
        reg.mark_devices_revoked([1, 2, 99], "keyCompromise")
    with pytest.raises(RegistryError) as info:
        reg.mark_devices_revoked([1, 2], "")
    assert info.value.reason == RegistryError.BAD_INPUT
    assert reg.mark_devices_revoked([], "keyCompromise") == {}
    assert _state(reg, 3) == before
    assert not os.path.exists(service.events_path)


def _fail_in_second_chunk(registry, monkeypatch):
    """Make the second chunk of revoke_devices fail: on SQL, once all its rows and audit
    entries are written (not committed); in memory (which checks everything before it
    changes anything), while it builds the 6th entry (device 3's second certificate)."""
    calls = []
    if isinstance(registry, MemoryRegistry):
        real = audit.revoke_entry

        def failing(**fields):
            calls.append(fields)
            if len(calls) == 6:
                raise RegistryError(RegistryError.STORAGE, "injected")
            return real(**fields)

        monkeypatch.setattr(audit, "revoke_entry", failing)
        return
    real_append = registry._append_all

    def failing_append(conn, fields_list):
        entries = real_append(conn, fields_list)
        calls.append(entries)
        if len(calls) == 2:
            raise RegistryError(RegistryError.STORAGE, "injected")
        return entries

    monkeypatch.setattr(registry, "_append_all", failing_append)


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_failure_inside_a_chunk_loses_that_chunk_only_and_a_rerun_completes_it(
        make_registry, kind, tmp_path, monkeypatch):
    ders = _certificates(5)
    reg, reference = make_registry(kind), make_registry(kind)
    for each in (reg, reference):
        _populate(each, ders)
    start = reg.head()[0]
    _fail_in_second_chunk(reg, monkeypatch)
    service = _service(reg, tmp_path / "state")
    ticks = []
    with pytest.raises(RegistryError):
        service.revoke_devices([1, 2, 3, 4, 5], "keyCompromise", progress=ticks.append,
                               chunk=2)
    assert ticks == [1, 1]  # the first chunk, committed
    assert read_event(service.events_path) == 1  # and announced
    assert [reg.get_device(n).status for n in range(1, 6)] == \
        [REVOKED, REVOKED, "committed", "committed", "committed"]
    assert not any(c.revoked for n in (3, 4, 5) for c in reg.certificates(n))
    assert reg.head()[0] == start + 4 and _verify(reg).entries == start + 4
    monkeypatch.undo()
    again = service.revoke_devices([1, 2, 3, 4, 5], "keyCompromise", chunk=2)
    assert again[1] == again[2] == [] and all(len(again[n]) == 2 for n in (3, 4, 5))
    per_certificate(reference, [1, 2, 3, 4, 5], "keyCompromise", "")
    assert _state(reg, 5) == _state(reference, 5)  # one chain, as if never interrupted
    assert _verify(reg).entries == start + 10


# The child: revoke devices 1..5 two per chunk, SIGKILLed inside the second chunk's
# transaction once all its rows and audit entries are written, before its COMMIT.
_KILLED_CHILD = """
import os, signal, sys
from fleetid.cloud.registry.sql_common import SqlRegistry
from fleetid.cloud.revocation.service import RevocationService
kind, target, folder = sys.argv[1:4]
chunks = []
real = SqlRegistry._append_all
def append_all(self, conn, fields_list):
    chunks.append(real(self, conn, fields_list))
    if len(chunks) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return chunks[-1]
SqlRegistry._append_all = append_all
if kind == "sqlite":
    from fleetid.cloud.registry.sqlite_backend import SqliteRegistry as Backend
else:
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry as Backend
registry = Backend(target, wall_clock=lambda: %r)
service = RevocationService(registry, [], os.path.join(folder, "revoked-cas.jsonl"),
                            os.path.join(folder, "revocation.events"))
service.revoke_devices([1, 2, 3, 4, 5], "keyCompromise", chunk=2)
""" % contract.T0


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_kill_inside_a_chunk_loses_that_chunk_only_and_a_rerun_completes_it(
        make_registry, kind, tmp_path):
    ders = _certificates(5)
    reg, reference = make_registry(kind), make_registry(kind)
    for each in (reg, reference):
        _populate(each, ders)
    start = reg.head()[0]
    target = reg.path if kind == "sqlite" else reg.conninfo
    (tmp_path / "state").mkdir()
    child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, kind, str(target),
                            str(tmp_path / "state")], capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    # The first chunk is durable, the second is gone whole; the kill came before the
    # announcement (a rerun makes it).
    assert [reg.get_device(n).status for n in range(1, 6)] == \
        [REVOKED, REVOKED, "committed", "committed", "committed"]
    assert not any(c.revoked for n in (3, 4, 5) for c in reg.certificates(n))
    assert _verify(reg).entries == start + 4
    service = _service(reg, tmp_path / "state")
    again = service.revoke_devices([1, 2, 3, 4, 5], "keyCompromise", chunk=2)
    assert again[1] == again[2] == [] and all(len(again[n]) == 2 for n in (3, 4, 5))
    assert read_event(service.events_path) == 1
    per_certificate(reference, [1, 2, 3, 4, 5], "keyCompromise", "")
    assert _state(reg, 5) == _state(reference, 5)
    assert _verify(reg).entries == start + 10


def _blocked_append(registry):
    """Make `registry`'s next audit append wait (inside its transaction, its device rows
    locked) until released.  Returns (entered, release) events."""
    entered, release = threading.Event(), threading.Event()
    real = registry._append_all

    def append_all(conn, fields_list):
        entered.set()
        assert release.wait(30)
        return real(conn, fields_list)

    registry._append_all = append_all
    return entered, release


def _wait_for_a_lock_wait(conninfo):
    """Until some session of the database waits on a row lock (bounded)."""
    deadline = time.monotonic() + 20
    with psycopg.connect(conninfo, autocommit=True) as conn:
        while time.monotonic() < deadline:
            if conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND wait_event_type = 'Lock'").fetchone()[0]:
                return
            time.sleep(0.02)
    raise AssertionError("no session waits on a lock")


def _run(fn, out):
    def target():
        try:
            out.append(fn())
        except Exception as exc:  # noqa: BLE001 - checked by the test
            out.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def test_a_concurrent_single_revocation_is_never_doubled_on_postgresql(make_registry,
                                                                       tmp_path):
    reg = make_registry("postgresql")
    _populate(reg, _certificates(3))
    conninfo = reg.conninfo
    identity_2 = "%x" % (0x7F000000 + 2)
    # 1. The single revocation (another process) holds device 2 first: the bulk waits on
    # its row lock, then reads the certificate again and skips it.
    single = _pg_registry(conninfo)
    bulk = _pg_registry(conninfo)
    try:
        entered, release = _blocked_append(single)
        first, second = [], []
        one = _run(lambda: single.mark_revoked(identity_2, "superseded"), first)
        assert entered.wait(20)
        service = _service(bulk, tmp_path / "state")
        many = _run(lambda: service.revoke_devices([1, 2, 3], "keyCompromise"), second)
        _wait_for_a_lock_wait(conninfo)
        release.set()
        one.join(30)
        many.join(30)
        assert isinstance(first[0], audit.AuditEntry), first
        assert second[0][2] == ["%x" % (0x55000000 + 2)], second  # identity 2 skipped
        assert reg.certificate_status(identity_2).revocation_reason == "superseded"
    finally:
        single.close()
        bulk.close()
    # 2. The bulk holds devices 1-3 first: the single one waits, then is refused.
    reg.add_certificate(3, contract.make_cert(3, cert_serial=0x66000003), "operational")
    reg.add_certificate(2, contract.make_cert(2, cert_serial=0x66000002), "operational")
    single = _pg_registry(conninfo)
    bulk = _pg_registry(conninfo)
    try:
        entered, release = _blocked_append(bulk)
        first, second = [], []
        service = _service(bulk, tmp_path / "state")
        many = _run(lambda: service.revoke_devices([2, 3], "keyCompromise"), second)
        assert entered.wait(20)
        one = _run(lambda: single.mark_revoked("66000003", "superseded"), first)
        _wait_for_a_lock_wait(conninfo)
        release.set()
        many.join(30)
        one.join(30)
        assert second[0] == {2: ["66000002"], 3: ["66000003"]}, second
        assert isinstance(first[0], RegistryError) and first[0].reason == RegistryError.STATE
    finally:
        single.close()
        bulk.close()
    revoked = [e.fields["cert_serial"] for n in (1, 2, 3) for e in reg.audit_entries_for(n)
               if e.type == "revoke"]
    assert sorted(revoked) == sorted(set(revoked)) and len(revoked) == 8
    assert _verify(reg).by_type == {"injection": 3, "issuance": 5, "revoke": 8}


def test_a_chunk_ended_by_the_servers_deadlock_detection_runs_again(make_registry, tmp_path):
    """A group-commit batch holds the audit chain's head and then wants a device row a
    chunk holds, while the chunk waits for the head: PostgreSQL ends one side of the
    cycle.  When that is the chunk, nothing of it was written and it runs again."""
    reg = make_registry("postgresql")
    _populate(reg, _certificates(3))
    service = _service(reg, tmp_path / "state")
    runs = []
    real = reg._write_revocations

    def write_revocations(conn, certs, *args):  # the runs that have something to revoke
        runs.extend([1] if certs else [])
        return real(conn, certs, *args)

    reg._write_revocations = write_revocations
    with psycopg.connect(reg.conninfo) as writer:  # the other writer, in a transaction
        # Its deadlock check waits 10 s, the chunk's 1 s: the chunk is the side ended.
        writer.execute("SET deadlock_timeout = '10s'")
        writer.execute("SELECT entry_count FROM audit_head WHERE id = 1 FOR UPDATE")
        out = []
        bulk = _run(lambda: service.revoke_devices([1, 2, 3], "keyCompromise"), out)
        _wait_for_a_lock_wait(reg.conninfo)  # the chunk holds devices 1-3, waits for the head
        writer.execute("SELECT serial FROM devices WHERE serial = 2 FOR UPDATE")
        writer.rollback()
        bulk.join(30)
    # (Order within a device: by added_at, equal under the fixed test clock.)
    assert [{n: sorted(done) for n, done in out[0].items()}] == [
        {n: ["%x" % (0x55000000 + n), "%x" % (0x7F000000 + n)] for n in (1, 2, 3)}], out
    assert len(runs) == 2
    assert [reg.get_device(n).status for n in (1, 2, 3)] == [REVOKED] * 3
    assert _verify(reg).by_type == {"injection": 3, "issuance": 3, "revoke": 6}


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_certificate_added_while_a_chunk_is_written_is_revoked_too(make_registry, kind,
                                                                     tmp_path):
    """An EST re-enrolment that passed its checks before the chunk and records its
    certificate after the chunk's transaction: the devices are revoked again, and the
    new certificate with them (a third transaction finds nothing left)."""
    reg = make_registry(kind)
    _populate(reg, _certificates(3))
    late = contract.make_cert(2, cert_serial=0x66000002)
    real = reg.mark_devices_revoked
    calls = []

    def with_a_late_certificate(*args, **kwargs):
        done = real(*args, **kwargs)
        if not calls:
            reg.add_certificate(2, late, "operational")  # after the chunk's commit
        calls.append(1)
        return done

    reg.mark_devices_revoked = with_a_late_certificate
    done = _service(reg, tmp_path / "state").revoke_devices([1, 2, 3], "keyCompromise")
    assert "66000002" in done[2] and len(calls) == 3
    assert all(record.revoked for n in (1, 2, 3) for record in reg.certificates(n))
    assert _verify(reg).by_type == {"injection": 3, "issuance": 4, "revoke": 7}
