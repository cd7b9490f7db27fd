"""Shared fakes for the T=1' link tests (an applet, a latency profile stand-in); no tests."""

import hashlib

from fleetid.common import t1
from fleetid.common.clock import FakeClock
from fleetid.common.t1link import T1Link
from fleetid.sim.endpoint import BusEndpoint


class Latency:
    """Stand-in for sim.profiles.LatencyProfile: fixed op times, a bus clock."""

    def __init__(self, bus_hz=0, name="test", **ops):
        self.name = name
        self.bus_hz = bus_hz
        self.ops = ops

    def op_ms(self, op):
        return float(self.ops.get(op, 0.0))

    def nvm_write_ms(self, nbytes):
        return 0.0


class Applet:
    """A deterministic applet: the response is a pure function of the command.

    INS 0xCB ("get_cert") answers P1P2 (big-endian) bytes of data, so tests choose the
    response length; anything else answers sha256(apdu)[:8] || reversed(apdu) || 9000.
    """

    def __init__(self):
        self.calls = 0
        self.power_losses = 0

    @staticmethod
    def expected(apdu):
        apdu = bytes(apdu)
        if len(apdu) >= 4 and apdu[1] == 0xCB:
            n = (apdu[2] << 8) | apdu[3]
            return bytes((i * 7 + n) & 0xFF for i in range(n)) + b"\x90\x00"
        return hashlib.sha256(apdu).digest()[:8] + apdu[::-1] + b"\x90\x00"

    def process(self, apdu):
        self.calls += 1
        return self.expected(apdu)

    def power_loss(self):
        self.power_losses += 1


def make_link(profile=t1.PROFILE_GP, latency=None, faults=None, ifsc=254, bwt_ms=None,
              open_link=True, **link_kw):
    clock = FakeClock()
    applet = Applet()
    ep = BusEndpoint(applet, profile, latency=latency or Latency(), clock=clock, faults=faults,
                     ifsc=ifsc, bwt_ms=bwt_ms)
    link = T1Link(ep, profile, clock, **link_kw)
    if open_link:
        link.open()
    return link, ep, applet, clock


def command(n, ins=0xCA):
    """A command APDU of exactly n bytes (n >= 4)."""
    return bytes((0x80, ins, 0x01, 0x02)) + bytes((i * 13 + 5) & 0xFF for i in range(n - 4))


def get_cert(resp_len):
    """A command whose response has resp_len data bytes (+ SW)."""
    return bytes((0x80, 0xCB, resp_len >> 8, resp_len & 0xFF))
