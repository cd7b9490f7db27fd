"""The registry: serials, intents, the one-transaction commit, holds, revocation, history,
and the audit chain it keeps.  Contract tests run on SQLite and on the in-memory fake."""

import datetime
import glob
import hashlib
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetid.cloud import audit
from fleetid.cloud.audit import AuditChainBroken
from fleetid.cloud.registry import (
    COMMITTED,
    HELD,
    INTENT,
    REVOKED,
    CertificateNotFound,
    DeviceNotFound,
    DuplicateSerial,
    DuplicateSeUid,
    IdentityRecord,
    InvalidState,
    RegistryError,
    open_registry,
    schema,
    verify_registry_log,
)
from fleetid.cloud.registry.memory import MemoryRegistry
from fleetid.cloud.registry.rotation import ACKED, RotationState
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
from tests.conftest import require

T0 = 1795000000.0
CA_KEY = ec.generate_private_key(ec.SECP256R1())
DEVICE_KEY = ec.generate_private_key(ec.SECP256R1())
CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetid batch CA 7"),
                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetid")])
LINE = audit.KeySigner(ec.generate_private_key(ec.SECP256R1()))
WITNESS = audit.KeySigner(ec.generate_private_key(ec.SECP256R1()))


def make_cert(device_serial, cert_serial=None, issuer=CA_NAME):
    """A small device certificate signed by the test batch CA."""
    start = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        str(device_serial))]))
            .issuer_name(issuer)
            .public_key(DEVICE_KEY.public_key())
            .serial_number(cert_serial or (0x7F000000 + device_serial))
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=3650))
            .sign(CA_KEY, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER))


def uid(n):
    return bytes([0x04, 0x90]) + n.to_bytes(14, "big")


def start_device(registry, n=None, station="line-1/st-1"):
    """allocate + intent; returns the serial."""
    serial = registry.allocate_serial()
    registry.write_intent(serial, uid(serial if n is None else n), station, operator="op-7",
                          batch="b-7", hsm_session="pool/1")
    return serial


def identity(serial, se_uid=None, cert_der=None, station="line-1/st-1"):
    cert_der = cert_der or make_cert(serial)
    record = IdentityRecord(serial=serial, se_uid=se_uid or uid(serial),
                            identity_cert_der=cert_der, slot=2,
                            aid=bytes.fromhex("a000000620466c656574"), batch="b-7",
                            station=station, operator="op-7", hsm_session="pool/1",
                            attestation_hash=audit.attestation_hash(b"statement %d" % serial))
    facts = audit.certificate_facts(cert_der)
    entry = audit.injection_entry(
        serial=serial, se_uid=record.se_uid, slot=record.slot, aid=record.aid,
        cert_serial=facts["cert_serial"], cert_fingerprint=facts["cert_fingerprint"],
        issuing_ca=facts["issuing_ca"], batch=record.batch, station=record.station,
        operator=record.operator, hsm_session=record.hsm_session,
        attestation_hash=record.attestation_hash, when=T0 + serial)
    return record, entry


def provision(registry, station="line-1/st-1"):
    serial = start_device(registry, station=station)
    registry.commit_identity(*identity(serial, station=station))
    return serial


@pytest.fixture(params=["sqlite", "memory"])
def registry(request, tmp_path):
    if request.param == "sqlite":
        reg = SqliteRegistry(tmp_path / "registry.db", wall_clock=lambda: T0)
    else:
        reg = MemoryRegistry(wall_clock=lambda: T0)
    yield reg
    reg.close()


# -- serials and intents --------------------------------------------------------------------------


def test_serials_are_monotonic_and_unique_under_parallel_stations(registry):
    got = []
    lock = threading.Lock()

    def station():
        for _ in range(40):
            serial = registry.allocate_serial()
            with lock:
                got.append(serial)

    threads = [threading.Thread(target=station) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 241))


def test_serials_never_repeat_after_reopen(tmp_path):
    path = tmp_path / "r.db"
    with SqliteRegistry(path) as reg:
        first = [reg.allocate_serial() for _ in range(5)]
    with SqliteRegistry(path) as reg:  # a crash after allocation leaves a gap, not a repeat
        assert reg.allocate_serial() == first[-1] + 1


def test_an_intent_needs_an_allocated_serial_and_is_written_once(registry):
    with pytest.raises(RegistryError) as info:
        registry.write_intent(1, uid(1), "st")
    assert info.value.reason == RegistryError.NOT_ALLOCATED
    serial = start_device(registry)
    with pytest.raises(DuplicateSerial):
        registry.write_intent(serial, uid(99), "st")
    with pytest.raises(RegistryError) as info:
        registry.write_intent(registry.allocate_serial(), b"\x01", "st")
    assert info.value.reason == RegistryError.BAD_INPUT


def test_intent_records_survive_a_reopen(tmp_path):
    path = tmp_path / "r.db"
    with SqliteRegistry(path, wall_clock=lambda: T0) as reg:
        a = start_device(reg)
        b = start_device(reg)
        provision(reg)
    with SqliteRegistry(path) as reg:
        in_flight = reg.list_in_flight()
        assert [d.serial for d in in_flight] == [a, b]
        assert in_flight[0].se_uid == uid(a) and in_flight[0].status == INTENT
        assert in_flight[0].station == "line-1/st-1"
        assert in_flight[0].intent_at == "2026-11-18T11:06:40.000Z"


# -- commit ---------------------------------------------------------------------------------------


def test_commit_writes_identity_certificate_and_audit_entry(registry):
    serial = start_device(registry)
    record, fields = identity(serial)
    entry = registry.commit_identity(record, fields)
    device = registry.get_device(serial)
    assert device.status == COMMITTED and device.committed_at
    assert device.identity_fingerprint == fields["cert_fingerprint"]
    assert device.issuing_ca == "O=fleetid,CN=fleetid batch CA 7"
    assert device.attestation_hash == record.attestation_hash and device.slot == 2
    [cert] = registry.certificates(serial)
    assert cert.kind == "identity" and cert.der == record.identity_cert_der
    assert not cert.revoked
    assert entry.seq == 0 and entry.fields["prev"] == audit.GENESIS_PREV
    assert registry.head() == (1, entry.hash_hex)
    assert registry.audit_entries_for(serial) == [entry]
    assert registry.list_in_flight() == []
    assert [d.serial for d in registry.find_by_se_uid(uid(serial))] == [serial]


def test_commit_refuses_an_audit_entry_for_another_device_or_cert(registry):
    serial = start_device(registry)
    other = start_device(registry)
    record, _fields = identity(serial)
    _other_record, other_fields = identity(other)
    _same, wrong_cert = identity(serial, cert_der=make_cert(serial, cert_serial=12345))
    for fields in (other_fields, wrong_cert):
        with pytest.raises(RegistryError) as info:
            registry.commit_identity(record, fields)
        assert info.value.reason == RegistryError.MISMATCH
    assert registry.get_device(serial).status == INTENT
    assert registry.head()[0] == 0 and registry.certificates(serial) == []


def test_commit_only_from_intent_and_one_live_identity_per_chip(registry):
    serial = provision(registry)
    with pytest.raises(InvalidState):
        registry.commit_identity(*identity(serial))
    with pytest.raises(DeviceNotFound):
        registry.commit_identity(*identity(999))
    # the same chip again under a new serial (e.g. a second station got it by mistake)
    again = registry.allocate_serial()
    registry.write_intent(again, uid(serial), "line-1/st-2")
    with pytest.raises(DuplicateSeUid):
        registry.commit_identity(*identity(again, se_uid=uid(serial)))
    assert registry.get_device(again).status == INTENT
    assert registry.head()[0] == 1


class _CommitFails(SqliteRegistry):
    """SQLite whose COMMIT fails (disk full / I/O error at the last moment)."""

    fail = False

    def _commit(self, conn):
        if self.fail:
            raise sqlite3.OperationalError("disk I/O error")
        super()._commit(conn)


def test_a_failed_commit_leaves_neither_identity_nor_audit_entry(tmp_path):
    path = tmp_path / "r.db"
    with _CommitFails(path, wall_clock=lambda: T0) as reg:
        provision(reg)
        head_before = reg.head()
        serial = start_device(reg)
        reg.fail = True
        with pytest.raises(RegistryError) as info:
            reg.commit_identity(*identity(serial))
        assert info.value.reason == RegistryError.STORAGE
        reg.fail = False
        assert reg.get_device(serial).status == INTENT
        # the line holds the device; that works and is audited
        hold = reg.hold(serial, "commit failed: storage", station="line-1/st-1",
                        operator="op-7")
        assert hold.seq == head_before[0]
    with SqliteRegistry(path) as reg:  # and nothing half-written survived on disk
        device = reg.get_device(serial)
        assert device.status == HELD and device.hold_reason == "commit failed: storage"
        assert reg.certificates(serial) == []
        assert [e.type for e in reg.audit_entries_for(serial)] == ["hold"]
        assert reg.head()[0] == head_before[0] + 1
        assert verify_registry_log(reg, LINE.public_key(), WITNESS.public_key()).entries == 2


def test_a_failure_inside_the_transaction_rolls_back_the_identity(tmp_path):
    path = tmp_path / "r.db"
    with SqliteRegistry(path) as reg:
        serial = start_device(reg)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit_log "
                 "BEGIN SELECT RAISE(ABORT, 'audit storage refused'); END")
    conn.commit()
    conn.close()
    with SqliteRegistry(path) as reg:
        with pytest.raises(RegistryError) as info:
            reg.commit_identity(*identity(serial))  # the audit insert is the last statement
        assert info.value.reason == RegistryError.STORAGE
        device = reg.get_device(serial)
        assert device.status == INTENT and device.identity_fingerprint is None
        assert reg.certificates(serial) == [] and reg.head() == (0, audit.GENESIS_PREV)


def test_parallel_stations_build_one_linear_chain(registry):
    errors = []

    def station(name):
        try:
            for _ in range(8):
                provision(registry, station=name)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=station, args=("line-1/st-%d" % i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    report = verify_registry_log(registry, LINE.public_key(), WITNESS.public_key())
    assert report.entries == 32 and report.by_type == {"injection": 32}


# -- hold, reconcile, revoke, history -------------------------------------------------------------


def test_crash_reconciliation_revokes_the_orphan_certificate(registry):
    serial = start_device(registry)
    orphan = make_cert(serial)  # the CA issued it, then the line crashed before the commit
    assert [d.serial for d in registry.list_in_flight()] == [serial]
    registry.add_certificate(serial, orphan, "identity")
    facts = audit.certificate_facts(orphan)
    registry.mark_revoked(facts["cert_serial"], "cessationOfOperation", operator="line-1")
    entry = registry.reconcile(serial, "revoked-orphan-cert", "no committed record",
                               station="line-1/st-1", operator="line-1",
                               cert_serial=facts["cert_serial"],
                               cert_fingerprint=facts["cert_fingerprint"])
    device = registry.get_device(serial)
    assert device.status == HELD and device.hold_reason == "reconciled: revoked-orphan-cert"
    assert registry.certificate_status(facts["cert_serial"]).revoked
    assert [e.type for e in registry.audit_entries_for(serial)] == ["issuance", "revoke",
                                                                    "reconcile"]
    assert entry.fields["cert_fingerprint"] == facts["cert_fingerprint"]
    assert registry.list_in_flight() == []
    with pytest.raises(InvalidState):
        registry.reconcile(serial, "again", "twice")


def test_revoking_the_identity_certificate_revokes_the_device(registry):
    serial = provision(registry)
    [cert] = registry.certificates(serial)
    entry = registry.mark_revoked(int(cert.cert_serial, 16), "keyCompromise", operator="sec")
    assert registry.get_device(serial).status == REVOKED
    status = registry.certificate_status(cert.cert_serial)
    assert status.revoked and status.revocation_reason == "keyCompromise"
    assert entry.fields["cert_fingerprint"] == cert.fingerprint
    with pytest.raises(RegistryError) as info:
        registry.mark_revoked(cert.cert_serial, "again")
    assert info.value.reason == RegistryError.STATE
    with pytest.raises(CertificateNotFound):
        registry.mark_revoked("abcd", "unknown")
    with pytest.raises(InvalidState):
        registry.hold(serial, "too late")


def test_certificate_history_rotation_state_and_ambiguous_serials(registry):
    serial = provision(registry)
    operational = make_cert(serial, cert_serial=0x55)
    other_ca = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other CA")])
    registry.add_certificate(serial, operational, "operational")
    registry.add_certificate(serial, make_cert(serial, cert_serial=0x55, issuer=other_ca),
                             "operational")
    kinds = sorted(c.kind for c in registry.certificates(serial))
    assert kinds == ["identity", "operational", "operational"]
    with pytest.raises(RegistryError) as info:
        registry.certificate_status(0x55)
    assert info.value.reason == RegistryError.AMBIGUOUS
    assert registry.certificate_status(0x55, issuer="CN=other CA").issuer == "CN=other CA"
    with pytest.raises(RegistryError) as info:
        registry.add_certificate(serial, operational, "operational")
    assert info.value.reason == RegistryError.DUPLICATE_CERTIFICATE
    with pytest.raises(RegistryError):
        registry.add_certificate(serial, b"not a certificate", "operational")
    with pytest.raises(RegistryError):
        registry.add_certificate(serial, operational, "firmware")
    registry.set_rotation_state(serial, "overlap:55")
    assert registry.get_device(serial).rotation_state == "overlap:55"
    with pytest.raises(DeviceNotFound):
        registry.set_rotation_state(12345, "x")


def test_certificate_and_device_is_one_read_matching_the_two_reads(registry):
    serial = provision(registry)
    other = provision(registry)
    registry.add_certificate(serial, make_cert(serial, cert_serial=0x77), "operational",
                             rotation_state="active:77")
    other_ca = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other CA")])
    registry.add_certificate(other, make_cert(other, cert_serial=0x77, issuer=other_ca),
                             "operational")
    record, device = registry.certificate_and_device(0x77, issuer=CA_NAME.rfc4514_string())
    assert record == registry.certificate_status(0x77, issuer=CA_NAME.rfc4514_string())
    assert device == registry.get_device(serial)
    assert device.rotation_state == "active:77" and record.kind == "operational"
    record, device = registry.certificate_and_device("77", issuer="CN=other CA")
    assert (record.device_serial, device.serial) == (other, other)
    with pytest.raises(RegistryError) as info:
        registry.certificate_and_device(0x77)
    assert info.value.reason == RegistryError.AMBIGUOUS
    with pytest.raises(CertificateNotFound):
        registry.certificate_and_device(0x12345)
    # Revocation and device status are what the verifier reads on every request.
    [identity_cert] = [c for c in registry.certificates(serial) if c.kind == "identity"]
    registry.mark_revoked(identity_cert.cert_serial, "keyCompromise")
    record, device = registry.certificate_and_device(identity_cert.cert_serial)
    assert record.revoked and record.revocation_reason == "keyCompromise"
    assert device.status == REVOKED


def test_certificate_and_device_sees_every_commit_of_any_handle_at_once(tmp_path):
    # SqliteRegistry memoises this read and re-validates it with PRAGMA data_version on
    # every call: a revocation by another handle (another process) or by this handle, or
    # a write by another tool, shows on the very next read.
    path = tmp_path / "registry.db"
    reader, writer = SqliteRegistry(path), SqliteRegistry(path)
    try:
        serial = provision(writer)
        [cert] = writer.certificates(serial)
        for _ in range(2):
            record, device = reader.certificate_and_device(cert.cert_serial)
            assert not record.revoked and device.status == "committed"
        writer.mark_revoked(cert.cert_serial, "keyCompromise")
        record, device = reader.certificate_and_device(cert.cert_serial)
        assert record.revoked and device.status == REVOKED
        reader.set_rotation_state(serial, "active:x")  # this handle's own connection
        assert reader.certificate_and_device(cert.cert_serial)[1].rotation_state == \
            "active:x"
        _tamper(path, "UPDATE devices SET rotation_state = ? WHERE serial = ?", "active:y",
                serial)
        assert reader.certificate_and_device(cert.cert_serial)[1].rotation_state == \
            "active:y"
    finally:
        reader.close()
        writer.close()


def test_allocate_intent_is_one_transaction_with_fresh_serials(registry):
    first = registry.allocate_intent(uid(1), "st-1", operator="op-7", batch="b-7",
                                     hsm_session="pool/1")
    plain = start_device(registry, n=2)
    second = registry.allocate_intent(uid(3), "st-2")
    assert (first.serial, plain, second.serial) == (1, 2, 3)
    assert first.status == INTENT and first.se_uid == uid(1) and first.batch == "b-7"
    assert [d.serial for d in registry.list_in_flight()] == [1, 2, 3]
    assert registry.get_device(1) == first
    with pytest.raises(RegistryError) as info:
        registry.allocate_intent(b"\x01", "st-1")  # refused before a serial is spent
    assert info.value.reason == RegistryError.BAD_INPUT
    assert registry.allocate_intent(uid(4), "st-1").serial == 4
    registry.commit_identity(*identity(4))
    assert registry.get_device(4).status == COMMITTED


def test_allocate_intent_serials_are_unique_under_parallel_stations(registry):
    got = []
    lock = threading.Lock()

    def station(k):
        for i in range(20):
            device = registry.allocate_intent(uid(k * 100 + i), "st-%d" % k)
            with lock:
                got.append(device.serial)

    threads = [threading.Thread(target=station, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 81))
    assert len(registry.list_in_flight()) == 80


def test_commit_accepts_the_identity_certificate_added_before_it(registry):
    serial = start_device(registry)
    record, fields = identity(serial)
    added = registry.add_certificate(serial, record.identity_cert_der, "identity")
    registry.commit_identity(record, fields)
    [cert] = registry.certificates(serial)
    assert cert.fingerprint == added.fingerprint and cert.kind == "identity"
    assert registry.get_device(serial).identity_fingerprint == cert.fingerprint
    # another device's certificate, or a revoked one, is never taken over
    other = start_device(registry)
    registry.add_certificate(serial, make_cert(other), "operational")
    with pytest.raises(RegistryError) as info:
        registry.commit_identity(*identity(other))
    assert info.value.reason == RegistryError.DUPLICATE_CERTIFICATE
    third = start_device(registry)
    record, fields = identity(third)
    registry.add_certificate(third, record.identity_cert_der, "identity")
    registry.mark_revoked(0x7F000000 + third, "cessationOfOperation")
    with pytest.raises(RegistryError) as info:
        registry.commit_identity(record, fields)
    assert info.value.reason == RegistryError.DUPLICATE_CERTIFICATE
    assert registry.get_device(third).status == INTENT


def test_add_certificate_with_rotation_state_is_one_write(registry):
    serial = provision(registry)
    new = make_cert(serial, cert_serial=0x66)
    record = registry.add_certificate(serial, new, "operational",
                                      rotation_state="overlap:" + "ab" * 4)
    assert record.kind == "operational"
    assert registry.get_device(serial).rotation_state == "overlap:" + "ab" * 4
    # refused as a whole: neither the certificate nor the state changes
    with pytest.raises(RegistryError):
        registry.add_certificate(serial, new, "operational", rotation_state="overlap:cd")
    assert registry.get_device(serial).rotation_state == "overlap:" + "ab" * 4
    with pytest.raises(RegistryError):
        registry.add_certificate(serial, make_cert(serial, cert_serial=0x67), "operational",
                                 rotation_state="bad\nstate")
    assert len(registry.certificates(serial)) == 2
    registry.add_certificate(serial, make_cert(serial, cert_serial=0x68), "operational")
    assert registry.get_device(serial).rotation_state == "overlap:" + "ab" * 4
    with pytest.raises(DeviceNotFound):
        registry.add_certificate(999, make_cert(999), "operational", rotation_state="x")


def test_acknowledge_rotation_reads_decides_and_writes_in_one_transaction(registry):
    serial = provision(registry)
    old_fp = registry.get_device(serial).identity_fingerprint
    new = make_cert(serial, cert_serial=0x69)
    new_fp = hashlib.sha256(new).hexdigest()
    deadline = datetime.datetime.fromtimestamp(T0 + 3600, datetime.timezone.utc)
    overlap = RotationState.overlap(old_fp, new_fp, deadline)
    registry.add_certificate(serial, new, "operational", rotation_state=overlap.format())
    entries = registry.head()[0]
    # Not the certificate that opened the overlap: nothing written, the state returned.
    assert registry.acknowledge_rotation(serial, old_fp) == overlap
    assert registry.head()[0] == entries
    # Several acknowledgements at once (two agents' retries): exactly one takes effect.
    results, failures = [], []

    def ack():
        try:
            results.append(registry.acknowledge_rotation(serial, new_fp))
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=ack) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    acked = RotationState(ACKED, old_fp, new_fp)
    assert results == [acked] * 4
    assert registry.get_device(serial).rotation_state == "acked:%s:%s" % (old_fp, new_fp)
    assert registry.head()[0] == entries + 1
    last = audit.parse_entry(list(registry.iter_audit_lines())[-1], entries)
    assert last.type == "rotation_ack"
    assert registry.acknowledge_rotation(serial, new_fp) == acked  # again: a no-op
    assert registry.head()[0] == entries + 1
    with pytest.raises(DeviceNotFound):
        registry.acknowledge_rotation(999, new_fp)


def test_a_held_and_reworked_chip_has_several_records(registry):
    first = start_device(registry, n=7)
    registry.hold(first, "confirmation gate failed", station="st-1", operator="op-7")
    second = start_device(registry, n=7)
    registry.commit_identity(*identity(second, se_uid=uid(7)))
    records = registry.find_by_se_uid(uid(7))
    assert [(d.serial, d.status) for d in records] == [(second, COMMITTED), (first, HELD)]


# -- the audit chain in the registry --------------------------------------------------------------


def test_checkpoints_in_the_registry_verify_and_must_match_the_stored_chain(registry):
    for _ in range(3):
        provision(registry)
    checkpointer = audit.Checkpointer(registry, LINE, WITNESS, every_entries=3,
                                      wall_clock=lambda: T0 + 10)
    entry = checkpointer.maybe_checkpoint()
    assert entry.fields["covers"] == 3 and registry.last_checkpoint() == entry
    provision(registry)
    report = verify_registry_log(registry, LINE.public_key(), WITNESS.public_key())
    assert (report.entries, report.checkpoints, report.unanchored) == (5, 1, 1)
    count, head = registry.head()
    bogus = audit.checkpoint_entry(covers=count, head="ab" * 32, line_signer=LINE,
                                   witness_signer=WITNESS, when=T0)
    with pytest.raises(RegistryError) as info:
        registry.append_audit(bogus)
    assert info.value.reason == RegistryError.MISMATCH
    with pytest.raises(RegistryError):
        registry.append_audit(audit.hold_entry(serial=1, reason="x", station="s",
                                               operator="o", when=T0))


def _tamper(path, sql, *params):
    conn = sqlite3.connect(path)
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def test_tampering_with_the_audit_table_is_caught(tmp_path):
    path = tmp_path / "r.db"
    with SqliteRegistry(path, wall_clock=lambda: T0) as reg:
        for _ in range(4):
            provision(reg)

    def verify():
        with SqliteRegistry(path) as reg:
            return verify_registry_log(reg, LINE.public_key(), WITNESS.public_key())

    assert verify().entries == 4
    # an edited entry
    _tamper(path, "UPDATE audit_log SET entry = replace(entry, 'op-7', 'op-8') WHERE seq = 2")
    with pytest.raises(AuditChainBroken) as info:
        verify()
    assert (info.value.index, info.value.reason) == (2, AuditChainBroken.HASH)
    _tamper(path, "UPDATE audit_log SET entry = replace(entry, 'op-8', 'op-7') WHERE seq = 2")
    # the last entry deleted: the head row, written in the same transaction, disagrees
    _tamper(path, "DELETE FROM audit_log WHERE seq = 3")
    with pytest.raises(AuditChainBroken) as info:
        verify()
    assert (info.value.index, info.value.reason) == (3, AuditChainBroken.TRUNCATED)


def test_the_schema_is_portable_sql_and_versioned(tmp_path):
    pg = schema.schema_for("postgresql")
    assert "BLOB" not in pg and "BYTEA" in pg and "AUTOINCREMENT" not in pg
    assert "BLOB" in schema.schema_for("sqlite")
    path = tmp_path / "r.db"
    SqliteRegistry(path).close()
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"devices", "certificates", "audit_log", "audit_head", "serial_counter",
            "registry_meta"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute("UPDATE registry_meta SET value = '99' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError) as info:
        SqliteRegistry(path)
    assert info.value.reason == RegistryError.SCHEMA


def test_foreign_keys_are_enforced(tmp_path):
    with SqliteRegistry(tmp_path / "r.db") as reg:
        serial = provision(reg)
        conn = reg._conn()
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("DELETE FROM devices WHERE serial = ?", (serial,))


def test_open_registry_uris(tmp_path):
    with open_registry("sqlite:%s" % (tmp_path / "r.db")) as reg:
        assert isinstance(reg, SqliteRegistry)
    with open_registry("memory:") as reg:
        assert isinstance(reg, MemoryRegistry)
    for bad in ("sqlite:", "mysql:x", ":memory:", "postgresql:"):
        with pytest.raises(RegistryError) as info:
            open_registry(bad)
        assert info.value.reason == RegistryError.CONFIG
    with pytest.raises(RegistryError):
        SqliteRegistry(":memory:")


def test_two_registry_handles_on_one_file_share_serials_and_one_chain(tmp_path):
    """Two processes' worth of handles (each with its own in-process lock): SQLite's
    BEGIN IMMEDIATE and the busy timeout serialise them."""
    path = tmp_path / "r.db"
    handles = [SqliteRegistry(path, wall_clock=lambda: T0) for _ in range(2)]
    errors = []

    def station(reg, name):
        try:
            for _ in range(5):
                provision(reg, station=name)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=station, args=(handles[i % 2], "st-%d" % i))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    report = verify_registry_log(handles[0], LINE.public_key(), WITNESS.public_key())
    assert report.entries == 20
    assert handles[1].allocate_serial() == 21
    for reg in handles:
        reg.close()


def _postgres_tool(name):
    """A PostgreSQL server binary: on PATH, or where Debian's postgresql package puts it
    (/usr/lib/postgresql/<version>/bin, not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/" + name),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return candidates[-1] if candidates else None


def test_the_schema_applies_on_postgresql():
    """The same schema text (BYTEA spelling) on a throwaway PostgreSQL cluster, twice
    (idempotent), with the one-live-identity-per-chip index enforced there too."""
    initdb, pg_ctl, psql_bin = (_postgres_tool(t) for t in ("initdb", "pg_ctl", "psql"))
    require(initdb and pg_ctl and psql_bin, "PostgreSQL server binaries (initdb, pg_ctl, psql)")
    base = tempfile.mkdtemp(prefix="fleetid-pg-")
    as_user = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        require(shutil.which("runuser"), "runuser (to run PostgreSQL as a non-root user)")
        os.chmod(base, 0o755)
        os.chown(base, pwd.getpwnam("nobody").pw_uid, -1)
        as_user = ["runuser", "-u", "nobody", "--"]
    data = os.path.join(base, "data")
    schema_file = os.path.join(base, "schema.sql")
    with open(schema_file, "w") as f:
        f.write(schema.schema_for("postgresql"))
    os.chmod(schema_file, 0o644)
    psql = [psql_bin, "-h", base, "-U", "fleet", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]
    try:
        subprocess.run(as_user + [initdb, "--no-sync", "-D", data, "-A", "trust",
                                  "-U", "fleet"], check=True, capture_output=True)
        options = "-k %s -c listen_addresses='' -c fsync=off" % base  # a throwaway cluster
        subprocess.run(as_user + [pg_ctl, "-D", data, "-w", "-l", os.path.join(base, "log"),
                                  "-o", options, "start"],
                       check=True, capture_output=True, timeout=60)
        for _ in range(2):
            subprocess.run(psql + ["-f", schema_file], check=True, capture_output=True)
        tables = subprocess.run(psql + ["-At", "-c", "SELECT tablename FROM pg_tables WHERE "
                                        "schemaname = 'public' ORDER BY 1"],
                                check=True, capture_output=True, text=True).stdout.split()
        assert tables == ["audit_head", "audit_log", "certificates", "devices",
                          "registry_meta", "serial_counter"]
        insert = ("INSERT INTO devices (serial, se_uid, status, station, operator, batch, "
                  "hsm_session, intent_at, updated_at) VALUES (%d, 'aa', 'committed', "
                  "'s', 'o', 'b', 'h', 't', 't')")
        subprocess.run(psql + ["-c", insert % 1], check=True, capture_output=True)
        second = subprocess.run(psql + ["-c", insert % 2], capture_output=True, text=True)
        assert second.returncode != 0 and "devices_one_committed_per_se_uid" in second.stderr
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", data, "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_verification_beside_live_stations_reads_one_consistent_snapshot(tmp_path):
    path = tmp_path / "r.db"
    with SqliteRegistry(path, wall_clock=lambda: T0) as reg:
        stop = threading.Event()
        errors = []

        def station():
            try:
                while not stop.is_set():
                    provision(reg)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        worker = threading.Thread(target=station)
        worker.start()
        try:
            counts = []
            for _ in range(15):
                with SqliteRegistry(path) as auditor:
                    counts.append(verify_registry_log(auditor, LINE.public_key(),
                                                      WITNESS.public_key()).entries)
        finally:
            stop.set()
            worker.join()
        assert errors == [] and counts == sorted(counts)


def test_certificate_serials_lists_an_issuers_unexpired_certificates_in_pages(registry):
    # What the OCSP cache pre-signs (cloud/revocation/ocsp_cache.py): every certificate
    # of an issuer, revoked ones too, read in pages; none past its notAfter.
    serials = [provision(registry) for _ in range(5)]
    records = [registry.certificates(s)[0] for s in serials]
    registry.mark_revoked(records[0].cert_serial, "keyCompromise")
    issuer = records[0].issuer
    expected = sorted(int(r.cert_serial, 16) for r in records)
    assert sorted(registry.certificate_serials(issuer)) == expected
    if not isinstance(registry, MemoryRegistry):  # the SQL backends read in pages
        assert sorted(registry.certificate_serials(issuer, page=2)) == expected
    assert list(registry.certificate_serials("CN=another issuer")) == []
    latest = max(r.not_after for r in records)
    assert list(registry.certificate_serials(issuer, valid_at=latest)) == []
