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
* certcheck: device/certcheck checks a device certificate for a key in the SE against a
  fleet root (the project's certificate profiles, signed on CPython): cacerts filtered
  by SE VERIFY, the certificate accepted; expired, look-alike-signed and other-key
  variants refused with their reasons.

Heap: each workflow runs at its budget in tests/micropython/budgets.py (1.25x the smallest
`-X heapsize` that passes, bisected to 1 KiB by bench/micropython.py, which reruns this
test with FLEETID_MP_HEAP overriding one workflow's heap).
"""

import hashlib
import os
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetid.common import attestation, t1
from fleetid.common.apdu import ApduProtocol
from fleetid.device import enrol
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
for name in ("fleetid.common.der", "fleetid.common.attestation", "fleetid.common.csr",
             "fleetid.device.enrol", "fleetid.common.asn1time", "fleetid.common.x509",
             "fleetid.device.certinfo"):
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

CERTCHECK_SCRIPT = r"""
for name in ("fleetid.common.der", "fleetid.common.asn1time", "fleetid.common.x509",
             "fleetid.device.certcheck"):
    __import__(name)
    gc.collect()
from fleetid.device import certcheck
import certdata

stack = open_se("sim:unix:" + SOCK + "?timeout_ms=10000", ifsd=IFSD)
se = stack.se
checker = certcheck.CertificateChecker(se, certdata.ROOT)
cas = checker.verified_cas([certdata.LOOKALIKE, certdata.CA, certdata.ROOT], certdata.NOW)
print("cas", len(cas), cas[0].depth)
gc.collect()
identity = certcheck.parse_certificate(certdata.IDENTITY)
point = se.public_key(4)[1]
cert = checker.check_issued(certdata.OP, cas, point, identity, certdata.NOW)
print("ok", cert.serial, cert.not_after)
for label, data, now in (("expired", certdata.OP, cert.not_after + 1),
                         ("forged", certdata.FORGED, certdata.NOW),
                         ("otherkey", certdata.OTHER, certdata.NOW)):
    gc.collect()
    try:
        checker.check_issued(data, cas, point, identity, now)
        print("refused", label, "none")
    except certcheck.CertificateRefused as exc:
        print("refused", label, exc.reason)
stack.close()
print("done", gc.mem_free())
"""

SCRIPTS = {"run_agent_journal": JOURNAL_SCRIPT, "run_agent_csr": CSR_SCRIPT,
           "run_agent_certcheck": CERTCHECK_SCRIPT}


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
    # The CSR builder (device/enrol.py over common/csr.py) gives the same bytes under both
    # interpreters: CPython's run on the same inputs, with the SE's signature, and asked to
    # sign sha256 of the same info.
    asked = []

    class Signer:
        def sign(self, slot, digest):
            asked.append((slot, digest))
            return csr.signature

    again = enrol.attested_csr(Signer(), 4, point, bundle.statements[0], bundle.certificates,
                               "FID-000000042", "FID-000000042")
    assert again.hex() == out["csr"][0]
    assert asked == [(4, hashlib.sha256(csr.tbs_certrequest_bytes).digest())]
    mak = x509.load_der_x509_certificate(rig.record.chain_der[0])
    serial, not_before, not_after, mak_point = out["mak"][0].split()
    assert int(serial) == mak.serial_number
    assert int(not_before) == int(mak.not_valid_before_utc.timestamp())
    assert int(not_after) == int(mak.not_valid_after_utc.timestamp())
    assert mak_point == mak.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint).hex()


def _fleet_certificates(point):
    # A root, its issuing CA, an identity and an operational certificate for `point`
    # (the project's profiles), a look-alike CA and its forgery, another key's certificate.
    import datetime
    import time

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from fleetid.cloud.pki import profiles

    def der(cert):
        return cert.public_bytes(serialization.Encoding.DER)

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    now = datetime.datetime.now(datetime.timezone.utc)
    years = datetime.timedelta(days=3700)
    root_key, ca_key, fake_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = profiles.root_builder(name("mp root"), root_key.public_key(), now, now + 2 * years) \
        .sign(root_key, hashes.SHA256())
    ca = profiles.issuing_ca_builder(name("mp CA"), ca_key.public_key(), root, now,
                                     now + years).sign(root_key, hashes.SHA256())
    lookalike = profiles.issuing_ca_builder(name("mp CA"), fake_key.public_key(), root, now,
                                            now + years).sign(fake_key, hashes.SHA256())
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(point))
    other = ec.generate_private_key(ec.SECP256R1()).public_key()

    def device(profile, public_key, signer):
        return der(profiles.device_builder(profile, "FID-000000042", public_key, ca, now)
                   .sign(signer, hashes.SHA256()))

    return {"ROOT": der(root), "CA": der(ca), "LOOKALIKE": der(lookalike),
            "IDENTITY": device("identity", other, ca_key),
            "OP": device("operational", key, ca_key),
            "FORGED": device("operational", key, fake_key),
            "OTHER": device("operational", other, ca_key), "NOW": int(time.time())}


def test_certificate_checks_under_micropython(tmp_path, rig):
    se = rig.se()
    point = se.generate_key(4, 0x01)
    data = _fleet_certificates(point)
    stage = Stage(tmp_path / "mp-certcheck", opt=3)
    _compile(stage, "certdata", "".join("%s = %r\n" % item for item in data.items()))
    _compile(stage, "run_agent_certcheck", rig.header() + PRELUDE + CERTCHECK_SCRIPT)
    out = _run(stage, "run_agent_certcheck")
    assert out["cas"] == ["1 1"]  # the look-alike CA left out, the root itself skipped
    op = x509.load_der_x509_certificate(data["OP"])
    assert out["ok"] == ["%d %d" % (op.serial_number,
                                    int(op.not_valid_after_utc.timestamp()))]
    assert sorted(out["refused"]) == ["expired expired", "forged signature",
                                      "otherkey key"]
