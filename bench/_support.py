"""What the benchmarks share: a personalised line and the fleet cloud in one process, and
the device agent's randomized rotation campaign against them (no tests in this module).

Everything here imports fleetid only (never tests/, pytest or hypothesis), so the
benchmarks run in the environment `bash scripts/setup.sh` makes (no --test).  The test
suite uses the same code (tests/device/device_cloud_support.py and agent_support.py
import it from here).

`LineAndCloud`: the factory line (fleetid.cloud.line.workdir + runner) initialised on the
embedded defaults (soft keystore, SQLite), chips fabbed and personalised on a station (they
hold their identity key, certificate and the fleet root trust anchor, exactly as shipped),
and the cloud (EST + verifier, fleetid.cloud.server.CloudServer) on 127.0.0.1 in a
background event loop on the line's PKI and registry, with a TLS server certificate the
fleet root signs through the line's HSM.

`Fleet` wraps it for the agent: `agent(i)` boots chip i (RAM state lost, applet selected)
and builds a fresh Agent on it with the CPython network adapter, as a restarted process
would.  Invariant checks used after every injected fault:
    accepted(i)   the verifier accepts the certificate in the slot the journal designates
    settled(i)    journal final (BASE), exactly the identity slot and the current
                  rotation slot hold keys, the current one holds the verifier's certificate
"""

import asyncio
import datetime
import os
import random
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.ca import IssuingCa
from fleetid.cloud.est.service import EstLabel, EstService
from fleetid.cloud.line import runner
from fleetid.cloud.line import workdir as workdir_mod
from fleetid.cloud.pki.profiles import server_certificate_builder
from fleetid.cloud.pki.signing import sign_certificate
from fleetid.cloud.server import CloudServer
from fleetid.cloud.revocation.service import RevocationService
from fleetid.cloud.verifier.revoked_cas import RevokedCaFile
from fleetid.cloud.verifier.service import FleetTrust, FleetVerifier
from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.common.errors import ReferenceNotFound
from fleetid.device import rotation_journal as rj
from fleetid.device.agent import Agent, AgentPolicy, NetError
from fleetid.device.host.agent_net import HostNetwork
from fleetid.device.se import SeSession
from fleetid.sim import fab
from fleetid.sim import lot as lot_mod
from fleetid.sim.metering import EmulatedBuses

PEM = serialization.Encoding.PEM
LABEL = "widget"
# The throwaway line's soft keystore: its passphrase (the tests re-open the line with the
# same one, tests/cloud/hsm_support.KEYSTORE_PASS) and scrypt's floor cost (~50 ms an open).
KEYSTORE_PASS = "correct horse battery staple"
SCRYPT_N = 2**14


def init_demo_line(path, **kwargs):
    """workdir.init_line on the simulated SE vendor (its root certificate published into
    <path>/vendor first, its key in "<path>.se-vendor", as the CLI's demo does)."""
    fab.publish_vendor_root(str(path) + ".se-vendor", os.path.join(str(path), "vendor"))
    return workdir_mod.init_line(str(path), **kwargs)


class LineAndCloud:
    """A line with `devices` personalised chips and the cloud on the same PKI.

    Attributes: line (workdir.Line), chips (list of EmulatedChip), server (CloudServer),
    ports ({"verifier": int, "est": int}), verifier (FleetVerifier), est (EstService).
    """

    def __init__(self, directory, devices=2, labels_extra=()):
        self.dir = str(directory)
        self.line = init_demo_line(os.path.join(self.dir, "line"), scrypt_n=SCRYPT_N,
                                     environ=dict(os.environ,
                                                  FLEETID_KEYSTORE_PASS=KEYSTORE_PASS))
        lot = lot_mod.make_lot(self.line, devices)
        summary = runner.run_line(self.line.resources_for(lot.batch), lot.chips,
                                  EmulatedBuses(), stations=1)
        if summary.yield_pct != 100.0:
            raise RuntimeError("the line failed: %r" % (summary.failures(),))
        self.chips = lot.chips
        line = self.line
        self.revoked_cas_path = os.path.join(self.dir, "revoked-cas.jsonl")
        self.trust = FleetTrust([line.root_cert], [line.ca_cert], line.vendor_roots,
                                revoked_ca_file=RevokedCaFile(self.revoked_cas_path))
        ca = IssuingCa(line.hsm, line.labels["ca"], line.ca_cert, line.vendor_roots)
        chain = [line.ca_cert, line.root_cert]
        labels = [EstLabel(LABEL, ca, chain)]
        labels += [EstLabel(name, ca, chain, require_approval=True, retry_after=retry)
                   for name, retry in labels_extra]
        self.est = EstService(labels, line.registry, self.trust, default_label=LABEL)
        self.verifier = FleetVerifier(self.trust, line.registry)
        self.revocation = RevocationService(
            line.registry, [line.ca_cert], self.revoked_cas_path,
            os.path.join(self.dir, "revocation.events"), listeners=[self.verifier.invalidate])
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = server_certificate_builder(key.public_key(), line.root_cert,
                                             ["localhost", "127.0.0.1"], now)
        cert = sign_certificate(line.hsm, line.labels["root"], builder,
                                line.root_cert.public_key())
        self.server_cert = os.path.join(self.dir, "server.pem")
        self.server_key = os.path.join(self.dir, "server.key")
        with open(self.server_cert, "wb") as f:
            f.write(cert.public_bytes(PEM))
        fd = os.open(self.server_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        self.server = CloudServer(self.verifier, self.est, self.server_cert, self.server_key,
                                  self.trust.ca_bundle_pem(), verifier_port=0, est_port=0)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        self.ports = self.server.ports

    def revoke_certificate(self, certificate, reason, operator=""):
        """Revoke `certificate` through the one writer (RevocationService), as `fleetid
        revoke --cert` does.  Returns its CertificateRecord."""
        return self.revocation.revoke_certificate(
            certificate.serial_number, reason, operator=operator,
            issuer=certificate.issuer.rfc4514_string())

    def session(self, index=0):
        """A selected SeSession on chip `index` (APDUs straight into the applet)."""
        made = self.chips[index]
        made.chip.power_loss()  # a fresh boot: no SCP03 session, applet deselected
        se = SeSession(ApduProtocol(made.chip.process))
        se.select()
        return se

    def device(self, se):
        """(registry DeviceRecord, identity certificate) of the chip behind `se`."""
        cert = x509.load_der_x509_certificate(bytes(se.get_cert(C.SLOT_IDENTITY)))
        return self.line.registry.find_by_se_uid(se.uid())[0], cert

    def root_der(self):
        return self.line.root_cert.public_bytes(serialization.Encoding.DER)

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.line.close()


SLOTS = (1, 2, 3)


class TestClock:
    """Real wall time plus an offset; sleep() advances the offset instead of sleeping."""

    def __init__(self):
        self.offset = 0.0
        self.sleeps = []

    def now(self):
        return int(time.time() + self.offset)

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.offset += seconds


class Killed(Exception):
    """A simulated process kill at a network step (not a NetError: never retried)."""


class FaultyNet:
    """Wraps a net; `plan(name, call_index) -> None | ("before"|"after", exception)`."""

    def __init__(self, net, plan=None):
        self.net = net
        self.plan = plan
        self.calls = []

    def _do(self, name, *args):
        index = len(self.calls)
        self.calls.append(name)
        fault = self.plan(name, index) if self.plan is not None else None
        if fault is not None and fault[0] == "before":
            raise fault[1]
        result = getattr(self.net, name)(*args)
        if fault is not None and fault[0] == "after":
            raise fault[1]
        return result

    def whoami(self, slot):
        return self._do("whoami", slot)

    def cacerts(self, slot):
        return self._do("cacerts", slot)

    def nonce(self, slot):
        return self._do("nonce", slot)

    def enroll(self, slot, csr, reenroll):
        return self._do("enroll", slot, csr, reenroll)

    def ack(self, slot):
        return self._do("ack", slot)

    def fetch_revocation(self, slot):
        return self._do("fetch_revocation", slot)


class Fleet:
    def __init__(self, directory, devices=1):
        self.cloud = LineAndCloud(directory, devices=devices)
        self.clock = TestClock()

    def net(self, se):
        ports = self.cloud.ports
        return HostNetwork(se, "https://127.0.0.1:%d" % ports["verifier"],
                           "https://127.0.0.1:%d" % ports["est"], [self.cloud.root_der()],
                           label=LABEL, connect_timeout=5, io_timeout=10)

    def agent(self, index=0, plan=None, policy=None, seed=1, boot=None, revocation=None):
        se = self.cloud.session(index)
        net = FaultyNet(self.net(se), plan)
        return Agent(se, net, self.clock, random.Random(seed).random, boot=boot,
                     revocation=revocation, policy=policy or AgentPolicy(max_attempts=4))

    def nvm(self, index=0):
        return self.cloud.chips[index].nvm

    def keys(self, se):
        held = []
        for slot in SLOTS:
            try:
                se.public_key(slot)
                held.append(slot)
            except ReferenceNotFound:
                pass
        return held

    def accepted(self, index=0):
        """The verifier's verdict on the designated credential (raises AccessRefused)."""
        se = self.cloud.session(index)
        journal = rj.RotationJournal(se)
        slot = rj.credential_slot(journal.load())
        return slot, self.cloud.verifier.verify(bytes(se.get_cert(slot)))

    def settled(self, index=0):
        """Asserts the end state of a finished rotation; returns the current slot."""
        se = self.cloud.session(index)
        journal = rj.RotationJournal(se)
        last = journal.load()
        assert last is not None and last.kind == rj.BASE, journal.records
        assert len(journal.records) == 1
        assert self.keys(se) == sorted((1, last.cur)), "a slot leaked"
        cert = x509.load_der_x509_certificate(bytes(se.get_cert(last.cur)))
        point = cert.public_key().public_bytes(serialization.Encoding.X962,
                                               serialization.PublicFormat.UncompressedPoint)
        assert point == se.public_key(last.cur)[1]
        identity = self.cloud.verifier.verify(bytes(se.get_cert(last.cur)))
        assert identity.kind == "operational" and not identity.in_overlap
        return last.cur

    def close(self):
        self.cloud.close()



class CampaignCounts:
    """What a randomized campaign did (campaign() below)."""

    FIELDS = ("rotations", "cycles", "failed_cycles", "retries", "link_drops",
              "server_errors", "lost_answers", "pending", "kills", "power_cuts",
              "invariant_checks", "refused_credentials", "max_cycles_per_rotation")

    def __init__(self):
        for name in self.FIELDS:
            setattr(self, name, 0)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.FIELDS}


def campaign(fleet, rotations, seed, index=0, fault_rate=0.12, cut_rate=0.25,
             max_cycles=40):
    """Rotate `rotations` times under seeded random faults: at each network call a link
    drop, a 5xx, a lost answer (the server acted, the device timed out), a 202 with
    Retry-After, or a process kill; per rotation, an SE power cut at a random NVM write
    (before or after its atomic point).  After every failed cycle the credential the
    journal designates must be accepted by the verifier; after every rotation the device
    must be settled (journal final, no spare key, certificate matches key).

    Returns: CampaignCounts.  Raises AssertionError on a broken invariant.
    """
    from fleetid.sim.nvm import PowerLoss

    rng = random.Random(seed)
    counts = CampaignCounts()
    nvm = fleet.nvm(index)

    def plan(name, i):
        roll = rng.random()
        if roll >= fault_rate:
            return None
        kind = rng.randrange(5)
        if kind == 0:
            counts.link_drops += 1
            return ("before", NetError(NetError.LINK, "connection reset"))
        if kind == 1:
            counts.server_errors += 1
            return ("before", NetError(NetError.SERVER, "503", 503,
                                       retry_after=rng.choice((None, 1, 3))))
        if kind == 2:
            counts.lost_answers += 1
            return ("after", NetError(NetError.TIMEOUT, "answer lost"))
        if kind == 3:
            counts.pending += 1
            return ("before", NetError(NetError.PENDING, "", 202,
                                       retry_after=rng.randrange(1, 6)))
        counts.kills += 1
        return (rng.choice(("before", "after")), Killed(name))

    policy = AgentPolicy(max_attempts=4, base_delay=1, max_delay=10, max_wait=60)
    for _ in range(rotations):
        if rng.random() < cut_rate:
            nvm.cut_power_at(rng.randrange(1, 8), after_atomic=rng.random() < 0.5)
        command = "rotate"
        cycles = 0
        while True:
            cycles += 1
            counts.cycles += 1
            if cycles > max_cycles:
                raise AssertionError("no progress after %d cycles" % max_cycles)
            agent = fleet.agent(index, plan=plan, policy=policy, seed=rng.randrange(1 << 30))
            try:
                report = agent.run_once(command=command)
                counts.retries += report.retries
                break
            except PowerLoss:
                counts.power_cuts += 1
                nvm.disarm()
            except (NetError, Killed):
                pass
            counts.failed_cycles += 1
            command = None  # the journal carries the rotation on
            try:
                fleet.accepted(index)
                counts.invariant_checks += 1
            except Exception:
                counts.refused_credentials += 1
                raise
        nvm.disarm()
        fleet.settled(index)
        counts.invariant_checks += 1
        counts.rotations += 1
        counts.max_cycles_per_rotation = max(counts.max_cycles_per_rotation, cycles)
    return counts
