"""The audit trail has no holes (issue 9, defect 3).

Every issuance, re-issuance, revocation and rotation acknowledgement is an audit entry,
whichever path it takes (EST over HTTPS, `fleetid cloud revoke-ca`, the verifier's own
CA revocation); a killed line run is anchored by `line reconcile`, a stopped one by its
own shutdown; and the witness keeps an anchor that a truncated, rewritten log cannot fake.
"""

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cli.main import cli
from fleetid.cloud import audit
from fleetid.cloud.line import runner, workdir
from fleetid.cloud.line.reconcile import reconcile
from fleetid.cloud.line.station import Station
from fleetid.cloud.registry import verify_registry_log
from fleetid.cloud.verifier.revoked_cas import ca_fingerprint
from fleetid.sim.endpoint import BusEndpoint
from fleetid.sim.metering import EmulatedBuses
from tests.cloud.cloud_support import pem
from tests.cloud.hsm_support import KEYSTORE_PASS
from tests.cloud.line_support import LINE_ENV, init_demo_line, known_lot, make_line

ANY_KEY = ec.generate_private_key(ec.SECP256R1()).public_key()  # logs without checkpoints


def _types(registry, serial):
    return [e.type for e in registry.audit_entries_for(serial)]


def test_est_enrolment_reenrolment_and_rotation_ack_are_audit_entries(fleet, cloud):
    device = fleet.provision()
    _, csr = device.csr()
    status, _, body = cloud.request("est", "POST", "/.well-known/est/simpleenroll",
                                    files=device.files(), body=base64.b64encode(csr),
                                    headers={"Content-Type": "application/pkcs10"})
    assert status == 200, body
    fleet.enrol(device)  # the device now holds an operational certificate
    old_files = device.files()
    key, csr = device.csr()
    status, _, body = cloud.request("est", "POST", "/.well-known/est/simplereenroll",
                                    files=old_files, body=base64.b64encode(csr),
                                    headers={"Content-Type": "application/pkcs10"})
    assert status == 200, body
    from cryptography.hazmat.primitives.serialization import pkcs7

    [new] = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    status, _, _ = cloud.request("verifier", "POST", "/v1/rotation/ack",
                                 files=device.files(new, key))
    assert status == 200
    entries = fleet.registry.audit_entries_for(device.serial)
    assert [e.type for e in entries] == ["injection", "issuance", "issuance", "issuance",
                                         "rotation_ack"]
    assert [e.fields.get("operation") for e in entries[1:4]] == [
        "simpleenroll", "simpleenroll", "simplereenroll"]
    new_fp = new.fingerprint(hashes.SHA256()).hex()
    assert entries[3].fields["cert_fingerprint"] == new_fp
    assert entries[4].fields["cert_fingerprint"] == new_fp
    assert entries[4].fields["previous_fingerprint"] == entries[2].fields["cert_fingerprint"]
    assert all(e.fields["kind"] == "operational" for e in entries[1:4])
    report = verify_registry_log(fleet.registry, ANY_KEY, ANY_KEY)
    assert report.by_type == {"injection": 1, "issuance": 3, "rotation_ack": 1}


def test_ca_revocation_by_cli_and_by_the_verifier_are_audit_entries(fleet, tmp_path):
    ca_file = tmp_path / "b42.pem"
    ca_file.write_bytes(pem(fleet.ca_certs["b42"]))
    (tmp_path / "root.pem").write_bytes(pem(fleet.root))
    config = tmp_path / "cloud.toml"
    config.write_text('[cloud]\nstate_dir = "%s"\nregistry = "sqlite:%s"\nroots = ["%s"]\n'
                      % (tmp_path / "state", os.path.join(fleet.dir, "registry.db"),
                         tmp_path / "root.pem"))
    head = fleet.registry.head()
    result = CliRunner().invoke(cli, ["cloud", "revoke-ca", "--cert", str(ca_file),
                                      "--reason", "cACompromise", "--operator", "alice",
                                      "--config", str(config)])
    assert result.exit_code == 0, result.output
    count, _ = fleet.registry.head()
    assert count == head[0] + 1
    [line] = list(fleet.registry.iter_audit_lines(head[0]))
    entry = audit.parse_entry(line, head[0])
    assert entry.type == "ca_revoke"
    assert entry.fields["ca_fingerprint"] == ca_fingerprint(fleet.ca_certs["b42"])
    assert (entry.fields["reason"], entry.fields["operator"]) == ("cACompromise", "alice")
    # Repeating it changes nothing (already revoked).
    again = CliRunner().invoke(cli, ["cloud", "revoke-ca", "--cert", str(ca_file),
                                     "--config", str(config)])
    assert again.exit_code == 0 and fleet.registry.head()[0] == count
    # The service (the one writer) writes its entry too.
    fleet.revocation.revoke_ca(fleet.ca_certs["b43"], "superseded", operator="bob")
    [line] = list(fleet.registry.iter_audit_lines(count))
    assert audit.parse_entry(line, count).fields["subject"] == \
        fleet.ca_certs["b43"].subject.rfc4514_string()


# -- checkpoints after a kill and at shutdown ---------------------------------------------------


def test_reconcile_signs_a_checkpoint_over_what_a_killed_run_left(tmp_path):
    line = make_line(tmp_path)
    try:
        lot, _keys = known_lot(line, 3)
        resources = line.resources_for(lot.batch)
        for index, made in enumerate(lot.chips):  # a run killed before its end-of-run checkpoint
            assert Station("st-%d" % index, resources).provision(BusEndpoint(made.chip)).ok
        public = line.public_keys()
        assert verify_registry_log(line.registry, *public).unanchored == 3
        report = reconcile(resources, None)
        assert report.decisions == [] and report.checkpoint is not None
        assert verify_registry_log(line.registry, *public).unanchored == 0
        assert reconcile(resources, None).checkpoint is None  # nothing new: no entry
    finally:
        line.close()


def test_reconcile_command_reports_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETID_KEYSTORE_PASS", KEYSTORE_PASS)
    out = str(tmp_path / "line")
    line = init_demo_line(out, scrypt_n=2**14)
    try:
        lot, _keys = known_lot(line, 1)
        Station("st-1", line.resources_for(lot.batch)).provision(BusEndpoint(lot.chips[0].chip))
    finally:
        line.close()
    result = CliRunner().invoke(cli, ["line", "reconcile", "--out", out])
    assert result.exit_code == 0, result.output
    assert "audit checkpoint signed: covers" in result.output


def test_a_line_run_stopped_by_sigterm_signs_a_last_checkpoint(tmp_path):
    out = tmp_path / "line"
    env = dict(os.environ, FLEETID_KEYSTORE_PASS=KEYSTORE_PASS)
    init = subprocess.run([sys.executable, "-m", "fleetid.cli.main", "line", "init", str(out)],
                          env=env, capture_output=True, timeout=120, check=False)
    assert init.returncode == 0, init.stderr
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetid.cli.main", "line", "run", "--devices", "5000",
         "--stations", "2", "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            time.sleep(0.3)
            conn = sqlite3.connect("file:%s?mode=ro" % (out / "registry.db"), uri=True)
            try:
                count = conn.execute("SELECT entry_count FROM audit_head").fetchone()[0]
            except sqlite3.Error:
                count = 0
            finally:
                conn.close()
            if count >= 5:
                break
        assert process.poll() is None, process.stderr.read()
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 1
    assert b"Traceback" not in process.stderr.read()
    line = workdir.open_line(str(out), environ=env)
    try:
        report = verify_registry_log(line.registry, *line.public_keys())
        assert report.entries < 5000 and report.unanchored == 0 and report.checkpoints >= 1
    finally:
        line.close()


# -- the witness's anchor ------------------------------------------------------------------------


def _pub(path, key):
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(path)


def test_the_witness_anchor_catches_a_truncated_and_rewritten_log(tmp_path):
    line = make_line(tmp_path)
    try:
        lot, _keys = known_lot(line, 4)
        runner.run_line(line.resources_for(lot.batch), lot.chips, EmulatedBuses(), stations=2)
        line_pub, witness_pub = line.public_keys()
        anchor_file = os.path.join(line.workdir, "witness", "anchor.json")
        covers, head = audit.read_witness_anchor(anchor_file, witness_pub)
        assert (covers, head) == (line.registry.last_checkpoint().fields["covers"],
                                  line.registry.last_checkpoint().fields["head"])
        db = os.path.join(line.workdir, "registry.db")
    finally:
        line.close()
    keys = ["--line-pub", _pub(tmp_path / "l.pem", line_pub),
            "--witness-pub", _pub(tmp_path / "w.pem", witness_pub)]
    uri = "sqlite:" + db

    def verify(*extra):
        return CliRunner().invoke(cli, ["audit", "verify", "--registry", uri, *keys, *extra])

    assert verify("--witness-anchor", anchor_file).exit_code == 0
    # An insider cuts the log after entry 1 and moves the head row to match.
    conn = sqlite3.connect(db)
    kept = conn.execute("SELECT entry_hash FROM audit_log WHERE seq = 1").fetchone()[0]
    conn.execute("DELETE FROM audit_log WHERE seq >= 2")
    conn.execute("UPDATE audit_head SET entry_count = 2, head_hash = ?", (kept,))
    conn.commit()
    conn.close()
    assert verify().exit_code == 0  # self-consistent without the anchor
    result = verify("--witness-anchor", anchor_file)
    assert result.exit_code == 1 and "first bad entry 2: truncated" in result.output
    # The witness will not sign the shorter log, so no new anchor can paper over the cut.
    line = workdir.open_line(os.path.join(str(tmp_path), "line"), environ=LINE_ENV)
    try:
        with pytest.raises(audit.AuditError) as refused:
            line.checkpointer.checkpoint()
        assert refused.value.reason == audit.AuditError.STATE
    finally:
        line.close()
    assert audit.read_witness_anchor(anchor_file, witness_pub) == (covers, head)
    # A forged anchor (covers lowered) fails its signature.
    with open(anchor_file) as f:
        forged = json.loads(f.read())
    forged["covers"] = 2
    forged_file = tmp_path / "forged.json"
    forged_file.write_text(json.dumps(forged))
    result = verify("--witness-anchor", str(forged_file))
    assert result.exit_code == 1 and "signature does not verify" in result.output


def test_the_cloud_signs_checkpoints_while_it_runs_and_at_shutdown(fleet, tmp_path):
    """What the EST server and the verifier record is anchored without a line run."""
    from tests.cloud.cloud_support import RunningCloud
    from tests.cloud.test_registry import LINE, WITNESS

    anchor = tmp_path / "witness" / "anchor.json"
    checkpointer = audit.Checkpointer(fleet.registry, LINE,
                                      audit.AnchoringWitness(WITNESS, anchor),
                                      every_entries=3)
    with RunningCloud(fleet, checkpointer=checkpointer, checkpoint_poll=0.05) as cloud:
        device = fleet.provision()
        for _ in range(2):
            _, csr = device.csr()
            status, _, body = cloud.request(
                "est", "POST", "/.well-known/est/simpleenroll", files=device.files(),
                body=base64.b64encode(csr), headers={"Content-Type": "application/pkcs10"})
            assert status == 200, body
        deadline = time.monotonic() + 10
        while fleet.registry.last_checkpoint() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fleet.registry.last_checkpoint() is not None  # made while running
        fleet.revocation.revoke_ca(fleet.ca_certs["b43"], "unspecified")  # one more entry
    report = verify_registry_log(fleet.registry, LINE.public_key(), WITNESS.public_key(),
                                 witness_anchor=audit.read_witness_anchor(
                                     anchor, WITNESS.public_key()))
    assert report.unanchored == 0 and report.checkpoints == 2
