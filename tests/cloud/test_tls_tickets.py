"""The server context's two ticket modes (cloud/http/tls.server_ssl_context): stateful
sessions live in the process that made them; stateless tickets are sealed with a key
OpenSSL draws when the context is made, so processes forked after that (worker
processes) resume each other's sessions.  Real TLS 1.3 between Python's ssl client and
two forked server processes, with a device certificate the test fleet issued."""

import os
import signal
import socket
import ssl

import pytest

from fleetid.cloud.http.tls import TICKETS_STATEFUL, TICKETS_STATELESS, server_ssl_context


def _serve_forever(listener, context):
    # A forked worker: answer each connection once, until killed.
    while True:
        conn, _ = listener.accept()
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
                tls.sendall(b"ok")
                # close_notify: OpenSSL drops a cached session whose connection ended
                # without one (SSL_free without SSL_shutdown).
                tls.unwrap()
        except (OSError, ssl.SSLError):
            pass


def _fork_workers(context, count):
    workers = []
    for _ in range(count):
        listener = socket.create_server(("127.0.0.1", 0))
        pid = os.fork()
        if pid == 0:
            try:
                _serve_forever(listener, context)
            finally:
                os._exit(0)
        workers.append((pid, listener.getsockname()[1]))
        listener.close()
    return workers


def _connect(client, port, session):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
            tls.sendall(b"x")
            assert tls.recv(2) == b"ok"  # the server's tickets arrive before its data
            session, reused = tls.session, tls.session_reused
            tls.unwrap()
            return session, reused


@pytest.mark.parametrize("tickets, resumes_elsewhere",
                         [(TICKETS_STATELESS, True), (TICKETS_STATEFUL, False)])
def test_forked_workers_resume_each_others_sessions_only_with_stateless_tickets(
        fleet, tickets, resumes_elsewhere):
    device = fleet.provision()
    fleet.enrol(device)
    context = server_ssl_context(fleet.server_cert, fleet.server_key,
                                 fleet.trust.ca_bundle_pem(), False, tickets=tickets)
    client = ssl.create_default_context(cafile=fleet.root_file)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.load_cert_chain(*device.files())
    workers = _fork_workers(context, 2)
    try:
        (_, first), (_, second) = workers
        session, reused = _connect(client, first, None)
        assert not reused
        session, reused = _connect(client, first, session)
        assert reused  # the worker that made the session resumes it in both modes
        _, reused = _connect(client, second, session)
        assert reused == resumes_elsewhere
    finally:
        for pid, _ in workers:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_an_unknown_ticket_mode_is_refused(fleet):
    with pytest.raises(ValueError):
        server_ssl_context(fleet.server_cert, fleet.server_key, fleet.trust.ca_bundle_pem(),
                           tickets="shared")
