"""Opening a registry beside live writers, and the schema's migrations (issue 19):

- a registry whose schema is current opens with reads only: no DDL, no schema lock, so a
  `fleetid revoke` or a second worker started under load cannot deadlock with the
  writers (CREATE INDEX IF NOT EXISTS took SHARE locks table after table on PostgreSQL);
- version 3 adds the index serving "revoked certificates of one issuer" (the CRL, OCSP
  and compact-set rebuilds), which the real query uses on both databases;
- `fleetid registry migrate` applies pending migrations explicitly and reports versions.

SQLite here; the PostgreSQL cases at the end run on the throwaway cluster of
test_registry_postgres.py (skip locally without it, fail under CI=true).
"""

import json
import sqlite3
import threading

import pytest
from click.testing import CliRunner

from fleetid.cli.main import cli
from fleetid.cloud.registry import RegistryError, schema
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
from tests.cloud import test_registry as contract
from tests.cloud.test_registry_postgres import _uri, database, pg_cluster, pg_server  # noqa: F401

try:
    import psycopg
except ImportError:  # pragma: no cover
    psycopg = None

REVOKED_QUERY = ("SELECT cert_serial FROM certificates WHERE issuer = ? AND revoked_at IS NOT "
                 "NULL ORDER BY cert_serial")


def _old_schema(execute, dialect, version):
    """The schema as code of `version` (1 or 2) left it."""
    for statement in schema.statements(dialect):
        execute(statement)
    for target in range(2, version + 1):
        for statement in schema.statements(dialect, schema.MIGRATIONS[target]):
            execute(statement)
        execute("INSERT INTO schema_history (version, applied_at) VALUES (%d, "
                "'2026-01-01T00:00:00Z')" % target)
    execute("UPDATE registry_meta SET value = '%d' WHERE name = 'schema_version'" % version)


def _v2_sqlite(path):
    conn = sqlite3.connect(path)
    _old_schema(conn.execute, "sqlite", 2)
    conn.commit()
    conn.close()


def _migrate(*args):
    return CliRunner().invoke(cli, ["registry", "migrate", *args])


def test_a_current_registry_opens_while_another_process_holds_the_write_lock(tmp_path):
    path = tmp_path / "registry.db"
    SqliteRegistry(path).close()
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a writer mid-transaction (a station, a worker)
    try:
        # Opening used to run the schema's DDL in a write transaction: it waited for the
        # writer and failed after the busy timeout.  Now it only reads the version.
        reg = SqliteRegistry(path, busy_timeout_s=0.2)
        assert reg.schema_version() == schema.SCHEMA_VERSION
        reg.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_version_3_adds_the_revoked_per_issuer_index_and_the_query_uses_it(tmp_path):
    path = tmp_path / "registry.db"
    _v2_sqlite(path)
    with SqliteRegistry(path, wall_clock=lambda: contract.T0) as reg:
        serial = contract.provision(reg)
        record = reg.certificates(serial)[0]
        reg.mark_revoked(record.cert_serial, "keyCompromise", issuer=record.issuer)
        assert [r.cert_serial for r in reg.revoked_certificates(record.issuer)] \
            == [record.cert_serial]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM registry_meta WHERE name = 'schema_version'"
                        ).fetchone()[0] == "3"
    assert [r[0] for r in conn.execute("SELECT version FROM schema_history ORDER BY version")
            ] == [2, 3]
    plan = " ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + REVOKED_QUERY, ("x",)))
    assert "certificates_revoked_by_issuer" in plan, plan
    conn.close()


def test_registry_migrate_applies_pending_versions_once_and_reports_them(tmp_path):
    path = tmp_path / "registry.db"
    _v2_sqlite(path)
    uri = "sqlite:%s" % path
    check = _migrate("--check", "--registry", uri)
    assert check.exit_code == 1 and json.loads(check.output) == {
        "current": 2, "code": 3, "pending": True}
    # --check wrote nothing
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT max(version) FROM schema_history").fetchone()[0] == 2
    conn.close()
    first = _migrate("--registry", uri)
    assert first.exit_code == 0, first.output
    assert json.loads(first.output) == {"before": 2, "after": 3, "applied": [3]}
    again = _migrate("--registry", uri)
    assert json.loads(again.output) == {"before": 3, "after": 3, "applied": []}
    assert _migrate("--check", "--registry", uri).exit_code == 0
    fresh = _migrate("--registry", "sqlite:%s" % (tmp_path / "new.db"))
    assert json.loads(fresh.output) == {"before": None, "after": 3, "applied": [2, 3]}


def test_registry_migrate_refuses_a_newer_database_untouched(tmp_path):
    path = tmp_path / "registry.db"
    SqliteRegistry(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE registry_meta SET value = '9' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    for args in ((), ("--check",)):
        result = _migrate(*args, "--registry", "sqlite:%s" % path)
        assert result.exit_code == 1 and "knows up to 3" in result.output, result.output
    with pytest.raises(RegistryError) as info:
        SqliteRegistry(path)
    assert info.value.reason == RegistryError.SCHEMA


# -- PostgreSQL ---------------------------------------------------------------------------


def _pg_registry(conninfo, **kwargs):
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    return PostgresRegistry(conninfo, wall_clock=lambda: contract.T0, **kwargs)


def test_a_current_postgres_registry_opens_beside_an_open_write_on_certificates(database):
    _pg_registry(database).close()
    with psycopg.connect(database) as writer:  # a transaction left open on certificates
        writer.execute("UPDATE certificates SET revocation_reason = NULL WHERE false")
        writer.execute("LOCK TABLE devices IN ROW EXCLUSIVE MODE")
        # CREATE INDEX IF NOT EXISTS needs SHARE on both tables: it used to wait here
        # until lock_timeout (RegistryError(STORAGE)), or deadlock with the writer.
        reg = _pg_registry(database, lock_timeout_s=0.5)
        assert reg.schema_version() == schema.SCHEMA_VERSION
        reg.close()
        writer.rollback()


def test_opening_registries_during_concurrent_writes_never_deadlocks(database):
    """Writers commit devices, add certificates and revoke while other threads open and
    close registries over and over (what workers starting and `fleetid revoke` under load
    do): every write succeeds."""
    writer = _pg_registry(database)
    serials = [contract.provision(writer) for _ in range(4)]
    failures, stop = [], threading.Event()

    def write(index):
        try:
            for round_ in range(8):
                serial = contract.provision(writer)
                cert = contract.make_cert(serial, cert_serial=0x50000000 + index * 100 + round_)
                writer.add_certificate(serials[index], cert, "operational")
                record = writer.certificates(serial)[0]
                writer.mark_revoked(record.cert_serial, "superseded", issuer=record.issuer)
        except Exception as exc:  # noqa: BLE001 - the test's finding
            failures.append(repr(exc))

    def open_and_close():
        while not stop.is_set():
            try:
                reg = _pg_registry(database, group_commit=False)
                reg.revoked_certificates(contract.CA_NAME.rfc4514_string())
                reg.close()
            except Exception as exc:  # noqa: BLE001
                failures.append("open: " + repr(exc))

    writers = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    openers = [threading.Thread(target=open_and_close) for _ in range(2)]
    for thread in openers + writers:
        thread.start()
    for thread in writers:
        thread.join(120)
    stop.set()
    for thread in openers:
        thread.join(60)
    writer.close()
    assert failures == []


def test_a_version_2_postgres_registry_migrates_and_the_revoked_query_uses_the_index(
        database):
    with psycopg.connect(database, autocommit=True) as conn:
        _old_schema(conn.execute, "postgresql", 2)
    result = _migrate("--registry", _uri(database))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"before": 2, "after": 3, "applied": [3]}
    with psycopg.connect(database) as conn:
        conn.execute("SET enable_seqscan = off")  # a tiny table: ask which index serves it
        plan = " ".join(r[0] for r in conn.execute(
            "EXPLAIN " + REVOKED_QUERY.replace("?", "%s"), ("x",)))
    assert "certificates_revoked_by_issuer" in plan, plan
