"""`fleetid audit verify` and `fleetid audit show` over a file log and a registry."""

import datetime
import json
import sqlite3

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from fleetid.cli.main import cli
from fleetid.cloud import audit
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
from tests.cloud.test_registry import CA_NAME, LINE, T0, WITNESS, provision


def _pem(path, signer):
    path.write_bytes(signer.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(path)


@pytest.fixture
def keys(tmp_path):
    return ["--line-pub", _pem(tmp_path / "line.pem", LINE),
            "--witness-pub", _pem(tmp_path / "witness.pem", WITNESS)]


@pytest.fixture
def registry_db(tmp_path):
    path = tmp_path / "line.db"
    with SqliteRegistry(path, wall_clock=lambda: T0) as reg:
        for _ in range(3):
            provision(reg, station="line-2/st-4")
        audit.Checkpointer(reg, LINE, WITNESS, wall_clock=lambda: T0).checkpoint()
        serial = provision(reg)
        reg.hold(serial, "QA sample", station="qa", operator="op-9")
    return path


def run(*args):
    return CliRunner().invoke(cli, ["audit", *args], catch_exceptions=False)


AT_T0 = "--at=" + datetime.datetime.fromtimestamp(
    T0 + 60, datetime.timezone.utc).isoformat()  # a minute after the fixture's entries


def test_verify_a_registry_prints_ok_with_counts(registry_db, keys):
    result = run("verify", AT_T0, "--registry", "sqlite:%s" % registry_db, *keys)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK ")
    assert "6 entries (checkpoint 1, hold 1, injection 4), 1 checkpoints" in result.output
    assert "2 entries are not yet covered by a checkpoint" in result.output


def test_verify_names_the_first_bad_entry_and_exits_1(registry_db, keys, tmp_path):
    export = tmp_path / "export.jsonl"
    with SqliteRegistry(registry_db) as reg:
        audit.export_lines(reg.iter_audit_lines(), export)
    lines = export.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"line-2/st-4", b"line-2/st-5")
    export.write_bytes(b"".join(lines))
    result = run("verify", AT_T0, "--log", str(export), *keys)
    assert result.exit_code == 1
    assert "first bad entry 1: hash" in result.output
    result = run("verify", AT_T0, "--log", str(export), "--json", *keys)
    assert json.loads(result.output) == {"ok": False, "source": str(export), "index": 1,
                                         "reason": "hash", "detail": ""}


def test_verify_a_file_catches_truncation_only_with_an_expected_count(registry_db, keys,
                                                                      tmp_path):
    export = tmp_path / "export.jsonl"
    with SqliteRegistry(registry_db) as reg:
        audit.export_lines(list(reg.iter_audit_lines())[:5], export)
    assert run("verify", AT_T0, "--log", str(export), *keys).exit_code == 0
    result = run("verify", AT_T0, "--log", str(export), "--expect-count", "6", *keys)
    assert result.exit_code == 1 and "first bad entry 5: truncated" in result.output


def test_show_answers_for_one_device(registry_db, keys):
    result = run("show", "--serial", "2", "--registry", "sqlite:%s" % registry_db, *keys)
    assert result.exit_code == 0, result.output
    assert "device 2: status committed" in result.output
    assert "station=line-2/st-4 operator=op-7" in result.output
    assert "attestation_sha256=" in result.output and "not verified" not in result.output
    held = run("show", "--serial", "4", "--registry", "sqlite:%s" % registry_db)
    assert "hold serial=4" in held.output and "reason=QA sample" in held.output
    assert "the chain was not verified" in held.output
    as_json = run("show", "--serial", "2", "--registry", "sqlite:%s" % registry_db, "--json")
    assert json.loads(as_json.output)["serial"] == 2


def test_user_errors_are_reported_not_raised(registry_db, keys, tmp_path):
    missing = run("show", "--serial", "99", "--registry", "sqlite:%s" % registry_db)
    assert missing.exit_code == 1 and "no audit entries for serial 99" in missing.output
    both = run("verify", AT_T0, "--log", "x", "--registry", "sqlite:y", *keys)
    assert both.exit_code == 2 and "exactly one of" in both.output
    no_db = run("verify", AT_T0, "--registry", "sqlite:%s" % (tmp_path / "nope.db"), *keys)
    assert no_db.exit_code == 1 and "no registry database" in no_db.output
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    bad_key = run("verify", AT_T0, "--registry", "sqlite:%s" % registry_db,
                  "--line-pub", str(garbage), "--witness-pub", str(garbage))
    assert bad_key.exit_code == 1 and "cannot load the line public key" in bad_key.output
    assert "Examples:" in run("verify", "--help").output
    assert "Examples:" in run("show", "--help").output


def test_a_witness_anchor_catches_a_consistent_rewrite_of_table_and_head_row(registry_db,
                                                                             keys):
    with SqliteRegistry(registry_db) as reg:
        checkpoint = reg.last_checkpoint().fields
    anchor = "%d:%s" % (checkpoint["covers"], checkpoint["head"])
    uri = "sqlite:%s" % registry_db
    assert run("verify", AT_T0, "--registry", uri, "--witness-anchor", anchor,
               *keys).exit_code == 0
    # an insider deletes everything from entry 1 on and moves the head row to match
    conn = sqlite3.connect(registry_db)
    first = conn.execute("SELECT entry_hash FROM audit_log WHERE seq = 0").fetchone()[0]
    conn.execute("DELETE FROM audit_log WHERE seq >= 1")
    conn.execute("UPDATE audit_head SET entry_count = 1, head_hash = ?", (first,))
    conn.commit()
    conn.close()
    assert run("verify", AT_T0, "--registry", uri, *keys).exit_code == 0  # self-consistent now
    result = run("verify", AT_T0, "--registry", uri, "--witness-anchor", anchor, *keys)
    assert result.exit_code == 1 and "first bad entry 1: truncated" in result.output
    bad = run("verify", AT_T0, "--registry", uri, "--witness-anchor", "3:xyz", *keys)
    assert bad.exit_code == 2 and "--witness-anchor" in bad.output


@pytest.mark.parametrize("column,value", [("device_serial", 999), ("device_serial", None),
                                          ("entry_type", "hold"), ("entry_hash", "0" * 64)])
def test_verify_catches_a_changed_index_column_that_hides_a_device(registry_db, keys,
                                                                    column, value):
    """Issue 9, defect 2: the columns stored beside each entry are checked against it."""
    uri = "sqlite:%s" % registry_db
    assert run("show", "--serial", "2", "--registry", uri).exit_code == 0
    conn = sqlite3.connect(registry_db)
    conn.execute("UPDATE audit_log SET %s = ? WHERE seq = 1" % column, (value,))
    conn.commit()
    conn.close()
    result = run("verify", AT_T0, "--registry", uri, *keys)
    assert result.exit_code == 1, result.output
    assert "first bad entry 1: columns (%s)" % column in result.output
    shown = run("show", "--serial", "2", "--registry", uri, *keys)
    assert shown.exit_code == 1 and "does not verify: first bad entry 1: columns" \
        in shown.output


def _at(seconds):
    return "--at=" + datetime.datetime.fromtimestamp(
        T0 + seconds, datetime.timezone.utc).isoformat()


def test_entries_uncovered_longer_than_the_checkpoint_interval_fail_verify(registry_db, keys):
    # The fixture's last checkpoint covers 3 entries; an injection (entry 4) and a hold
    # follow.  Within the interval: OK with a note; past it: FAIL at entry 4.
    source = "sqlite:%s" % registry_db
    assert run("verify", "--registry", source, _at(3599), *keys).exit_code == 0
    result = run("verify", "--registry", source, _at(3700), *keys)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("FAIL %s: first bad entry 4: unanchored" % source)
    assert "more than 3600 s (the checkpoint interval)" in result.output
    result = run("verify", "--registry", source, *keys)  # today: long past
    assert result.exit_code == 1 and "unanchored" in result.output
    result = run("verify", "--registry", source, _at(3700), "--json", *keys)
    assert json.loads(result.output)["reason"] == "unanchored"
    result = run("verify", "--registry", source, _at(3700), "--max-unanchored-age", "7200",
                 *keys)
    assert result.exit_code == 0 and "2 entries are not yet covered" in result.output


def test_an_uncovered_revocation_fails_verify_after_a_minute(tmp_path, keys):
    # The case: entries, a revoke among them, uncovered for 20 minutes.
    path = tmp_path / "revoked.db"
    now = [T0]
    with SqliteRegistry(path, wall_clock=lambda: now[0]) as reg:
        provision(reg)
        audit.Checkpointer(reg, LINE, WITNESS, wall_clock=lambda: now[0]).checkpoint()
        serials = [provision(reg) for _ in range(3)]
        now[0] = T0 + 10
        reg.mark_revoked(0x7F000000 + serials[1], "keyCompromise", operator="op-1",
                         issuer=CA_NAME.rfc4514_string())
        count = reg.head()[0]
    source = "sqlite:%s" % path
    assert run("verify", "--registry", source, _at(60), *keys).exit_code == 0
    result = run("verify", "--registry", source, _at(10 + 20 * 60), *keys)
    assert result.exit_code == 1, result.output
    assert "first bad entry %d: unanchored" % (count - 1) in result.output  # the revoke
    assert "a revocation or CA change, due a checkpoint at once" in result.output
    result = run("verify", "--registry", source, _at(10 + 20 * 60),
                 "--max-unanchored-revocation-age", "3600", *keys)
    assert result.exit_code == 0, result.output
