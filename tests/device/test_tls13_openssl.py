"""The SE-keyed TLS 1.3 client against a real `openssl s_server` (TLS 1.3 only, client
certificate required), for chips the real factory line personalised: the identity key,
its certificate and the fleet root come from the chip; the ECDHE share is the SE's
transient key; the server chain and CertificateVerify are verified by the SE's VERIFY.

Covers a forced HelloRetryRequest (s_server -groups with a client that lets the server
pick), small maximum fragments, session tickets on and off with PSK-DHE resumption, a
KeyUpdate from s_server's interactive 'K', and the refusals (wrong name, expired and
not-yet-valid certificates, another root, TLS 1.2 only): each a typed error with the
socket closed.
"""

import datetime
import socket

import pytest

from fleetid.common import se_consts as C
from fleetid.common.clock import SystemClock
from fleetid.common.errors import TlsAlertReceived, TlsCertificateError, TlsError
from fleetid.common.tls13 import Tls13Client
from fleetid.device.host.tls13_socket import connect, se_client_config
from fleetid.device.tls13_keys import Tls13Stream
from tests.conftest import require
from tests.device.device_cloud_support import LineAndCloud
from tests.device.tls13_openssl_support import (
    OPENSSL,
    LineServerCerts,
    SServer,
    counting_session,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require(OPENSSL is not None, "openssl")
    running = LineAndCloud(tmp_path_factory.mktemp("tls13"), devices=1)
    yield running
    running.close()


@pytest.fixture(scope="module")
def certs(env, tmp_path_factory):
    return LineServerCerts(env, tmp_path_factory.mktemp("tls13-certs"))


@pytest.fixture
def server_factory(certs, tmp_path):
    started = []

    def start(*options, cert=None, **kwargs):
        cert_pem, key_pem = cert or certs.fleet()
        server = SServer(tmp_path, cert_pem, key_pem, certs.ca_pem, *options, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def _device(env):
    se, counting = counting_session(env.chips[0])
    anchors = [bytes(se.get_data(C.DATA_TRUST_FLEET_ROOT, -1, 65536))]
    return se, counting, anchors


def test_mutual_tls13_with_the_se_key_and_no_nvm_write(env, server_factory):
    server = server_factory("-rev")
    se, counting, anchors = _device(env)
    nvm = env.chips[0].chip.nvm
    writes = nvm.write_count
    config, ephemeral = se_client_config(se, C.SLOT_IDENTITY, anchors, "localhost")
    counting.reset()
    stream = connect("127.0.0.1", server.port, config, io_timeout=10)
    try:
        info = stream.info
        assert (info.version, info.suite, info.group) == ("TLSv1.3", "TLS_AES_128_GCM_SHA256",
                                                         "secp256r1")
        assert info.client_certificate and not info.resumed
        assert dict(info.chain_report)["eku"] == "serverAuth"
        # SE operations of one full handshake: ECDHE share + shared secret in the transient
        # object, one SIGN (CertificateVerify), VERIFY for the chain and the server's CV.
        assert counting.counts["generate_key"] == 1 and counting.counts["ecdh"] == 1
        assert counting.counts["sign"] == 1 and counting.counts["verify"] == 2
        assert nvm.write_count == writes
        stream.send(b"hello fleet\n")
        assert stream.recv() == b"teelf olleh\n"  # s_server -rev answers reversed
    finally:
        stream.close()


def test_forced_hello_retry_request_via_server_groups(env, server_factory):
    server = server_factory("-groups", "P-256", "-rev")
    se, counting, anchors = _device(env)
    config, ephemeral = se_client_config(se, C.SLOT_IDENTITY, anchors, "127.0.0.1",
                                         initial_key_share=False)
    stream = connect("127.0.0.1", server.port, config, io_timeout=10)
    try:
        assert stream.info.hello_retry and ephemeral.operations == 2
        stream.send(b"abc\n")
        assert stream.recv() == b"cba\n"
    finally:
        stream.close()


def test_small_maximum_fragments_reassemble(env, server_factory):
    server = server_factory("-max_send_frag", "512", "-rev")
    se, _counting, anchors = _device(env)
    config, _ = se_client_config(se, C.SLOT_IDENTITY, anchors, "localhost",
                                 record_size_limit=1024)
    stream = connect("127.0.0.1", server.port, config, io_timeout=10)
    try:
        line = bytes(range(0x41, 0x5B)) * 40 + b"\n"
        stream.send(line)
        received = b""
        while len(received) < len(line):
            received += stream.recv()
        assert received == line[-2::-1] + b"\n"
    finally:
        stream.close()


def test_board_sized_records_with_the_portable_provider(env, server_factory):
    # What a board runs (device/https): the portable provider (records opened in place,
    # in the reused record_buffer when they fit it, else in a buffer of their own), small
    # records out (send_fragment: the client Certificate and the data span many records;
    # s_server reassembles them and checks our CertificateVerify over that transcript)
    # and the answer handed out in small pieces (data_chunk).
    from fleetid.common.host.tls13_host import ecb_block_function
    from fleetid.common.tls13_crypto import PortableTls13Primitives

    server = server_factory("-rev")
    se, _counting, anchors = _device(env)
    config, _ = se_client_config(se, C.SLOT_IDENTITY, anchors, "localhost",
                                 prims=PortableTls13Primitives(aes_ecb=ecb_block_function),
                                 send_fragment=100, record_buffer=bytearray(600),
                                 data_chunk=7)
    stream = connect("127.0.0.1", server.port, config, io_timeout=10)
    try:
        assert stream.info.client_certificate
        line = bytes(range(0x41, 0x5B)) * 20 + b"\n"
        stream.send(line)
        received = b""
        while len(received) < len(line):
            piece = stream.recv()
            assert 0 < len(piece) <= 7
            received += piece
        assert received == line[-2::-1] + b"\n"
    finally:
        stream.close()


def test_session_ticket_resumes_with_one_ecdhe_and_no_signature(env, server_factory):
    server = server_factory("-rev")
    se, counting, anchors = _device(env)
    config, _ = se_client_config(se, C.SLOT_IDENTITY, anchors, "localhost")
    stream = connect("127.0.0.1", server.port, config, io_timeout=10)
    try:
        stream.send(b"x\n")
        stream.recv()
        stream.wait(lambda: stream.tickets)  # OpenSSL sends its tickets after the handshake
        ticket = stream.tickets[-1]
    finally:
        stream.close()
    config, ephemeral = se_client_config(se, C.SLOT_IDENTITY, anchors, "localhost", ticket=ticket)
    counting.reset()
    stream = connect("127.0.0.1", server.port, config, io_timeout=10)
    try:
        assert stream.info.resumed and not stream.info.client_certificate
        assert dict(counting.counts) == {"generate_key": 1, "ecdh": 1}
        stream.send(b"again\n")
        assert stream.recv() == b"niaga\n"
    finally:
        stream.close()


def test_no_tickets_when_the_server_sends_none(env, server_factory):
    server = server_factory("-no_ticket", "-num_tickets", "0", "-rev")
    se, _counting, anchors = _device(env)
    config, _ = se_client_config(se, C.SLOT_IDENTITY, anchors, "localhost")
    stream = connect("127.0.0.1", server.port, config, io_timeout=10)
    try:
        stream.send(b"ping\n")
        assert stream.recv() == b"gnip\n"
        assert stream.tickets == []
    finally:
        stream.close()


def test_key_update_requested_by_s_server_is_answered(env, server_factory):
    server = server_factory()  # interactive: stdin lines go to the client, 'K' = KeyUpdate
    se, _counting, anchors = _device(env)
    config, _ = se_client_config(se, C.SLOT_IDENTITY, anchors, "localhost")
    stream = connect("127.0.0.1", server.port, config, io_timeout=10)
    try:
        assert server.wait_for("CIPHER is")
        server.command("K")  # SSL_key_update(REQUESTED) + SSL_do_handshake in s_server
        stream.wait(lambda: stream.key_updates)  # one stdin line per read: wait for it
        server.command("after the update")
        data = b""
        while b"after the update" not in data:
            data += stream.recv()
        assert stream.key_updates == 1
        # Our answer moved our write key too; the server reads us under it.
        stream.send(b"client under new keys\n")
        assert server.wait_for("client under new keys")
        stream.key_update(request_peer=False)
        stream.send(b"and once more\n")
        assert server.wait_for("and once more")
    finally:
        stream.close()


# -- refusals -----------------------------------------------------------------------------


def _refused(server_port, config):
    sock = socket.create_connection(("127.0.0.1", server_port), 5)
    sock.settimeout(10)
    stream = Tls13Stream(sock, Tls13Client(config), SystemClock(), 10000)
    with pytest.raises(TlsError) as caught:
        stream.handshake()
    assert sock.fileno() == -1  # closed: no half-open connection
    return caught.value


def test_wrong_server_name_is_refused(env, server_factory):
    server = server_factory()
    se, _counting, anchors = _device(env)
    config, _ = se_client_config(se, C.SLOT_IDENTITY, anchors, "verifier.fleet.example")
    error = _refused(server.port, config)
    assert isinstance(error, TlsCertificateError) and error.check == "name"


def test_expired_and_not_yet_valid_server_certificates_are_refused(env, certs, server_factory):
    now = datetime.datetime.now(datetime.timezone.utc)
    se, _counting, anchors = _device(env)
    expired = certs.fleet("expired", not_before=now - datetime.timedelta(days=40), days=10)
    server = server_factory(cert=expired)
    config, _ = se_client_config(se, C.SLOT_IDENTITY, anchors, "localhost")
    error = _refused(server.port, config)
    assert (error.check, error.alert) == ("validity", 45)
    future = certs.fleet("future", not_before=now + datetime.timedelta(days=2))
    server = server_factory(cert=future)
    error = _refused(server.port, config)
    assert (error.check, error.alert) == ("validity", 42)


def test_chain_to_another_root_is_refused(env, certs, server_factory):
    server = server_factory(cert=certs.foreign())
    se, _counting, anchors = _device(env)
    config, _ = se_client_config(se, C.SLOT_IDENTITY, anchors, "localhost")
    error = _refused(server.port, config)
    assert (error.check, error.alert) == ("path", 48)


def test_tls12_only_server_is_refused(env, server_factory):
    server = server_factory("-tls1_2")
    se, _counting, anchors = _device(env)
    config, _ = se_client_config(se, C.SLOT_IDENTITY, anchors, "localhost")
    error = _refused(server.port, config)
    # We offer TLS 1.3 and its suite only: OpenSSL capped at 1.2 finds nothing in common.
    assert isinstance(error, TlsAlertReceived) or error.reason == "protocol_version"
    assert error.alert in (40, 70)


# -- fleetid agent probe-tls ----------------------------------------------------------------


@pytest.fixture
def bus_uri(env, tmp_path):
    from fleetid.common import t1
    from fleetid.sim import profiles
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.server import serve_in_thread

    chip = env.chips[0].chip
    chip.power_loss()
    server = serve_in_thread(BusEndpoint(chip, profile=t1.PROFILE_GP,
                                         latency=profiles.get("none")),
                             "unix:" + str(tmp_path / "se.sock"), idle_timeout_s=30)
    try:
        yield server.bus_uri
    finally:
        server.stop()


def _probe(*args):
    from click.testing import CliRunner

    from fleetid.cli.main import cli

    return CliRunner().invoke(cli, ["agent", "probe-tls", *args], catch_exceptions=False)


def test_probe_tls_reports_the_negotiation_and_the_chain_checks(env, server_factory, bus_uri):
    server = server_factory("-rev")
    result = _probe("127.0.0.1:%d" % server.port, "--bus", bus_uri, "--server-name",
                    "localhost", "--resume", "--net-timeout", "5")
    assert result.exit_code == 0, result.output
    out = result.output
    for line in ("version: TLSv1.3", "suite: TLS_AES_128_GCM_SHA256", "group: secp256r1",
                 "resumption: no (full handshake)", "resumption: yes (PSK-DHE",
                 "client certificate: sent, signed by SE slot 1",
                 "SE operations: generate 1, ecdh 1, sign 1, verify 2",
                 "SE operations: generate 1, ecdh 1, sign 0, verify 0",
                 "eku                ok  serverAuth", "name               ok  localhost"):
        assert line in out, out


def test_probe_tls_exits_1_with_the_reason(env, certs, server_factory, bus_uri, tmp_path):
    server = server_factory()
    result = _probe("127.0.0.1:%d" % server.port, "--bus", bus_uri, "--server-name",
                    "elsewhere.example", "--net-timeout", "5")
    assert result.exit_code == 1
    assert "REFUSED: server chain failed check 'name'" in result.output
    foreign_cert, _key = certs.foreign("other-root")
    result = _probe("127.0.0.1:%d" % server.port, "--bus", bus_uri, "--roots", foreign_cert,
                    "--server-name", "localhost", "--net-timeout", "5")
    assert result.exit_code == 1 and "check 'path'" in result.output, result.output
