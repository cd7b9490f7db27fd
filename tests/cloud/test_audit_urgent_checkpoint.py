"""A revocation or CA change is checkpointed at once (cloud/audit/checkpoints.py
URGENT_TYPES): the Checkpointer calls one due as soon as such an entry is pending, and a
running `cloud serve` anchors one written by another process (`fleetid revoke`) within
its poll, so `fleetid audit verify` then passes with nothing uncovered."""

import json
import os
import time

from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from fleetid.cli.main import cli
from fleetid.cloud import audit
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
from fleetid.cloud.verifier import revoked_cas
from tests.cloud.cloud_support import Fleet, RunningCloud, pem
from tests.cloud.test_registry import CA_NAME, LINE, T0, WITNESS, provision


def test_a_revocation_or_ca_change_makes_a_checkpoint_due_at_once(tmp_path):
    now = [T0]
    with SqliteRegistry(tmp_path / "r.db", wall_clock=lambda: now[0]) as reg:
        serials = [provision(reg) for _ in range(3)]
        checkpointer = audit.Checkpointer(reg, LINE, WITNESS, every_entries=256,
                                          every_seconds=3600, wall_clock=lambda: now[0])
        assert checkpointer.checkpoint().fields["covers"] == 3
        provision(reg)
        reg.hold(serials[0], "QA sample", station="qa", operator="op-9")
        assert not checkpointer.due()  # an injection and a hold wait for the interval
        reg.mark_revoked(0x7F000000 + serials[1], "keyCompromise", operator="op-1",
                         issuer=CA_NAME.rfc4514_string())
        assert checkpointer.due()  # no time passed, 3 of 256 entries: the revoke decides
        entry = checkpointer.maybe_checkpoint()
        assert entry.fields["covers"] == reg.head()[0] - 1
        assert not checkpointer.due()
        provision(reg)
        assert not checkpointer.due()
        # A fresh checkpointer (another process, a restart) sees a pending revoke too.
        reg.mark_revoked(0x7F000000 + serials[2], "superseded", operator="op-1",
                         issuer=CA_NAME.rfc4514_string())
        assert audit.Checkpointer(reg, LINE, WITNESS, wall_clock=lambda: now[0]).due()


def _keys(tmp_path):
    paths = []
    for name, signer in (("line", LINE), ("witness", WITNESS)):
        path = tmp_path / (name + ".pub.pem")
        path.write_bytes(signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        paths.append(str(path))
    return ["--line-pub", paths[0], "--witness-pub", paths[1]]


def _entries_through(registry, entry_type):
    """The entry count up to and including the log's last entry of `entry_type`."""
    last = None
    for index, line in enumerate(registry.iter_audit_lines()):
        if json.loads(line)["type"] == entry_type:
            last = index
    assert last is not None, entry_type
    return last + 1


def _wait_covered(registry, count):
    """Wait (bounded: the server polls every 50 ms) for a checkpoint covering `count`."""
    deadline = time.monotonic() + 30
    while registry.last_checkpoint().fields["covers"] < count and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert registry.last_checkpoint().fields["covers"] >= count


def test_a_running_cloud_anchors_a_revocation_written_by_another_process(tmp_path):
    fleet = Fleet(tmp_path / "fleet")
    try:
        devices = [fleet.provision("b42") for _ in range(2)]
        for name, cert in (("root", fleet.root), ("b42", fleet.ca_certs["b42"]),
                           ("b43", fleet.ca_certs["b43"])):
            (tmp_path / (name + ".pem")).write_bytes(pem(cert))
        registry_uri = "sqlite:%s" % os.path.join(fleet.dir, "registry.db")
        config = tmp_path / "cloud.toml"
        config.write_text('[cloud]\nstate_dir = "%s"\nroots = ["%s"]\nintermediates = '
                          '["%s", "%s"]\nregistry = "%s"\n' % (
                              tmp_path / "state", tmp_path / "root.pem",
                              tmp_path / "b42.pem", tmp_path / "b43.pem", registry_uri))
        # Hourly otherwise, and no entry count reached: only the revoke makes one due.
        checkpointer = audit.Checkpointer(fleet.registry, LINE, WITNESS, every_entries=256,
                                          every_seconds=3600)
        checkpointer.checkpoint()
        with RunningCloud(fleet, checkpointer=checkpointer, checkpoint_poll=0.05):
            result = CliRunner().invoke(cli, ["revoke", "--serial", str(devices[1].serial),
                                              "--reason", "keyCompromise", "--config",
                                              str(config)], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            # Counted from the revoke entry itself, not from head(): the server may have
            # appended its checkpoint already, and head() would count that entry too.
            revoked_at = _entries_through(fleet.registry, "revoke")
            _wait_covered(fleet.registry, revoked_at)
            # A CA change (the revoked-CA file and its audit entry) the same way.
            revoked_cas.revoke(str(tmp_path / "state" / "revoked-cas.jsonl"),
                               fleet.ca_certs["b43"], fleet.registry, "cACompromise",
                               "alice")
            _wait_covered(fleet.registry, _entries_through(fleet.registry, "ca_revoke"))
        result = CliRunner().invoke(cli, ["audit", "verify", "--registry", registry_uri,
                                          "--json"] + _keys(tmp_path))
        report = json.loads(result.output)
        assert result.exit_code == 0 and report["unanchored"] == 0, result.output
    finally:
        fleet.close()
