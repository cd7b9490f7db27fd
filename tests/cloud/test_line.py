"""The factory line end to end: parallel stations over emulated chips on both HSM
backends, the attestation refusals, and a scan of everything a run wrote for secrets."""

import logging
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from fleetid.cloud.ca import verify_attestation_extension
from fleetid.cloud.line import report as report_mod
from fleetid.cloud.line import runner
from fleetid.cloud.line.station import LineFailure, Station
from fleetid.cloud.registry import COMMITTED, HELD
from fleetid.common import se_consts as C
from fleetid.sim import fab
from fleetid.sim.chip import Chip
from fleetid.sim.endpoint import BusEndpoint
from fleetid.sim.metering import EmulatedBuses
from tests.cloud.line_support import (
    check_invariants,
    files_under,
    known_lot,
    make_line,
    scan,
    secret_values,
)
from tests.cloud.attestation_support import CountingHsm
from tests.sim.chip_support import plant_key


@pytest.mark.parametrize("kind", ["soft", "pkcs11"])
def test_parallel_stations_commit_confirmed_identities_and_write_no_secret(
        kind, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    line = make_line(tmp_path, kind, monkeypatch)
    try:
        lot, transport = known_lot(line, 6)
        before = {p: os.stat(p).st_mtime_ns for p in files_under(line.workdir)}
        summary = runner.run_line(line.resources_for(lot.batch), lot.chips, EmulatedBuses(),
                                  stations=3)
        report = report_mod.write_report([summary], os.path.join(line.workdir, "report.html"))

        assert summary.yield_pct == 100.0 and summary.failures() == {}
        assert summary.audit_entries >= 6 and summary.audit_bytes > 6 * 500
        committed, held = check_invariants(line, lot.chips)
        assert (committed, held) == (6, 0)
        serials = sorted(r.result.serial for r in summary.runs)
        assert len(set(serials)) == 6

        # The certificates chain to the fleet root and re-verify their attestation offline.
        chain_verifier = (verification.PolicyBuilder()
                          .store(verification.Store([line.root_cert]))
                          .build_client_verifier())
        for made in lot.chips:
            device = line.registry.find_by_se_uid(made.uid)[0]
            assert device.status == COMMITTED and device.station.startswith("st-")
            cert = x509.load_der_x509_certificate(bytes(made.nvm.get("cert/1")))
            chain_verifier.verify(cert, [line.ca_cert])
            statement = verify_attestation_extension(cert, line.vendor_roots,
                                                     expected_se_uid=made.uid)
            assert statement.slot == C.SLOT_IDENTITY
            assert made.nvm.get("ta/%04x" % C.DGI_FLEET_ROOT) == line.root_cert.public_bytes(
                serialization.Encoding.DER)
            firmware = line.hsm.public_key(line.labels["firmware"]).public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
            assert made.nvm.get("ta/%04x" % C.DGI_FIRMWARE_KEY) == firmware

        with open(report) as f:
            page = f.read()
        assert "<svg" in page and "Stations vs throughput" in page and "100.00 %" in page

        written = [p for p in files_under(line.workdir)
                   if before.get(p) != os.stat(p).st_mtime_ns]
        assert any(p.endswith("registry.db") or "registry.db-" in p for p in written)
        assert any(p.endswith("journal.jsonl") for p in written)
        logs = [r.getMessage() for r in caplog.records]
        secrets = secret_values(line, lot.chips, transport)
        assert len(secrets) >= 1 + 3 + 6 * 5  # master, transport, per chip: 3 keys + 2 EC
        canary = tmp_path / "canary"  # the scanner finds what it looks for
        canary.write_bytes(b"x" + secrets[-1].hex().encode() + b"x")
        assert scan([str(canary)], secrets[-1:]) != []
        hits = scan(written, secrets, logs)
        assert hits == [], "secret bytes in %s" % sorted({h[0] for h in hits})
    finally:
        line.close()


@pytest.fixture
def soft_line(tmp_path):
    line = make_line(tmp_path)
    yield line
    line.close()


def _state(line):
    return (line.registry.head(), len(line.journal.entries()))


def test_counterfeit_chip_is_refused_before_anything_is_written(soft_line, tmp_path):
    other_vendor = fab.load_or_create_vendor_ca(str(tmp_path / "other-vendor"))
    lot, _keys = known_lot(soft_line, 1, vendor=other_vendor)
    resources = soft_line.resources_for(lot.batch)
    before = _state(soft_line)
    made = lot.chips[0]
    result = Station("st-01", resources).provision(BusEndpoint(made.chip))
    assert not result.ok and result.cause == "counterfeit:unknown_vendor"
    assert result.serial is None and result.step == "identify"
    assert _state(soft_line) == before
    assert soft_line.registry.find_by_se_uid(made.uid) == []
    assert made.nvm.get("scp/%02x" % C.SCP03_KVN_TRANSPORT) is not None  # untouched
    assert made.nvm.get("key/1") is None


def test_each_chip_chain_is_validated_once_for_the_gate_and_the_ca(soft_line):
    # The counterfeit check goes through the CA's evidence verifier: its chain cache then
    # answers the CA's own check of the same MAK chain at issuance.
    lot, _keys = known_lot(soft_line, 2)
    resources = soft_line.resources_for(lot.batch)
    verifier = resources.issuing_ca.evidence_verifier
    assert resources.chain_verifier is verifier
    hits = verifier.chain_cache_hits
    station = Station("st-01", resources)
    for made in lot.chips:
        assert station.provision(BusEndpoint(made.chip)).ok
    assert verifier.chain_cache_hits == hits + 2


class _OtherKeyChip(Chip):
    """Attests the key in slot 5 whatever slot the station asks for."""

    def _attest(self, cmd, tx):
        cmd.p1 = 5
        return Chip._attest(self, cmd, tx)


class _UidView:
    def __init__(self, tx, uid):
        self._tx = tx
        self._uid = uid

    def get(self, key, default=None):
        return self._uid if key == "uid" else self._tx.get(key, default)


class _WrongUidChip(Chip):
    """Signs attestation statements that claim another SE UID."""

    def _attest(self, cmd, tx):
        return Chip._attest(self, cmd, _UidView(tx, b"\x42" * 16))


class _ReplayingCa:
    """An issuing CA proxy that hands out its first nonce again (a replaying station)."""

    def __init__(self, ca):
        self._ca = ca
        self._first = None

    def issue_nonce(self):
        if self._first is None:
            self._first = self._ca.issue_nonce()
        return self._first

    def __getattr__(self, name):
        return getattr(self._ca, name)


@pytest.mark.parametrize("case, reason", [
    ("other_key", "key_mismatch"),
    ("wrong_uid", "se_uid_mismatch"),
    ("replay", "nonce_replayed"),
])
def test_attestation_refusals_issue_nothing_and_hold_the_device(soft_line, case, reason):
    chip_cls = {"other_key": _OtherKeyChip, "wrong_uid": _WrongUidChip}.get(case, Chip)
    lot, _keys = known_lot(soft_line, 2 if case == "replay" else 1, chip_cls=chip_cls)
    if case == "other_key":
        plant_key(lot.chips[0].nvm, 5, os.urandom(31) + b"\x01", policy=C.POLICY_SIGN)
    counting = CountingHsm(soft_line.hsm)
    soft_line.issuing_ca.hsm = counting  # every CA signature is counted
    resources = soft_line.resources_for(lot.batch)
    if case == "replay":
        resources.issuing_ca = _ReplayingCa(resources.issuing_ca)
        assert Station("st-01", resources).provision(BusEndpoint(lot.chips[0].chip)).ok
    made = lot.chips[-1]
    signatures_before = counting.signatures
    journal_before = len(soft_line.journal.entries())
    count_before, _head = soft_line.registry.head()

    result = Station("st-01", resources).provision(BusEndpoint(made.chip))

    assert not result.ok and result.cause == "issuance_refused:" + reason
    assert result.step == "issue" and result.cert_der is None
    assert len(soft_line.journal.entries()) == journal_before  # no certificate exists
    assert counting.signatures == signatures_before  # the CA signed nothing
    device = soft_line.registry.get_device(result.serial)
    assert device.status == HELD and reason in device.hold_reason
    assert soft_line.registry.certificates(result.serial) == []
    entries = soft_line.registry.audit_entries_for(result.serial)
    assert [e.type for e in entries] == ["hold"]  # the intent's only trace: its hold
    assert soft_line.registry.head()[0] == count_before + 1
    assert made.nvm.get("cert/1") is None and made.nvm.get("lc") != bytes((C.LC_SECURED,))
    check_invariants(soft_line, lot.chips)


def test_a_chip_already_in_the_registry_is_refused(soft_line):
    lot, _keys = known_lot(soft_line, 1)
    resources = soft_line.resources_for(lot.batch)
    made = lot.chips[0]
    assert Station("st-01", resources).provision(BusEndpoint(made.chip)).ok
    before = _state(soft_line)
    again = Station("st-02", resources).provision(BusEndpoint(made.chip))
    assert again.cause.startswith("not_personalisable") and again.serial is None
    assert _state(soft_line) == before


def test_line_failure_carries_cause_and_step():
    failure = LineFailure("confirmation:possession", "confirm", "bad signature")
    assert failure.cause == "confirmation:possession" and failure.step == "confirm"


def test_issuance_journal_shares_fsyncs_between_concurrent_stations(tmp_path, monkeypatch):
    import threading
    import time as time_mod

    from fleetid.cloud.line import journal as journal_mod
    from fleetid.cloud.line.journal import IssuanceJournal

    real_sync = journal_mod._sync  # os.fdatasync (os.fsync where the OS lacks it)

    def slow_sync(fd):  # a disk with 5 ms of commit latency
        time_mod.sleep(0.005)
        real_sync(fd)

    monkeypatch.setattr(journal_mod, "_sync", slow_sync)
    journal = IssuanceJournal(tmp_path / "journal.jsonl")
    cert = bytes.fromhex("3003020101")

    def station(i):
        for n in range(5):
            journal.record(i * 100 + n, bytes([i]) * 16, cert)

    threads = [threading.Thread(target=station, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    journal.close()
    serials = sorted(s for s, _uid, _cert in IssuanceJournal(tmp_path / "journal.jsonl")
                     .entries())
    assert serials == sorted(i * 100 + n for i in range(8) for n in range(5))
    assert 1 <= journal.fsyncs < 40  # shared, never more than one per record


def test_report_makes_a_yield_drop_obvious():
    from fleetid.cloud.line.station import DeviceResult

    runs = []
    for i in range(100):
        result = DeviceResult("st-01")
        result.ok = i >= 3
        result.cause = None if result.ok else "hsm:busy"
        runs.append(runner.DeviceRun(result, 20.0 + i % 7, 0.0, 5.0, 10.0, 19))
    summary = runner.RunSummary(4, "none", runs, 2.0, 76000, 97, {"busy_timeouts": 3}, "lot")
    page = report_mod.report_html([summary])
    assert summary.yield_pct == 97.0 and summary.failures() == {"hsm:busy": 3}
    assert "class='bad'>97.00 %" in page and "Yield loss 3.00 %" in page
    assert "<code>hsm:busy</code>" in page


def test_report_lists_every_device_with_serial_se_uid_fingerprint_station_and_time(tmp_path):
    """A real line run (soft keystore, two stations): the report's HTML and JSON list each
    device as the registry and the chip itself know it."""
    import datetime
    import hashlib
    import json

    line = make_line(tmp_path, "soft")
    try:
        lot, _transport = known_lot(line, 3)
        started = datetime.datetime.now(datetime.timezone.utc)
        summary = runner.run_line(line.resources_for(lot.batch), lot.chips, EmulatedBuses(),
                                  stations=2)
        ended = datetime.datetime.now(datetime.timezone.utc)
        path = report_mod.write_report([summary], os.path.join(line.workdir, "report.html"))
        page = open(path).read()
        with open(os.path.join(line.workdir, "report.json")) as f:
            rows = json.load(f)[0]["devices"]
        assert len(rows) == 3 and [r["status"] for r in rows] == ["committed"] * 3
        by_uid = {r["se_uid"]: r for r in rows}
        for made in lot.chips:
            device = line.registry.find_by_se_uid(made.uid)[0]
            row = by_uid[made.uid.hex()]
            fingerprint = hashlib.sha256(bytes(made.nvm.get("cert/1"))).hexdigest()
            cert = x509.load_der_x509_certificate(bytes(made.nvm.get("cert/1")))
            assert row["serial"] == device.serial and row["station"] == device.station
            assert row["device_serial"] == cert.subject.get_attributes_for_oid(
                x509.oid.NameOID.COMMON_NAME)[0].value
            assert row["cert_sha256"] == fingerprint
            when = datetime.datetime.strptime(row["finished_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
            assert started <= when.replace(tzinfo=datetime.timezone.utc) <= ended
            for text in (row["device_serial"], made.uid.hex(), fingerprint, row["station"],
                         row["finished_at"]):
                assert text in page
    finally:
        line.close()
