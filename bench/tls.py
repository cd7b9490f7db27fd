"""TLS 1.3 handshake bench: the SE-keyed client (fleetid.common.tls13) under an SE
latency profile against `openssl s_client` with a software key, same server, same run.

    .venv/bin/python bench/tls.py [--handshakes N] [--profile se050]

What is measured (everything on 127.0.0.1, one `openssl s_server -tls1_3 -Verify` on a
server certificate the line's fleet root signs):
  fleetid full     a full handshake with client authentication: a line-personalised
                   emulated chip behind its bus endpoint with the latency profile (the
                   endpoint waits what the profile charges per command and per byte), the
                   T=1' link, the SE session; ECDHE in the SE's transient key, SIGN for
                   the CertificateVerify, VERIFY for the chain and the server's CV;
  fleetid resumed  PSK-DHE resumption with the ticket of the full handshake;
  s_client         `openssl s_client` with the key in a file, full handshake, minus the
                   start-up of an `openssl version` process (so only the handshake counts).
Per handshake: wall ms; SE ms (what the profile charges, bus transfer included); host ms
(this thread's CPU outside the emulator: the TLS client's own parsing and crypto) and the
host share of the wall time; SE operations by command; NVM writes.

Needs the repo root on sys.path (it reuses tests/device/ support modules).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fleetid.common import se_consts as C  # noqa: E402
from fleetid.device.host.tls13_socket import connect, se_client_config  # noqa: E402
from fleetid.device.stack import open_se  # noqa: E402
from fleetid.sim.metering import EmulatedBuses  # noqa: E402
from bench._support import LineAndCloud  # noqa: E402
from bench._tls13_support import (  # noqa: E402
    OPENSSL,
    CountingChip,
    LineServerCerts,
    SServer,
)


class _Item:
    # What EmulatedBuses takes: an object with .chip.
    def __init__(self, chip):
        self.chip = chip


def _handshake(se, bus, counting, nvm, port, anchors, ticket=None):
    config, _ephemeral = se_client_config(se, C.SLOT_IDENTITY, anchors, "localhost",
                                          ticket=ticket)
    counting.reset()
    se_before, _emu_wall, emu_cpu_before, _ = bus.measurements()
    writes = nvm.write_count
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    stream = connect("127.0.0.1", port, config, io_timeout=30)
    wall = (time.perf_counter() - wall0) * 1000.0
    cpu = (time.thread_time() - cpu0) * 1000.0
    se_after, _emu_wall, emu_cpu_after, _ = bus.measurements()
    resumed = stream.info.resumed
    try:
        stream.send(b"x\n")
        stream.recv()
        if ticket is None:
            stream.wait(lambda: stream.tickets)
    finally:
        stream.close()
    host = cpu - (emu_cpu_after - emu_cpu_before)
    return dict(wall=wall, se=se_after - se_before, host=host, ops=dict(counting.counts),
                nvm=nvm.write_count - writes, resumed=resumed,
                ticket=stream.tickets[-1] if stream.tickets else None)


def _s_client_ms(port, cert, key, root, count):
    def run(args):
        start = time.perf_counter()
        subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, check=False)
        return (time.perf_counter() - start) * 1000.0

    startup = statistics.median(run([OPENSSL, "version"]) for _ in range(count))
    handshakes = [run([OPENSSL, "s_client", "-connect", "127.0.0.1:%d" % port, "-tls1_3",
                       "-cert", cert, "-key", key, "-CAfile", root, "-servername", "localhost",
                       "-verify_return_error", "-brief"]) for _ in range(count)]
    return statistics.median(handshakes) - startup, startup


def _row(name, results):
    wall = statistics.median(r["wall"] for r in results)
    se = statistics.median(r["se"] for r in results)
    host = statistics.median(r["host"] for r in results)
    ops = ", ".join("%s %d" % kv for kv in sorted(results[0]["ops"].items()))
    print("%-16s %8.1f %8.1f %8.1f %6.1f %%   %s; NVM writes %d" % (
        name, wall, se, host, 100.0 * host / wall, ops, max(r["nvm"] for r in results)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=5)
    parser.add_argument("--profile", default="se050")
    parser.add_argument("--json", dest="json_path", help="also write the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        env = LineAndCloud(os.path.join(directory, "env"), devices=1)
        server = None
        try:
            certs = LineServerCerts(env, directory)
            cert_pem, key_pem = certs.fleet()
            server = SServer(directory, cert_pem, key_pem, certs.ca_pem, "-rev")
            made = env.chips[0]
            made.chip.power_loss()
            counting = CountingChip(made.chip)
            bus = EmulatedBuses(args.profile)(_Item(counting))
            stack = open_se(bus)
            se = stack.se
            anchors = [bytes(se.get_data(C.DATA_TRUST_FLEET_ROOT, -1, 65536))]
            full, resumed = [], []
            for _ in range(args.handshakes):
                result = _handshake(se, bus, counting, made.chip.nvm, server.port, anchors)
                full.append(result)
                again = _handshake(se, bus, counting, made.chip.nvm, server.port, anchors,
                                   ticket=result["ticket"])
                if not again["resumed"]:
                    raise RuntimeError("the server did not resume")
                resumed.append(again)
            client_cert, client_key = certs.client()
            s_client, startup = _s_client_ms(server.port, client_cert, client_key,
                                             certs.root_pem(), args.handshakes)
            stack.close()
        finally:
            if server is not None:
                server.close()
            env.close()
    print("TLS 1.3 handshakes, median of %d, SE latency profile %s" % (args.handshakes,
                                                                       args.profile))
    print("%-16s %8s %8s %8s %8s   %s" % ("", "wall ms", "SE ms", "host ms", "host",
                                          "SE operations per handshake"))
    _row("fleetid full", full)
    _row("fleetid resumed", resumed)
    print("%-16s %8.1f %8s %8s %8s   software key (process start-up %.1f ms subtracted)" % (
        "openssl s_client", s_client, "-", "-", "-", startup))
    if args.json_path:  # bench/report.py
        _write_json(args.json_path, full, resumed, s_client)


def _write_json(path, full, resumed, s_client):
    from bench._report_support import figure, write_json

    rows = []
    for name, results in (("full", full), ("resumed", resumed)):
        wall = statistics.median(r["wall"] for r in results)
        se = statistics.median(r["se"] for r in results)
        rows.append(figure("SE-keyed TLS 1.3 handshake, %s" % name, wall, "ms",
                           "the SE-only time of it", se, higher_is_better=False))
        rows.append(figure("SE-keyed TLS 1.3 handshake, %s" % name, wall, "ms",
                           "openssl s_client, software key", s_client,
                           higher_is_better=False))
    write_json(path, "tls", {"full": full, "resumed": resumed, "s_client_ms": s_client}, rows)


if __name__ == "__main__":
    main()
