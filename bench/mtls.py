"""mTLS benchmark: the fleetid verifier against nginx, same certificates, same machine,
same run.

    .venv/bin/python bench/mtls.py [--quick] [--connections N] [--devices D]
                                   [--loop auto|uvloop|asyncio] [--workers N] [--profile]

What is measured, per server, as connections per server CPU-second (utime + stime of
the server process from /proc, so client cost does not count):
  full     a new TLS 1.3 handshake per connection (no resumption), client certificate
           verified, then one HTTP request (`GET /v1/whoami` on fleetid: chain +
           attestation verdict per certificate fingerprint + registry status read on
           every request; `GET /` on nginx: its chain check, a static 200);
  resumed  TLS 1.3 session resumption (a reconnecting fleet), same request.
A bare aiohttp server (same TLS context, a handler that checks nothing) is measured too:
the floor of the framework, so the cost of the fleet checks themselves shows; and
"tls-floor", an asyncio.Protocol on the same TLS context and event loop that writes a
fixed 200 on the first bytes it gets and closes (no HTTP, no checks): the ceiling of any
server driving OpenSSL through the event loop's TLS transport, as fleetid does.
nginx from Debian (`nginx-light`), one worker process (`master_process off`; with
--workers N, N workers under its master, and N fleetid worker processes forked after the
TLS context was made, each listening on the same port with SO_REUSEPORT; a server's CPU
is the sum over its processes),
`ssl_verify_client on` with the fleet's roots + intermediates, the same server
certificate.  Devices rotate over D attested certificates (their verdicts are cached
after the first connection, as in a running fleet); the cold per-certificate cost of the
full check is printed separately.

Fairness (what each server does per connection, and where they differ):
  same     one process (or N: --workers), one thread of request handling each; the
           same server key and certificate; the same client CAs (fleet roots + issuing
           CAs); TLS 1.3 with the client's default key share; one HTTP/1.1 request per connection
           (`Connection: close`, the server closes); access logs off on both (nginx
           `access_log off`; fleetid's JSON access line is skipped when INFO is not
           enabled, as here); a 2xx answer of a few hundred bytes at most (nginx "ok
           <subject DN>", fleetid the whoami JSON, bare aiohttp "ok").
  fleetid  additionally runs FleetVerifier on every request (cached chain and
           attestation verdicts, ONE registry read: the certificate's status joined
           with its device's, registry.certificate_and_device; one stat of the
           revoked-CA file, configured as `fleetid cloud serve` does it, the file
           absent as it is until a first CA revocation), Prometheus counters and a
           latency histogram.  It listens as `fleetid cloud serve` does: the
           verifier's fast path (cloud/http/verifier_fast.py) answers GET /v1/whoami
           without aiohttp's per-request machinery, with the same checks and answers;
           "aiohttp" stays the plain framework (TCPSite, router, a handler).
  TLS      the Python servers use fleetid's server_ssl_context: OpenSSL stops path
           validation at the trusted issuing CA (VERIFY_X509_PARTIAL_CHAIN; the full
           path to a fleet root is validated by FleetVerifier with
           cryptography.x509.verification, cached per certificate), and it issues one
           TLS 1.3 session ticket per connection (OpenSSL's default, which nginx keeps,
           is two).  nginx checks the whole path to the root on every handshake and
           lists its client CA names in the CertificateRequest; Python's ssl sends none.
           These differences are in fleetid's favour and are part of what is measured.
  sessions fleetid uses stateful TLS 1.3 tickets (OP_NO_TICKET: a session id into
           OpenSSL's in-process session cache) instead of stateless ones (a sealed copy
           of the session, client certificate included, encoded and decoded again per
           ticket: ~10% of a full handshake's server CPU in OpenSSL 3.0).  nginx runs
           twice: "nginx" with its default (stateless tickets, `ssl_session_tickets on`,
           no session cache: the reference of the figures before 2026-11-23) and
           "nginx-sc" with the same mechanism as fleetid (`ssl_session_tickets off`,
           `ssl_session_cache builtin:20480`); a ratio is printed against each.
  loop     both Python servers run on the same event loop: uvloop when installed (as
           `fleetid cloud serve` does by default), or --loop asyncio.
  workers  with --workers N > 1 a stateful session lives in the worker that made it: a
           resumption the kernel hands to another worker is a full handshake, for
           fleetid and nginx-sc alike (the "resumed" count shows it).  "fleetid-st"
           runs stateless tickets sealed with the key of the context made before the
           fork, so every worker resumes every session, as nginx's tickets (key made by
           its master) do: its ratio is printed against "nginx".

--profile: after the figures, one more fleetid server (one process) runs under cProfile
for a resumed measurement, and its top functions by own time are printed: where the
server's Python time goes per request.  The profiler slows Python code several-fold and
does not see inside uvloop and OpenSSL (their time is the event loop's own), so read it
for where the Python time goes, not for the rates.

Everything listens on 127.0.0.1; loops are bounded by --connections.  Needs the repo root
on sys.path (it reuses the fleet of bench/_cloud_support.py, which the tests use too).
"""

import argparse
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REQUEST = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def cpu_seconds(pid):
    """utime + stime of a process and of its live child processes (seconds), from /proc:
    a server's workers count as the server."""
    from bench._pg_support import process_tree_cpu_seconds

    return sum(process_tree_cpu_seconds(pid).values())


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_processes(processes, wait=10):
    """SIGTERM each of `processes`, SIGKILL any still running `wait` seconds later."""
    for proc in processes:
        proc.terminate()
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_port(port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("port %d did not open" % port)


# -- the fleetid verifier in its own process --------------------------------------------------


def serve_fleetid(workdir, port, bare=False, event_loop="auto", workers=1,
                  tickets="stateful"):
    """Server process: the verifier app over the bench fleet's files (bare=True: the same
    TLS context and aiohttp, a handler that checks nothing: the framework's floor;
    bare="floor": the TLS transport's floor, FloorProtocol).

    The TLS context is cloud/server.py's (one context for the verifier and EST, client
    certificate optional at the TLS layer, required by the verifier's middleware), made
    here before any worker is forked.  workers > 1: that many forked worker processes,
    each with its own event loop, registry connection and listening socket on the same
    port (SO_REUSEPORT: the kernel spreads connections over them); this process only
    waits, and stops them on SIGTERM."""
    from fleetid.cloud.http.tls import server_ssl_context

    context = server_ssl_context(os.path.join(workdir, "fleet", "server.pem"),
                                 os.path.join(workdir, "fleet", "server.key"),
                                 _client_cas(workdir), False, tickets=tickets)
    if workers <= 1:
        _serve_worker(workdir, port, context, bare, event_loop, reuse_port=False)
        return
    import signal

    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker: serve until terminated
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _serve_worker(workdir, port, context, bare, event_loop, reuse_port=True)
            finally:
                os._exit(0)
        children.append(pid)

    def stop(signum, frame):
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for child in children:
            os.waitpid(child, 0)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    for child in children:
        os.waitpid(child, 0)


def _client_cas(workdir):
    with open(os.path.join(workdir, "client-cas.pem"), "rb") as f:
        return f.read()


class FloorProtocol:
    """"tls-floor": answers a fixed 200 to the first bytes of a connection and closes."""

    ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(self.ANSWER)
        self.transport.close()

    def connection_lost(self, exc):
        pass

    def eof_received(self):
        return False


def _serve_worker(workdir, port, context, bare, event_loop, reuse_port):
    import asyncio

    from aiohttp import web
    from cryptography import x509

    from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
    from fleetid.cloud.http.middleware import ServerTimeouts
    from fleetid.cloud.http.sites import Runner, ssl_bounds
    from fleetid.cloud.http.verifier_app import make_verifier_app
    from fleetid.cloud.http.verifier_fast import VerifierFastPath, VerifierFastSite
    from fleetid.cloud.http.metrics import Metrics
    from fleetid.cloud.server import event_loop_factory
    from fleetid.cloud.verifier.revoked_cas import RevokedCaFile
    from fleetid.cloud.verifier.service import FleetTrust, FleetVerifier

    def pems(name):
        with open(os.path.join(workdir, name), "rb") as f:
            return x509.load_pem_x509_certificates(f.read())

    trust = FleetTrust(pems("root.pem"), pems("intermediates.pem"), pems("vendor.pem"),
                       revoked_ca_file=RevokedCaFile(
                           os.path.join(workdir, "fleet", "revoked-cas.jsonl")))
    registry = SqliteRegistry(os.path.join(workdir, "fleet", "registry.db"))
    verifier = FleetVerifier(trust, registry)
    metrics = Metrics()
    verifier.on_verdict = metrics.on_verdict
    timeouts = ServerTimeouts()

    async def ok(request):
        return web.Response(text="ok")

    if bare:
        app = web.Application()
        app.router.add_get("/v1/whoami", ok)
    else:
        app = make_verifier_app(verifier, metrics)

    async def main():
        if bare == "floor":  # no HTTP, no app: the loop's TLS transport alone
            await asyncio.get_running_loop().create_server(
                FloorProtocol, "127.0.0.1", port, ssl=context, backlog=1024,
                reuse_port=reuse_port or None, **ssl_bounds(context, timeouts))
            await asyncio.Event().wait()
        # fleetid's runner as `cloud serve` makes it; the bare framework's own
        runner = (web.AppRunner if bare else Runner)(app, access_log=None,
                                                     **timeouts.runner_options())
        await runner.setup()
        if bare:
            site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=context,
                               backlog=1024, reuse_port=reuse_port or None)
        else:  # as `fleetid cloud serve` listens: the verifier's fast path first
            site = VerifierFastSite(runner, "127.0.0.1", port,
                                    VerifierFastPath(verifier, metrics, timeouts.idle),
                                    ssl_context=context, backlog=1024,
                                    reuse_port=reuse_port or None)
            site.ssl_bounds = ssl_bounds(context, timeouts)
        await site.start()
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=event_loop_factory(event_loop)) as runner:
        runner.run(main())


NGINX_CONF = """
daemon off;
master_process %(master)s;
worker_processes %(workers)d;
error_log %(dir)s/nginx-error.log warn;
pid %(dir)s/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path %(dir)s/tmp;
    proxy_temp_path %(dir)s/tmp;
    fastcgi_temp_path %(dir)s/tmp;
    uwsgi_temp_path %(dir)s/tmp;
    scgi_temp_path %(dir)s/tmp;
    server {
        listen 127.0.0.1:%(port)d ssl;
        ssl_certificate %(dir)s/fleet/server.pem;
        ssl_certificate_key %(dir)s/fleet/server.key;
        ssl_client_certificate %(dir)s/client-cas.pem;
        ssl_verify_client on;
        ssl_verify_depth 3;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384;
%(sessions)s
        location / { return 200 "ok $ssl_client_s_dn\\n"; }
    }
}
"""


# nginx twice: its defaults for sessions (stateless tickets: `ssl_session_tickets on`,
# no session cache), and the mechanism fleetid uses (stateful tickets: no tickets, OpenSSL's
# in-process session cache, as SSL_OP_NO_TICKET does in fleetid's context).
NGINX_SESSIONS = {
    "nginx": "        ssl_session_tickets on;",
    "nginx-sc": "        ssl_session_tickets off;\n        ssl_session_cache builtin:20480;",
}


def serve_profiled(workdir, port, stats_path, event_loop):
    """The fleetid server (one process), profiled by cProfile from SIGUSR1 on (after
    start-up and warm-up); its stats are written to `stats_path` on SIGTERM."""
    import cProfile
    import signal

    profiler = cProfile.Profile()

    def stop(signum, frame):
        profiler.disable()
        profiler.dump_stats(stats_path)
        os._exit(0)

    signal.signal(signal.SIGUSR1, lambda signum, frame: profiler.enable())
    signal.signal(signal.SIGTERM, stop)
    serve_fleetid(workdir, port, event_loop=event_loop)


def profile_resumed(args, workdir, files, root_file, connections, top=25):
    """Run a resumed measurement against a profiled fleetid server; returns the text of
    its top functions by own time (pstats), per request."""
    import io
    import pstats
    import signal

    stats_path = os.path.join(workdir, "fleetid.prof")
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", workdir,
                             str(port), "--loop", args.loop, "--profile-out", stats_path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        run_load(port, "/v1/whoami", files, len(files) * 3, root_file, True)  # warm-up
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        counter, _wall = run_load(port, "/v1/whoami", files, connections, root_file, True)
    finally:
        stop_processes([proc])
    out = io.StringIO()
    out.write("cProfile of the fleetid server, resumed, %d requests (times inflated by the "
              "profiler):\n" % counter["ok"])
    pstats.Stats(stats_path, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


# -- load generator ----------------------------------------------------------------------------


def run_load(port, path, device_files, connections, root_file, resume, threads=3):
    """Open `connections` TLS 1.3 connections (each: handshake + one request), spread over
    `threads` threads and the device certificates.  Returns (ok, resumed, wall seconds)."""
    contexts = []
    for cert, key in device_files:
        context = ssl.create_default_context(cafile=root_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(cert, key)
        contexts.append(context)
    counter = {"ok": 0, "resumed": 0, "errors": 0}
    lock = threading.Lock()
    per_thread = connections // threads
    request = REQUEST % path.encode()

    def one(context, session):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1",
                                     session=session) as tls:
                tls.sendall(request)
                data = b""
                while True:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return data.startswith(b"HTTP/1.1 200"), tls.session_reused, tls.session

    def worker(index):
        sessions = {}
        for n in range(per_thread):
            slot = (index + n * threads) % len(contexts)
            session = sessions.get(slot) if resume else None
            try:
                ok, reused, new_session = one(contexts[slot], session)
            except (OSError, ssl.SSLError):
                ok, reused, new_session = False, False, None
            if resume and new_session is not None:
                sessions[slot] = new_session
            with lock:
                counter["ok" if ok else "errors"] += 1
                counter["resumed"] += bool(reused)

    if resume:  # prime one session per device (not counted)
        pass
    started = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return counter, time.perf_counter() - started


def measure(pid, port, path, device_files, connections, root_file, resume):
    # Warm-up: every device once (fills fleetid's verdict cache and nginx's state alike;
    # for resumption it also gives every client thread its first session).
    run_load(port, path, device_files, len(device_files) * 3, root_file, resume)
    before = cpu_seconds(pid)
    counter, wall = run_load(port, path, device_files, connections, root_file, resume)
    cpu = cpu_seconds(pid) - before
    return {"ok": counter["ok"], "errors": counter["errors"], "resumed": counter["resumed"],
            "cpu": cpu, "wall": wall, "per_cpu_s": counter["ok"] / cpu if cpu else 0.0}


def build_fleet(workdir, devices):
    from cryptography.hazmat.primitives import serialization

    from bench._cloud_support import Fleet, pem

    fleet = Fleet(os.path.join(workdir, "fleet"))
    files = []
    for _ in range(devices):
        device = fleet.provision()
        fleet.enrol(device)
        files.append(device.files())
    with open(os.path.join(workdir, "root.pem"), "wb") as f:
        f.write(pem(fleet.root))
    with open(os.path.join(workdir, "intermediates.pem"), "wb") as f:
        f.write(b"".join(pem(c) for c in fleet.ca_certs.values()))
    with open(os.path.join(workdir, "vendor.pem"), "wb") as f:
        f.write(pem(fleet.vendor.root))
    with open(os.path.join(workdir, "client-cas.pem"), "wb") as f:
        f.write(fleet.trust.ca_bundle_pem())
    # Cold cost of the full check for one certificate (no cache), in this process.
    from fleetid.cloud.verifier.service import FleetVerifier

    cold = FleetVerifier(fleet.trust, fleet.registry)
    ders = []
    for cert_file, _ in files:
        with open(cert_file, "rb") as f:
            from cryptography import x509

            ders.append(x509.load_pem_x509_certificate(f.read()).public_bytes(
                serialization.Encoding.DER))
    started = time.perf_counter()
    for der in ders:
        cold.verify(der)
    cold_ms = (time.perf_counter() - started) / len(ders) * 1000
    started = time.perf_counter()
    for der in ders:
        cold.verify(der)
    warm_ms = (time.perf_counter() - started) / len(ders) * 1000
    fleet.close()
    return files, os.path.join(workdir, "root.pem"), cold_ms, warm_ms


def _ratio(result, baseline_rate):
    """'1.23x', or 'n/a' when the baseline's server CPU time was below the clock's
    resolution (a short --quick run of a fast server can read 0 ticks)."""
    if not baseline_rate or not result["per_cpu_s"]:
        return "n/a (server CPU below one clock tick: use more --connections)"
    return "%.2fx" % (result["per_cpu_s"] / baseline_rate)


def _start_python(workdir, args, name, extra):
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", workdir,
                             str(port), "--loop", args.loop, "--workers", str(args.workers)]
                            + extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, (name, proc.pid, port, "/v1/whoami")


def _start_nginx(nginx, workdir, name, sessions, workers):
    port = free_port()
    ndir = os.path.join(workdir, name)
    os.makedirs(os.path.join(ndir, "tmp"), exist_ok=True)
    for entry in ("fleet", "client-cas.pem"):
        os.symlink(os.path.join(workdir, entry), os.path.join(ndir, entry))
    conf = os.path.join(ndir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF % {"dir": ndir, "port": port, "sessions": sessions,
                              "master": "on" if workers > 1 else "off",
                              "workers": workers})
    proc = subprocess.Popen([nginx, "-p", ndir, "-c", conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, (name, proc.pid, port, "/")


def _servers(args, workdir, nginx, processes):
    """Start every server of the run.  Returns [(name, pid, port, path)]."""
    python = [("fleetid", []), ("aiohttp", ["--bare"]), ("tls-floor", ["--floor"])]
    if args.workers > 1:
        # Stateless tickets sealed with the key of the context made before the fork:
        # every worker resumes every device's session (compare with nginx's tickets,
        # whose key nginx's master also makes before forking its workers).
        python.append(("fleetid-st", ["--tickets", "stateless"]))
    servers = []
    for name, extra in python:
        proc, server = _start_python(workdir, args, name, extra)
        processes.append(proc)
        wait_port(server[2])
        servers.append(server)
    for name, sessions in (NGINX_SESSIONS.items() if nginx else ()):
        proc, server = _start_nginx(nginx, workdir, name, sessions, args.workers)
        processes.append(proc)
        wait_port(server[2])
        servers.append(server)
    return servers


# (ours, nginx's with the same session mechanism) pairs whose ratio is printed.
RATIOS = (("fleetid", "nginx"), ("fleetid", "nginx-sc"), ("fleetid-st", "nginx"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (CI smoke)")
    parser.add_argument("--connections", type=int, default=None)
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1,
                        help="server worker processes, fleetid and nginx alike (default 1)")
    parser.add_argument("--serve", nargs=2, metavar=("WORKDIR", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tickets", default="stateful", help=argparse.SUPPRESS)
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="event loop of both Python servers (default: uvloop if "
                             "installed, as `fleetid cloud serve` runs)")
    parser.add_argument("--json", dest="json_path", help="also write the figures as JSON")
    parser.add_argument("--profile", action="store_true",
                        help="then profile a fleetid server during a resumed run (cProfile)")
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve and args.profile_out:
        serve_profiled(args.serve[0], int(args.serve[1]), args.profile_out, args.loop)
        return 0
    if args.serve:
        serve_fleetid(args.serve[0], int(args.serve[1]),
                      bare="floor" if args.floor else args.bare, event_loop=args.loop,
                      workers=args.workers, tickets=args.tickets)
        return 0
    connections = args.connections or (300 if args.quick else 3000)
    devices = args.devices or (10 if args.quick else 50)
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    workdir = tempfile.mkdtemp(prefix="fleetid-bench-mtls-")
    from fleetid.cloud.server import event_loop_factory

    loop_name = event_loop_factory(args.loop).__module__.split(".")[0]
    print("fleetid mTLS bench: %d connections per measurement, %d device certificates, "
          "event loop %s, %d worker process(es) per server"
          % (connections, devices, loop_name, args.workers))
    files, root_file, cold_ms, warm_ms = build_fleet(workdir, devices)
    print("full check of one certificate in-process: cold %.2f ms, cached verdict %.3f ms"
          % (cold_ms, warm_ms))
    processes = []
    results = {}
    try:
        servers = _servers(args, workdir, nginx, processes)
        if not nginx:
            print("nginx not found: install nginx-light for the comparison")
        for mode in ("full", "resumed"):
            for name, pid, srv_port, path in servers:
                r = measure(pid, srv_port, path, files, connections, root_file,
                            resume=(mode == "resumed"))
                results[(name, mode)] = r
                print("%-10s %-8s %6d ok %3d errors %6d resumed  server CPU %.2f s  wall %.2f s"
                      "  -> %.0f connections per server CPU-second"
                      % (name, mode, r["ok"], r["errors"], r["resumed"], r["cpu"], r["wall"],
                         r["per_cpu_s"]))
        for ours, theirs in RATIOS:
            for mode in ("full", "resumed"):
                if (ours, mode) not in results or (theirs, mode) not in results:
                    continue
                nginx_rate = results[(theirs, mode)]["per_cpu_s"]
                print("ratio %s/%s, %s handshakes: %s   (bare aiohttp/%s: %s, tls-floor/%s: "
                      "%s)" % (ours, theirs, mode, _ratio(results[(ours, mode)], nginx_rate),
                               theirs, _ratio(results[("aiohttp", mode)], nginx_rate),
                               theirs, _ratio(results[("tls-floor", mode)], nginx_rate)))
        if args.json_path:  # bench/report.py
            _write_json(args.json_path, results)
        if args.profile:
            print(profile_resumed(args, workdir, files, root_file, connections))
    finally:
        stop_processes(processes)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _write_json(path, results):
    """The connections per server CPU-second of fleetid, bare aiohttp and the TLS floor
    beside each nginx set-up's, per handshake mode (bench/_report_support format)."""
    from bench._report_support import figure, write_json

    rows = []
    for mode in ("full", "resumed"):
        for name in sorted({n for n, _m in results if n.startswith("nginx")}):
            for ours in ("fleetid", "aiohttp", "tls-floor"):
                rows.append(figure("%s, %s handshakes" % (ours, mode),
                                   results[(ours, mode)]["per_cpu_s"], "conn/CPU-s",
                                   name, results[(name, mode)]["per_cpu_s"]))
    write_json(path, "mtls", {"%s %s" % key: value for key, value in results.items()}, rows)


if __name__ == "__main__":
    sys.exit(main())
