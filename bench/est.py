"""EST benchmark: attested re-enrolments per second against the raw certificate-issuance
rate of `cryptography`, same machine, same run.

    .venv/bin/python bench/est.py [--quick] [--count N] [--devices D] [--callers C]
                                  [--workers-list 1,2] [--https-postgres] [--json PATH]
                                  [--profile]

attested   EstService.enroll(..., reenroll=True) in-process: client certificate check
           (chain, attestation extension, registry, overlap), CSR proof of possession,
           evidence (SE vendor chain, MAK signature, key binding, policy, SE UID, nonce),
           certificate built and signed through the HSM interface (software keystore,
           verify_signatures="always" as `fleetid cloud serve` runs it), then recorded in
           the SQLite registry (synchronous=FULL) with the rotation state in the same
           transaction (add_certificate(rotation_state=...)).
https      the same over HTTPS to `fleetid cloud serve --workers N` (N of --workers-list)
           running in its own processes on the same SQLite registry; the clients run in
           this process (bench/_est_https_support.py).  Each re-enrolment is a new
           connection resuming the device's TLS 1.3 session (ticket from its nonce GET),
           client certificate, base64 bodies.  Printed beside the rate, per
           re-enrolment: the server's CPU (/proc, its parent + workers) and the clients'
           (this process), and the share of the machine's CPUs in use (by anyone: the
           machine may be shared); clients and server share the machine's cores.
           --https-postgres: the same runs over a throwaway PostgreSQL cluster (the
           registry for N processes across hosts), with the database's CPU.
raw        cryptography alone, what a CA that checks nothing would do: load the DER CSR,
           verify its signature, build the same device certificate profile and sign it
           with an in-memory P-256 key.
concurrent the same re-enrolments from --callers threads at once (an EST server's request
           workers; the HTTPS figure uses as many client connections): their registry
           writes share durable commits (group commit, cloud/registry/group_commit.py).
           "1 caller" is the sequential figure (every re-enrolment waits for its own
           fsync) beside it, and "no group commit" the concurrent run with
           group_commit=False (one transaction, one fsync per re-enrolment, as before).
cpu        process CPU time per certificate (time.process_time: every thread of this
           process, the registry writer's included) of the concurrent in-process run and of
           raw issuance: on a loaded machine their ratio moves far less than the wall-clock
           rates'.
Device-side work (key generation, attestation, CSR signing) is prepared before timing.
Loops are bounded by --count; the server listens on 127.0.0.1 only.

--profile adds a cProfile of --count sequential in-process re-enrolments (main thread, on
its CPU time; with group commit each one's registry batch runs on this thread): CPU per
certificate by area (library and built-in functions, cryptography's and sqlite3's, count
for the areas that called them), then the top functions by own time.  The profiler's
overhead inflates every figure, most where calls are many and short: read it for shares,
the figures above for times.
"""

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def prepare(fleet, devices, count):
    """[(device, client cert DER, CSR DER)] for `count` re-enrolments over `devices`."""
    from bench._cloud_support import der

    work = []
    for n in range(count):
        device = devices[n % len(devices)]
        _, csr = device.csr()
        work.append((device, der(device.cert), csr))
    return work


def raw_issuance(csrs, ca_cert):
    """Seconds to issue one certificate per CSR with cryptography alone."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from fleetid.cloud.pki import profiles

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    started = time.perf_counter()
    for csr_der in csrs:
        csr = x509.load_der_x509_csr(csr_der)
        if not csr.is_signature_valid:
            raise RuntimeError("bad CSR")
        serial = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        builder = profiles.device_builder("operational", serial, csr.public_key(), ca_cert, now)
        builder.sign(key, hashes.SHA256())
    return time.perf_counter() - started


def in_callers(work, callers, call):
    """Seconds to run call(item) over `work` from `callers` threads (each takes the next
    item).  Raises the first error."""
    items = iter(work)
    lock = threading.Lock()
    errors = []

    def loop():
        while not errors:
            with lock:
                item = next(items, None)
            if item is None:
                return
            try:
                call(item)
            except Exception as exc:  # noqa: BLE001 - reported after the join
                errors.append(exc)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(callers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    if errors:
        raise errors[0]
    return time.perf_counter() - started


# Areas of the --profile summary: the first prefix (path in the repository) that matches a
# function's file.
_AREAS = (
    ("cloud/est/", "EST service (cloud/est/)"),
    ("cloud/verifier/", "client certificate check (cloud/verifier/)"),
    ("cloud/ca/", "issuing CA: CSR, evidence, nonces (cloud/ca/)"),
    ("cloud/pki/", "certificate profile and signing (cloud/pki/)"),
    ("cloud/hsm/", "HSM (cloud/hsm/)"),
    ("cloud/registry/", "registry (cloud/registry/, sqlite3)"),
    ("cloud/audit/", "audit entries (cloud/audit/)"),
    ("common/", "DER / attestation codecs (common/)"),
)


def profile_reenrolments(work, reenrol):
    """cProfile of `work` re-enrolled one after the other on this thread's CPU time:
    CPU ms per certificate by area, then the functions with the most own time."""
    from bench import _profile_support

    stats, out = _profile_support.profiled(lambda: [reenrol(item) for item in work])
    totals = _profile_support.profile_areas(stats.stats, _AREAS)
    out.write("profiled CPU ms per certificate by area (total %.3f):\n"
              % (sum(totals.values()) * 1000.0 / len(work)))
    _profile_support.write_areas(out, totals, len(work), 50)
    out.write("\nfunctions by own time:\n")
    stats.sort_stats("tottime").print_stats(25)
    return out.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--json", dest="json_path", help="also write the figures as JSON")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile sequential in-process re-enrolments (module docstring)")
    parser.add_argument("--callers", type=int, default=8,
                        help="concurrent re-enrolments (threads / client connections)")
    parser.add_argument("--workers-list", default="1,2",
                        help="server worker processes of the HTTPS runs")
    parser.add_argument("--https-postgres", action="store_true",
                        help="also run the HTTPS runs over a throwaway PostgreSQL cluster")
    args = parser.parse_args(argv)
    workers_list = [int(w) for w in args.workers_list.split(",") if w]
    count = args.count or (100 if args.quick else 1000)
    ndev = args.devices or (10 if args.quick else 50)
    callers = max(1, args.callers)

    from bench._cloud_support import Fleet

    workdir = tempfile.mkdtemp(prefix="fleetid-bench-est-")
    try:
        fleet = Fleet(workdir, verify_signatures="always")  # as `cloud serve` runs
        devices = []
        for _ in range(ndev):
            device = fleet.provision()
            fleet.enrol(device)
            devices.append(device)
        print("fleetid EST bench: %d re-enrolments over %d devices, %d callers; python %s, "
              "%d CPUs" % (count, ndev, callers, sys.version.split()[0], os.cpu_count() or 0))

        def reenrol(item):
            fleet.est.enroll("b42", item[1], item[2], reenroll=True)

        sequential = count / in_callers(prepare(fleet, devices, count), 1, reenrol)
        # With and without group commit, interleaved (two halves each): the machine's
        # load drifts, and the two figures are compared with each other.
        group = fleet.registry.group_commit
        batches, ops = group.batches, group.ops
        half = max(1, count // 2)
        grouped_s = ungrouped_s = grouped_cpu = 0.0
        for _ in range(2):
            work = prepare(fleet, devices, half)
            cpu = time.process_time()  # this process's CPU, every thread (writer too)
            grouped_s += in_callers(work, callers, reenrol)
            grouped_cpu += time.process_time() - cpu
            fleet.registry.group_commit = None  # each re-enrolment its own transaction
            ungrouped_s += in_callers(prepare(fleet, devices, half), callers, reenrol)
            fleet.registry.group_commit = group
        batches, ops = group.batches - batches, group.ops - ops
        concurrent, ungrouped = 2 * half / grouped_s, 2 * half / ungrouped_s

        work = prepare(fleet, devices, count)
        cpu = time.process_time()
        raw = count / raw_issuance([csr for _, _, csr in work], fleet.ca_certs["b42"])
        raw_cpu_ms = 1000.0 * (time.process_time() - cpu) / count
        cpu_ms = 1000.0 * grouped_cpu / (2 * half)

        from bench import _est_https_support
        from bench._pg_support import missing as pg_missing

        https = {}
        for workers in workers_list:  # server in its own processes, clients here
            https[workers] = _est_https_support.measure(
                fleet, devices, count, callers, workers, os.path.join(workdir, "serve"))
        https_pg = _est_https_support.measure_postgres(
            ndev, count, callers, workers_list, os.path.join(workdir, "pg")) \
            if args.https_postgres else None
        profile = (profile_reenrolments(prepare(fleet, devices, count), reenrol)
                   if args.profile else None)
        fleet.close()
        print("attested re-enrolments (in-process, %2d callers): %8.1f /s  (%d ops in %d "
              "commits)" % (callers, concurrent, ops, batches))
        print("  same, no group commit                : %8.1f /s" % ungrouped)
        print("  same, 1 caller                       : %8.1f /s" % sequential)
        for workers, figures in sorted(https.items()):
            print(_est_https_support.report_line(workers, figures, callers))
        for workers, figures in sorted((https_pg or {}).items()):
            print(_est_https_support.report_line(workers, figures, callers,
                                                    " over PostgreSQL"))
        if args.https_postgres and https_pg is None:
            print("HTTPS over PostgreSQL: not run (%s)" % "; ".join(pg_missing()))
        print("raw cryptography issuance (1 thread)   : %8.1f /s" % raw)
        print("CPU per certificate: %.2f ms attested (in-process, %d callers, all threads), "
              "%.2f ms raw: raw/attested %.2fx (the machine's load changes CPU time far less "
              "than wall time)" % (cpu_ms, callers, raw_cpu_ms, raw_cpu_ms / cpu_ms))
        print("ratio attested/raw: %.2fx in-process (%.2fx without group commit, %.2fx one "
              "caller)" % (concurrent / raw, ungrouped / raw, sequential / raw)
              + "".join(", %.2fx over HTTPS with %d worker%s" % (
                  f["rate"] / raw, w, "s" if w > 1 else "") for w, f in sorted(https.items())))
        for registry, runs in (("", https), (" over PostgreSQL", https_pg or {})):
            if len(runs) > 1:
                low, high = min(runs), max(runs)
                print("ratio HTTPS%s %d/%d workers: %.2fx" % (
                    registry, high, low, runs[high]["rate"] / runs[low]["rate"]))
        if profile:
            print("\n== cProfile: %d sequential in-process re-enrolments ==" % count)
            print(profile)
        if args.json_path:  # bench/report.py
            from bench._report_support import figure, write_json

            write_json(args.json_path, "est",
                       {"attested": concurrent, "attested_ungrouped": ungrouped,
                        "attested_one_caller": sequential, "raw": raw,
                        "attested_cpu_ms": cpu_ms, "raw_cpu_ms": raw_cpu_ms,
                        "https": {str(w): f for w, f in https.items()},
                        "https_postgres": {str(w): f for w, f in (https_pg or {}).items()}},
                       [
                           figure("attested re-enrolments, in-process, %d callers" % callers,
                                  concurrent, "/s", "raw cryptography issuance", raw),
                       ] + [figure("attested re-enrolments, HTTPS, %d server worker(s), %d "
                                   "clients" % (w, callers), f["rate"], "/s",
                                   "raw cryptography issuance", raw)
                            for w, f in sorted(https.items())])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
