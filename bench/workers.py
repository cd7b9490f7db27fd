"""EST over HTTPS with N worker processes: `fleetid cloud serve --workers N` for N = 1 and
N = 2 (or --workers-list), same fleet, same registry, same run; the 1-worker figure is
the baseline of the ratio.

    .venv/bin/python bench/workers.py [--quick] [--count N] [--clients K]
                                      [--registry postgresql://...]

Each enrolment is a simpleenroll POST on a new TLS 1.3 connection with the device's
identity certificate: the server checks the client certificate (chain, attestation,
registry), the CSR's attestation evidence and its nonce (consumed in the registry, which
the workers share), signs through the soft keystore and records the certificate with its
audit entry.  Nonces are fetched and CSRs built (device-side work) before timing; K client
threads then send the POSTs.  The clients run on the same machine (2 cores shared with the
server's workers): the figure is client + server wall-clock throughput.
Default registry: SQLite in a temporary folder (workers on one host share the file).
"""

import argparse
import base64
import http.client
import os
import shutil
import ssl
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

EST = "/.well-known/est/b42/"


def write_config(fleet, folder, registry):
    """cloud.toml adopting the fleet's root, CA (label b42) and TLS files."""
    from bench._cloud_support import pem

    for name, cert in (("root", fleet.root), ("b42", fleet.ca_certs["b42"]),
                       ("vendor", fleet.vendor.root)):
        with open(os.path.join(folder, name + ".pem"), "wb") as f:
            f.write(pem(cert))
    path = os.path.join(folder, "cloud.toml")
    with open(path, "w") as f:
        f.write('[cloud]\nstate_dir = "state"\nverifier_port = 0\nest_port = 0\n'
                'metrics_port = 0\nregistry = "%s"\n'
                'hsm = "soft:%s;pass-env=FLEETID_KEYSTORE_PASS"\nroots = ["root.pem"]\n'
                'vendor_roots = ["vendor.pem"]\ntls_cert = "%s"\ntls_key = "%s"\n'
                '[[cloud.labels]]\nname = "b42"\nca_key = "ca-widget-b42"\n'
                'ca_cert = "b42.pem"\ndefault = true\n'
                % (registry, os.path.join(fleet.dir, "keystore.json"), fleet.server_cert,
                   fleet.server_key))
    return path


def start_server(config, folder, workers):
    """(server, EST port) of `fleetid cloud serve --workers N` once it listens (server: a
    bench/_serve_support.CloudServe, its `pid` the supervisor's)."""
    from bench._serve_support import CloudServe, ServeFailed

    try:
        server = CloudServe(config, workers=workers, cwd=folder, timeout=180)
    except ServeFailed:
        raise SystemExit("the server did not start") from None
    return server, server.ports["est"]


def stop_server(server):
    server.stop()


def request(fleet, port, device, method, op, body=None):
    context = ssl.create_default_context(cafile=fleet.root_file)
    context.load_cert_chain(*device.files(device.identity_cert, device.identity_key))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=context)
    try:
        headers = {"Content-Type": "application/pkcs10"} if body else {}
        conn.request(method, EST + op, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def prepare(fleet, port, devices, count):
    """[(device, base64 CSR)]: a nonce from the server and an attested CSR for each."""
    from bench._attestation_support import enrolment

    work = []
    for n in range(count):
        device = devices[n % len(devices)]
        status, body = request(fleet, port, device, "GET", "nonce")
        if status != 200:
            raise SystemExit("nonce refused: %d %r" % (status, body[:200]))
        _, csr = enrolment(device.chip, base64.b64decode(body), device.name)
        work.append((device, base64.b64encode(csr)))
    return work


def run(fleet, port, work, clients):
    """Seconds for `clients` threads to send every POST of `work`; raises on a refusal."""
    queue = list(work)
    lock = threading.Lock()
    failures = []

    def client():
        while True:
            with lock:
                if not queue:
                    return
                device, body = queue.pop()
            status, answer = request(fleet, port, device, "POST", "simpleenroll", body)
            if status != 200:
                failures.append((status, answer[:200]))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise SystemExit("enrolments refused: %r" % failures[:3])
    return elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--count", type=int, default=None, help="enrolments per run")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers-list", default="1,2")
    parser.add_argument("--registry", default=None, help="default: a temporary SQLite file")
    args = parser.parse_args(argv)
    count = args.count or (40 if args.quick else 200)
    from bench._cloud_support import Fleet

    folder = tempfile.mkdtemp(prefix="fleetid-bench-workers-")
    try:
        kind = "sqlite"
        if args.registry:
            from fleetid.cloud.registry import open_registry

            kind = open_registry(args.registry)
        fleet = Fleet(os.path.join(folder, "fleet"), registry_kind=kind,
                      verify_signatures="first")
        registry = args.registry or "sqlite:" + fleet.registry.path
        devices = [fleet.provision() for _ in range(8)]
        config = write_config(fleet, folder, registry)
        rates = {}
        for workers in [int(w) for w in args.workers_list.split(",")]:
            process, port = start_server(config, folder, workers)
            try:
                work = prepare(fleet, port, devices, count)
                rates[workers] = count / run(fleet, port, work, args.clients)
            finally:
                stop_server(process)
            print("workers=%d  %d enrolments, %d clients: %.1f enrolments/s"
                  % (workers, count, args.clients, rates[workers]), flush=True)
        base = min(rates)
        for workers, rate in sorted(rates.items()):
            print("ratio %d/%d workers: %.2fx" % (workers, base, rate / rates[base]))
        fleet.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
