"""Several stateless cloud processes over one PostgreSQL registry (issue 19, items 1 and 6):
real `fleetid cloud serve` processes (separate ones behind an imagined load balancer, and
`--workers N` under one supervising parent) on a PostgreSQL cluster this module owns, so
it may restart and pause it.

Devices, CAs and the SE vendor are the suite's Fleet (tests/cloud/cloud_support.py); the
servers adopt its root, CA keys (its soft keystore) and TLS files.  Skips locally without
the PostgreSQL server binaries or psycopg; fails under CI=true (tests.conftest.require).
"""

import base64
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench._fault_support import pg_signal_all, pg_start, pg_stop
from bench._pg_support import ThrowawayPostgres, missing
from bench._serve_support import CloudServe, ServeFailed
from fleetid.cli.main import cli
from fleetid.cloud import audit
from fleetid.cloud.registry import verify_registry_log
from tests.cloud import test_registry as contract
from tests.cloud.attestation_support import enrolment
from tests.cloud.cloud_support import Fleet, der, pem
from tests.cloud.test_registry_postgres import _uri
from tests.conftest import require

try:
    import psycopg
except ImportError:  # pragma: no cover
    psycopg = None

EST = "/.well-known/est/"
READY_S = 120  # a server's start (keystore, registry, TLS) on a loaded 2-core machine
RECOVERY_S = 30  # the bound within which services must serve again after an outage


class Cluster(ThrowawayPostgres):
    """A PostgreSQL cluster of this module (bench/_pg_support.ThrowawayPostgres, fsync off),
    owned so a test may restart it and pause (SIGSTOP) every one of its processes
    (bench/_fault_support: pg_stop, pg_start, pg_signal_all)."""

    def __init__(self):
        lacking = missing()
        require(not lacking, "; ".join(lacking))
        super().__init__(durable=False, max_connections=100)
        self.__enter__()

    def start(self):
        pg_start(self)

    def stop(self):
        """pg_ctl stop -m fast."""
        pg_stop(self)

    def signal_all(self, sig):
        pg_signal_all(self, sig)

    def close(self):
        self.signal_all(signal.SIGCONT)  # never leave a stopped cluster behind
        self.__exit__(None, None, None)  # -m immediate, the folder removed


@pytest.fixture(scope="module")
def cluster():
    owned = Cluster()
    try:
        yield owned
    finally:
        owned.close()


@pytest.fixture
def fleet(cluster, tmp_path):
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    database = cluster.new_database()
    fleet = Fleet(tmp_path / "fleet", registry_kind=PostgresRegistry(database))
    fleet.database = database
    fleet.uri = _uri(database)
    yield fleet
    fleet.close()


@pytest.fixture(params=["postgresql", "sqlite"])
def any_fleet(request, tmp_path):
    """The fleet on PostgreSQL (above), or on SQLite: processes on one host share the
    file, BEGIN IMMEDIATE serialising their writes."""
    if request.param == "postgresql":
        yield request.getfixturevalue("fleet")
        return
    fleet = Fleet(tmp_path / "fleet")
    fleet.uri = "sqlite:" + fleet.registry.path
    yield fleet
    fleet.close()


def _config(fleet, folder, registry_timeout=3):
    """cloud.toml adopting the fleet's root and CA (label b42, and b42-approval with
    require_approval) on its soft keystore and PostgreSQL registry."""
    for name, cert in (("root", fleet.root), ("b42", fleet.ca_certs["b42"]),
                       ("vendor", fleet.vendor.root)):
        (folder / (name + ".pem")).write_bytes(pem(cert))
    path = folder / "cloud.toml"
    path.write_text(
        '[cloud]\nstate_dir = "state"\nverifier_port = 0\nest_port = 0\nmetrics_port = 0\n'
        'registry = "%s"\nregistry_timeout = %d\n'
        'hsm = "soft:%s;pass-env=FLEETID_KEYSTORE_PASS"\n'
        'roots = ["root.pem"]\nvendor_roots = ["vendor.pem"]\n'
        'tls_cert = "%s"\ntls_key = "%s"\n'
        '[[cloud.labels]]\nname = "b42"\nca_key = "ca-widget-b42"\nca_cert = "b42.pem"\n'
        'default = true\n'
        '[[cloud.labels]]\nname = "b42-approval"\nca_key = "ca-widget-b42"\n'
        'ca_cert = "b42.pem"\nrequire_approval = true\n'
        % (fleet.uri, registry_timeout, os.path.join(fleet.dir, "keystore.json"),
           fleet.server_cert, fleet.server_key))
    return str(path)


class Serve(CloudServe):
    """One `fleetid cloud serve` process (and its workers) in `folder`, its stderr (JSON
    log) to a file there: bench/_serve_support.CloudServe, failing the test when it does
    not start."""

    def __init__(self, config, folder, workers=1):
        try:
            super().__init__(config, str(folder / ("serve-%s.log" % uuid.uuid4().hex[:6])),
                             workers, cwd=str(folder), timeout=READY_S)
        except ServeFailed as exc:
            pytest.fail(str(exc))


def _request(fleet, port, method, path, files=None, body=None, headers=None):
    """(status, body) of one HTTPS request to 127.0.0.1:port."""
    context = ssl.create_default_context(cafile=fleet.root_file)
    if files:
        context.load_cert_chain(*files)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _nonce(fleet, port, device, label="b42"):
    status, body = _request(fleet, port, "GET", EST + label + "/nonce",
                            files=device.files(device.identity_cert, device.identity_key))
    assert status == 200, body
    return base64.b64decode(body)


def _enroll(fleet, port, device, csr, label="b42"):
    return _request(fleet, port, "POST", EST + label + "/simpleenroll",
                    files=device.files(device.identity_cert, device.identity_key),
                    body=base64.b64encode(csr), headers={"Content-Type": "application/pkcs10"})


def test_separate_est_processes_share_nonces_and_approvals(any_fleet, tmp_path):
    """Two stateless EST processes on one registry (PostgreSQL; SQLite on one host): a
    nonce issued by A is consumed by B, its replay at A is refused; a pending approval
    recorded through A, approved by the operator, is honoured by B."""
    fleet = any_fleet
    config = _config(fleet, tmp_path)
    a = Serve(config, tmp_path)
    b = Serve(config, tmp_path)
    try:
        device, waiting = fleet.provision(), fleet.provision()
        _, csr = enrolment(device.chip, _nonce(fleet, a.ports["est"], device), device.name)
        status, body = _enroll(fleet, b.ports["est"], device, csr)
        assert status == 200, body
        status, body = _enroll(fleet, a.ports["est"], device, csr)
        assert status == 403 and b"already used" in body, body
        # Deferred enrolment: pending at A, approved by the operator, issued at B.
        _, csr = enrolment(waiting.chip, _nonce(fleet, a.ports["est"], waiting, "b42-approval"),
                           waiting.name)
        status, _ = _enroll(fleet, a.ports["est"], waiting, csr, "b42-approval")
        assert status == 202
        listed = CliRunner().invoke(cli, ["cloud", "pending", "--registry", fleet.uri])
        assert listed.exit_code == 0 and listed.output == "b42-approval %s\n" % waiting.name
        approved = CliRunner().invoke(cli, ["cloud", "approve", "b42-approval", waiting.name,
                                            "--registry", fleet.uri])
        assert approved.exit_code == 0, approved.output
        status, body = _enroll(fleet, b.ports["est"], waiting, csr, "b42-approval")
        assert status == 200, body
        kinds = [c.kind for c in fleet.registry.certificates(waiting.serial)]
        assert kinds == ["identity", "operational"]
    finally:
        assert a.stop() == 0 and b.stop() == 0


def test_a_version_1_database_is_migrated_once_by_concurrent_first_starts(cluster):
    from fleetid.cloud.registry import schema
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    database = cluster.new_database()
    with psycopg.connect(database, autocommit=True) as conn:
        for statement in schema.statements("postgresql"):  # what version 1 created
            conn.execute(statement)
    opened, failed = [], []

    def open_one():
        try:
            opened.append(PostgresRegistry(database))
        except Exception as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for registry in opened:
        registry.close()
    assert not failed and len(opened) == 3
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT value FROM registry_meta WHERE name = 'schema_version'"
                            ).fetchone()[0] == "3"
        assert conn.execute("SELECT version FROM schema_history ORDER BY version"
                            ).fetchall() == [(2,), (3,)]
        assert conn.execute("SELECT seq FROM revocation_events").fetchall() == [(0,)]


def _provision_many(database, station, count):
    """Run in a child process: `count` devices through the line's registry calls."""
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    registry = PostgresRegistry(database)
    try:
        for _ in range(count):
            contract.provision(registry, station=station)
    finally:
        registry.close()


def test_two_processes_appending_concurrently_keep_one_chain(cluster, tmp_path):
    """The audit chain's appends are serialised by PostgreSQL (the audit_head row lock),
    not by a process: two processes committing devices at once give one linear chain that
    `fleetid audit verify` accepts."""
    import multiprocessing

    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    database = cluster.new_database()
    PostgresRegistry(database).close()  # schema first (the processes would race for it)
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_provision_many, args=(database, "st-%d" % i, 25))
                 for i in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    line, witness = (audit.KeySigner(ec.generate_private_key(ec.SECP256R1()))
                     for _ in range(2))
    with PostgresRegistry(database) as registry:
        stations = {registry.get_device(s).station for s in range(1, 51)}
        assert stations == {"st-0", "st-1"}
        audit.Checkpointer(registry, line, audit.AnchoringWitness(
            witness, str(tmp_path / "anchor.json"))).checkpoint()
    pubs = []
    for name, signer in (("line", line), ("witness", witness)):
        pubs.append(str(tmp_path / (name + ".pem")))
        with open(pubs[-1], "wb") as f:
            f.write(signer.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    verify = CliRunner().invoke(cli, [
        "audit", "verify", "--registry", _uri(database), "--line-pub", pubs[0],
        "--witness-pub", pubs[1], "--witness-anchor", str(tmp_path / "anchor.json")])
    assert verify.exit_code == 0, verify.output
    assert verify.output.startswith("OK ") and \
        "51 entries (checkpoint 1, injection 50)" in verify.output, verify.output


def _enrol_until_done(fleet, port, device, received, errors, deadline):
    """simpleenroll `device` through whichever worker answers, retrying (fresh nonce) on
    a refused / reset connection or a 503 until one certificate comes back."""
    while time.monotonic() < deadline:
        try:
            _, csr = enrolment(device.chip, _nonce(fleet, port, device), device.name)
            status, body = _enroll(fleet, port, device, csr)
        except (OSError, http.client.HTTPException, AssertionError) as exc:
            errors.append(type(exc).__name__)
            time.sleep(0.2)
            continue
        if status == 200:
            received.append((device, body))
            return
        errors.append(status)
        time.sleep(0.2)


def _chain_verifies(registry, folder):
    """A checkpoint over the registry's chain (test keys), then the full verification."""
    line, witness = (audit.KeySigner(ec.generate_private_key(ec.SECP256R1()))
                     for _ in range(2))
    audit.Checkpointer(registry, line, audit.AnchoringWitness(
        witness, str(folder / "anchor.json"))).checkpoint()
    return verify_registry_log(registry, line.public_key(), witness.public_key())


def _open_request(fleet, port, device, csr):
    """A simpleenroll whose body is half sent: the worker that accepted it is inside the
    request.  Returns (TLS socket, pid of that worker: the owner of the server side)."""
    import socket

    context = ssl.create_default_context(cafile=fleet.root_file)
    context.load_cert_chain(*device.files(device.identity_cert, device.identity_key))
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                               server_hostname="127.0.0.1")
    body = base64.b64encode(csr)
    sock.sendall(b"POST %sb42/simpleenroll HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/pkcs10\r\nContent-Length: %d\r\n\r\n"
                 % (EST.encode(), len(body)) + body[:len(body) // 2])
    client_port = sock.getsockname()[1]
    for _ in range(50):
        owners = subprocess.run(["ss", "-tnpH", "state", "established", "( sport = :%d and "
                                 "dport = :%d )" % (port, client_port)],
                                capture_output=True, text=True).stdout
        if "pid=" in owners:
            return sock, int(owners.split("pid=")[1].split(",")[0])
        time.sleep(0.1)
    raise AssertionError("no worker holds the connection")


def test_a_killed_worker_is_restarted_and_no_record_is_lost_or_forked(fleet, tmp_path):
    from cryptography.hazmat.primitives.serialization import pkcs7

    require(subprocess.run(["which", "ss"], capture_output=True).returncode == 0, "ss")
    devices = [fleet.provision() for _ in range(8)]
    serve = Serve(_config(fleet, tmp_path), tmp_path, workers=2)
    received, errors = [], []
    try:
        # Killed mid-request: the request is lost with its worker (the client sees the
        # connection end without an answer), nothing of it is recorded.
        hung = devices[0]
        _, csr = enrolment(hung.chip, _nonce(fleet, serve.ports["est"], hung), hung.name)
        sock, victim = _open_request(fleet, serve.ports["est"], hung, csr)
        assert victim in serve.info["workers"]
        os.kill(victim, signal.SIGKILL)
        try:
            assert sock.recv(100) == b""
        except OSError:
            pass  # reset: lost as well
        sock.close()
        assert [c.kind for c in fleet.registry.certificates(hung.serial)] == ["identity"]
        victim = [pid for pid in serve.info["workers"] if pid != victim][0]
        deadline = time.monotonic() + 240
        threads = [threading.Thread(target=lambda group=devices[i::3]: [
            _enrol_until_done(fleet, serve.ports["est"], d, received, errors, deadline)
            for d in group]) for i in range(3)]
        for thread in threads:
            thread.start()
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)  # while the clients keep sending
        for thread in threads:
            thread.join(300)
        end = time.monotonic() + RECOVERY_S
        while serve.log().count(" restarted (pid ") < 2 and time.monotonic() < end:
            time.sleep(0.2)
        assert serve.log().count(" restarted (pid ") == 2, serve.log()[-2000:]
    finally:
        assert serve.stop() == 0
    assert sorted(d.serial for d, _ in received) == sorted(d.serial for d in devices)
    # No record lost: every certificate a client got is in the registry.  No record
    # forked: every operational certificate there has its one issuance entry, and the
    # chain is one line.
    for device, body in received:
        cert = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))[0]
        record = fleet.registry.certificate_status(cert.serial_number)
        assert record.device_serial == device.serial and record.kind == "operational"
    issued = 0
    for device in devices:
        operational = [c for c in fleet.registry.certificates(device.serial)
                       if c.kind == "operational"]
        entries = [e for e in fleet.registry.audit_entries_for(device.serial)
                   if e.fields["type"] == audit.ISSUANCE]
        assert sorted(e.fields["cert_fingerprint"] for e in entries) == \
            sorted(c.fingerprint for c in operational)
        issued += len(operational)
    report = _chain_verifies(fleet.registry, tmp_path)
    assert report.entries == len(devices) + issued + 1


def _status(fleet, port, device, path="/v1/whoami"):
    try:
        return _request(fleet, port, "GET", path, files=device.files(
            device.identity_cert, device.identity_key))[0]
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__


def _until(predicate, bound=RECOVERY_S):
    end = time.monotonic() + bound
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def test_postgresql_restarted_and_paused_typed_503_then_recovery(fleet, cluster, tmp_path):
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    device, revoked = fleet.provision(), fleet.provision()
    serve = Serve(_config(fleet, tmp_path, registry_timeout=3), tmp_path, workers=2)
    verifier, est = serve.ports["verifier"], serve.ports["est"]
    try:
        assert _status(fleet, verifier, device) == 200
        # Restarted: down, then up.  While down every answer is a 503, never a 200.
        cluster.stop()
        try:
            assert [_status(fleet, verifier, device) for _ in range(3)] == [503] * 3
            assert _status(fleet, est, device, EST + "b42/nonce") == 503
        finally:
            cluster.start()
        assert _until(lambda: all(_status(fleet, verifier, device) == 200 for _ in range(4)))
        with PostgresRegistry(fleet.database) as registry:
            registry.mark_revoked(revoked.identity_cert.serial_number, "keyCompromise")
        # Refused at once by every worker: a connection the restart ended is replaced
        # before its next operation, not answered with a 503.
        assert [_status(fleet, verifier, revoked) for _ in range(8)] == [403] * 8
        # Paused (every PostgreSQL process stopped): bounded 503s, the revoked device
        # still refused, then recovery by itself after SIGCONT.
        cluster.signal_all(signal.SIGSTOP)
        try:
            assert _status(fleet, verifier, revoked) == 503
            assert _status(fleet, verifier, device) == 503
            assert _status(fleet, est, device, EST + "b42/nonce") == 503
        finally:
            cluster.signal_all(signal.SIGCONT)
        assert _until(lambda: all(_status(fleet, verifier, device) == 200 for _ in range(4)))
        assert _status(fleet, est, device, EST + "b42/nonce") == 200
        assert [_status(fleet, verifier, revoked) for _ in range(4)] == [403] * 4
    finally:
        assert serve.stop() == 0
    # The outages are logged (one JSON line each: the storage error, never a plain-text
    # traceback), and nothing but them failed.
    records = [json.loads(line) for line in serve.log().splitlines()]
    failures = {r.get("error") for r in records if r.get("msg") == "backend failure"}
    assert failures == {"RegistryError"}
    assert not [r for r in records if r["level"] == "error" and r.get("msg") != "backend failure"]


def _whoami_session(context, port, session):
    """(session, reused) of one mTLS GET /v1/whoami resuming `session` (or None)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
            tls.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Connection: close\r\n\r\n")
            answer = b""
            while True:
                data = tls.recv(65536)
                if not data:
                    break
                answer += data
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            return tls.session, tls.session_reused


def test_a_session_made_at_one_worker_resumes_at_the_other(fleet, tmp_path):
    """The workers share one ticket key (the parent makes the TLS context before it
    forks), so a device resumes whichever worker accepts it: one worker is stopped
    (SIGSTOP) while the other makes the session, then they swap."""
    device = fleet.provision()
    context = ssl.create_default_context(cafile=fleet.root_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(*device.files(device.identity_cert, device.identity_key))
    serve = Serve(_config(fleet, tmp_path), tmp_path, workers=2)
    try:
        first, second = serve.info["workers"]
        port = serve.ports["verifier"]
        os.kill(second, signal.SIGSTOP)
        try:
            session, reused = _whoami_session(context, port, None)
            assert not reused
        finally:
            os.kill(second, signal.SIGCONT)
        os.kill(first, signal.SIGSTOP)
        try:
            _, reused = _whoami_session(context, port, session)
        finally:
            os.kill(first, signal.SIGCONT)
        assert reused
    finally:
        assert serve.stop() == 0
