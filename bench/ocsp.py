#!/usr/bin/env python3
"""OCSP benchmark: the fleetid responder against `openssl ocsp` as a responder, the same
requests, the same machine, the same run.

    .venv/bin/python bench/ocsp.py [--quick] [--seconds S] [--devices D] [--clients C]

What is measured, per server, as responses per server CPU-second (utime + stime of the
server process from /proc, every thread of it, so the client's cost does not count),
and responses per wall second:
  cached   RFC 5019 requests (no nonce, SHA-1 CertID) over the D devices' identity
           certificates (one of them revoked): fleetid answers from its pre-signed cache
           (cloud/revocation/ocsp_cache.py); `openssl ocsp` signs every response.
  nonce    the same requests with a 16-byte nonce: both sign every response (fleetid
           reads the registry and signs through its HSM interface, software keystore).
Every answer is checked: HTTP 200 and an OCSP response with responseStatus successful.

The servers, each in its own process on 127.0.0.1:
  fleetid  the revocation listener's app (cloud/http/revocation_app.py) with the OCSP
           tier only, as `fleetid cloud serve` builds it: the event file polled per
           request, the middleware (metrics, error table), the per-client token bucket
           (set high here: every request comes from 127.0.0.1), uvloop when installed.
           The cache is warm before the clock starts (pre-signed at start-up, as a
           running responder is).
  openssl  `openssl ocsp -index index.txt -CA ca.pem -rsigner -rkey -port P -nmin 60`
           (one process), its index listing the same certificates and the same
           revocation, its responder certificate issued by the same CA (its key in a
           file: openssl cannot sign through the fleet's HSM interface).
The client is this process: C threads, a new connection per request (POST /ocsp,
`Connection: close`: `openssl ocsp` closes after each answer).  Both servers therefore
pay a TCP accept and close per response.
"""

import argparse
import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.mtls import cpu_seconds, free_port, stop_processes, wait_port  # noqa: E402

REQUEST_HEAD = (b"POST /ocsp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/ocsp-request\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n")


# -- the fleet and both responders' files ------------------------------------------------------


def build(workdir, devices):
    """A bench fleet (bench/_cloud_support.Fleet) with `devices` devices under b42, one
    revoked through RevocationService; the delegated responder in the HSM for fleetid,
    and a software responder key + certificate and an index for openssl.
    Returns (request bodies without nonce, with nonce)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp

    from bench._cloud_support import Fleet, pem
    from bench._ocsp_support import ocsp_signers

    fleet = Fleet(os.path.join(workdir, "fleet"), verify_signatures="first")
    try:
        devices = [fleet.provision("b42") for _ in range(devices)]
        fleet.revoke_certificate(devices[-1].identity_cert, "keyCompromise")
        signer = ocsp_signers(fleet)[0]  # b42's, its key "ocsp-b42" in the fleet's HSM
        ca = fleet.ca_certs["b42"]
        with open(os.path.join(workdir, "ca.pem"), "wb") as f:
            f.write(pem(ca))
        with open(os.path.join(workdir, "ocsp-b42.pem"), "wb") as f:
            f.write(pem(signer.responder_cert))
        _openssl_files(workdir, fleet, ca, devices)
        plain, nonced = [], []
        for device in devices:
            builder = ocsp.OCSPRequestBuilder().add_certificate(device.identity_cert, ca,
                                                                hashes.SHA1())
            plain.append(builder.build().public_bytes(serialization.Encoding.DER))
            nonced.append(builder.add_extension(x509.OCSPNonce(os.urandom(16)), False)
                          .build().public_bytes(serialization.Encoding.DER))
        return plain, nonced
    finally:
        fleet.close()


def _openssl_files(workdir, fleet, ca, devices):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from bench._cloud_support import NOW, key_pem, pem
    from fleetid.cloud.pki.signing import sign_certificate

    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                           "OCSP openssl bench")]))
               .issuer_name(ca.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW - datetime.timedelta(minutes=5))
               .not_valid_after(NOW + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]),
                              False)
               .add_extension(x509.OCSPNoCheck(), False))
    cert = sign_certificate(fleet.hsm, "ca-widget-b42", builder, ca.public_key())
    with open(os.path.join(workdir, "openssl-rsigner.pem"), "wb") as f:
        f.write(pem(cert))
    fd = os.open(os.path.join(workdir, "openssl-rkey.pem"), os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem(key))
    lines = []
    for device in devices:
        c = device.identity_cert
        record = fleet.registry.certificate_status(c.serial_number,
                                                   issuer=c.issuer.rfc4514_string())
        serial = "%X" % c.serial_number
        serial = "0" * (len(serial) % 2) + serial  # BN_bn2hex: whole bytes
        expiry = c.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        if record.revoked:
            when = datetime.datetime.fromisoformat(record.revoked_at.replace("Z", "+00:00"))
            lines.append("R\t%s\t%s,keyCompromise\t%s\tunknown\t/%s\n" % (
                expiry, when.strftime("%y%m%d%H%M%SZ"), serial,
                c.subject.rfc4514_string().replace(",", "/")))
        else:
            lines.append("V\t%s\t\t%s\tunknown\t/%s\n" % (
                expiry, serial, c.subject.rfc4514_string().replace(",", "/")))
    with open(os.path.join(workdir, "index.txt"), "w") as f:
        f.writelines(lines)
    with open(os.path.join(workdir, "index.txt.attr"), "w") as f:
        f.write("unique_subject = no\n")


# -- the fleetid responder in its own process --------------------------------------------------


def serve_fleetid(workdir, port, event_loop="auto", lean=True):
    """Child process: the revocation listener's app with the OCSP tier over the bench
    fleet's keystore, registry and event file; the cache pre-signed before listening."""
    import asyncio

    from aiohttp import web
    from cryptography import x509

    from bench._support import KEYSTORE_PASS, SCRYPT_N
    from fleetid.cloud.hsm.soft_backend import SoftBackend
    from fleetid.cloud.http.metrics import Metrics
    from fleetid.cloud.http.ocsp_fast import OcspFastPath, OcspFastSite
    from fleetid.cloud.http.rate_limit import ClientRateLimits
    from fleetid.cloud.http.revocation_app import make_revocation_app
    from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
    from fleetid.cloud.revocation.ocsp import OcspResponder, OcspSigner
    from fleetid.cloud.revocation.ocsp_tier import OcspTier
    from fleetid.cloud.revocation.service import EventWatcher
    from fleetid.cloud.server import event_loop_factory

    def cert(name):
        with open(os.path.join(workdir, name), "rb") as f:
            return x509.load_pem_x509_certificate(f.read())

    folder = os.path.join(workdir, "fleet")
    hsm = SoftBackend(os.path.join(folder, "keystore.json"), KEYSTORE_PASS, scrypt_n=SCRYPT_N)
    registry = SqliteRegistry(os.path.join(folder, "registry.db"))
    responder = OcspResponder(registry, [OcspSigner(cert("ca.pem"), hsm, "ocsp-b42",
                                                    cert("ocsp-b42.pem"))])
    tier = OcspTier(responder)
    tier.cache.sync()
    tier.cache.presign()  # warm, as a responder that has been running is
    watcher = EventWatcher(os.path.join(folder, "revocation.events"), tier.invalidate)
    metrics = Metrics()
    # Every request of the bench comes from 127.0.0.1: the bucket is there (and paid
    # for per request) but wide enough not to refuse.
    limits = ClientRateLimits(1e9, 1e9)
    app = make_revocation_app([tier], watcher, metrics, client_limits=limits)
    fast = OcspFastPath(tier, limits, watcher, metrics)

    async def main():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        if lean:  # as `fleetid cloud serve` listens (cloud/server.py)
            await OcspFastSite(runner, "127.0.0.1", port, fast, backlog=1024).start()
        else:  # the aiohttp app alone (the path before the fast path)
            await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=event_loop_factory(event_loop)) as runner:
        runner.run(main())


def start_openssl(workdir, port):
    openssl = shutil.which("openssl")
    return subprocess.Popen(
        [openssl, "ocsp", "-index", os.path.join(workdir, "index.txt"),
         "-CA", os.path.join(workdir, "ca.pem"),
         "-rsigner", os.path.join(workdir, "openssl-rsigner.pem"),
         "-rkey", os.path.join(workdir, "openssl-rkey.pem"),
         "-port", str(port), "-nmin", "60", "-ignore_err"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, OPENSSL_CONF="/dev/null"))


# -- load generator ----------------------------------------------------------------------------


def _one(port, wire):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(wire)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


class KeepAliveClient:
    """HTTP/1.1 requests on one connection while the server keeps it open (a new one
    when it closes: `openssl ocsp` answers HTTP/1.0 and closes after each)."""

    def __init__(self, port):
        self.port = port
        self.sock = None

    def ask(self, wire):
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.sock.sendall(wire)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("closed before an answer")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in lines
                      if line.startswith(b"content-length:"))
        while len(body) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("closed in the body")
            body += chunk
        if lines[0].startswith(b"http/1.0") or b"connection: close" in lines:
            self.close()
        return head + b"\r\n\r\n" + body

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def check_answer(raw):
    """True for HTTP 200 with a successful OCSP response."""
    from cryptography.x509 import ocsp

    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.split(b" ", 2)[1:2] == [b"200"]:
        return False
    return ocsp.load_der_ocsp_response(body).response_status == \
        ocsp.OCSPResponseStatus.SUCCESSFUL


def run_load(port, bodies, seconds, clients, keep_alive=False):
    """`clients` threads posting the bodies round robin for `seconds`, a new connection
    per request (or keep_alive: one per thread while the server keeps it).
    Returns (ok, errors, wall seconds)."""
    head = REQUEST_HEAD.replace(b"close", b"keep-alive") if keep_alive else REQUEST_HEAD
    wires = [head % len(b) + b for b in bodies]
    counts = [[0, 0] for _ in range(clients)]
    stop = time.perf_counter() + seconds

    def worker(slot):
        i = slot
        client = KeepAliveClient(port)
        while time.perf_counter() < stop:
            try:
                wire = wires[i % len(wires)]
                raw = client.ask(wire) if keep_alive else _one(port, wire)
                # Checking every answer costs the client, not the server; the first
                # answers of each thread are parsed, the rest checked for HTTP 200.
                good = check_answer(raw) if i < slot + 3 else raw.startswith(
                    b"HTTP/1.") and raw[9:12] == b"200"
            except OSError:
                client.close()
                good = False
            counts[slot][0 if good else 1] += 1
            i += 1
        client.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return sum(c[0] for c in counts), sum(c[1] for c in counts), wall


def measure(pid, port, bodies, seconds, clients, keep_alive=False):
    run_load(port, bodies, 0.3, clients, keep_alive)  # warm-up: first signatures
    before = cpu_seconds(pid)
    ok, errors, wall = run_load(port, bodies, seconds, clients, keep_alive)
    cpu = cpu_seconds(pid) - before
    return {"ok": ok, "errors": errors, "wall": wall, "cpu": cpu,
            "per_s": ok / wall if wall else 0.0, "per_cpu_s": ok / cpu if cpu else 0.0}


def _ratio(ours, theirs):
    if not ours["per_cpu_s"] or not theirs["per_cpu_s"]:
        return "n/a (server CPU below one clock tick: use more --seconds)"
    return "%.2fx" % (ours["per_cpu_s"] / theirs["per_cpu_s"])


def wait_answer(port, body, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check_answer(_one(port, REQUEST_HEAD % len(body) + body)):
                return
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError("no OCSP answer on port %d" % port)


def _start_servers(workdir, loop, processes, probe):
    servers = []
    for name, extra in (("fleetid", []), ("aiohttp", ["--app-only"])):
        port = free_port()
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", workdir,
                                 str(port), "--loop", loop] + extra, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        processes.append(proc)
        wait_port(port, timeout=60)
        servers.append((name, proc.pid, port))
    oport = free_port()
    theirs = start_openssl(workdir, oport)
    processes.append(theirs)
    # Not wait_port: `openssl ocsp` (3.0) spins on a connection closed before a request
    # line; a real request says it is up.
    wait_answer(oport, probe)
    servers.append(("openssl", theirs.pid, oport))
    return servers


MODES = (("cached", False), ("cached", True), ("nonce", False), ("nonce", True))


def _report(results):
    for kind, keep_alive in MODES:
        conn = "keep-alive" if keep_alive else "close"
        theirs = results[("openssl", kind, keep_alive)]
        for name in ("fleetid", "aiohttp"):
            ours = results[(name, kind, keep_alive)]
            print("ratio %s/openssl ocsp, %s, %s: %s per server CPU-second, %.2fx "
                  "responses/s" % (name, kind, conn, _ratio(ours, theirs),
                                   ours["per_s"] / theirs["per_s"] if theirs["per_s"] else 0))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (CI smoke)")
    parser.add_argument("--seconds", type=float, default=None, help="per measurement")
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument("--serve", nargs=2, metavar=("WORKDIR", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--app-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_fleetid(args.serve[0], int(args.serve[1]), event_loop=args.loop,
                      lean=not args.app_only)
        return 0
    if shutil.which("openssl") is None:
        sys.stderr.write("bench/ocsp.py: openssl not found (the baseline)\n")
        return 2
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    devices = args.devices or (4 if args.quick else 20)
    workdir = tempfile.mkdtemp(prefix="fleetid-bench-ocsp-")
    processes = []
    try:
        plain, nonced = build(workdir, devices)
        servers = _start_servers(workdir, args.loop, processes, plain[0])
        print("fleetid OCSP bench: %d certificates (1 revoked), %d client threads, %.1f s "
              "per measurement; fleetid = the listener as `fleetid cloud serve` runs it (OCSP "
              "fast path), aiohttp = the same app without the fast path" % (
                  devices, args.clients, seconds))
        results = {}
        for kind, keep_alive in MODES:
            bodies = plain if kind == "cached" else nonced
            for name, pid, port in servers:
                r = results[(name, kind, keep_alive)] = measure(pid, port, bodies, seconds,
                                                                args.clients, keep_alive)
                print("%-8s %-7s %-10s %6d ok %3d errors  server CPU %5.2f s  wall %.2f s  "
                      "-> %5.0f responses/s, %5.0f per server CPU-second (%4.0f us each)"
                      % (name, kind, "keep-alive" if keep_alive else "close", r["ok"],
                         r["errors"], r["cpu"], r["wall"], r["per_s"], r["per_cpu_s"],
                         1e6 / r["per_cpu_s"] if r["per_cpu_s"] else 0))
                sys.stdout.flush()
        _report(results)
        errors = sum(r["errors"] for r in results.values())
        return 0 if errors == 0 else 1
    finally:
        stop_processes(processes)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
