"""The state several cloud processes share, in the registry's database (schema version 2,
cloud/registry/shared_state.py): attestation nonces, EST approvals, the revocation event
sequence; and the forward migration that adds them to an existing registry.

SQLite here (two handles on one file are two processes' views; the nonce race below runs
in real processes); the same tables on PostgreSQL: test_workers_postgres.py."""

import datetime
import multiprocessing
import sqlite3

import pytest

from fleetid.cloud.ca.errors import NonceRefused
from fleetid.cloud.ca.nonces import RegistryNonceStore
from fleetid.cloud.registry import RegistryError, schema
from fleetid.cloud.registry.shared_state import shared_tables
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
from tests.cloud import test_registry as contract

NOW = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.timezone.utc)
TTL = datetime.timedelta(minutes=5)


def _v1_registry(path):
    """A registry database as version 1 made it (the released schema, no migration)."""
    conn = sqlite3.connect(path)
    for statement in schema.statements("sqlite"):
        conn.execute(statement)
    conn.commit()
    conn.close()


def test_a_version_1_registry_is_migrated_forward_once_and_keeps_its_records(tmp_path):
    path = tmp_path / "registry.db"
    _v1_registry(path)
    with SqliteRegistry(path, wall_clock=lambda: contract.T0) as reg:
        serial = contract.provision(reg)
        assert reg.head()[0] == 1
    # The v1 schema text of old code applied again (CREATE IF NOT EXISTS): harmless.
    _v1_registry(path)
    for _ in range(2):
        SqliteRegistry(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM registry_meta WHERE name = 'schema_version'"
                        ).fetchone()[0] == str(schema.SCHEMA_VERSION) == "3"
    assert conn.execute("SELECT version FROM schema_history ORDER BY version"
                        ).fetchall() == [(2,), (3,)]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"ca_nonces", "est_approvals", "revocation_events", "schema_history"} <= tables
    conn.close()
    with SqliteRegistry(path) as reg:
        assert reg.get_device(serial).status == "committed"


def test_a_registry_newer_than_the_code_is_refused_untouched(tmp_path):
    path = tmp_path / "registry.db"
    SqliteRegistry(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE registry_meta SET value = '4' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError) as info:
        SqliteRegistry(path)
    assert info.value.reason == RegistryError.SCHEMA and "knows up to 3" in str(info.value)


def test_a_nonce_issued_through_one_handle_is_consumed_once_through_another(tmp_path):
    a, b = (SqliteRegistry(tmp_path / "registry.db") for _ in range(2))
    try:
        store_a = RegistryNonceStore(shared_tables(a).nonces("ca-b42"))
        store_b = RegistryNonceStore(shared_tables(b).nonces("ca-b42"))
        other_ca = RegistryNonceStore(shared_tables(b).nonces("ca-b43"))
        nonce = bytes(range(32))
        store_a.add(nonce, NOW, NOW + TTL)
        with pytest.raises(ValueError):
            store_b.add(nonce, NOW, NOW + TTL)
        with pytest.raises(NonceRefused) as info:
            other_ca.consume(nonce, NOW, b"k" * 32)  # another CA's store: unknown there
        assert info.value.reason == "nonce_unknown"
        store_b.consume(nonce, NOW + datetime.timedelta(seconds=1), b"k" * 32)
        with pytest.raises(NonceRefused) as info:
            store_a.consume(nonce, NOW + datetime.timedelta(seconds=2), b"x" * 32)
        assert info.value.reason == "nonce_replayed"
        assert store_a.binding(nonce)[1] == b"k" * 32  # the first binding stays
        late = bytes(32)
        store_a.add(late, NOW, NOW + TTL)
        with pytest.raises(NonceRefused) as info:
            store_b.consume(late, NOW + TTL, b"k" * 32)
        assert info.value.reason == "nonce_expired"
        assert store_b.binding(late) is None  # an expired nonce is not consumed
        with pytest.raises(NonceRefused) as info:
            store_b.consume(b"\x01" * 32, NOW, b"k" * 32)
        assert info.value.reason == "nonce_unknown"
        assert store_a.purge(NOW + TTL) == 1  # the expired unused one; the used one stays
        assert store_a.binding(nonce) is not None
        # Expired unused nonces are purged as the store issues (every PURGE_EVERY adds).
        store_a.PURGE_EVERY = 3
        for index in range(3):
            store_a.add(bytes([9, index]) * 16, NOW, NOW + TTL)
        store_a.add(b"\x0a" * 32, NOW + TTL, NOW + 2 * TTL)  # the 6th add of store_a: purges
        with pytest.raises(NonceRefused) as info:
            store_b.consume(bytes([9, 0]) * 16, NOW + TTL, b"k" * 32)
        assert info.value.reason == "nonce_unknown"
    finally:
        a.close()
        b.close()


def _race(path, nonce_hex, results):
    reg = SqliteRegistry(path)
    try:
        RegistryNonceStore(shared_tables(reg).nonces("ca")).consume(
            bytes.fromhex(nonce_hex), NOW, b"p" * 32)
        results.put("consumed")
    except NonceRefused as exc:
        results.put(exc.reason)
    finally:
        reg.close()


def test_one_nonce_raced_by_four_processes_is_consumed_by_exactly_one(tmp_path):
    path = str(tmp_path / "registry.db")
    with SqliteRegistry(path) as reg:
        RegistryNonceStore(shared_tables(reg).nonces("ca")).add(b"\x07" * 32, NOW, NOW + TTL)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=_race, args=(path, "07" * 32, results))
                 for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(30)
    assert outcomes == ["consumed"] + ["nonce_replayed"] * 3


def test_concurrent_nonce_consumptions_share_group_commits_and_are_each_durable(tmp_path):
    # EST requests consume their nonces at the same moment: through the registry's group
    # commit writer they share fsyncs; each result is durable (another handle sees it) and
    # one nonce raced by threads is still consumed once.
    import threading

    path = tmp_path / "registry.db"
    with SqliteRegistry(path) as reg, SqliteRegistry(path) as other:
        store = RegistryNonceStore(shared_tables(reg).nonces("ca-b42"))
        nonces = [bytes([n]) * 32 for n in range(16)]
        for nonce in nonces:
            store.add(nonce, NOW, NOW + TTL)
        group = reg.group_commit
        batches, ops = group.batches, group.ops
        outcomes = []
        barrier = threading.Barrier(20)

        def consume(nonce):
            barrier.wait(10)
            try:
                store.consume(nonce, NOW, b"k" * 32)
                outcomes.append("consumed")
            except NonceRefused as exc:
                outcomes.append(exc.reason)

        threads = [threading.Thread(target=consume, args=(n,))
                   for n in nonces + [nonces[0]] * 4]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(outcomes) == ["consumed"] * 16 + ["nonce_replayed"] * 4
        assert group.ops - ops == 20 and group.batches - batches < 20
        seen = RegistryNonceStore(shared_tables(other).nonces("ca-b42"))
        assert all(seen.binding(n)[1] == b"k" * 32 for n in nonces)


def test_approvals_given_through_one_handle_are_honoured_through_another(tmp_path):
    a, b = (SqliteRegistry(tmp_path / "registry.db") for _ in range(2))
    try:
        approvals_a, approvals_b = shared_tables(a).approvals, shared_tables(b).approvals
        assert approvals_a.request("b42-approval", "7") is False  # asked: pending
        assert approvals_a.request("b42-approval", "7") is False  # asked again: one row
        assert approvals_b.pending() == [("b42-approval", "7")]
        approvals_b.approve("b42-approval", "7")
        assert approvals_a.pending() == []
        assert approvals_a.request("b42-approval", "7") is True
        approvals_a.consume("b42-approval", "7")
        assert approvals_b.request("b42-approval", "7") is False  # used: asks again
        events_a, events_b = shared_tables(a).revocation_events, shared_tables(b).revocation_events
        assert events_b.current() == 0
        assert events_a.bump() == 1 and events_b.current() == 1
    finally:
        a.close()
        b.close()


def test_a_revocation_announced_by_one_process_reaches_another_through_the_registry(tmp_path):
    """Processes without a shared state directory (other hosts) see the announcement
    through the registry's event sequence, looked at once per interval."""
    from fleetid.cloud.revocation.service import RegistryEventWatcher, RevocationService

    writer, reader = (SqliteRegistry(tmp_path / "registry.db") for _ in range(2))
    try:
        now = [100.0]
        seen = []
        watcher = RegistryEventWatcher(shared_tables(reader).revocation_events,
                                       lambda: seen.append(1), interval=1.0,
                                       clock=lambda: now[0])
        assert watcher.poll() is False
        service = RevocationService(writer, [], str(tmp_path / "host-a" / "revoked.jsonl"),
                                    str(tmp_path / "host-a" / "revocation.events"))
        service._announce()  # what every revoke_* does after its write
        assert watcher.poll() is False  # within the interval: no query
        now[0] += 1.0
        assert watcher.poll() is True and seen == [1]
        now[0] += 1.0
        assert watcher.poll() is False and seen == [1]
    finally:
        writer.close()
        reader.close()
