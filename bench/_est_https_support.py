"""EST re-enrolment over HTTPS against `fleetid cloud serve --workers N` running in its own
processes (bench/est.py): the clients run in the bench's process, the server's parent and
workers in theirs, so the two no longer share one GIL.

A device keeps its TLS 1.3 session: its first request (the nonce GET, before timing) makes
a full handshake with its certificate and receives the server's session tickets; every
re-enrolment after it opens a new connection that resumes that session (no certificate
exchange, no signature: what a device on a monthly rotation does with a ticket it kept,
and what `cloud serve --workers` supports across workers, their tickets keys being made
in the parent).  Server CPU is read from /proc (utime + stime of the parent and its
workers) before and after the timed run, the clients' CPU (this process: only the
client threads run during it) from os.times(), and the share of the machine's CPUs in
use (by anyone: the machine may be shared) from /proc/stat.  measure_postgres runs the
same over a throwaway PostgreSQL cluster (the registry for N processes across hosts),
its own fleet enrolled in it; the database's CPU is reported beside the server's.

It imports fleetid, the runtime dependencies and bench support only (never tests/).
"""

import base64
import os
import socket
import ssl
import threading

from bench._cloud_support import read_http_answers

EST = "/.well-known/est/b42/"


class DeviceClient:
    """One device's TLS client: its context (CA file, key, certificate) and the last
    session the server issued to it.

    Each request is a new TCP connection resuming that session, the request bytes
    http.client would send (Host, Accept-Encoding, Content-Length, Content-Type), the
    answer read by its Content-Length, then close_notify and close: the connection a
    device makes, without http.client's header parsing (email.parser), which cost the
    bench's clients more CPU than their TLS."""

    def __init__(self, device, root_file, port):
        self.device = device
        self.port = port
        self.context = ssl.create_default_context(cafile=root_file)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.load_cert_chain(*device.files())
        self.session = None
        self.resumed = 0
        self.lock = threading.Lock()  # one request at a time per device

    def request(self, method, op, body=None):
        """(status, body) of one request on a new connection resuming the last session."""
        head = [b"%s %s HTTP/1.1" % (method.encode(), (EST + op).encode()),
                b"Host: 127.0.0.1:%d" % self.port, b"Accept-Encoding: identity"]
        if body:
            head += [b"Content-Length: %d" % len(body), b"Content-Type: application/pkcs10"]
        message = b"\r\n".join(head) + b"\r\n\r\n" + (body or b"")
        with self.lock:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = self.context.wrap_socket(sock, server_hostname="127.0.0.1",
                                                session=self.session)
                sock.sendall(message)
                [(status, _headers, answer)] = read_http_answers(sock)
                self.resumed += bool(sock.session_reused)
                self.session = sock.session  # a TLS 1.3 ticket arrives with the data
                try:  # close_notify (RFC 8446 6.1), as a device's client sends it: OpenSSL
                    sock = sock.unwrap()  # drops the session of a connection cut without it
                except (OSError, ValueError):
                    pass
            finally:
                sock.close()
        return status, answer


def process_cpu_seconds(pid):
    """utime + stime (s) of `pid` and its direct children, from /proc."""
    from bench._pg_support import process_tree_cpu_seconds

    return sum(process_tree_cpu_seconds(pid).values())


def prepare(clients, count):
    """[(DeviceClient, base64 CSR)]: a server nonce (full handshake the first time) and an
    attested CSR for each re-enrolment."""
    work = []
    for n in range(count):
        client = clients[n % len(clients)]
        status, body = client.request("GET", "nonce")
        if status != 200:
            raise RuntimeError("nonce refused: %d %r" % (status, body[:200]))
        _, csr = client.device.csr(nonce=base64.b64decode(body))
        work.append((client, base64.b64encode(csr)))
    return work


def run(work, callers):
    """Seconds for `callers` threads to send every simplereenroll of `work` (est.in_callers)."""
    from bench.est import in_callers

    def reenrol(item):
        client, body = item
        status, answer = client.request("POST", "simplereenroll", body)
        if status != 200:
            raise RuntimeError("re-enrolment refused: %d %r" % (status, answer[:200]))

    return in_callers(work, callers, reenrol)


def _own_cpu_seconds():
    times = os.times()
    return times.user + times.system


def measure(fleet, devices, count, callers, workers, folder, registry=None, database=None):
    """{"rate": re-enrolments/s, "server_cpu_ms": server CPU per re-enrolment,
    "client_cpu_ms": the clients' CPU per re-enrolment, "machine_busy": share of the
    machine's CPUs in use, "resumed": share of resumed handshakes} with `workers` server
    processes on `registry` (default: the fleet's SQLite file); with `database` (a
    ThrowawayPostgres) also "db_cpu_ms", its CPU per re-enrolment."""
    from bench._pg_support import machine_busy
    from bench.workers import start_server, stop_server, write_config

    os.makedirs(folder, exist_ok=True)
    config = write_config(fleet, folder, registry or "sqlite:" + fleet.registry.path)
    process, port = start_server(config, folder, workers)
    try:
        clients = [DeviceClient(d, fleet.root_file, port) for d in devices]
        work = prepare(clients, count)
        resumed_before = sum(c.resumed for c in clients)
        readings = [(process_cpu_seconds(process.pid), _own_cpu_seconds(), machine_busy(),
                     database.cpu_seconds() if database else 0.0)]
        seconds = run(work, callers)
        readings.append((process_cpu_seconds(process.pid), _own_cpu_seconds(),
                         machine_busy(), database.cpu_seconds() if database else 0.0))
        resumed = sum(c.resumed for c in clients) - resumed_before
    finally:
        stop_server(process)
    (cpu0, own0, busy0, db0), (cpu1, own1, busy1, db1) = readings
    figures = {"rate": count / seconds, "server_cpu_ms": 1000.0 * (cpu1 - cpu0) / count,
               "client_cpu_ms": 1000.0 * (own1 - own0) / count,
               "machine_busy": (busy1[0] - busy0[0]) / float(max(1, busy1[1] - busy0[1])),
               "resumed": resumed / float(count)}
    if database:
        figures["db_cpu_ms"] = 1000.0 * (db1 - db0) / count
    return figures


def measure_postgres(devices, count, callers, workers_list, folder):
    """{workers: measure() figures} over a throwaway PostgreSQL cluster, with a fleet of
    `devices` devices of its own enrolled in it (None when PostgreSQL or psycopg is
    missing here: bench/_pg_support.missing())."""
    from bench._cloud_support import Fleet
    from bench._pg_support import ThrowawayPostgres, missing
    from fleetid.cloud.registry import open_registry

    if missing():
        return None
    with ThrowawayPostgres() as database:
        fleet = Fleet(os.path.join(folder, "fleet"), verify_signatures="always",
                      registry_kind=open_registry(database.uri))
        try:
            enrolled = []
            for _ in range(devices):
                device = fleet.provision()
                fleet.enrol(device)
                enrolled.append(device)
            return {workers: measure(fleet, enrolled, count, callers, workers,
                                     os.path.join(folder, "serve-%d" % workers),
                                     database.uri, database)
                    for workers in workers_list}
        finally:
            fleet.close()


def report_line(workers, figures, callers, over=""):
    """The bench's line for one HTTPS run (measure's figures); over: " over PostgreSQL"
    for measure_postgres's."""
    return ("attested re-enrolments (HTTPS%s, %d worker%s): %8.1f /s  (%d clients; CPU "
            "per re-enrolment: server %.2f ms%s, clients %.2f ms; machine %d%% busy; %d%% "
            "resumed TLS 1.3)" % (
                over, workers, "s" if workers > 1 else " ", figures["rate"], callers,
                figures["server_cpu_ms"],
                ", database %.2f ms" % figures["db_cpu_ms"] if "db_cpu_ms" in figures
                else "", figures["client_cpu_ms"], round(100 * figures["machine_busy"]),
                round(100 * figures["resumed"])))
