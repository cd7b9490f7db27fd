"""The T=1' host (clock, crc16, t1, t1link) runs unchanged under MicroPython (at its heap budget).

A CPython run of T1Link against the emulator's endpoint, with a seeded fault plan (bit
errors, drops), is recorded as a transcript of bus transactions.  The MicroPython run
replays the SE's side of that transcript: every frame the MicroPython host writes must
equal the CPython host's, byte for byte, and the APDU results must be the same.
"""

import pytest

from fleetid.common import t1
from fleetid.common.clock import FakeClock
from fleetid.common.errors import BusNack, LinkError
from fleetid.common.t1link import T1Link
from fleetid.sim.endpoint import BusEndpoint
from fleetid.sim.faults import FaultPlan
from tests.micropython.support import Stage
from tests.sim.endpoint_support import Applet, Latency, command, get_cert

pytestmark = pytest.mark.micropython


class Recorder:
    """Wraps a bus; records W frame / R n data / N n (NACK) / X transactions."""

    def __init__(self, bus):
        self.bus = bus
        self.log = []

    def write(self, frame):
        try:
            self.bus.write(frame)
        except BusNack:
            self.log.append(("WN", bytes(frame).hex()))
            raise
        self.log.append(("W", bytes(frame).hex()))

    def read(self, n):
        try:
            data = self.bus.read(n)
        except BusNack:
            if self.log and self.log[-1][0] == "N" and self.log[-1][1] == n:
                self.log[-1] = ("N", n, self.log[-1][2] + 1)  # runs of NACKs compressed
            else:
                self.log.append(("N", n, 1))
            raise
        self.log.append(("R", bytes(data).hex()))
        return data

    def reset(self):
        self.bus.reset()
        self.log.append(("X",))

    def close(self):
        pass


def record(profile):
    clock = FakeClock()
    ep = BusEndpoint(Applet(), profile, latency=Latency(), clock=clock, ifsc=64, bwt_ms=50,
                     faults=FaultPlan(seed=11, ber=3e-4, drop=0.03))
    bus = Recorder(ep)
    link = T1Link(bus, profile, clock, ifsd=64)
    link.open()
    results = []
    for apdu in (command(5), command(300, ins=0x2A), get_cert(600), command(64)):
        try:
            results.append(link.transceive(apdu).hex())
        except LinkError as e:
            results.append("error:" + e.reason)
    return bus.log, results, link.retransmissions


SCRIPT = r"""
import gc
from fleetid.common import t1
from fleetid.common.clock import FakeClock
from fleetid.common.errors import BusNack, LinkError
from fleetid.common.t1link import T1Link


class ReplayBus:
    # The transcript is streamed from a file, one transaction per line: the heap holds
    # one entry at a time, as a device would.
    def __init__(self, path):
        self.f = open(path)
        self.entry = None
        self.i = 0
        self.nacks = 0
        self.mismatch = 0

    def _peek(self):
        if self.entry is None:
            line = self.f.readline().split()
            if line and line[0] == "N":
                line = ["N", int(line[1]), int(line[2])]
            self.entry = line
        return self.entry

    def _pop(self):
        entry = self._peek()
        self.entry = None
        self.i += 1
        return entry

    def write(self, frame):
        entry = self._pop()
        if entry[1] != frame.hex():
            self.mismatch += 1
        if entry[0] == "WN":
            raise BusNack()

    def read(self, n):
        entry = self._peek()
        if entry[0] == "N":
            if entry[1] != n:
                self.mismatch += 1
            self.nacks += 1
            if self.nacks == entry[2]:
                self.nacks = 0
                self._pop()
            raise BusNack()
        self._pop()
        data = bytes.fromhex(entry[1])
        if len(data) != n:
            self.mismatch += 1
        return data

    def reset(self):
        self._pop()

    def close(self):
        pass


bus = ReplayBus("transcript.txt")
gc.collect()
link = T1Link(bus, t1.PROFILES[PROFILE], FakeClock(), ifsd=64)
link.open()
for apdu in APDUS:
    try:
        print("result", link.transceive(bytes.fromhex(apdu)).hex())
    except LinkError as e:
        print("result", "error:" + e.reason)
    gc.collect()
print("replayed", bus.i, NTRANS, bus.mismatch, link.retransmissions)
print("done", gc.mem_free())
"""


@pytest.mark.parametrize("profile", [t1.PROFILE_GP, t1.PROFILE_SE05X], ids=["gp", "se05x"])
def test_t1link_under_micropython_writes_the_same_frames_as_cpython(tmp_path, profile):
    stage = Stage(tmp_path)
    log, results, retransmissions = record(profile)
    assert retransmissions > 0  # the transcript exercises recovery
    apdus = [command(5), command(300, ins=0x2A), get_cert(600), command(64)]
    (tmp_path / "transcript.txt").write_text(
        "".join(" ".join(str(x) for x in entry) + "\n" for entry in log))
    header = "NTRANS = %d\nAPDUS = %r\nPROFILE = %r\n" % (
        len(log), [a.hex() for a in apdus], profile.name)
    stdout = stage.run("run_t1link", header + SCRIPT)
    lines = stdout.splitlines()
    got = [line.split(" ", 1)[1] for line in lines if line.startswith("result ")]
    assert got == results
    replayed = [line for line in lines if line.startswith("replayed ")][0].split()
    assert replayed[1] == replayed[2]  # the whole transcript, no more, no less
    assert replayed[3] == "0"  # no frame differed from CPython's
    assert int(replayed[4]) == retransmissions
    assert int([line for line in lines if line.startswith("done ")][0].split()[1]) > 0
