"""Fleet simulation: a registry of many devices in PostgreSQL, a rotation storm through
`fleetid cloud serve --workers W`, a batch revocation during it and each revocation
tier's propagation time.

    .venv/bin/python bench/fleet.py [--quick] [--devices N] [--storm S] [--workers 1,2]
                                    [--registry postgresql://...] [--json FILE]

registry   --devices rows (default 10^6; --quick 20,000) in a PostgreSQL registry (a
           throwaway cluster, fsync on, unless --registry names one): one real device made
           by the line's path (bench/_cloud_support.Fleet.provision: intent, attested
           identity certificate, commit + audit entry) is the model; the filler devices
           are inserted with COPY in batches of --batch rows: a device row, an identity
           certificate row and its audit entry each, the audit entries sealed into the one
           hash chain (audit.seal), so the chain verifies and the sizes are real.  The
           filler certificates are the model's DER with a new serial number (same size;
           their signature no longer verifies: nothing reads them during the run).  Then
           the storm's and the revoked batch's devices are provisioned and enrolled through
           the real path.  `fleetid registry migrate --check` then confirms the schema is
           current (what a deploy runs before starting its workers).
storm      for each worker count W of --workers: ONE `fleetid cloud serve --workers W` over
           the PostgreSQL registry and the keystore; its workers share the listening
           sockets, so the kernel hands each connection to any worker: the client never
           picks one (nonces, approvals and revocation events are in the registry, so any
           worker answers any request).  --storm devices re-enrol as fast as --clients
           client threads drive them: per device one TLS connection (its current
           operational certificate), GET nonce, the attested CSR made with the nonce
           (software keys: the SE is not the subject here), POST simplereenroll; with
           --split-nonce the nonce and the re-enrolment use two connections (two workers,
           most of the time: a nonce issued by one is consumed by another).
revocation during the last storm (at half of it): --victims enrolled devices revoked by
           `fleetid revoke --from-file` (a separate process opening its registry while the
           storm writes: no DDL, no deadlock; one event for the list), then the time from
           the command's end (and from its start) until each tier shows the last of them:
           the verifier (GET /v1/whoami with its certificate refused on 4 connections per
           worker, i.e. whichever worker answers), the CRL, OCSP and the compact set on the
           revocation listener.  MQTT is not measured here: `fleetid mqtt cloud` runs on a line
           directory (bench/mqtt.py measures the retained delivery).
figures    devices/s against W, p50/p99 of one re-enrolment (nonce + enrol, client side),
           CPU per component as a share of one core during the storm (each worker, the
           supervisor, PostgreSQL, this client) -- the first to reach 100 % is what
           saturates -- the database size per device (pg_database_size and each
           table's pg_total_relation_size / devices), and the tiers' rebuild query
           (revoked certificates of one issuer) with the schema-3 index against the same
           query without it, in the same run (revoked_query()).

Needs PostgreSQL (server binaries, or --registry) and psycopg (fleetid[postgres]); without
them it says what is missing and exits 2.  Every wait is bounded; servers listen on
127.0.0.1 only and are stopped at the end.
"""

import argparse
import base64
import http.client
import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TIER_TIMEOUT = 30.0  # s: a tier that has not shown the revocation by then is reported so
START_TIMEOUT = 60.0  # s: a `fleetid cloud serve` process must be listening by then
POLL_BOUND_S = 5.0  # s: servers re-read the revocation state at least this often (README)


def _args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="20,000 devices, a storm of 60, 10 revoked (CI-sized)")
    parser.add_argument("--devices", type=int, default=None, help="registry size")
    parser.add_argument("--storm", type=int, default=None, help="devices that re-enrol")
    parser.add_argument("--victims", type=int, default=None, help="devices revoked")
    parser.add_argument("--workers", "--processes", dest="workers", default="1,2",
                        help="`cloud serve --workers` counts, one storm each, e.g. 1,2")
    parser.add_argument("--split-nonce", action="store_true",
                        help="nonce and re-enrolment on two connections (any two workers)")
    parser.add_argument("--clients", type=int, default=None, help="client threads")
    parser.add_argument("--batch", type=int, default=10000, help="rows per COPY batch")
    parser.add_argument("--registry", default=None,
                        help="an existing, empty PostgreSQL database (default: a throwaway "
                             "cluster)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (configuration, server logs)")
    parser.add_argument("--json", dest="json_path", default=None,
                        help="also write the figures as JSON to this file")
    args = parser.parse_args(argv)
    args.devices = args.devices or (20000 if args.quick else 10 ** 6)
    args.storm = args.storm or (60 if args.quick else 2000)
    args.victims = args.victims or (10 if args.quick else 100)
    args.clients = args.clients or (4 if args.quick else 16)
    args.process_counts = [int(p) for p in args.workers.split(",") if p.strip()]
    if args.devices < args.storm + args.victims + 1 or min(args.process_counts) < 1:
        parser.error("--devices must exceed --storm + --victims; worker counts >= 1")
    return args


# -- the registry: a model device, then the filler by COPY --------------------------------


def _model_rows(conn, serial):
    from psycopg.rows import dict_row

    conn.row_factory = dict_row
    device = conn.execute("SELECT * FROM devices WHERE serial = %s", (serial,)).fetchone()
    cert = conn.execute("SELECT * FROM certificates WHERE device_serial = %s AND kind = "
                        "'identity'", (serial,)).fetchone()
    entry = conn.execute("SELECT entry FROM audit_log WHERE device_serial = %s ORDER BY seq "
                         "LIMIT 1", (serial,)).fetchone()["entry"]
    return device, cert, json.loads(entry)


def _new_serial_der(der, serial_bytes):
    """The model DER with its certificate serial replaced by a fresh one of the same
    length (first byte 0x01..0x7f: still a positive INTEGER of that length)."""
    fresh = bytes([secrets.randbelow(0x7f) + 1]) + secrets.token_bytes(len(serial_bytes) - 1)
    at = der.index(b"\x02" + bytes([len(serial_bytes)]) + serial_bytes)
    head = at + 2
    return der[:head] + fresh + der[head + len(fresh):], fresh


class Filler:
    """Rows for filler devices shaped like the model device's; audit entries sealed into
    the chain after (count, head)."""

    def __init__(self, device, cert, entry, count, head):
        from cryptography import x509

        self.device, self.cert = device, cert
        self.entry = {k: v for k, v in entry.items() if k not in ("seq", "prev", "hash")}
        model = x509.load_der_x509_certificate(bytes(cert["der"]))
        number = model.serial_number
        self.serial_bytes = number.to_bytes((number.bit_length() + 8) // 8, "big")
        self.count, self.head = count, head

    def rows(self, serial):
        import hashlib

        from fleetid.cloud import audit

        der, fresh = _new_serial_der(bytes(self.cert["der"]), self.serial_bytes)
        se_uid = secrets.token_hex(len(self.device["se_uid"]) // 2)
        fingerprint = hashlib.sha256(der).hexdigest()
        cert_serial = audit.to_hex(fresh.lstrip(b"\x00") or b"\x00")
        device = dict(self.device, serial=serial, se_uid=se_uid,
                      identity_fingerprint=fingerprint)
        cert = dict(self.cert, fingerprint=fingerprint, device_serial=serial,
                    cert_serial=cert_serial, der=der)
        fields = dict(self.entry)
        for key, value in (("serial", serial), ("se_uid", se_uid), ("cert_serial", cert_serial),
                           ("cert_fingerprint", fingerprint)):
            if key in fields:
                fields[key] = value
        sealed = audit.seal(fields, self.count, self.head)
        self.count, self.head = self.count + 1, sealed.hash_hex
        log = {"seq": sealed.seq, "entry_type": sealed.type, "device_serial": serial,
               "entry_hash": sealed.hash_hex, "entry": sealed.line[:-1].decode("ascii")}
        return device, cert, log


def _copy(conn, table, rows):
    columns = list(rows[0])
    with conn.cursor().copy("COPY %s (%s) FROM STDIN" % (table, ", ".join(columns))) as copy:
        for row in rows:
            copy.write_row([row[c] for c in columns])


def bulk_insert(uri, model_serial, count, batch):
    """Insert `count` filler devices after the registry's last serial, in COPY batches of
    `batch` (each batch one transaction, serial counter and audit head moved with it).
    Returns seconds taken."""
    import psycopg

    started = time.perf_counter()
    with psycopg.connect(uri.replace("postgresql://", "postgresql://", 1)) as conn:
        device, cert, entry = _model_rows(conn, model_serial)
        done = 0
        while done < count:
            with conn.transaction():
                head = conn.execute("SELECT entry_count, head_hash FROM audit_head WHERE id = 1 "
                                    "FOR UPDATE").fetchone()
                first = conn.execute("SELECT next_serial FROM serial_counter WHERE id = 1 "
                                     "FOR UPDATE").fetchone()["next_serial"]
                filler = Filler(device, cert, entry, head["entry_count"], head["head_hash"])
                size = min(batch, count - done)
                rows = [filler.rows(first + i) for i in range(size)]
                for index, table in enumerate(("devices", "certificates", "audit_log")):
                    _copy(conn, table, [r[index] for r in rows])
                conn.execute("UPDATE serial_counter SET next_serial = %s WHERE id = 1",
                             (first + size,))
                conn.execute("UPDATE audit_head SET entry_count = %s, head_hash = %s "
                             "WHERE id = 1", (filler.count, filler.head))
            done += size
    return time.perf_counter() - started


# -- the cloud processes -------------------------------------------------------------------


def write_config(fleet, folder, uri, crl_port):
    """A cloud.toml on the fleet's PKI, keystore and the PostgreSQL registry."""
    from bench._cloud_support import revocation_config

    path = revocation_config(fleet, folder, extra=(
        'hsm = "soft:%s;pass-env=FLEETID_KEYSTORE_PASS"\n'
        'tls_cert = "%s"\ntls_key = "%s"\ncrl_base_url = "http://127.0.0.1:%d"\n'
        'log_level = "warning"\n' % (os.path.join(fleet.dir, "keystore.json"),
                                     fleet.server_cert, fleet.server_key, crl_port)))
    with open(path) as f:
        text = f.read()
    # revocation_config names the fleet's SQLite file: this run's registry is PostgreSQL.
    text = "\n".join('registry = "%s"' % uri if line.startswith("registry = ") else line
                     for line in text.splitlines()) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return path


def _fleetid_env():
    from bench._support import KEYSTORE_PASS

    return dict(os.environ, FLEETID_KEYSTORE_PASS=KEYSTORE_PASS, PYTHONUNBUFFERED="1")


def _fleetid():
    return [sys.executable, "-m", "fleetid.cli.main"]


def cloud_process(config, crl_port, log_path, workers=1):
    """One `fleetid cloud serve --workers W` (bench/_serve_support.CloudServe: `ports`,
    `workers` (their pids), stop()) on ephemeral ports and `crl_port`, once listening."""
    from bench._serve_support import CloudServe

    return CloudServe(config, log_path, workers,
                      args=["--verifier-port", "0", "--est-port", "0", "--metrics-port", "0",
                            "--crl-port", str(crl_port)], timeout=START_TIMEOUT)


def migrate_check(config):
    """`fleetid registry migrate --check` on the run's registry (what a deploy runs before
    it starts the workers): {"current", "code", "pending"}."""
    done = subprocess.run(_fleetid() + ["registry", "migrate", "--check", "--config", config],
                          capture_output=True, env=_fleetid_env(), timeout=120)
    return json.loads(done.stdout.decode().splitlines()[-1])


def revocation_init(config, folder):
    with open(os.path.join(folder, "revocation-init.log"), "wb") as log:
        subprocess.run(_fleetid() + ["revocation", "init", "--config", config], check=True,
                       stdout=log, stderr=subprocess.STDOUT, env=_fleetid_env(), timeout=120)


# -- the storm --------------------------------------------------------------------------------


def _https(port, context):
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=20, context=context)


def reenrol(device, port, context, split_nonce=False):
    """One re-enrolment: nonce, attested CSR, simplereenroll, on one connection (or two
    with split_nonce: the kernel may hand them to two workers).  Returns (key,
    certificate).  Raises RuntimeError on a refusal."""
    from cryptography.hazmat.primitives.serialization import pkcs7

    conn = _https(port, context)
    try:
        conn.request("GET", "/.well-known/est/b42/nonce")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError("nonce: %d %r" % (response.status, body[:200]))
        key, csr = device.csr("b42", nonce=base64.b64decode(body))
        if split_nonce:
            conn.close()
            conn = _https(port, context)
        conn.request("POST", "/.well-known/est/b42/simplereenroll",
                     body=base64.b64encode(csr), headers={"Content-Type": "application/pkcs10"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError("re-enrolment: %d %r" % (response.status, body[:200]))
    finally:
        conn.close()
    return key, pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))[0]


def _client_context(fleet, device):
    import ssl

    context = ssl.create_default_context(cafile=fleet.root_file)
    context.load_cert_chain(*device.files())
    return context


def _percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


class Storm:
    """`devices` re-enrol through `server` (whichever of its workers the kernel picks)
    with `clients` threads; on_half() runs once when half of them are done (in its own
    thread)."""

    def __init__(self, fleet, devices, server, clients, on_half=None, split_nonce=False):
        self.fleet, self.devices, self.server = fleet, devices, server
        self.clients, self.on_half, self.split_nonce = clients, on_half, split_nonce
        self.latencies, self.errors = [], []
        self.lock = threading.Lock()

    def _worker(self, work):
        while True:
            try:
                index, device, context = work.get_nowait()
            except queue.Empty:
                return
            started = time.perf_counter()
            try:
                device.key, device.cert = reenrol(device, self.server.ports["est"], context,
                                                  self.split_nonce)
            except Exception as exc:  # noqa: BLE001 - counted and reported, run goes on
                with self.lock:
                    self.errors.append(repr(exc)[:200])
                continue
            with self.lock:
                self.latencies.append(time.perf_counter() - started)
                if len(self.latencies) == len(self.devices) // 2 and self.on_half:
                    threading.Thread(target=self.on_half, daemon=True).start()

    def run(self):
        """Returns the wall seconds of the storm."""
        work = queue.Queue()
        for index, device in enumerate(self.devices):
            work.put((index, device, _client_context(self.fleet, device)))
        threads = [threading.Thread(target=self._worker, args=(work,), daemon=True)
                   for _ in range(self.clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        return time.perf_counter() - started


# -- revocation propagation ----------------------------------------------------------------


def _tier_checks(fleet, victim, server, crl_port):
    """{tier name: fn() -> True once the tier shows `victim` revoked}."""
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp

    from fleetid.common import revset

    cert, issuer = victim.cert, fleet.ca_certs["b42"]
    context = ssl.create_default_context(cafile=fleet.root_file)
    context.load_cert_chain(*victim.files())

    def plain(method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", crl_port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def refused_once():
        conn = _https(server.ports["verifier"], context)
        try:
            conn.request("GET", "/v1/whoami")
            return conn.getresponse().status in (401, 403)
        except (ssl.SSLError, ConnectionError):
            return True  # refused at the handshake
        finally:
            conn.close()

    def verifier():  # whichever worker each connection reaches
        return all(refused_once() for _ in range(4 * len(server.workers)))

    def crl():
        status, body = plain("GET", "/crl/b42.crl")
        return status == 200 and x509.load_der_x509_crl(body) \
            .get_revoked_certificate_by_serial_number(cert.serial_number) is not None

    request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
    request_der = request.public_bytes(serialization.Encoding.DER)

    def ocsp_tier():
        status, body = plain("POST", "/ocsp", request_der,
                             {"Content-Type": "application/ocsp-request"})
        return status == 200 and ocsp.load_der_ocsp_response(body).certificate_status \
            == ocsp.OCSPCertStatus.REVOKED

    def compact_set():
        status, body = plain("GET", "/revset/current.frs")
        return status == 200 and revset.parse(body).contains(victim.serial)

    checks = {"verifier": verifier, "CRL": crl, "OCSP": ocsp_tier,
              "compact set": compact_set}
    return checks


def revoke_batch(fleet, ctx, victims, server, out):
    """Revoke `victims` with `fleetid revoke --from-file` (its own process, opening its
    registry while the storm writes), then time each tier until it shows the last one,
    from the command's end (tiers_s: as earlier runs measured it, after the writes) and
    from its start (tiers_from_start_s: the process start included).  Fills
    out["revocation"]."""
    checks = _tier_checks(fleet, victims[-1], server, ctx["crl_port"])
    listed = os.path.join(ctx["folder"], "victims-%d.txt" % len(out))
    with open(listed, "w") as f:
        f.write("".join("%d\n" % victim.serial for victim in victims))
    started = time.perf_counter()
    command = subprocess.run(
        _fleetid() + ["revoke", "--from-file", listed, "--reason", "keyCompromise",
                      "--operator", "bench", "--config", ctx["config"]],
        capture_output=True, env=_fleetid_env(), timeout=300)
    written = time.perf_counter()
    if command.returncode != 0:
        out["revocation"] = {"failed": command.stderr.decode(errors="replace")[-500:]}
        return
    seen = {}
    while checks and time.perf_counter() - written < TIER_TIMEOUT:
        for name, check in list(checks.items()):
            try:
                if check():
                    seen[name] = time.perf_counter() - written
                    del checks[name]
            except Exception:  # noqa: BLE001 - not there yet (e.g. set being rebuilt)
                pass
        time.sleep(0.02)
    out["revocation"] = {"devices": len(victims), "write_s": written - started,
                         "per_s": len(victims) / (written - started),
                         "report": json.loads(command.stdout.decode().splitlines()[-1]),
                         "tiers_s": seen, "not_seen": sorted(checks),
                         "tiers_from_start_s": {k: v + written - started
                                                for k, v in seen.items()}}


# -- one round, sizes, report --------------------------------------------------------------


def storm_round(fleet, ctx, workers, devices, clients, victims=None, split_nonce=False):
    """One `cloud serve --workers W`, one storm (with the batch revocation when victims
    are given).  Returns the round's figures."""
    from bench._pg_support import machine_busy, process_tree_cpu_seconds

    out = {"workers": workers, "devices": len(devices)}
    server = cloud_process(ctx["config"], ctx["crl_port"], os.path.join(
        ctx["folder"], "serve-%d.log" % workers), workers=workers)
    try:
        on_half = None
        if victims:
            on_half = lambda: revoke_batch(  # noqa: E731 - run in the storm's thread
                fleet, ctx, victims, server, out)
        storm = Storm(fleet, devices, server, clients, on_half, split_nonce)
        cpu = process_tree_cpu_seconds(server.pid)
        pg_cpu = ctx["pg"].cpu_seconds() if ctx["pg"] else None
        own, machine = os.times(), machine_busy()
        wall = storm.run()
        own_after, machine_after = os.times(), machine_busy()
        out["machine_busy"] = ((machine_after[0] - machine[0])
                               / max(1, machine_after[1] - machine[1]))
        if victims:
            deadline = time.monotonic() + TIER_TIMEOUT + 300
            while "revocation" not in out and time.monotonic() < deadline:
                time.sleep(0.1)
        cpu_after = process_tree_cpu_seconds(server.pid)
        out.update(_round_figures(storm, wall, server, (cpu, cpu_after), pg_cpu,
                                  (own, own_after), ctx))
    finally:
        server.stop()
    return out


def _round_figures(storm, wall, server, cpu, pg_cpu, own, ctx):
    before, after = cpu
    done = len(storm.latencies)
    busy = {}
    for index, pid in enumerate(server.workers):
        if server.workers != [server.pid]:
            busy["worker %d" % index] = (after.get(pid, 0.0) - before.get(pid, 0.0)) / wall
    busy["supervisor" if len(busy) else "server"] = (
        after.get(server.pid, 0.0) - before.get(server.pid, 0.0)) / wall
    if pg_cpu is not None:
        busy["postgresql"] = (ctx["pg"].cpu_seconds() - pg_cpu) / wall
    busy["client (this process)"] = ((own[1].user - own[0].user)
                                     + (own[1].system - own[0].system)) / wall
    return {"wall_s": wall, "done": done, "errors": len(storm.errors),
            "error_sample": storm.errors[:3], "per_s": done / wall,
            "p50_ms": 1000 * _percentile(storm.latencies, 0.5) if done else None,
            "p99_ms": 1000 * _percentile(storm.latencies, 0.99) if done else None,
            "cpu_share": busy}


def database_size(uri, devices):
    import psycopg

    with psycopg.connect(uri) as conn:
        total = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        tables = {}
        for table in ("devices", "certificates", "audit_log"):
            tables[table] = conn.execute("SELECT pg_total_relation_size(%s)",
                                         (table,)).fetchone()[0]
        count = conn.execute("SELECT count(*) FROM devices").fetchone()[0]
    return {"devices": count, "database_bytes": total,
            "bytes_per_device": total / max(count, 1),
            "table_bytes_per_device": {t: b / max(count, 1) for t, b in tables.items()}}


def revoked_query(uri, issuer, repeats=5):
    """The tiers' rebuild query (Registry.revoked_certificates: an issuer's revoked
    certificates) timed on this registry with the schema-3 partial index and, in the same
    run, without it (dropped inside a transaction that is rolled back: the baseline of
    schema 2).  Returns {"with_index_ms", "without_index_ms", "plan", "revoked"}."""
    import psycopg

    from fleetid.cloud.registry.sql_rows import CERT_COLUMNS

    query = ("SELECT %s FROM certificates WHERE issuer = %%s AND revoked_at IS NOT NULL "
             "ORDER BY cert_serial" % CERT_COLUMNS)

    def best(conn):
        times, rows = [], 0
        for _ in range(repeats):
            started = time.perf_counter()
            rows = len(conn.execute(query, (issuer,)).fetchall())
            times.append(time.perf_counter() - started)
        return 1000 * min(times), rows

    with psycopg.connect(uri) as conn:
        plan = " / ".join(row[0].strip() for row in conn.execute("EXPLAIN " + query,
                                                                   (issuer,)))
        with_index, revoked = best(conn)
        conn.rollback()
        conn.execute("DROP INDEX certificates_revoked_by_issuer")
        without_index, _ = best(conn)
        conn.rollback()
    return {"with_index_ms": with_index, "without_index_ms": without_index, "plan": plan,
            "revoked": revoked}


def verify_chain(uri):
    """The registry's whole audit chain verified offline (every entry, link and stored
    column, from one snapshot; cloud/audit/verify.py): the filler's COPY kept it one
    chain.  Returns {"entries", "seconds"}.  Raises AuditChainBroken."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from fleetid.cloud.audit.verify import verify_log
    from fleetid.cloud.registry import open_registry

    unused = ec.generate_private_key(ec.SECP256R1()).public_key()  # no checkpoints here
    registry = open_registry(uri)
    try:
        started = time.perf_counter()
        count, head, rows = registry.audit_snapshot()
        try:
            report = verify_log(rows, unused, unused, expected_count=count, expected_head=head)
        finally:
            rows.close()
    finally:
        registry.close()
    return {"entries": report.entries, "seconds": time.perf_counter() - started}


def print_report(figures):
    reg = figures["registry"]
    print("registry: %d devices (%d filler by COPY in %.1f s, %.0f rows/s)"
          % (reg["devices"], reg["filler"], reg["filler_s"], reg["filler"] / reg["filler_s"]))
    chain = figures["audit_chain"]
    print("audit chain: %d entries verified offline in %.1f s (one chain through the COPY "
          "batches and the storm)" % (chain["entries"], chain["seconds"]))
    size = figures["size"]
    print("database size: %.1f MB, %.0f B per device (%s)" % (
        size["database_bytes"] / 1e6, size["bytes_per_device"], ", ".join(
            "%s %.0f" % item for item in size["table_bytes_per_device"].items())))
    base = figures["rounds"][0]["per_s"]
    for row in figures["rounds"]:
        print("storm, cloud serve --workers %d: %d re-enrolments in %.2f s = %.1f devices/s "
              "(%.2fx the first round), p50 %.1f ms, p99 %.1f ms, %d errors" % (
                  row["workers"], row["done"], row["wall_s"], row["per_s"],
                  row["per_s"] / base if base else 0, row["p50_ms"] or 0, row["p99_ms"] or 0,
                  row["errors"]))
        busiest = max(row["cpu_share"].items(), key=lambda item: item[1])
        print("  CPU, share of one core: %s; busiest: %s; the whole machine (%d cores, "
              "shared) %.0f%% busy" % (", ".join(
                  "%s %.0f%%" % (name, 100 * share) for name, share in row["cpu_share"].items()),
                  busiest[0], os.cpu_count() or 0, 100 * row["machine_busy"]))
        if row.get("error_sample"):
            print("  errors, e.g.: %s" % row["error_sample"][0])
    rev = figures["rounds"][-1].get("revocation")
    if rev and "failed" in rev:
        print("batch revocation during the storm FAILED: %s" % rev["failed"])
    elif rev:
        print("batch revocation during the storm: `fleetid revoke --from-file` of %d devices "
              "took %.2f s (process start included; one event)" % (rev["devices"],
                                                                   rev["write_s"]))
        for name, seconds in sorted(rev["tiers_s"].items(), key=lambda item: item[1]):
            print("  %-22s shows the last revocation %7.1f ms after the command returned "
                  "(%.1f ms after it started)" % (name, 1000 * seconds,
                                                  1000 * rev["tiers_from_start_s"][name]))
        for name in rev["not_seen"]:
            print("  %-22s NOT within %.0f s" % (name, TIER_TIMEOUT))
    query = figures["revoked_query"]
    print("the tiers' rebuild query (%d revoked certificates, %d devices): %.2f ms with the "
          "schema-3 index, %.2f ms without it (same run; %.0fx); plan: %s" % (
              query["revoked"], figures["size"]["devices"], query["with_index_ms"],
              query["without_index_ms"], query["without_index_ms"]
              / max(query["with_index_ms"], 1e-6), query["plan"]))
    print("MQTT tier: not measured here (`fleetid mqtt cloud` runs on a line directory; "
          "bench/mqtt.py measures retained delivery)")


# -- main ----------------------------------------------------------------------------------


def _prepare(args, uri, folder):
    """The fleet on `uri`: model device, filler, storm devices and victims, enrolled."""
    from bench._cloud_support import Fleet
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    fleet = Fleet(folder, registry_kind=PostgresRegistry(uri), verify_signatures="first")
    model = fleet.provision("b42")
    filler = args.devices - 1 - args.storm - args.victims
    filler_s = bulk_insert(uri, model.serial, filler, args.batch)
    print("filler: %d devices by COPY in %.1f s" % (filler, filler_s))
    sys.stdout.flush()
    devices = []
    for _ in range(args.storm + args.victims):
        device = fleet.provision("b42")
        fleet.enrol(device)
        devices.append(device)
    registry = {"devices": args.devices, "filler": filler, "filler_s": filler_s}
    return fleet, devices[:args.storm], devices[args.storm:], registry


def run(args, uri, pg, folder):
    from bench.mtls import free_port

    fleet, storm_devices, victims, registry = _prepare(args, uri, folder)
    try:
        crl_port = free_port()
        config = write_config(fleet, folder, uri, crl_port)
        revocation_init(config, folder)
        from fleetid.cloud.config import load_config

        loaded = load_config(config, {})
        ctx = {"folder": folder, "config": config, "crl_port": crl_port, "uri": uri,
               "pg": pg, "state_dir": loaded.state_dir,
               "revoked_cas": loaded.revoked_cas_file}
        rounds = []
        ctx["schema"] = migrate_check(config)
        for index, workers in enumerate(args.process_counts):
            last = index == len(args.process_counts) - 1
            rounds.append(storm_round(fleet, ctx, workers, storm_devices, args.clients,
                                      victims if last else None, args.split_nonce))
        figures = {"registry": registry, "rounds": rounds, "schema": ctx["schema"],
                   "revoked_query": revoked_query(uri, fleet.ca_certs["b42"].subject
                                                  .rfc4514_string()),
                   "size": database_size(uri, args.devices), "audit_chain": verify_chain(uri)}
    finally:
        fleet.close()
    return figures


def main(argv=None):
    args = _args(argv)
    from bench._pg_support import ThrowawayPostgres, missing

    lacking = missing() if args.registry is None else []
    try:
        import psycopg  # noqa: F401
    except ImportError:
        lacking.append("psycopg (pip install 'fleetid[postgres]')")
    if lacking:
        print("bench/fleet.py needs %s" % "; ".join(sorted(set(lacking))), file=sys.stderr)
        return 2
    print("fleetid fleet bench: %d devices, storm of %d through cloud serve --workers %s, "
          "%d revoked" % (args.devices, args.storm, args.workers, args.victims))
    sys.stdout.flush()
    folder = tempfile.mkdtemp(prefix="fleetid-bench-fleet-")
    try:
        if args.registry:
            figures = run(args, args.registry, None, folder)
        else:
            with ThrowawayPostgres() as pg:
                if args.keep:
                    pg.keep_log = os.path.join(folder, "postgresql.log")
                figures = run(args, pg.uri, pg, folder)
    finally:
        if args.keep:
            print("kept: %s (server logs serve-P-I.log)" % folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print_report(figures)
    if args.json_path:
        from bench._report_support import write_json

        write_json(args.json_path, "fleet", figures, report_figures(figures))
    return 0


def report_figures(figures):
    """The rows bench/report.py shows: devices/s by process count against 1 process,
    latency, each tier's propagation, the size per device."""
    from bench._report_support import figure

    rounds = figures["rounds"]
    base = rounds[0]["per_s"]
    rows = []
    for row in rounds:
        first = row is rounds[0]
        rows.append(figure("storm re-enrolments, %d worker(s)" % row["workers"],
                           row["per_s"], "devices/s", None if first else
                           "the same storm, %d worker(s)" % rounds[0]["workers"],
                           None if first else base))
        rows.append(figure("re-enrolment p99, %d worker(s)" % row["workers"],
                           row["p99_ms"], "ms", "p50", row["p50_ms"], higher_is_better=False))
    rev = rounds[-1].get("revocation") or {}
    for name, seconds in sorted(rev.get("tiers_s", {}).items()):
        rows.append(figure("revocation visible: " + name, 1000 * seconds, "ms",
                           "the poll bound (event missed)", 1000 * POLL_BOUND_S,
                           higher_is_better=False))
    query = figures["revoked_query"]
    rows.append(figure("revoked-per-issuer query (the tiers' rebuild)",
                       query["with_index_ms"], "ms", "without the schema-3 index",
                       query["without_index_ms"], higher_is_better=False))
    rows.append(figure("database bytes per device", figures["size"]["bytes_per_device"],
                       "B", higher_is_better=False))
    return rows


if __name__ == "__main__":
    sys.exit(main())
