#!/usr/bin/env python3
"""Revocation benchmark: DER CRL vs compact set vs the information-theoretic bound, lookups
under MicroPython, set build and incremental update, OCSP responses per second.

    .venv/bin/python bench/revocation.py [--quick] [--crl-full] [--no-mp] [--no-ocsp]
    .venv/bin/python bench/revocation.py --bulk N [--bulk-rounds R] [--no-pg]

The MicroPython columns need the test extras (`bash scripts/setup.sh --test`: pytest and
the interpreter, run through tests/micropython/support.Stage).  Without them the CPython
figures and OCSP still run, the mp columns print "-", and the exit status is 2 (0 with
--no-mp).

Per fleet size N (10^4, 10^5, 10^6) and revoked fraction (0.1 %, 1 %, 10 %), with R
random revoked serials out of 1..N (the line allocates serials monotonically):

  crl        size of the DER CRL `cryptography`'s builder makes for R entries as the
             cloud publishes them (random 159-bit certificate serials, revocationDate,
             reasonCode), signed ECDSA P-256.  Entries cost the same bytes whatever R, so
             above --crl-max entries (default 20 000) the CRL is built for 20 000 entries
             and extrapolated linearly (fixed part + R x per-entry bytes measured at
             10 000 and 20 000); --crl-full builds every one (minutes for 100 000).
  compact    the signed compact set (common/revset.py): header, index, body, signature.
  bound      ceil(log2 C(N, R) / 8) bytes.
  payload/bnd  (index + body) / bound: the coding overhead, what the format controls.
  cmp/bnd    whole set / bound (the fixed 46-byte header + ~72-byte signature dominate
             for tiny sets).
  crl/cmp    CRL size / compact size.
  build ms   encode + sign (software P-256 key: the HSM path adds its own latency).
  delta ms   cloud: encode the new set + its delta after 0.1 % of N more revocations;
  apply ms   device side on CPython: merge the delta into the new set's exact bytes.
  mp us      mean lookup time under MicroPython (unix port, this machine) over revoked
             serials, their successors and random serials; mp heap: bytes allocated
             during those lookups (the set itself is resident as one bytes object);
             mp min: the smallest -X heapsize at which parse + lookups run (bisected to
             1 KiB; unix port, so ~20 KB of bytecode and the script's query list are in it).

OCSP: a Fleet (bench/_cloud_support.py) with a delegated responder per CA, the
aiohttp responder on 127.0.0.1, and a scripted client (urllib, new connection per
request) posting requests with nonces from N threads for a few seconds; plus the
responder's in-process rate (respond() alone: parse, registry lookup, build, HSM sign).

--bulk N (only this): the registry writes of `fleetid revoke --from-file` for N devices
(an identity and an operational certificate each), devices/s, on SQLite (a file in the
temporary folder, synchronous=FULL) and PostgreSQL (a throwaway durable cluster, when
bench/_pg_support.missing() is empty; --no-pg skips it): the per-certificate path (the
baseline: one mark_revoked transaction per certificate, as revoke_devices wrote before
its chunks) against RevocationService.revoke_devices (CHUNK devices per transaction),
each on its own copy of one populated registry, alternated --bulk-rounds times in the
same run; both do the same up-front check of every serial and one announcement.
"""

import argparse
import contextlib
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FLEETS = (10**4, 10**5, 10**6)
FRACTIONS = (0.001, 0.01, 0.1)
FLEET_ID = bytes(range(8))


def bound_bytes(n, r):
    bits = (math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)) / math.log(2)
    return bits / 8


class CrlSizer:
    """DER CRL sizes from cryptography's builder, exact up to `limit` entries."""

    def __init__(self, limit):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.x509, self.hashes = x509, hashes
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.issuer = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                    "product:widget"),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                    "batch:b42"),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                    "region:eu")])
        self.now = datetime.datetime(2026, 12, 6, tzinfo=datetime.timezone.utc)
        self.limit = limit
        self.cache = {}
        self.seconds = {}

    def exact(self, r):
        if r in self.cache:
            return self.cache[r]
        x509 = self.x509
        import datetime

        started = time.perf_counter()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.issuer)
                   .last_update(self.now).next_update(self.now + datetime.timedelta(days=1))
                   .add_extension(x509.CRLNumber(int(self.now.timestamp() * 1000)), False))
        for i in range(r):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(x509.random_serial_number())
                .revocation_date(self.now - datetime.timedelta(seconds=i))
                .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), False)
                .build())
        from cryptography.hazmat.primitives import serialization

        size = len(builder.sign(self.key, self.hashes.SHA256()).public_bytes(
            serialization.Encoding.DER))
        self.seconds[r] = time.perf_counter() - started
        self.cache[r] = size
        return size

    def size(self, r):
        """(bytes, exact?)"""
        if r <= self.limit:
            return self.exact(r), True
        half = self.limit // 2
        a, b = self.exact(half), self.exact(self.limit)
        per_entry = (b - a) / (self.limit - half)
        return int(round(b + per_entry * (r - self.limit))), False


def sign_with(key):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from fleetid.common import revset

    def sign(signed):
        return revset.sign_part(signed, key.sign(signed, ec.ECDSA(hashes.SHA256())))
    return sign


def compact_row(n, fraction, rng, sign):
    from fleetid.common import revset, revset_merge

    r = max(1, int(round(n * fraction)))
    revoked = sorted(rng.sample(range(1, n + 1), r))
    started = time.perf_counter()
    wire = sign(revset_merge.encode(FLEET_ID, 1, 0, 86400, n, revoked))
    build_ms = (time.perf_counter() - started) * 1000
    info = revset.parse(wire)
    members = set(revoked)
    extra = set()
    while len(extra) < max(1, n // 1000):
        s = rng.randint(1, n)
        if s not in members:
            extra.add(s)
    extra = sorted(extra)
    started = time.perf_counter()
    new = sign(revset_merge.encode(FLEET_ID, 2, 0, 86400, n, sorted(revoked + extra)))
    delta = revset.encode_delta(1, new, extra)
    delta_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    merged = revset_merge.apply_delta(info, revset.RevDelta(delta))
    apply_ms = (time.perf_counter() - started) * 1000
    if merged != new:
        raise SystemExit("delta merge differs from the encoder's bytes")
    payload = info.signed_len - info.index_pos
    return {"n": n, "fraction": fraction, "r": r, "revoked": revoked, "wire": wire,
            "compact": len(wire), "payload": payload, "bound": bound_bytes(n, r),
            "build_ms": build_ms, "delta_ms": delta_ms, "apply_ms": apply_ms,
            "delta_bytes": len(delta), "k": info.k, "stride": info.stride}


MP_SCRIPT = r"""
import gc
import os
import time
from fleetid.common import revset
gc.collect()
data = bytearray(os.stat(SET)[6])
f = open(SET, "rb")
f.readinto(data)
f.close()
info = revset.parse(data)
gc.collect()
before = gc.mem_free()
t0 = time.ticks_us()
for s in QUERIES:
    info.contains(s)
elapsed = time.ticks_diff(time.ticks_us(), t0)
print("us", elapsed // len(QUERIES))
print("heap", before - gc.mem_free())
"""


def mp_lookup(stage, folder, row, rng, heap):
    path = os.path.join(folder, "set-%d-%s.frs" % (row["n"], row["fraction"]))
    with open(path, "wb") as f:
        f.write(row["wire"])
    revoked = row["revoked"]
    step = max(1, len(revoked) // 100)
    queries = revoked[::step][:100] + [s + 1 for s in revoked[::step][:100]] + [
        rng.randint(1, row["n"]) for _ in range(100)]
    script = "SET = %r\nQUERIES = %r\n" % (path, queries) + MP_SCRIPT
    status, out, err = stage.try_run("bench_revset_lookup", script, heap=heap)
    if status != 0:
        return None, None, None
    values = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    # Peak: the smallest -X heapsize at which parse + the lookups still run, bisected to
    # 1 KiB (unix port: the ~20 KB of revset/errors bytecode and the query list included).
    lo, hi = 4 * 1024, heap
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        if stage.try_run("bench_revset_lookup", script, heap=mid)[0] == 0:
            hi = mid
        else:
            lo = mid
    return int(values["us"]), int(values["heap"]), hi


def ocsp_rate(seconds, threads):
    import threading
    import urllib.request

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp

    from bench._cloud_support import Fleet
    from bench._ocsp_support import LoopbackServer, ocsp_responder
    from fleetid.cloud.http.revocation_app import make_revocation_app
    from fleetid.cloud.revocation.ocsp_tier import OcspTier

    folder = tempfile.mkdtemp(prefix="bench-ocsp-")
    fleet = Fleet(folder, verify_signatures="first")
    try:
        devices = [fleet.provision("b42") for _ in range(8)]
        responder = ocsp_responder(fleet)
        requests = []
        for i, d in enumerate(devices):
            requests.append(ocsp.OCSPRequestBuilder().add_certificate(
                d.identity_cert, fleet.ca_certs["b42"], hashes.SHA1()).add_extension(
                x509.OCSPNonce(os.urandom(16)), False).build().public_bytes(
                serialization.Encoding.DER))
        count = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            responder.respond(requests[count % len(requests)])
            count += 1
        in_process = count / (time.perf_counter() - started)
        # No per-client limit: every request comes from this one address, and the
        # figure is the responder's rate, not the limiter's (bench/ocsp.py does the same).
        with LoopbackServer(make_revocation_app([OcspTier(responder)],
                                                client_limits=None)) as server:
            done = [0] * threads
            stop = time.perf_counter() + seconds

            def client(slot):
                i = slot
                while time.perf_counter() < stop:
                    req = urllib.request.Request(
                        server.url + "/ocsp", data=requests[i % len(requests)],
                        headers={"Content-Type": "application/ocsp-request"})
                    with urllib.request.urlopen(req, timeout=10) as resp:
                        ocsp.load_der_ocsp_response(resp.read())
                    done[slot] += 1
                    i += 1

            started = time.perf_counter()
            workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            http_rate = sum(done) / (time.perf_counter() - started)
        return in_process, http_rate
    finally:
        fleet.close()
        shutil.rmtree(folder, ignore_errors=True)


# -- bulk revocation: per certificate against chunks ----------------------------------------


def _bulk_ders(count):
    """(identity DER, operational DER) for devices 1..count, one CA key (whose signatures
    nobody checks here)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench batch CA")])
    start = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)

    def cert(n, number):
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(n))]))
                .issuer_name(issuer).public_key(key.public_key()).serial_number(number)
                .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650))
                .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))

    return [(cert(n, 0x7F000000 + n), cert(n, 0x55000000 + n)) for n in range(1, count + 1)]


def _bulk_populate(registry, ders):
    """Each device as the line and EST leave it: intent, committed identity (with its
    injection entry), then an operational certificate (issuance entry)."""
    from fleetid.cloud import audit
    from fleetid.cloud.registry import IdentityRecord

    for identity_der, operational_der in ders:
        se_uid = os.urandom(16)
        serial = registry.allocate_intent(se_uid, "line-1/st-1").serial
        facts = audit.certificate_facts(identity_der)
        record = IdentityRecord(serial=serial, se_uid=se_uid, identity_cert_der=identity_der,
                                slot=2, aid=bytes.fromhex("a000000620466c656574"),
                                batch="b42", station="line-1/st-1", operator="bench",
                                hsm_session="pool/1",
                                attestation_hash=audit.attestation_hash(b"%d" % serial))
        registry.commit_identity(record, audit.injection_entry(
            serial=serial, se_uid=se_uid, slot=2, aid=record.aid,
            cert_serial=facts["cert_serial"], cert_fingerprint=facts["cert_fingerprint"],
            issuing_ca=facts["issuing_ca"], batch="b42", station="line-1/st-1",
            operator="bench", hsm_session="pool/1", attestation_hash=record.attestation_hash,
            when=time.time()))
        registry.add_certificate(serial, operational_der, "operational")


def per_certificate(registry, serials, reason, operator=""):
    """The path revoke_devices' chunks replaced: one mark_revoked transaction per
    certificate, newest first (tests/cloud/test_revocation_bulk.py compares the chunks
    with it).  Returns {serial: [cert serial hex]} as revoke_devices does."""
    done = {}
    for serial in serials:
        done[serial] = []
        for record in reversed(registry.certificates(serial)):
            if not record.revoked:
                registry.mark_revoked(record.cert_serial, reason, operator=operator,
                                      issuer=record.issuer)
                done[serial].append(record.cert_serial)
    return done


def _per_certificate(service, serials, reason):
    """The baseline: revoke_devices before its chunks (every serial checked, then
    per_certificate, one announcement)."""
    from fleetid.cloud.revocation.service import bump_event

    for serial in serials:
        service.registry.get_device(serial)
    per_certificate(service.registry, serials, reason)
    bump_event(service.events_path)


class _SqliteCopies:
    """A populated SQLite registry and fresh copies of it."""

    def __init__(self, folder):
        self.folder = folder
        self.template = os.path.join(folder, "template.db")
        self.made = 0

    def populate(self, ders):
        import sqlite3

        from fleetid.cloud.registry.sqlite_backend import SqliteRegistry

        with SqliteRegistry(self.template) as registry:
            _bulk_populate(registry, ders)
        with sqlite3.connect(self.template) as conn:  # the WAL into the file, then copy it
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def open(self):
        from fleetid.cloud.registry.sqlite_backend import SqliteRegistry

        self.made += 1
        path = os.path.join(self.folder, "copy-%d.db" % self.made)
        shutil.copyfile(self.template, path)
        return SqliteRegistry(path)


class _PostgresCopies:
    """A populated PostgreSQL registry (database `bulk`) and fresh copies of it (CREATE
    DATABASE ... TEMPLATE), on a throwaway cluster started and removed with the `with`."""

    def __init__(self):
        from bench._pg_support import ThrowawayPostgres

        self.pg = ThrowawayPostgres()
        self.made = 0

    def __enter__(self):
        self.pg.__enter__()
        return self

    def __exit__(self, *exc):
        return self.pg.__exit__(*exc)

    def populate(self, ders):
        from fleetid.cloud.registry.postgres_backend import PostgresRegistry

        with PostgresRegistry(self.pg.new_database("bulk")) as registry:
            _bulk_populate(registry, ders)

    def open(self):
        from fleetid.cloud.registry.postgres_backend import PostgresRegistry

        self.made += 1
        return PostgresRegistry(self.pg.new_database("copy_%d" % self.made, template="bulk"))


def bulk_revocation(copies, count, rounds, folder):
    """Alternate the per-certificate path and the chunks on fresh copies.  Returns
    {"per_certificate": [devices/s], "chunks": [devices/s], "entries": {the chain lengths
    after each run} (one: both paths wrote the same number of entries)}."""
    from fleetid.cloud.revocation.service import RevocationService

    out = {"per_certificate": [], "chunks": [], "entries": set()}
    serials = list(range(1, count + 1))
    for index in range(2 * rounds):
        which = "per_certificate" if index % 2 == 0 else "chunks"
        registry = copies.open()
        try:
            state = tempfile.mkdtemp(dir=folder)
            service = RevocationService(registry, [], os.path.join(state, "revoked.jsonl"),
                                        os.path.join(state, "revocation.events"))
            started = time.perf_counter()
            if which == "chunks":
                service.revoke_devices(serials, "keyCompromise")
            else:
                _per_certificate(service, serials, "keyCompromise")
            out[which].append(count / (time.perf_counter() - started))
            out["entries"].add(registry.head()[0])
        finally:
            registry.close()
    return out


def run_bulk(args):
    """--bulk: print devices/s of both paths per backend, and their ratio."""
    from bench._pg_support import missing
    from fleetid.cloud.revocation.service import CHUNK

    print("machine: %s, %s, %d cores, Python %s" % (
        platform.machine(), _cpu(), os.cpu_count() or 0, platform.python_version()))
    ders = _bulk_ders(args.bulk)
    folder = tempfile.mkdtemp(prefix="bench-bulk-revoke-")
    measured = []  # (backend, per-certificate devices/s, chunked devices/s): --json
    try:
        backends = [("SQLite", lambda: contextlib.nullcontext(_SqliteCopies(folder)))]
        lacking = missing()
        if args.no_pg or lacking:
            print("PostgreSQL: not measured (%s)" % ("--no-pg" if args.no_pg
                                                     else "; ".join(lacking)))
        else:
            backends.append(("PostgreSQL", _PostgresCopies))
        for name, opened in backends:
            with opened() as copies:
                started = time.perf_counter()
                copies.populate(ders)
                print("%s: %d devices populated in %.1f s" % (
                    name, args.bulk, time.perf_counter() - started))
                sys.stdout.flush()
                got = bulk_revocation(copies, args.bulk, args.bulk_rounds, folder)
            assert len(got["entries"]) == 1, got["entries"]  # the same chain length
            base, chunked = (sum(got[k]) / len(got[k]) for k in ("per_certificate", "chunks"))
            print("%s: revoke %d devices (2 certificates each): per certificate %s "
                  "devices/s, chunks of %d devices %s devices/s: %.1fx" % (
                      name, args.bulk, " / ".join("%.0f" % v for v in got["per_certificate"]),
                      CHUNK, " / ".join("%.0f" % v for v in got["chunks"]), chunked / base))
            sys.stdout.flush()
            measured.append((name, base, chunked))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json_path:
        from bench._report_support import figure, write_json

        write_json(args.json_path, "revocation_bulk", {"devices": args.bulk, "chunk": CHUNK,
                                                       "measured": measured},
                   [figure("bulk revocation, %s, chunks of %d" % (name, CHUNK), chunked,
                           "devices/s", "one transaction per certificate", base)
                    for name, base, chunked in measured])
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^4 and 10^5 only")
    parser.add_argument("--crl-full", action="store_true", help="build every CRL in full")
    parser.add_argument("--crl-max", type=int, default=20000)
    parser.add_argument("--no-mp", action="store_true", help="skip the MicroPython lookups")
    parser.add_argument("--no-ocsp", action="store_true")
    parser.add_argument("--mp-heap", default="256K", help="-X heapsize for the lookups")
    parser.add_argument("--ocsp-seconds", type=float, default=3.0)
    parser.add_argument("--ocsp-threads", type=int, default=4)
    parser.add_argument("--json", dest="json_path", help="also write the figures as JSON")
    parser.add_argument("--bulk", type=int, default=0, metavar="N",
                        help="only the bulk revocation writes of N devices (see above)")
    parser.add_argument("--bulk-rounds", type=int, default=2)
    parser.add_argument("--no-pg", action="store_true", help="--bulk on SQLite only")
    args = parser.parse_args(argv)
    if args.bulk:
        return run_bulk(args)
    collected = []  # (n, fraction, row, crl bytes): --json

    from cryptography.hazmat.primitives.asymmetric import ec

    print("machine: %s, %s, %d cores, Python %s" % (
        platform.machine(), _cpu(), os.cpu_count() or 0, platform.python_version()))
    rng = random.Random(13)
    sign = sign_with(ec.generate_private_key(ec.SECP256R1()))
    sign(b"warm-up")  # the first signature pays for loading the backend
    sizer = CrlSizer(10**9 if args.crl_full else args.crl_max)
    stage = None
    mp_missing = None
    if not args.no_mp:
        try:
            from tests.micropython.budgets import parse_size
            from tests.micropython.support import Stage
        except ImportError as exc:
            # The demo's environment (setup.sh without --test): the CPython figures run,
            # the MicroPython columns stay "-", and the exit status says they are missing.
            mp_missing = exc
            sys.stderr.write("bench/revocation.py: the MicroPython lookups (mp columns) need "
                             "the test extras (pytest, the MicroPython interpreter); run `bash "
                             "scripts/setup.sh --test` first, or pass --no-mp (%s)\n" % exc)
    folder = tempfile.mkdtemp(prefix="bench-revset-")
    if not args.no_mp and mp_missing is None:
        stage = Stage(os.path.join(folder, "mp"), opt=3)
        heap = parse_size(args.mp_heap)
    header = ("%8s %6s %7s %10s %9s %9s %8s %8s %8s %8s %8s %8s %8s %7s %7s %7s" % (
        "N", "rev%", "R", "crl B", "compact B", "bound B", "pay/bnd", "cmp/bnd", "crl/cmp",
        "build ms", "delta ms", "apply ms", "delta B", "mp us", "mp heap", "mp min"))
    print(header)
    try:
        for n in FLEETS[:2] if args.quick else FLEETS:
            for fraction in FRACTIONS:
                row = compact_row(n, fraction, rng, sign)
                crl, exact = sizer.size(row["r"])
                collected.append((n, fraction, row, crl))
                us, mp_heap, mp_min = (mp_lookup(stage, folder, row, rng, heap) if stage
                                       else (None, None, None))
                print("%8d %6.1f %7d %9d%s %9d %9.0f %8.3f %8.3f %8.1f %8.1f %8.1f %8.1f "
                      "%8d %7s %7s %7s" % (
                          n, fraction * 100, row["r"], crl, " " if exact else "*",
                          row["compact"], math.ceil(row["bound"]),
                          row["payload"] / row["bound"], row["compact"] / row["bound"],
                          crl / row["compact"], row["build_ms"], row["delta_ms"],
                          row["apply_ms"], row["delta_bytes"],
                          "-" if us is None else us, "-" if mp_heap is None else mp_heap,
                          "-" if mp_min is None else "%dK" % (mp_min // 1024)))
                sys.stdout.flush()
        if sizer.limit in sizer.seconds:
            print("* extrapolated linearly from CRLs of %d and %d entries built by "
                  "cryptography (%.1f s for the larger); every other CRL built in full"
                  % (sizer.limit // 2, sizer.limit, sizer.seconds[sizer.limit]))
        else:
            print("every CRL built in full by cryptography")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if not args.no_ocsp:
        in_process, http_rate = ocsp_rate(args.ocsp_seconds, args.ocsp_threads)
        print("OCSP: %.0f responses/s in process (respond(): parse, registry, build, "
              "HSM-interface sign); %.0f responses/s over HTTP on 127.0.0.1 (%d client "
              "threads in this process, new connection per request, nonce)"
              % (in_process, http_rate, args.ocsp_threads))
    if args.json_path:  # bench/report.py
        _write_json(args.json_path, collected,
                    None if args.no_ocsp else (in_process, http_rate))
    if mp_missing is not None:
        sys.stderr.write("bench/revocation.py: MicroPython columns not measured (no test "
                         "extras): exit status 2\n")
        return 2
    return 0


def _write_json(path, collected, ocsp_rates):
    from bench._report_support import figure, write_json

    rows = []
    for n, fraction, row, crl in collected:
        what = "N=%d, %g %% revoked" % (n, fraction * 100)
        rows.append(figure("compact set, " + what, row["compact"], "B",
                           "information-theoretic bound log2 C(N,R)",
                           math.ceil(row["bound"]), higher_is_better=False))
        rows.append(figure("compact set, " + what, row["compact"], "B", "CRL", crl,
                           higher_is_better=False))
    if ocsp_rates:
        rows.append(figure("OCSP responses, in process", ocsp_rates[0], "/s"))
        rows.append(figure("OCSP responses, HTTP on 127.0.0.1", ocsp_rates[1], "/s"))
    raw = [{"n": n, "fraction": f, "crl_bytes": c, **{k: v for k, v in r.items()
                                                          if isinstance(v, (int, float))}}
           for n, f, r, c in collected]
    write_json(path, "revocation", {"rows": raw, "ocsp": ocsp_rates}, rows)


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


if __name__ == "__main__":
    sys.exit(main())
