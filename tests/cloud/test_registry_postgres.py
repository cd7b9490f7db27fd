"""The PostgreSQL registry backend on a throwaway PostgreSQL server started by this module
(bench/_pg_support.ThrowawayPostgres: initdb + pg_ctl on a unix socket in a temporary
directory, as a non-root user when run as root): the registry contract tests of test_registry.py run against it unchanged, plus
what only a shared server shows (two handles = two stateless processes) and the cloud
services (EST + verifier) on top of it.

Skips locally when the PostgreSQL server binaries or psycopg are missing; fails under
CI=true (tests.conftest.require).
"""

import os
import threading
import time

import pytest

from bench._pg_support import ThrowawayPostgres, missing
from fleetid.cloud.registry import RegistryError
from tests.cloud import test_registry as contract
from tests.cloud import test_registry_group_commit as group_commit_tests
from tests.conftest import require

try:
    import psycopg
except ImportError:  # pragma: no cover
    psycopg = None

# The contract tests that take the `registry` fixture: collected here again, where the
# fixture below hands them a PostgresRegistry.
CONTRACT_TESTS = [
    "test_serials_are_monotonic_and_unique_under_parallel_stations",
    "test_an_intent_needs_an_allocated_serial_and_is_written_once",
    "test_commit_writes_identity_certificate_and_audit_entry",
    "test_commit_refuses_an_audit_entry_for_another_device_or_cert",
    "test_commit_only_from_intent_and_one_live_identity_per_chip",
    "test_parallel_stations_build_one_linear_chain",
    "test_crash_reconciliation_revokes_the_orphan_certificate",
    "test_revoking_the_identity_certificate_revokes_the_device",
    "test_certificate_history_rotation_state_and_ambiguous_serials",
    "test_a_held_and_reworked_chip_has_several_records",
    "test_checkpoints_in_the_registry_verify_and_must_match_the_stored_chain",
    "test_allocate_intent_is_one_transaction_with_fresh_serials",
    "test_allocate_intent_serials_are_unique_under_parallel_stations",
    "test_commit_accepts_the_identity_certificate_added_before_it",
    "test_add_certificate_with_rotation_state_is_one_write",
    "test_acknowledge_rotation_reads_decides_and_writes_in_one_transaction",
    "test_certificate_and_device_is_one_read_matching_the_two_reads",
    "test_certificate_serials_lists_an_issuers_unexpired_certificates_in_pages",
]
for _name in CONTRACT_TESTS:
    if hasattr(contract, _name):
        globals()[_name] = getattr(contract, _name)
# Group commit on PostgreSQL: one transaction per batch, each op in a savepoint.
GROUP_COMMIT_TESTS = [
    "test_concurrent_commits_share_one_durable_transaction",
    "test_an_op_refused_inside_a_batch_leaves_the_others_committed",
    "test_a_caller_whose_op_never_starts_withdraws_it_and_nothing_is_written",
]
for _name in GROUP_COMMIT_TESTS:
    globals()[_name] = getattr(group_commit_tests, _name)


@pytest.fixture(scope="module")
def pg_cluster():
    """A throwaway cluster (bench/_pg_support.ThrowawayPostgres, fsync off)."""
    lacking = missing()
    require(not lacking, "; ".join(lacking))
    with ThrowawayPostgres(durable=False) as pg:
        yield pg


@pytest.fixture(scope="module")
def pg_server(pg_cluster):
    """The libpq conninfo of the cluster's maintenance database."""
    return pg_cluster.admin_conninfo


@pytest.fixture
def database(pg_cluster):
    """A fresh database per test; yields its conninfo."""
    yield pg_cluster.new_database()


@pytest.fixture
def registry(database):
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    reg = PostgresRegistry(database, wall_clock=lambda: contract.T0)
    yield reg
    reg.close()


def test_two_handles_are_two_stateless_processes_sharing_serials_and_one_chain(database):
    from fleetid.cloud import audit
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    handles = [PostgresRegistry(database, wall_clock=lambda: contract.T0) for _ in range(2)]
    try:
        serials = []
        lock = threading.Lock()

        def station(index):
            for _ in range(10):
                serial = contract.provision(handles[index % 2])
                with lock:
                    serials.append(serial)

        threads = [threading.Thread(target=station, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(serials) == list(range(1, 41))
        count, head, lines = handles[0].audit_snapshot()
        report = audit.verify_log(lines, contract.LINE.public_key(),
                                  contract.WITNESS.public_key(), expected_count=count,
                                  expected_head=head)
        assert report.entries == 40
        assert handles[1].head() == (count, head)
    finally:
        for handle in handles:
            handle.close()


def test_open_errors_are_registry_errors(pg_server):
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    with pytest.raises(RegistryError) as info:
        PostgresRegistry(pg_server.replace("dbname=postgres", "dbname=does_not_exist"),
                         connect_timeout_s=5)
    assert info.value.reason == RegistryError.STORAGE
    assert "does_not_exist" not in str(info.value)


def _terminate_backends(database):
    """End every other session of the test's database from the server side, as a restart
    does (FATAL 57P01, then the socket closed).  Returns how many were ended."""
    name = database.rsplit("dbname=", 1)[1]
    others = "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
    with psycopg.connect(database, autocommit=True) as admin:
        ended = admin.execute("SELECT count(pg_terminate_backend(pid)) " + others,
                              (name,)).fetchone()[0]
        # pg_terminate_backend only signals: wait (bounded) until those backends are gone.
        end = time.monotonic() + 10
        while admin.execute("SELECT count(*) " + others, (name,)).fetchone()[0]:
            assert time.monotonic() < end, "terminated backends still listed"
            time.sleep(0.01)
    return ended


def test_a_connection_the_server_ended_is_replaced_before_the_next_operation(registry,
                                                                              database):
    """After a PostgreSQL restart every worker thread holds a dead connection: the next
    operation on it must open a new one, not answer "unavailable" once per thread."""
    serial = contract.provision(registry)
    registry.mark_revoked(registry.certificates(serial)[-1].cert_serial, "keyCompromise")
    # Ended from the server side while idle: the next read and the next write still work,
    # and what they see is what was committed before.
    for operation in (lambda: registry.get_device(serial).status,
                      lambda: contract.provision(registry)):
        assert _terminate_backends(database) >= 1
        assert operation()
    assert registry.get_device(serial).status == "revoked"
    assert registry.get_device(serial + 1).serial == serial + 1


def test_a_live_idle_connection_is_kept_across_operations(database):
    """The check costs no reconnection while the server keeps the connection, also on a
    descriptor above 1023 (a server process with many client sockets open: select()
    cannot watch those), and a replaced connection is not kept."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1100:
        require(hard >= 1100, "RLIMIT_NOFILE hard limit %d < 1100" % hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1100, hard))
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    fillers = []
    registry = None
    try:
        while not fillers or fillers[-1] < 1030:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        registry = PostgresRegistry(database, wall_clock=lambda: contract.T0)
        contract.provision(registry)
        conn = registry._conn()
        assert conn.pgconn.socket >= 1024
        serial = contract.provision(registry)
        registry.get_device(serial)
        assert registry._conn() is conn and not conn.closed
        held = len(registry._connections)
        _terminate_backends(database)
        registry.get_device(serial)
        assert registry._conn() is not conn and len(registry._connections) == held
    finally:
        if registry is not None:
            registry.close()
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_est_and_verifier_run_on_postgresql(database, tmp_path):
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry
    from fleetid.cloud.verifier.errors import AccessRefused
    from tests.cloud.cloud_support import Fleet, der

    fleet = Fleet(tmp_path, registry_kind=PostgresRegistry(database))
    try:
        device = fleet.provision()
        old = fleet.enrol(device)
        _, csr = device.csr()
        new = fleet.est.enroll("b42", der(old), csr, reenroll=True)
        assert fleet.verifier.verify(der(old)).in_overlap
        assert fleet.verifier.verify(der(new)).kind == "operational"
        fleet.revoke_certificate(new, "keyCompromise")
        with pytest.raises(AccessRefused) as info:
            fleet.verifier.verify(der(new))
        assert info.value.reason == "revoked"
        assert [c.kind for c in fleet.registry.certificates(device.serial)] == \
            ["identity", "operational", "operational"]
    finally:
        fleet.close()


def _uri(conninfo):
    """The libpq keyword conninfo of the fixtures as a postgresql:// URI (unix socket)."""
    fields = dict(part.split("=", 1) for part in conninfo.split())
    return "postgresql://%s@/%s?host=%s" % (fields["user"], fields["dbname"], fields["host"])


def test_open_registry_serves_postgresql(database):
    from fleetid.cloud.registry import open_registry
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    for uri in (_uri(database), _uri(database).replace("postgresql:", "postgres:", 1)):
        with open_registry(uri) as reg:
            assert isinstance(reg, PostgresRegistry)
            assert reg.head()[0] == 0


def test_line_run_and_audit_verify_on_postgresql(database, tmp_path):
    """`fleetid line run --registry postgresql://...` and `fleetid audit verify` against
    the same PostgreSQL registry (issue 10: one open_registry for every command)."""
    from click.testing import CliRunner

    from fleetid.cli.main import cli
    from tests.cloud.hsm_support import KEYSTORE_PASS

    uri = _uri(database)
    out = str(tmp_path / "line")
    env = {"FLEETID_KEYSTORE_PASS": KEYSTORE_PASS}
    run = CliRunner().invoke(cli, ["line", "run", "--devices", "3", "--stations", "2",
                                   "--registry", uri, "--out", out], env=env)
    assert run.exit_code == 0, run.output
    assert not os.path.exists(os.path.join(out, "registry.db"))
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM devices WHERE status = 'committed'"
                            ).fetchone()[0] == 3
    pki = os.path.join(out, "pki")
    verify = CliRunner().invoke(cli, [
        "audit", "verify", "--registry", uri,
        "--line-pub", os.path.join(pki, "audit-line.pub.pem"),
        "--witness-pub", os.path.join(pki, "audit-witness.pub.pem"),
        "--witness-anchor", os.path.join(out, "witness", "anchor.json")])
    assert verify.exit_code == 0, verify.output
    assert verify.output.startswith("OK ")
    show = CliRunner().invoke(cli, ["audit", "show", "--serial", "1", "--registry", uri])
    assert show.exit_code == 0, show.output


def test_cloud_serve_opens_postgresql_through_open_registry(database, tmp_path):
    from fleetid.cloud.config import load_config
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry
    from fleetid.cloud.server import build_context
    from tests.cloud.hsm_support import KEYSTORE_PASS

    config = load_config(None, environ={"FLEETID_CLOUD_STATE_DIR": str(tmp_path / "cloud"),
                                        "FLEETID_CLOUD_REGISTRY": _uri(database)})
    context = build_context(config, dict(os.environ, FLEETID_KEYSTORE_PASS=KEYSTORE_PASS))
    try:
        assert isinstance(context.registry, PostgresRegistry)
    finally:
        context.close()
