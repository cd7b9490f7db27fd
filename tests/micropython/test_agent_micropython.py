"""The device agent's portable workflows under the real MicroPython interpreter (unix
port), against the emulator over its socket, through the one SE stack
(fleetid.device.stack.open_se):

* journal: the rotation journal in the SE holds what a power cut after ISSUED leaves
  (BASE(2), BEGIN(2->3), ISSUED(2->3), keys and certificates in slots 2 and 3); the agent
  replays it by the decision table: acknowledges slot 3 (a fake `net`), deletes slot 2,
  compacts the journal to BASE(3).  CPython then reads the same SE and checks it.
* csr: device/enrol.build_attested_csr (GENERATE KEY, ATTEST with a nonce, CSR signed in
  the SE) and device/certinfo on the MAK certificate; CPython verifies the CSR's
  signature, its key against the SE's, the attestation's nonce and slot, and the facts.

Heap: each workflow runs at its budget in tests/micropython/budgets.py (1.25x the smallest
`-X heapsize` that passes, bisected to 1 KiB by bench/micropython.py, which reruns this
test with FLEETID_MP_HEAP overriding one workflow's heap).
"""

import os
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetid.common import attestation, t1
from fleetid.common.apdu import ApduProtocol
from fleetid.device import rotation_journal as rj
from fleetid.device.se import SeSession
from tests.micropython.budgets import heap_for
from tests.micropython.support import PRELUDE as HEX_PRELUDE
from tests.micropython.support import Stage, parse

pytestmark = pytest.mark.micropython

IFSD = 64
T0, T1 = 1796500000, 1799100000

PRELUDE = HEX_PRELUDE + r"""
for name in ("fleetid.common.errors", "fleetid.common.crc16", "fleetid.common.clock",
             "fleetid.common.t1", "fleetid.common.t1link", "fleetid.common.apdu_wire",
             "fleetid.common.apdu",
             "fleetid.device.bus", "fleetid.device.bus_sim", "fleetid.device.se",
             "fleetid.device.stack"):
    __import__(name)
    gc.collect()
from fleetid.device.stack import open_se
"""

JOURNAL_SCRIPT = r"""
for name in ("fleetid.device.enrol", "fleetid.device.rotation_journal",
             "fleetid.device.agent"):
    __import__(name)
    gc.collect()
from fleetid.device import rotation_journal as rj
from fleetid.device.agent import Agent


class Net:
    def ack(self, slot):
        print("ack", slot)


class Clock:
    def now(self):
        return 1797000000

    def sleep(self, seconds):
        pass


stack = open_se("sim:unix:" + SOCK + "?timeout_ms=10000", ifsd=IFSD)
agent = Agent(stack.se, Net(), Clock(), lambda: 0.5)
last = agent.journal.load()
print("before", rj.KIND_NAMES[last.kind], rj.credential_slot(last), len(agent.journal.records))
gc.collect()
last = agent.resume(last)
print("after", rj.KIND_NAMES[last.kind], last.cur, len(agent.journal.records), last.t0, last.t1)
stack.close()
print("done", gc.mem_free())
"""

CSR_SCRIPT = r"""
for name in ("fleetid.common.der", "fleetid.common.attestation", "fleetid.device.enrol",
             "fleetid.common.asn1time", "fleetid.device.certinfo"):
    __import__(name)
    gc.collect()
from fleetid.device import certinfo, enrol

stack = open_se("sim:unix:" + SOCK + "?timeout_ms=10000", ifsd=IFSD)
se = stack.se
chain = se.attestation_chain()
gc.collect()
facts = certinfo.certificate_facts(chain[0])
print("mak", facts.serial, facts.not_before, facts.not_after, h(facts.point))
gc.collect()
point, signed, csr = enrol.build_attested_csr(se, 4, u(NONCE), "FID-000000042",
                                              "FID-000000042", chain)
show("point", point)
show("csr", csr)
stack.close()
print("done", gc.mem_free())
"""

SCRIPTS = {"run_agent_journal": JOURNAL_SCRIPT, "run_agent_csr": CSR_SCRIPT}


class _Rig:
    """A fabbed chip served on a Unix socket, its NVM restorable between runs."""

    def __init__(self, tmp_path):
        from fleetid.sim import profiles
        from fleetid.sim.chip import Chip
        from fleetid.sim.endpoint import BusEndpoint
        from fleetid.sim.fab import fab_chip
        from fleetid.sim.nvm import Nvm
        from fleetid.sim.server import serve_in_thread

        self.nvm_path = str(tmp_path / "chip.nvm")
        self.record = fab_chip(str(tmp_path / "vendor"), self.nvm_path)
        self.chip = Chip(Nvm(self.nvm_path))
        self._state_after_cut()
        self.snapshot = str(tmp_path / "chip.snapshot")
        shutil.copyfile(self.nvm_path, self.snapshot)
        endpoint = BusEndpoint(self.chip, profile=t1.PROFILE_GP, latency=profiles.get("none"))
        self.sock = str(tmp_path / "se.sock")
        self.server = serve_in_thread(endpoint, "unix:" + self.sock, idle_timeout_s=30)
        self.nonce = os.urandom(20)

    def se(self):
        self.chip.power_loss()
        se = SeSession(ApduProtocol(self.chip.process))
        se.select()
        return se

    def _state_after_cut(self):
        # What a power cut right after the ISSUED record leaves (decision table row
        # "ISSUED"): both keys with certificates, the journal BASE, BEGIN, ISSUED.
        se = self.se()
        for slot in (2, 3):
            se.generate_key(slot, 0x01)
            se.put_cert(slot, b"\x30\x03\x02\x01" + bytes((slot,)))
        journal = rj.RotationJournal(se)
        journal.append(rj.Record(rj.BASE, 2, 0, rj.CAUSE_NONE, T0 - 1000, T1 - 1000))
        journal.append(rj.Record(rj.BEGIN, 2, 3, rj.CAUSE_DUE, T0, 0))
        journal.append(rj.Record(rj.ISSUED, 2, 3, rj.CAUSE_DUE, T0, T1))

    def restore(self):
        shutil.copyfile(self.snapshot, self.nvm_path)
        self.chip.power_loss()  # re-reads the NVM file

    def header(self):
        return "SOCK = %r\nIFSD = %d\nNONCE = %r\n" % (self.sock, IFSD, self.nonce.hex())

    def close(self):
        self.server.stop()


@pytest.fixture
def rig(tmp_path):
    rig = _Rig(tmp_path)
    yield rig
    rig.close()


def _compile(stage, name, script):
    source = stage.folder / (name + ".py")
    source.write_text(script)
    stage.compile(source, stage.folder / (name + ".mpy"))
    source.unlink()


def _try(stage, name, heap):
    proc = subprocess.run([stage.micropython, "-X", "heapsize=" + heap, "-c", "import " + name],
                          cwd=str(stage.folder), capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, MICROPYPATH=str(stage.folder)))
    return proc.returncode == 0 and "\ndone " in proc.stdout, proc


@pytest.fixture
def stage(tmp_path, rig):
    stage = Stage(tmp_path / "mp", opt=3)
    for name, script in SCRIPTS.items():
        _compile(stage, name, rig.header() + PRELUDE + script)
    return stage


def _run(stage, name):
    heap = heap_for(name)
    ok, proc = _try(stage, name, heap)
    if not ok:
        pytest.fail("%s at %s:\n%s%s" % (name, heap, proc.stdout, proc.stderr))
    return parse(proc.stdout)


def test_journal_replay_after_a_cut_under_micropython(stage, rig):
    out = _run(stage, "run_agent_journal")
    assert out["before"] == ["ISSUED 3 3"]
    assert out["ack"] == ["3"]
    assert out["after"] == ["BASE 3 1 %d %d" % (T0, T1)]
    se = rig.se()  # CPython reads the same SE
    journal = rj.RotationJournal(se)
    last = journal.load()
    assert (last.kind, last.cur, last.t0, last.t1) == (rj.BASE, 3, T0, T1)
    assert len(journal.records) == 1
    from fleetid.common.errors import ReferenceNotFound

    with pytest.raises(ReferenceNotFound):
        se.public_key(2)
    assert se.get_cert(3) == b"\x30\x03\x02\x01\x03"


def test_attested_csr_and_certificate_facts_under_micropython(stage, rig):
    out = _run(stage, "run_agent_csr")
    se = rig.se()
    point = bytes.fromhex(out["point"][0])
    assert se.public_key(4)[1] == point
    csr = x509.load_der_x509_csr(bytes.fromhex(out["csr"][0]))
    assert csr.is_signature_valid
    assert csr.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint) == point
    assert csr.subject.rfc4514_string() == "2.5.4.5=FID-000000042,CN=FID-000000042"
    from fleetid.cloud.ca.issuing import evidence_from_csr

    bundle = attestation.decode_evidence_bundle(evidence_from_csr(csr.public_bytes(
        serialization.Encoding.DER)))
    statement = bundle.statements[0].statement
    assert (statement.slot, statement.nonce, statement.public_point) == (4, rig.nonce, point)
    mak = x509.load_der_x509_certificate(rig.record.chain_der[0])
    serial, not_before, not_after, mak_point = out["mak"][0].split()
    assert int(serial) == mak.serial_number
    assert int(not_before) == int(mak.not_valid_before_utc.timestamp())
    assert int(not_after) == int(mak.not_valid_after_utc.timestamp())
    assert mak_point == mak.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint).hex()
