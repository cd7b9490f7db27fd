"""EST re-enrolment over HTTPS against `fleetid cloud serve --workers N` running in its own
processes (bench/est.py): the clients run in the bench's process, the server's parent and
workers in theirs, so the two no longer share one GIL.

A device keeps its TLS 1.3 session: its first request (the nonce GET, before timing) makes
a full handshake with its certificate and receives the server's session tickets; every
re-enrolment after it opens a new connection that resumes that session (no certificate
exchange, no signature: what a device on a monthly rotation does with a ticket it kept,
and what `cloud serve --workers` supports across workers, their tickets keys being made
in the parent).  Server CPU is read from /proc (utime + stime of the parent and its
workers) before and after the timed run.

It imports fleetid, the runtime dependencies and bench support only (never tests/).
"""

import base64
import http.client
import os
import ssl
import threading

EST = "/.well-known/est/b42/"


class ResumingConnection(http.client.HTTPSConnection):
    """HTTPSConnection that offers `session` (an ssl.SSLSession) when it connects, and
    keeps the session the server gave (`self.sock.session`) for the next one."""

    def __init__(self, host, port, context, session=None, timeout=30):
        super().__init__(host, port, timeout=timeout, context=context)
        self.session = session

    def connect(self):
        http.client.HTTPConnection.connect(self)  # TCP only
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host,
                                              session=self.session)


class DeviceClient:
    """One device's TLS client: its context (CA file, key, certificate) and the last
    session the server issued to it."""

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
        with self.lock:
            conn = ResumingConnection("127.0.0.1", self.port, self.context, self.session)
            try:
                headers = {"Content-Type": "application/pkcs10"} if body else {}
                conn.request(method, EST + op, body=body, headers=headers)
                response = conn.getresponse()
                status, answer = response.status, response.read()
                self.resumed += bool(conn.sock.session_reused)
                self.session = conn.sock.session  # a TLS 1.3 ticket arrives with the data
                try:  # close_notify (RFC 8446 6.1), as a device's client sends it: OpenSSL
                    conn.sock.unwrap()  # drops the session of a connection cut without it
                except (OSError, ValueError):
                    pass
            finally:
                conn.close()
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


def measure(fleet, devices, count, callers, workers, folder):
    """{"rate": re-enrolments/s, "server_cpu_ms": server CPU per re-enrolment,
    "resumed": share of resumed handshakes} with `workers` server processes."""
    from bench.workers import start_server, stop_server, write_config

    os.makedirs(folder, exist_ok=True)
    config = write_config(fleet, folder, "sqlite:" + fleet.registry.path)
    process, port = start_server(config, folder, workers)
    try:
        clients = [DeviceClient(d, fleet.root_file, port) for d in devices]
        work = prepare(clients, count)
        resumed_before = sum(c.resumed for c in clients)
        cpu_before = process_cpu_seconds(process.pid)
        seconds = run(work, callers)
        cpu = process_cpu_seconds(process.pid) - cpu_before
        resumed = sum(c.resumed for c in clients) - resumed_before
    finally:
        stop_server(process)
    return {"rate": count / seconds, "server_cpu_ms": 1000.0 * cpu / count,
            "resumed": resumed / float(count)}
