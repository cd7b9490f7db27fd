"""The audit log: canonical entries, the hash chain, checkpoints, the file form, tampering."""

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetid.cloud import audit
from fleetid.cloud.hsm import open_hsm
from fleetid.cloud.hsm.soft_backend import SoftBackend
from fleetid.cloud.audit import AuditChainBroken, AuditError
from tests.cloud.hsm_support import (
    KEYSTORE_PASS,
    SOFTHSM_MODULE,
    TEST_SCRYPT_N,
    TOKEN_LABEL,
    USER_PIN,
    init_softhsm_token,
)

T0 = 1795000000.0  # 2026-11-18, fixed so entries are deterministic


def _signer():
    return audit.KeySigner(ec.generate_private_key(ec.SECP256R1()))


LINE = _signer()
WITNESS = _signer()


def _injection(serial, station="line-1/st-3", operator="op-7", when=None):
    return audit.injection_entry(
        serial=serial, se_uid=bytes([0x04, serial & 0xFF]) + b"\xa5" * 14, slot=2,
        aid=bytes.fromhex("a000000620466c656574"), cert_serial=0x1000 + serial,
        cert_fingerprint=bytes([serial & 0xFF]) * 32, issuing_ca="CN=batch CA 7,O=fleetid",
        batch="b-7", station=station, operator=operator, hsm_session="pool/%d" % serial,
        attestation_hash=bytes([0xAA]) * 32, when=T0 + serial if when is None else when)


def _build_log(path, devices=10, checkpoint_every=4):
    """A file log: injections, a hold, a revocation, checkpoints every few entries."""
    with audit.AuditFile(path) as log:
        for serial in range(1, devices + 1):
            log.append_audit(_injection(serial))
            if serial == 5:
                log.append_audit(audit.hold_entry(serial=5, reason="QA sample", station="qa",
                                                  operator="op-9", when=T0 + 50))
            if serial == 7:
                log.append_audit(audit.revoke_entry(
                    serial=3, cert_serial=0x1003, cert_fingerprint=bytes([3]) * 32,
                    reason="keyCompromise", operator="sec-1", when=T0 + 60))
            if serial % checkpoint_every == 0:
                count, head = log.head()
                log.append_audit(audit.checkpoint_entry(
                    covers=count, head=head, line_signer=LINE, witness_signer=WITNESS,
                    when=T0 + 100 + serial))
    with open(path, "rb") as f:
        return f.read().splitlines(keepends=True)


@pytest.fixture(scope="module")
def good_lines(tmp_path_factory):
    return _build_log(tmp_path_factory.mktemp("audit") / "audit.jsonl")


def _verify(lines, **kwargs):
    return audit.verify_log(lines, LINE.public_key(), WITNESS.public_key(), **kwargs)


# -- encoding -------------------------------------------------------------------------------------


def test_an_entry_is_canonical_json_whose_hash_covers_every_other_field():
    entry = audit.seal(_injection(1), 0, audit.GENESIS_PREV)
    stored = json.loads(entry.line)
    assert entry.line.endswith(b"\n") and b'", "' not in entry.line and b'": ' not in entry.line
    assert list(stored) == sorted(stored)
    body = dict(stored)
    stored_hash = body.pop("hash")
    import hashlib

    recomputed = hashlib.sha256(b"fleetid/audit-entry/v1\n" + json.dumps(
        body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert stored_hash == recomputed == entry.hash_hex
    assert body["prev"] == "0" * 64 and body["seq"] == 0 and body["v"] == 1
    assert body["time"] == "2026-11-18T11:06:41.000Z"  # T0 + 1 s, UTC, milliseconds
    for name in ("serial", "se_uid", "slot", "aid", "cert_serial", "cert_fingerprint",
                 "issuing_ca", "batch", "station", "operator", "hsm_session",
                 "attestation_hash"):
        assert name in body


def test_entries_stay_within_the_per_injection_budget():
    stats = audit.entry_size_stats(count=50)
    assert 500 <= stats["injection_min"] <= stats["injection_max"] <= 3072
    assert stats["checkpoint_bytes"] <= audit.MAX_ENTRY_BYTES


@pytest.mark.parametrize("change", [
    {"operator": ""},  # who did it may not be blank
    {"station": "x" * 300},
    {"serial": -1},
    {"se_uid": "abc"},  # odd-length hex
    {"cert_fingerprint": "00" * 31},
    {"colour": "blue"},  # unknown field: a new field is a new format version
    {"time": "yesterday"},
])
def test_malformed_fields_are_refused_when_sealing(change):
    fields = _injection(1)
    fields.update(change)
    with pytest.raises(AuditError) as info:
        audit.seal(fields, 0, audit.GENESIS_PREV)
    assert info.value.reason == AuditError.BAD_FIELDS


def test_builders_refuse_blank_operator():
    with pytest.raises(AuditError):
        _injection(1, operator="")


def test_a_line_with_the_same_json_value_but_other_bytes_is_not_canonical():
    line = audit.seal(_injection(1), 0, audit.GENESIS_PREV).line
    spaced = line.replace(b'","', b'", "', 1)
    assert json.loads(spaced) == json.loads(line)
    with pytest.raises(AuditChainBroken) as info:
        audit.parse_entry(spaced, 0)
    assert info.value.reason == AuditChainBroken.NOT_CANONICAL


def test_duplicate_keys_and_non_objects_do_not_parse():
    line = audit.seal(_injection(1), 0, audit.GENESIS_PREV).line
    duplicated = line[:-2] + b',"v":1}\n'
    for bad in (duplicated, b"[1,2]\n", b"\xff\n", b"{\"v\":NaN}\n"):
        with pytest.raises(AuditChainBroken) as info:
            audit.parse_entry(bad, 0)
        assert info.value.index == 0


# -- the chain ------------------------------------------------------------------------------------


def test_a_good_log_verifies_with_counts(good_lines):
    report = _verify(good_lines, expected_count=len(good_lines))
    assert report.entries == len(good_lines) == 10 + 1 + 1 + 2
    assert report.by_type == {"injection": 10, "hold": 1, "revoke": 1, "checkpoint": 2}
    assert report.checkpoints == 2
    # the second checkpoint (entry 11) covers entries 0..10; injections 9 and 10 follow it
    assert report.anchored == 11 and report.unanchored == 2
    assert report.head == json.loads(good_lines[-1])["hash"]


def _line_of(lines, position):
    total = 0
    for index, line in enumerate(lines):
        total += len(line)
        if position < total:
            return index
    raise AssertionError("position beyond the log")


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_single_byte_change_is_caught_at_its_own_entry(good_lines, data):
    blob = b"".join(good_lines)
    position = data.draw(st.integers(0, len(blob) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != blob[position]), label="byte")
    tampered = bytearray(blob)
    tampered[position] = value
    lines = bytes(tampered).splitlines(keepends=True)
    with pytest.raises(AuditChainBroken) as info:
        _verify(lines, expected_count=len(good_lines))
    assert info.value.index == _line_of(good_lines, position)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_deleting_any_entry_is_caught_at_its_position(good_lines, data):
    index = data.draw(st.integers(0, len(good_lines) - 1))
    lines = good_lines[:index] + good_lines[index + 1:]
    with pytest.raises(AuditChainBroken) as info:
        _verify(lines, expected_count=len(good_lines))
    assert info.value.index == index
    expected_reason = (AuditChainBroken.TRUNCATED if index == len(good_lines) - 1
                       else AuditChainBroken.SEQ)
    assert info.value.reason == expected_reason


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_moving_any_entry_is_caught_at_the_first_moved_position(good_lines, data):
    i = data.draw(st.integers(0, len(good_lines) - 2))
    j = data.draw(st.integers(i + 1, len(good_lines) - 1))
    lines = list(good_lines)
    lines[i], lines[j] = lines[j], lines[i]
    with pytest.raises(AuditChainBroken) as info:
        _verify(lines)
    assert info.value.index == i and info.value.reason == AuditChainBroken.SEQ


def test_duplicating_an_entry_is_caught(good_lines):
    lines = good_lines[:4] + [good_lines[3]] + good_lines[4:]
    with pytest.raises(AuditChainBroken) as info:
        _verify(lines)
    assert info.value.index == 4


def test_truncation_is_caught_only_against_a_count_or_head_kept_elsewhere(good_lines):
    """A prefix of a chain is a valid chain: the log alone cannot show that its tail was cut.
    The registry's head row, a count the caller knows, or a witness's copy of its latest
    checkpoint can, at any cut position."""
    n = len(good_lines)
    for keep in range(n):
        prefix = good_lines[:keep]
        assert _verify(prefix).entries == keep  # undetectable without outside knowledge
        with pytest.raises(AuditChainBroken) as info:
            _verify(prefix, expected_count=n)
        assert (info.value.index, info.value.reason) == (keep, AuditChainBroken.TRUNCATED)
    last_checkpoint = json.loads(good_lines[-1] if b"checkpoint" in good_lines[-1]
                                 else [ln for ln in good_lines if b'"checkpoint"' in ln][-1])
    anchor = (last_checkpoint["covers"], last_checkpoint["head"])
    for keep in range(anchor[0]):
        with pytest.raises(AuditChainBroken) as info:
            _verify(good_lines[:keep], witness_anchor=anchor)
        assert info.value.reason == AuditChainBroken.TRUNCATED
    assert _verify(good_lines, witness_anchor=anchor).entries == n


def test_more_entries_than_the_head_row_says_are_caught(good_lines):
    with pytest.raises(AuditChainBroken) as info:
        _verify(good_lines, expected_count=len(good_lines) - 2)
    assert (info.value.index, info.value.reason) == (len(good_lines) - 2,
                                                     AuditChainBroken.BEYOND_HEAD)


def test_a_wrong_expected_head_is_caught(good_lines):
    with pytest.raises(AuditChainBroken) as info:
        _verify(good_lines, expected_count=len(good_lines), expected_head="11" * 32)
    assert info.value.reason == AuditChainBroken.HEAD


def _reseal(lines, start, edit):
    """What an insider with write access does: edit entry `start`, recompute every hash."""
    out = list(lines[:start])
    prev = json.loads(lines[start - 1])["hash"] if start else audit.GENESIS_PREV
    for index in range(start, len(lines)):
        fields = json.loads(lines[index])
        fields.pop("hash")
        if index == start:
            edit(fields)
        entry = audit.seal(fields, index, prev)
        out.append(entry.line)
        prev = entry.hash_hex
    return out


def test_a_rewritten_and_rehashed_history_is_caught_by_the_next_checkpoint(good_lines):
    def edit(fields):
        fields["operator"] = "someone-else"

    lines = _reseal(good_lines, 2, edit)
    first_checkpoint = next(i for i, ln in enumerate(good_lines) if b'"checkpoint"' in ln)
    with pytest.raises(AuditChainBroken) as info:
        _verify(lines)
    assert (info.value.index, info.value.reason) == (first_checkpoint,
                                                     AuditChainBroken.CHECKPOINT_HEAD)


def test_a_rewritten_checkpoint_head_fails_its_signatures(good_lines):
    def rewrite(fields):
        fields["operator"] = "someone-else"

    lines = _reseal(good_lines, 2, rewrite)
    first_checkpoint = next(i for i, ln in enumerate(good_lines) if b'"checkpoint"' in ln)

    def fix_head(fields):
        fields["head"] = json.loads(lines[fields["covers"] - 1])["hash"]

    lines = _reseal(lines, first_checkpoint, fix_head)
    with pytest.raises(AuditChainBroken) as info:
        _verify(lines)
    assert (info.value.index, info.value.reason) == (first_checkpoint,
                                                     AuditChainBroken.CHECKPOINT_SIG)


def test_checkpoints_by_an_untrusted_witness_are_refused(good_lines):
    first_checkpoint = next(i for i, ln in enumerate(good_lines) if b'"checkpoint"' in ln)
    with pytest.raises(AuditChainBroken) as info:
        audit.verify_log(good_lines, LINE.public_key(), _signer().public_key())
    assert (info.value.index, info.value.reason) == (first_checkpoint,
                                                     AuditChainBroken.CHECKPOINT_KEY)
    with pytest.raises(AuditError):
        audit.verify_log(good_lines, LINE.public_key(), None)


def test_a_rotated_line_key_verifies_when_both_keys_are_trusted(tmp_path):
    new_line = _signer()
    with audit.AuditFile(tmp_path / "a.jsonl") as log:
        log.append_audit(_injection(1))
        audit.Checkpointer(log, LINE, WITNESS).checkpoint()
        log.append_audit(_injection(2))
        audit.Checkpointer(log, new_line, WITNESS).checkpoint()
        lines = list(log.lines())
    report = audit.verify_log(lines, [LINE.public_key(), new_line.public_key()],
                              WITNESS.public_key())
    assert report.checkpoints == 2
    with pytest.raises(AuditChainBroken) as info:
        audit.verify_log(lines, new_line.public_key(), WITNESS.public_key())
    assert (info.value.index, info.value.reason) == (1, AuditChainBroken.CHECKPOINT_KEY)


def test_a_checkpoint_signer_that_signs_garbage_is_caught_when_signing():
    class Broken:
        def sign(self, data):
            return LINE.sign(data + b"x")

        def public_key(self):
            return LINE.public_key()

    with pytest.raises(AuditError) as info:
        audit.checkpoint_entry(covers=1, head="00" * 32, line_signer=Broken(),
                               witness_signer=WITNESS, when=T0)
    assert info.value.reason == AuditError.SIGNER


# -- checkpoints with HSM keys --------------------------------------------------------------------


def _checkpointed_log_verifies(tmp_path, line_signer):
    with audit.AuditFile(tmp_path / "hsm.jsonl") as log:
        for serial in range(1, 4):
            log.append_audit(_injection(serial))
        entry = audit.Checkpointer(log, line_signer, WITNESS).checkpoint()
        lines = list(log.lines())
    assert entry.fields["line_key"] == audit.key_id(line_signer.public_key())
    report = audit.verify_log(lines, line_signer.public_key(), WITNESS.public_key())
    assert report.checkpoints == 1 and report.anchored == 3


def test_checkpoints_signed_by_the_soft_hsm_verify(tmp_path):
    with SoftBackend(tmp_path / "ks.json", KEYSTORE_PASS, scrypt_n=TEST_SCRYPT_N) as hsm:
        hsm.generate_signing_key("audit-line")
        _checkpointed_log_verifies(tmp_path, audit.HsmSigner(hsm, "audit-line"))


def test_checkpoints_signed_in_softhsm2_verify(tmp_path, monkeypatch):
    init_softhsm_token(tmp_path, monkeypatch)
    uri = "pkcs11:module=%s;token=%s;pin-env=PIN" % (SOFTHSM_MODULE, TOKEN_LABEL)
    with open_hsm(uri, environ={"PIN": USER_PIN}) as hsm:
        hsm.generate_signing_key("audit-line")
        _checkpointed_log_verifies(tmp_path, audit.HsmSigner(hsm, "audit-line"))


def test_the_checkpointer_signs_when_enough_entries_or_time_went_by(tmp_path):
    now = [T0]
    with audit.AuditFile(tmp_path / "c.jsonl") as log:
        checkpointer = audit.Checkpointer(log, LINE, WITNESS, every_entries=3,
                                          every_seconds=600, wall_clock=lambda: now[0])
        assert checkpointer.maybe_checkpoint() is None  # empty log
        log.append_audit(_injection(1))
        log.append_audit(_injection(2))
        assert checkpointer.maybe_checkpoint() is None
        log.append_audit(_injection(3))
        first = checkpointer.maybe_checkpoint()
        assert first.fields["covers"] == 3 and first.seq == 3
        log.append_audit(_injection(4))
        assert checkpointer.maybe_checkpoint() is None
        now[0] += 601
        second = checkpointer.maybe_checkpoint()
        assert second.fields["covers"] == 5  # the 4th injection and the first checkpoint
        assert checkpointer.checkpoint() is None  # nothing new
    # a new process picks up where the last checkpoint was
    with audit.AuditFile(tmp_path / "c.jsonl") as log:
        assert log.last_checkpoint().seq == second.seq
        fresh = audit.Checkpointer(log, LINE, WITNESS, every_entries=3,
                                   wall_clock=lambda: now[0])
        assert not fresh.due()
        _verify(list(log.lines()), expected_count=6)


# -- the file form --------------------------------------------------------------------------------


def test_the_file_log_continues_its_chain_after_reopen(tmp_path):
    path = tmp_path / "a.jsonl"
    with audit.AuditFile(path) as log:
        first = log.append_audit(_injection(1))
    with audit.AuditFile(path) as log:
        assert log.head() == (1, first.hash_hex)
        second = log.append_audit(_injection(2))
    assert second.fields["prev"] == first.hash_hex
    assert _verify(audit.read_log_file(path)).entries == 2


def test_a_torn_append_is_refused_until_repaired(tmp_path):
    path = tmp_path / "a.jsonl"
    with audit.AuditFile(path) as log:
        log.append_audit(_injection(1))
        complete = log.head()
    with open(path, "ab") as f:
        f.write(audit.seal(_injection(2), 1, complete[1]).line[:100])  # power cut mid-write
    with pytest.raises(AuditError) as info:
        audit.AuditFile(path)
    assert info.value.reason == AuditError.TORN_TAIL
    with audit.AuditFile(path, repair_torn_tail=True) as log:
        assert log.head() == complete
        log.append_audit(_injection(2))
    assert _verify(audit.read_log_file(path)).entries == 2


def test_export_and_append_lines_keep_the_chain(tmp_path, good_lines):
    assert audit.export_lines(iter(good_lines), tmp_path / "x.jsonl") == len(good_lines)
    assert list(audit.read_log_file(tmp_path / "x.jsonl")) == good_lines
    with audit.AuditFile(tmp_path / "mirror.jsonl") as mirror:
        mirror.append_lines(good_lines[:5])
        with pytest.raises(AuditChainBroken):
            mirror.append_lines(good_lines[6:7])  # skips one: refused
        mirror.append_lines(good_lines[5:])
        assert mirror.head() == (len(good_lines), json.loads(good_lines[-1])["hash"])


def test_show_answers_when_where_who_and_with_what_attestation(good_lines):
    entries = audit.show(good_lines, 5)
    assert [e.type for e in entries] == ["injection", "hold"]
    injection = entries[0].fields
    assert (injection["station"], injection["operator"]) == ("line-1/st-3", "op-7")
    assert injection["attestation_hash"] == "aa" * 32
    text = audit.describe(entries[0])
    for part in ("2026-11-18T11:06:45.000Z", "station=line-1/st-3", "operator=op-7",
                 "attestation_sha256=" + "aa" * 32):
        assert part in text
    assert "reason=QA sample" in audit.describe(entries[1])
    assert audit.show(good_lines, 999) == []


def test_a_failed_append_stops_the_file_until_the_torn_tail_is_repaired(tmp_path, monkeypatch):
    import errno
    import os

    path = tmp_path / "a.jsonl"
    log = audit.AuditFile(path)
    log.append_audit(_injection(1))
    good_head = log.head()
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, bytes(data[:50]))  # part of the line reaches the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(AuditError) as info:
        log.append_audit(_injection(2))
    assert info.value.reason == AuditError.IO
    monkeypatch.setattr(os, "write", real_write)
    with pytest.raises(AuditError) as info:
        log.append_audit(_injection(2))  # would follow the partial line: refused
    assert info.value.reason == AuditError.STATE
    assert log.head() == good_head
    log.close()
    with pytest.raises(AuditError):
        audit.AuditFile(path)
    with audit.AuditFile(path, repair_torn_tail=True) as log:
        log.append_audit(_injection(2))
    assert _verify(audit.read_log_file(path)).entries == 2
