"""Benchmark of the factory line (cloud/line): throughput, host cost, cycle time.

Run:  .venv/bin/python bench/line.py [--quick] [--host-only] [--dir DIR] [--profile]

Everything runs in one process: K station threads, the soft-keystore HSM, the SQLite
registry (WAL, synchronous=FULL: every registry transaction is durable; the stations'
writes group-committed: a batch runs on the thread of the station that found the writer
idle, or on the writer thread, whose CPU time is added to the host cost),
the issuance journal (fsync per certificate, shared by stations writing at once) and the
emulated SEs behind their bus endpoints.

1. Zero-latency SE profile ("none": no operation time, no bus time):
   * devices/s for 1, 2, 4, 8 stations;
   * host cost per device = the line host's CPU time per device (station thread CPU
     minus the CPU spent below the Bus interface: the emulator's endpoint, SE-side T=1',
     applet and chip crypto, which on a real line run on the SE).  This is the figure
     held against the target; wall time (cycle minus emulator wall) is shown beside it and
     also contains the waits for durable commits (fsync).  It is everything the line host
     does for one device: T=1' host side, SCP03, HSM calls, CSR, the CA's checks and
     signature, registry transactions, journal and audit.  Reported as wall ms and as
     CPU ms (thread CPU time minus the emulator's CPU time), with a per-step split;
   * beside it, the raw `cryptography` cost of keygen + CSR + issue + verify for one
     device, measured in the same process (the floor any Python line pays).
   Target: host cost <= 2 ms per device.
2. ATECC608-class profile (sign 115 ms, keygen 115 ms, ~80 ms per 100 B NVM write,
   I2C 1 MHz; sim/profiles.py), real time:
   * cycle time per device against the SE-only time of the same steps (what the profile
     charges for the APDUs the device executed, bus transfers included).  Target <= 1.05x;
   * 32 stations against linear: throughput(32) / (32 x throughput(1)).  Target >= 0.9.
3. Audit bytes per device (injection entries + checkpoints, as stored).

--profile adds a cProfile of 1 station at zero latency (main thread, on its CPU time): CPU
per device by area with the emulator's apart (shared common/ code is the emulator's when
called from sim/), then the top functions by own time, so the host cost split can be
checked.
"""

import argparse
import datetime
import os
import secrets
import shutil
import sys
import tempfile
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetid.cloud.line import journal as journal_mod
from fleetid.cloud.line import report as report_mod
from fleetid.cloud.line import runner
from fleetid.cloud.line import station as station_mod
from fleetid.cloud.line import workdir as line_workdir
from fleetid.cloud.line.station import STEPS, Station
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
from fleetid.sim import fab
from fleetid.sim import lot as lot_mod
from fleetid.sim.endpoint import BusEndpoint
from fleetid.sim.metering import EmulatedBuses, MeteredBus

TARGET_HOST_MS = 2.0
TARGET_CYCLE_RATIO = 1.05
TARGET_SCALING = 0.9


def raw_crypto_ms(rounds):
    """Mean ms of: device keygen + CSR (built and signed) + CA issue + chain verify, with
    `cryptography` alone (software keys, no HSM, no attestation)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(ca_key.public_key()).serial_number(1)
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
               .sign(ca_key, hashes.SHA256()))
    started = time.perf_counter()
    for i in range(rounds):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FID-%09d" % i)])
        csr = (x509.CertificateSigningRequestBuilder().subject_name(subject)
               .sign(key, hashes.SHA256()))
        csr = x509.load_der_x509_csr(csr.public_bytes(serialization.Encoding.DER))
        if not csr.is_signature_valid:
            raise SystemExit("CSR does not verify")
        cert = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(name)
                .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
                .sign(ca_key, hashes.SHA256()))
        cert.verify_directly_issued_by(ca_cert)
    return (time.perf_counter() - started) * 1000.0 / rounds


def writer_cpu_s(registry):
    """CPU seconds of the registry's group-commit writer thread so far (0 without one):
    the stations' registry work runs there, and the host cost must count it."""
    group = getattr(registry, "group_commit", None)
    return group.cpu_s if group is not None else 0.0


def run(line, devices, stations, profile):
    """run_line over a fresh lot; the summary's `host_cpu_ms` adds the group-commit
    writer's CPU per device to the stations' own."""
    lot = lot_mod.make_lot(line, devices)
    writer_before = writer_cpu_s(line.registry)
    summary = runner.run_line(line.resources_for(lot.batch), lot.chips,
                              EmulatedBuses(profile), stations=stations)
    writer_ms = (writer_cpu_s(line.registry) - writer_before) * 1000.0 / max(1, summary.devices)
    for device_run in summary.runs:
        device_run.host_cpu_ms += writer_ms
    return summary


_REGISTRY = "registry (SQLite, 2 durable txns)"


class _Timed:
    """Times every method call on the wrapped object into totals[name] = [wall s, CPU s]
    (CPU: this thread's CPU time, so waits for fsync or a lock do not count)."""

    def __init__(self, target, name, totals):
        self._target = target
        self._name = name
        self._totals = totals

    def __getattr__(self, attr):
        value = getattr(self._target, attr)
        if not callable(value):
            return value
        totals, name = self._totals, self._name

        def timed(*args, **kwargs):
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return value(*args, **kwargs)
            finally:
                total = totals.setdefault(name, [0.0, 0.0])
                total[0] += time.perf_counter() - started
                total[1] += time.thread_time() - cpu

        return timed


def _timed_function(fn, name, totals):
    """fn, timing every call into totals[name] like _Timed."""

    def timed(*args, **kwargs):
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            total = totals.setdefault(name, [0.0, 0.0])
            total[0] += time.perf_counter() - started
            total[1] += time.thread_time() - cpu

    return timed


_CHIP_CHECKS = "chip checks (MAK chain, shipment signature)"
_DURABLE = "durable writes"


def host_split(line, devices):
    """Host wall time per device by service, 1 station, zero latency: registry, HSM
    (station calls), issuing CA (verification + HSM signature), issuance journal, the
    identify step's checks on the chip (MAK chain validation, the shipment entry's vendor
    signature), and the rest (T=1' host side, SCP03 host, APDU/DER building, the
    confirmation gate, station logic).  Also returns, apart, what the durable writes cost
    inside the registry and journal rows: SQLite's COMMITs (WAL write and fsync) and the
    journal's fdatasync, the part of the host cost that is the kernel's durability work."""
    lot = lot_mod.make_lot(line, devices)
    resources = line.resources_for(lot.batch)
    totals = {}
    durable = {}
    commit, sync = SqliteRegistry._commit, journal_mod._sync
    SqliteRegistry._commit = _timed_function(commit, _DURABLE, durable)
    journal_mod._sync = _timed_function(sync, _DURABLE, durable)
    resources.transport_kvn = _timed_function(resources.transport_kvn, _CHIP_CHECKS, totals)
    check_vendor_chain = station_mod.check_vendor_chain
    station_mod.check_vendor_chain = _timed_function(check_vendor_chain, _CHIP_CHECKS, totals)
    resources.registry = _Timed(resources.registry, _REGISTRY, totals)
    resources.hsm = _Timed(resources.hsm, "HSM calls (session keys, diversify, wrap)",
                           totals)
    resources.issuing_ca = _Timed(resources.issuing_ca,
                                  "issuing CA (checks, HSM signature)", totals)
    resources.journal = _Timed(resources.journal, "issuance journal (fsync)", totals)
    resources.checkpointer = None
    station = Station("st-split", resources)
    cycle = emulator = cpu = emulator_cpu = 0.0
    writer_before = writer_cpu_s(line.registry)
    try:
        for made in lot.chips:
            bus = MeteredBus(BusEndpoint(made.chip))
            cpu0 = time.thread_time()
            result = station.provision(bus)
            cpu += time.thread_time() - cpu0
            if not result.ok:
                raise SystemExit("host split run failed: %s" % result.cause)
            cycle += result.cycle_s
            emulator += bus.emulator_s
            emulator_cpu += bus.emulator_cpu_s
    finally:
        station_mod.check_vendor_chain = check_vendor_chain
        SqliteRegistry._commit, journal_mod._sync = commit, sync
    # The registry's work on the group-commit writer thread (its CPU, not the station's).
    writer = writer_cpu_s(line.registry) - writer_before
    totals.setdefault(_REGISTRY, [0.0, 0.0])[1] += writer
    cpu += writer
    n = float(devices) / 1000.0
    host = (cycle - emulator) / n
    host_cpu = (cpu - emulator_cpu) / n
    rows = [(name, wall / n, cpu_s / n) for name, (wall, cpu_s) in sorted(totals.items())]
    rows.append(("T=1' host, SCP03 host, APDU/DER, gate, station", host - sum(r[1] for r in rows),
                 host_cpu - sum(r[2] for r in rows)))
    wall, cpu_s = durable.get(_DURABLE, (0.0, 0.0))
    return host, host_cpu, rows, (wall / n, cpu_s / n)


# Areas of the cProfile summary: the first prefix (path relative to the repository) that
# matches a function's file.  Library and built-in functions count for the area of their
# heaviest caller.
_AREAS = (
    ("sim/", "emulator (sim/: endpoint, SE-side T=1', applet, chip crypto)"),
    ("common/t1", "T=1' host (common/t1*.py, CRC)"),
    ("common/crc16", "T=1' host (common/t1*.py, CRC)"),
    ("common/clock", "T=1' host (common/t1*.py, CRC)"),
    ("common/scp03", "SCP03 host (common/scp03.py, common/host/)"),
    ("common/host/", "SCP03 host (common/scp03.py, common/host/)"),
    ("common/apdu", "APDU / SE session (common/apdu*, device/se.py, stack)"),
    ("common/command_apdu", "APDU / SE session (common/apdu*, device/se.py, stack)"),
    ("device/se.py", "APDU / SE session (common/apdu*, device/se.py, stack)"),
    ("device/stack.py", "APDU / SE session (common/apdu*, device/se.py, stack)"),
    ("common/", "DER / attestation codecs (common/der.py, attestation.py, enrol)"),
    ("device/", "DER / attestation codecs (common/der.py, attestation.py, enrol)"),
    ("cloud/ca/", "issuing CA (cloud/ca/, cloud/pki/)"),
    ("cloud/pki/", "issuing CA (cloud/ca/, cloud/pki/)"),
    ("cloud/registry/", "registry (cloud/registry/)"),
    ("cloud/audit/", "audit entries (cloud/audit/)"),
    ("cloud/hsm/", "HSM (cloud/hsm/)"),
    ("cloud/line/", "line: station, gate, journal, shipment (cloud/line/)"),
)
_EMULATOR = _AREAS[0][1]
# Code the emulated SE runs too (sim/ imports these): its time is the emulator's when the
# call came from sim/, else the host's.
_SHARED = ("common/", "device/")


def profile_host(line, devices):
    """cProfile of 1 station (zero latency) on this thread's CPU time (waits for fsync or
    the group-commit writer do not count): CPU per device by area, the emulator's apart,
    then the host functions with the most own time.  The profiler's own overhead inflates
    every figure (most where calls are many and short): read it for shares, the bench's
    figures above for times."""
    lot = lot_mod.make_lot(line, devices)
    station = Station("st-prof", line.resources_for(lot.batch))
    endpoints = [BusEndpoint(c.chip) for c in lot.chips]
    from bench import _profile_support

    stats, out = _profile_support.profiled(
        lambda: [station.provision(endpoint) for endpoint in endpoints])
    totals = _profile_support.profile_areas(stats.stats, _AREAS, _SHARED, _EMULATOR)
    host = sum(v for k, v in totals.items() if not k.startswith("emulator"))
    out.write("profiled CPU ms per device by area (host total %.2f, emulator %.2f):\n"
              % (host * 1000.0 / devices,
                 sum(v for k, v in totals.items() if k.startswith("emulator"))
                 * 1000.0 / devices))
    _profile_support.write_areas(out, totals, devices, 66)
    out.write("\nfunctions by own time, sim/ left out (common/ ones include their calls from "
              "the emulator):\n")
    sim = os.path.join(_profile_support.REPO, "sim") + os.sep
    for func in list(stats.stats):
        if func[0].startswith(sim):
            del stats.stats[func]
    stats.total_tt = host
    stats.sort_stats("tottime").print_stats(25)
    return out.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (CI smoke test)")
    parser.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    parser.add_argument("--profile", action="store_true", help="cProfile the host side")
    parser.add_argument("--json", dest="json_path", help="also write the figures as JSON")
    parser.add_argument("--host-only", action="store_true",
                        help="only the zero-latency host cost (1 station, its split and the "
                             "raw crypto baseline), no scaling or ATECC608 runs")
    args = parser.parse_args(argv)
    quick = args.quick
    workdir = args.dir or tempfile.mkdtemp(prefix="fleetid-bench-line-")
    n_fast = 40 if quick else 200
    n_slow_1 = 2 if quick else 4
    n_slow_32 = 32 if quick else 192  # 6 devices per station: past the lockstep start
    print("fleetid line benchmark%s (work dir %s)" % (" --quick" if quick else "", workdir))
    print("python %s, %d CPUs" % (sys.version.split()[0], os.cpu_count() or 0))
    # The soft keystore's passphrase by environment (the line never stores it).
    environ = dict(os.environ)
    environ.setdefault(line_workdir.PASS_ENV, secrets.token_urlsafe(24))
    # The simulated vendor's key beside the line, only its root certificate inside.
    fab.publish_vendor_root(os.path.join(workdir, "line.se-vendor"),
                            os.path.join(workdir, "line", "vendor"))
    line = line_workdir.init_line(os.path.join(workdir, "line"), scrypt_n=2**14, environ=environ)
    try:
        line.close()
        line = line_workdir.open_line(os.path.join(workdir, "line"), max_sessions=64,
                                      environ=environ)
        run(line, 10, 1, "none")  # warm-up: imports, caches, first SQLite pages

        raw = raw_crypto_ms(50 if quick else 200)
        print("\n== zero-latency SE profile: host cost ==")
        print("raw cryptography keygen + CSR + issue + verify: %.2f ms/device" % raw)
        header = ("stations", "devices", "dev/s", "x 1-station", "cycle p50", "host wall",
                  "host CPU", "emulator", "yield %")
        print("%8s %8s %8s %11s %10s %10s %9s %9s %8s" % header)
        fast = []
        for k in ((1,) if args.host_only else (1, 2, 4, 8)):
            s = run(line, n_fast, k, "none")
            fast.append(s)
            host_wall = s.mean("cycle_ms") - s.mean("emulator_ms")
            print("%8d %8d %8.1f %11.2f %10.2f %10.2f %9.2f %9.2f %8.2f" % (
                k, s.devices, s.throughput, s.throughput / fast[0].throughput,
                s.cycle_ms(50), host_wall, s.mean("host_cpu_ms"), s.mean("emulator_ms"),
                s.yield_pct))
        one = fast[0]
        host = one.mean("cycle_ms") - one.mean("emulator_ms")
        host_cpu = one.mean("host_cpu_ms")
        print("HOST COST (1 station) = line-host CPU per device, the emulated SE's own CPU "
              "(endpoint, SE-side T=1', applet, chip crypto) subtracted:")
        print("  host CPU %.2f ms/device; raw crypto %.2f ms (host CPU / raw = %.1fx); "
              "target <= %.1f ms: %s"
              % (host_cpu, raw, host_cpu / raw, TARGET_HOST_MS,
                 "MET" if host_cpu <= TARGET_HOST_MS else "NOT MET"))
        print("  host wall %.2f ms/device (CPU + waiting for durable commits: fsync of the "
              "registry and the issuance journal); emulator %.2f ms/device wall, not counted"
              % (host, one.mean("emulator_ms")))
        steps = one.step_means_ms()
        print("per step (1 station, ms, emulator included): " + ", ".join(
            "%s %.2f" % (step, steps.get(step, 0.0)) for step in STEPS))
        split_host, split_cpu, split, durable = host_split(line, 50 if quick else 100)
        print("where the host time goes (1 station; this run: %.2f ms/device CPU, %.2f ms "
              "wall):" % (split_cpu, split_host))
        print("  %-48s %8s %6s %8s" % ("", "CPU ms", "CPU %", "wall ms"))
        for name, wall_ms, cpu_ms in split:
            print("  %-48s %8.2f %5.1f%% %8.2f" % (name, cpu_ms, 100.0 * cpu_ms / split_cpu,
                                                   wall_ms))
        print("  of which the durable writes (SQLite COMMITs with their WAL fsync, the "
              "journal's fdatasync): %.2f ms CPU, %.2f ms wall" % (durable[1], durable[0]))
        print("audit: %.0f bytes/device (%d entries for %d devices, checkpoints included)"
              % (one.audit_bytes / max(1, len(one.ok)), one.audit_entries, len(one.ok)))
        if args.host_only:
            if args.profile:
                print("\n== cProfile: 1 station, zero latency, %d devices ==" % (n_fast // 2))
                print(profile_host(line, n_fast // 2))
            return 0

        print("\n== ATECC608-class SE profile (real time) ==")
        slow1 = run(line, n_slow_1, 1, "atecc608")
        ratio = slow1.mean("cycle_ms") / slow1.mean("se_ms")
        print("1 station, %d devices: cycle %.0f ms/device, SE-only %.0f ms/device, "
              "ratio %.3f (target <= %.2f: %s)"
              % (slow1.devices, slow1.mean("cycle_ms"), slow1.mean("se_ms"), ratio,
                 TARGET_CYCLE_RATIO, "MET" if ratio <= TARGET_CYCLE_RATIO else "NOT MET"))
        slow32 = run(line, n_slow_32, 32, "atecc608")
        scaling = slow32.throughput / (32 * slow1.throughput)
        print("32 stations, %d devices: %.2f dev/s vs 1 station %.3f dev/s -> %.3f of "
              "linear (target >= %.2f: %s); cycle p50 %.0f ms, p99 %.0f ms, yield %.1f %%"
              % (slow32.devices, slow32.throughput, slow1.throughput, scaling,
                 TARGET_SCALING, "MET" if scaling >= TARGET_SCALING else "NOT MET",
                 slow32.cycle_ms(50), slow32.cycle_ms(99), slow32.yield_pct))
        print("HSM pool after 32 stations: %s" % slow32.pool)
        report = report_mod.write_report(fast, os.path.join(workdir, "bench-zero-latency.html"))
        report_mod.write_report([slow1, slow32], os.path.join(workdir, "bench-atecc608.html"))
        print("\nreports: %s, %s" % (report, os.path.join(workdir, "bench-atecc608.html")))

        print("\n== summary ==")
        print("%-44s %12s %12s %8s" % ("figure", "measured", "target", "ratio"))
        rows = [
            ("host CPU ms/device (1 station)", host_cpu, TARGET_HOST_MS,
             host_cpu / TARGET_HOST_MS),
            ("host wall ms/device (1 station, fsync incl.)", host, None, None),
            ("raw cryptography ms/device (ratio: CPU/raw)", raw, None, host_cpu / raw),
            ("ATECC608 cycle / SE-only", ratio, TARGET_CYCLE_RATIO, ratio / TARGET_CYCLE_RATIO),
            ("ATECC608 32 stations vs linear", scaling, TARGET_SCALING, scaling / TARGET_SCALING),
            ("zero-latency 8 vs 1 station throughput", fast[-1].throughput / one.throughput,
             None, None),
            ("audit bytes/device", one.audit_bytes / max(1, len(one.ok)), 3072.0, None),
        ]
        for name, value, target, r in rows:
            print("%-44s %12.3f %12s %8s" % (name, value,
                                              "-" if target is None else "%.3f" % target,
                                              "-" if r is None else "%.2f" % r))
        if args.json_path:  # bench/report.py
            from bench._report_support import figure, write_json

            write_json(args.json_path, "line", {name: value for name, value, _t, _r in rows}, [
                figure("host CPU per device (1 station)", host_cpu, "ms",
                       "raw cryptography keygen + CSR + issue + verify", raw,
                       higher_is_better=False),
                figure("ATECC608-class cycle per device", slow1.mean("cycle_ms"), "ms",
                       "SE-only time of the same steps", slow1.mean("se_ms"),
                       higher_is_better=False),
                figure("ATECC608-class, 32 stations", slow32.throughput, "devices/s",
                       "32 x 1 station (linear)", 32 * slow1.throughput)])
        if args.profile:
            print("\n== cProfile: 1 station, zero latency, %d devices ==" % (n_fast // 2))
            print(profile_host(line, n_fast // 2))
    finally:
        line.close()
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
