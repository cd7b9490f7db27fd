"""Benchmark of the T=1' link (common/t1link.py) over the emulator's bus endpoint.

Run:  .venv/bin/python bench/link.py [--quick] [--realtime]

What is measured, for 16-byte and 1-KiB command APDUs (the applet echoes the data, so the
response is as long again plus SW), on a clean bus and at a bit error rate of 1e-4:

* host cost, "round trips/s": APDU round trips per second of wall-clock time with the
  zero-latency profile (no operation time, bus_hz 0) on virtual time.  Nothing sleeps, so
  this is the CPU cost of one exchange: host link + emulator (T1Card, endpoint, faults)
  in one process.  It bounds the APDU rate a test or a line station can drive.
* "goodput": useful APDU bytes (command + response) moved per second of *modelled* bus
  time, as a fraction of the raw I2C byte rate at 1 MHz (1e6 / 9 bytes/s: 8 data bits +
  ACK).  The endpoint charges every transaction (bytes + address byte) x 9 clocks on a
  virtual clock, and the host's MPOT polls and waits add their modelled time, so this is
  the protocol efficiency (prologue + CRC, acknowledgements, chaining, retransmissions,
  polling) independent of how fast this machine is.  Real sleeps of 10-200 us would
  measure the OS timer instead; --realtime does exactly that (SystemClock, the endpoint
  sleeps each transfer) to show the difference.

IFSC and IFSD are 254 (one-byte-LEN safe); the GP framing profile is used.  "retx/APDU"
counts the host's retransmitted blocks; "failed" APDUs ended in a LinkError (at 1e-4 a
260-byte block is hit about one time in five, and a block that fails 4 times in a row
gives up); "wrong" counts responses that differ from what the applet sent: it must be 0
(the script exits 1 otherwise).
"""

import argparse
import sys
import time

from fleetid.common import t1
from fleetid.common.clock import FakeClock, SystemClock
from fleetid.common.errors import LinkError
from fleetid.common.t1link import T1Link
from fleetid.sim import profiles
from fleetid.sim.endpoint import BusEndpoint
from fleetid.sim.faults import FaultPlan

BUS_HZ = 1_000_000


class EchoApplet:
    """Answers the command's data field (bytes after the 4-byte header) || 9000."""

    def process(self, apdu):
        return bytes(apdu[4:]) + b"\x90\x00"

    def power_loss(self):
        pass


def make(latency, clock, ber, seed, realtime_bus=True):
    faults = FaultPlan(seed=seed, ber=ber) if ber else FaultPlan()
    ep = BusEndpoint(EchoApplet(), t1.PROFILE_GP, latency=latency, clock=clock, faults=faults,
                     ifsc=254, bwt_ms=300, realtime_bus=realtime_bus)
    link = T1Link(ep, t1.PROFILE_GP, clock, ifsd=254)
    link.open()
    return link


def command(size):
    body = bytes((i * 31 + 7) & 0xFF for i in range(size - 4))
    return b"\x80\xca\x00\x00" + body


def run(link, apdu, count):
    """Send `count` APDUs; return (ok, failed, wrong)."""
    expected = apdu[4:] + b"\x90\x00"
    ok = failed = wrong = 0
    for _ in range(count):
        try:
            resp = link.transceive(apdu)
        except LinkError:
            failed += 1
            continue
        if resp == expected:
            ok += 1
        else:
            wrong += 1
    return ok, failed, wrong


def host_cost(size, ber, seconds):
    link = make(profiles.get("none"), FakeClock(), ber, seed=1)
    apdu = command(size)
    run(link, apdu, 20)  # warm-up
    link.retransmissions = 0
    n = 0
    t0 = time.perf_counter()
    ok = failed = wrong = 0
    while True:
        a, b, c = run(link, apdu, 20)
        ok, failed, wrong, n = ok + a, failed + b, wrong + c, n + 20
        if time.perf_counter() - t0 >= seconds:
            break
    elapsed = time.perf_counter() - t0
    return n / elapsed, link.retransmissions / float(n), failed, wrong


def goodput(size, ber, count, realtime):
    latency = profiles.LatencyProfile("bus-1MHz", BUS_HZ, {})
    clock = SystemClock() if realtime else FakeClock()
    link = make(latency, clock, ber, seed=2)
    apdu = command(size)
    t0 = clock.now_us()
    ok, failed, wrong = run(link, apdu, count)
    elapsed_s = (clock.now_us() - t0) / 1e6
    useful = ok * (2 * size - 4 + 2)  # command + echoed data + SW
    raw_rate = BUS_HZ / 9.0
    return useful / elapsed_s / raw_rate, failed, wrong


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (about 5 s)")
    parser.add_argument("--realtime", action="store_true",
                        help="goodput on the real clock, the endpoint sleeping each transfer")
    args = parser.parse_args(argv)
    seconds = 0.4 if args.quick else 2.0
    count_small = 200 if args.quick else 2000
    count_large = 40 if args.quick else 400
    print("T=1' link over the emulator endpoint (GP profile, IFSC/IFSD 254)")
    print("goodput: useful bytes / modelled %s bus time, fraction of %d B/s raw I2C rate"
          % ("real" if args.realtime else "virtual", BUS_HZ // 9))
    print()
    head = "%-8s %-6s %14s %12s %9s %8s %6s" % (
        "APDU", "BER", "round trips/s", "retx/APDU", "goodput", "failed", "wrong")
    print(head)
    print("-" * len(head))
    total_wrong = 0
    for size, count in ((16, count_small), (1024, count_large)):
        for ber in (0.0, 1e-4):
            rate, retx, f1, w1 = host_cost(size, ber, seconds)
            frac, f2, w2 = goodput(size, ber, count, args.realtime)
            total_wrong += w1 + w2
            print("%-8s %-6s %14.0f %12.3f %8.1f%% %8d %6d" % (
                "%d B" % size, "0" if not ber else "1e-4", rate, retx, 100 * frac, f1 + f2,
                w1 + w2))
    return 1 if total_wrong else 0


if __name__ == "__main__":
    sys.exit(main())
