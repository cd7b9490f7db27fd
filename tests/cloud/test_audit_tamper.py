"""Tampering with a registry's audit chain, exhaustively (issue 9, "must show").

One registry holds every entry type (injection, hold, issuance, rotation_ack, revoke,
reconcile, ca_revoke, checkpoint).  Each test changes a copy of its database the way an
insider with SQL access could: every stored column of every row, one at a time (and every
field inside the hashed entry), the head row, a consistently re-sealed entry, deleted and
reordered rows, and the tail cut off with the head row moved to match.  Every change must
be caught by `verify_registry_log`; the truncations by the witness's anchor, which is the
point of keeping one.
"""

import datetime
import gc
import hashlib
import os
import json
import shutil
import sqlite3

import pytest

from fleetid.cloud import audit
from fleetid.cloud.registry import verify_registry_log
from fleetid.cloud.registry.rotation import RotationState
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
from tests.cloud.test_registry import LINE, T0, WITNESS, make_cert, provision, start_device

_HEX = "0123456789abcdef"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """(database path, witness anchor (covers, head), number of entries)."""
    directory = tmp_path_factory.mktemp("tamper")
    path = directory / "registry.db"
    witness = audit.AnchoringWitness(WITNESS, directory / "anchor.json")
    with SqliteRegistry(path, wall_clock=lambda: T0) as reg:
        checkpointer = audit.Checkpointer(reg, LINE, witness, wall_clock=lambda: T0)
        first = provision(reg)
        second = provision(reg)
        reg.hold(second, "QA sample", station="qa", operator="op-9")
        checkpointer.checkpoint()
        old_fp = reg.get_device(first).identity_fingerprint
        operational = make_cert(first, cert_serial=0x1234)
        new_fp = hashlib.sha256(operational).hexdigest()
        overlap = RotationState.overlap(
            old_fp, new_fp, datetime.datetime.fromtimestamp(T0, datetime.timezone.utc))
        record = reg.add_certificate(first, operational, "operational",
                                     rotation_state=overlap.format(),
                                     operation="simplereenroll", operator="est:0011")
        reg.acknowledge_rotation(first, record.fingerprint)
        reg.mark_revoked(0x7F000000 + second, "keyCompromise", operator="op-1")
        third = start_device(reg)
        reg.reconcile(third, "no-certificate", "crash before issuance", station="line-1",
                      operator="reconcile")
        reg.append_audit(audit.ca_revoke_entry(ca_fingerprint="ab" * 32,
                                               subject="CN=batch 7", reason="cACompromise",
                                               operator="alice", when=T0))
        checkpointer.checkpoint()
        count, _head = reg.head()
        types = {audit.parse_entry(line, i).type
                 for i, line in enumerate(reg.iter_audit_lines())}
    assert types == set(audit.ENTRY_TYPES)  # every type is in the log
    anchor = audit.read_witness_anchor(directory / "anchor.json", WITNESS.public_key())
    return path, anchor, count


def _copy(chain, tmp_path, name):
    path, _anchor, _count = chain
    target = tmp_path / ("%s.db" % name)
    shutil.copyfile(path, target)
    return target


def _verify(db, anchor):
    with SqliteRegistry(db) as reg:
        return verify_registry_log(reg, LINE.public_key(), WITNESS.public_key(),
                                   witness_anchor=anchor)


def _caught(db, anchor, what):
    with pytest.raises(audit.AuditChainBroken) as broken:
        _verify(db, anchor)
    return broken.value.reason, what


def _rows(db):
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT seq, entry_type, device_serial, entry_hash, entry "
                            "FROM audit_log ORDER BY seq").fetchall()
    finally:
        conn.close()


def _sql(db, statement, params=()):
    conn = sqlite3.connect(db)
    try:
        conn.execute(statement, params)
        conn.commit()
    finally:
        conn.close()


def _other(value):
    """A different value of the same shape (int + 1; the last character of a string
    replaced by another of its kind)."""
    if isinstance(value, bool) or value is None:
        return 1
    if isinstance(value, int):
        return value + 1
    last = value[-1:]
    if last and last in _HEX:
        return value[:-1] + _HEX[(_HEX.index(last) + 1) % 16]
    if last.isdigit():
        return value[:-1] + str((int(last) + 1) % 10)
    return value[:-1] + ("x" if last != "x" else "y")


def test_an_untouched_copy_verifies(chain, tmp_path):
    _path, anchor, count = chain
    report = _verify(_copy(chain, tmp_path, "clean"), anchor)
    assert report.entries == count and report.unanchored == 0


def test_every_stored_column_of_every_row_is_checked(chain, tmp_path):
    _path, anchor, _count = chain
    rows = _rows(_copy(chain, tmp_path, "probe"))
    caught = []
    for seq, entry_type, device_serial, entry_hash, _entry in rows:
        changes = [
            ("seq", seq + 1000),
            ("entry_type", next(t for t in audit.ENTRY_TYPES if t != entry_type)),
            ("device_serial", _other(device_serial)),
            ("device_serial", None if device_serial is not None else 7),
            ("entry_hash", _other(entry_hash)),
        ]
        for column, value in changes:
            db = _copy(chain, tmp_path, "col")
            _sql(db, "UPDATE audit_log SET %s = ? WHERE seq = ?" % column, (value, seq))
            caught.append(_caught(db, anchor, (seq, column, value)))
    assert len(caught) == 5 * len(rows)
    # A re-labelled row is named as such, not as some later symptom.
    assert {reason for reason, (_s, column, _v) in caught if column != "seq"} == {"columns"}


def _handles_on(path):
    """This process's open file descriptors on `path` or its -wal / -shm files."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_verification_stopped_at_a_bad_entry_lets_go_of_the_database(chain, tmp_path):
    """The walk stops mid-table with its statement still open; closing the snapshot must
    close SQLite's handle then, not when the garbage collector gets to the cursor: a
    lingering handle keeps the WAL, whose frames an operator's next copy of the file (or
    this suite's next tampered copy) would pick up.  The collector is off to show it."""
    _path, anchor, _count = chain
    db = _copy(chain, tmp_path, "stopped")
    rows = _rows(db)
    _sql(db, "UPDATE audit_log SET entry_hash = ? WHERE seq = ?",
         (_other(rows[1][3]), rows[1][0]))
    enabled = gc.isenabled()
    gc.disable()
    try:
        reason, _what = _caught(db, anchor, "second row")
        assert reason == "columns"
        assert _handles_on(db) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["stopped.db"]
    finally:
        if enabled:
            gc.enable()


def test_every_field_inside_every_entry_is_covered_by_its_hash(chain, tmp_path):
    _path, anchor, _count = chain
    rows = _rows(_copy(chain, tmp_path, "probe"))
    changed = 0
    for seq, _t, _d, _h, entry in rows:
        stored = json.loads(entry)
        for name in sorted(stored):
            edited = dict(stored)
            edited[name] = _other(stored[name])
            text = audit.canonical_json(edited).decode("ascii")
            db = _copy(chain, tmp_path, "field")
            _sql(db, "UPDATE audit_log SET entry = ? WHERE seq = ?", (text, seq))
            _caught(db, anchor, (seq, name))
            changed += 1
    assert changed > 8 * len(rows)


def test_an_entry_rewritten_and_resealed_with_its_columns_is_caught(chain, tmp_path):
    """The insider recomputes the entry's own hash and its columns: the next entry's
    link (or the head row, or a checkpoint) still catches it."""
    _path, anchor, _count = chain
    rows = _rows(_copy(chain, tmp_path, "probe"))
    for seq, _t, _d, _h, entry in rows:
        fields = json.loads(entry)
        fields.pop("hash")
        fields["time"] = "2031-01-01T00:00:00.000Z"
        resealed = audit.seal(fields, seq, fields["prev"])
        db = _copy(chain, tmp_path, "reseal")
        _sql(db, "UPDATE audit_log SET entry = ?, entry_hash = ? WHERE seq = ?",
             (resealed.line[:-1].decode("ascii"), resealed.hash_hex, seq))
        _caught(db, anchor, seq)


def test_the_head_row_is_checked(chain, tmp_path):
    _path, anchor, count = chain
    for statement, params in (("UPDATE audit_head SET entry_count = ?", (count + 1,)),
                              ("UPDATE audit_head SET entry_count = ?", (count - 1,)),
                              ("UPDATE audit_head SET head_hash = ?", ("0" * 64,))):
        db = _copy(chain, tmp_path, "head")
        _sql(db, statement, params)
        _caught(db, anchor, statement)


def test_deleting_or_reordering_any_entry_is_caught(chain, tmp_path):
    _path, anchor, _count = chain
    rows = _rows(_copy(chain, tmp_path, "probe"))
    for seq, *_rest in rows:
        db = _copy(chain, tmp_path, "delete")
        _sql(db, "DELETE FROM audit_log WHERE seq = ?", (seq,))
        _caught(db, anchor, ("delete", seq))
    for first, second in zip(rows, rows[1:]):
        # Swap the two rows' contents (each keeps its own seq): a reordering.
        db = _copy(chain, tmp_path, "swap")
        conn = sqlite3.connect(db)
        for (seq, *_r), (_s, entry_type, device_serial, entry_hash, entry) in (
                (first, second), (second, first)):
            conn.execute("UPDATE audit_log SET entry_type = ?, device_serial = ?, "
                         "entry_hash = ?, entry = ? WHERE seq = ?",
                         (entry_type, device_serial, entry_hash, entry, seq))
        conn.commit()
        conn.close()
        _caught(db, anchor, ("swap", first[0]))


def test_a_truncated_log_with_a_matching_head_row_is_caught_by_the_witness_anchor(
        chain, tmp_path):
    _path, anchor, count = chain
    rows = _rows(_copy(chain, tmp_path, "probe"))
    for keep in range(count):
        db = _copy(chain, tmp_path, "cut")
        head = rows[keep - 1][3] if keep else audit.GENESIS_PREV
        conn = sqlite3.connect(db)
        conn.execute("DELETE FROM audit_log WHERE seq >= ?", (keep,))
        conn.execute("UPDATE audit_head SET entry_count = ?, head_hash = ?", (keep, head))
        conn.commit()
        conn.close()
        _verify(db, None)  # a consistent shorter chain: nothing inside shows the cut
        reason, _what = _caught(db, anchor, ("truncate", keep))
        assert reason in ("truncated", "head")
