"""The TLS 1.3 client (common/tls13.py) under the real MicroPython interpreter.

run_tls13_vectors: the portable provider as a board has it -- hashlib's SHA-256, the HMAC
and GHASH of common/tls13_crypto.py, MicroPython's own `cryptolib` AES -- gives the
RFC 8448 key schedule, binder and protected records (tests/vectors/tls13/).

run_tls13: a board's whole TLS 1.3 session.  MicroPython's `socket` to a real `openssl
s_server -tls1_3 -Verify` on the line's PKI; the client key, its certificate and the fleet
root in a line-personalised chip behind the emulator's Unix socket; ECDHE in the SE's
transient key, SIGN for the CertificateVerify, VERIFY for the server chain and its
CertificateVerify; then a PSK-DHE resumption with the ticket.  No host TLS anywhere.

Heap: each script runs at its budget from tests/micropython/budgets.py; on the unix port
the imported bytecode sits in the heap (firmware keeps it in flash).
"""

import pytest

from tests.conftest import load_vectors, require
from tests.micropython.support import PRELUDE, Stage, open_se_script, parse, serve_chip

pytestmark = pytest.mark.micropython

V = {k: v for k, v in load_vectors("tls13/rfc8448.json").items() if not k.startswith("_")}

VECTORS_SCRIPT = PRELUDE + r"""
for name in ("fleetid.common.errors", "fleetid.common.der", "fleetid.common.asn1time",
             "fleetid.common.x509", "fleetid.common.tls13_cert", "fleetid.common.tls13_crypto",
             "fleetid.common.tls13"):
    __import__(name)
    gc.collect()
from fleetid.common import tls13
from fleetid.common import tls13_crypto as K
import hashlib

prims = K.PortableTls13Primitives()  # hashlib + cryptolib + os.urandom
empty = hashlib.sha256(b"").digest()
early = K.hkdf_extract(prims, b"", K.ZEROS)
hs = K.hkdf_extract(prims, K.derive_secret(prims, early, b"derived", empty), u(ECDHE))
show("handshake_secret", hs)
c_hs = K.derive_secret(prims, hs, b"c hs traffic", u(HELLO_HASH))
show("client_handshake_traffic_secret", c_hs)
master = K.hkdf_extract(prims, K.derive_secret(prims, hs, b"derived", empty), K.ZEROS)
show("master_secret", master)
c_ap = K.derive_secret(prims, master, b"c ap traffic", u(SERVER_FINISHED_HASH))
show("client_application_traffic_secret_0", c_ap)
key, iv = K.traffic_keys(prims, c_ap)
show("client_application_key", key)
show("client_application_iv", iv)
record = tls13.RecordProtection(prims, c_hs)
show("record_client_finished", record.seal(tls13.CT_HANDSHAKE, u(CLIENT_FINISHED)))
record = tls13.RecordProtection(prims, c_ap)
show("record_client_application_data", record.seal(tls13.CT_APPLICATION_DATA, bytes(range(50))))
show("record_client_close_notify", record.seal(tls13.CT_ALERT, b"\x01\x00"))
opened = tls13.RecordProtection(prims, u(S_AP))
opened.seq = 1
data = u(SERVER_RECORD)
show("opened", opened.open(data[:5], data[5:]))
psk_early = K.hkdf_extract(prims, b"", u(PSK))
binder_key = K.derive_secret(prims, psk_early, b"res binder", empty)
show("psk_binder", K.finished_mac(prims, binder_key, u(BINDER_HASH)))
try:
    tls13.RecordProtection(prims, c_ap).open(data[:5], data[5:])
except tls13.TlsError as exc:
    print("refused", exc.reason, exc.alert)
gc.collect()
print("free", gc.mem_free())
"""


def test_rfc8448_key_schedule_and_records_under_micropython(tmp_path):
    header = "".join("%s = %r\n" % (name, V[key]) for name, key in (
        ("ECDHE", "ecdhe_shared_secret"), ("HELLO_HASH", "hash_client_hello_server_hello"),
        ("SERVER_FINISHED_HASH", "hash_through_server_finished"),
        ("CLIENT_FINISHED", "client_finished"), ("S_AP", "server_application_traffic_secret_0"),
        ("SERVER_RECORD", "record_server_application_data"), ("PSK", "resumption_psk"),
        ("BINDER_HASH", "psk_binder_hash")))
    stage = Stage(tmp_path / "mp", opt=3)
    out = parse(stage.run("run_tls13_vectors", header + VECTORS_SCRIPT))
    for name in ("handshake_secret", "client_handshake_traffic_secret", "master_secret",
                 "client_application_traffic_secret_0", "client_application_key",
                 "client_application_iv", "record_client_finished",
                 "record_client_application_data", "record_client_close_notify",
                 "psk_binder"):
        assert out[name] == [V[name]], name
    assert out["opened"] == [V["application_data"] + "17"]
    assert out["refused"] == ["bad_record_mac 20"]


SESSION_SCRIPT = PRELUDE + open_se_script(
    "fleetid.common.der", "fleetid.common.asn1time", "fleetid.common.tls13_crypto",
    "fleetid.common.x509", "fleetid.common.tls13_cert", "fleetid.common.tls13",
    "fleetid.device.tls13_keys") + r"""
import socket
import time

from fleetid.common import tls13
from fleetid.common.clock import SystemClock
from fleetid.common.tls13_crypto import PortableTls13Primitives
from fleetid.device.tls13_keys import SeEphemeral, Tls13Stream, se_signer, se_verifier

anchors = [se.get_data(0x0111, -1, 65536)]  # DATA_TRUST_FLEET_ROOT
client_chain = [se.get_cert(1)]
prims = PortableTls13Primitives()
gc.collect()


def session(ticket, text):
    ephemeral = SeEphemeral(se)
    config = tls13.Tls13Config(prims, ephemeral, anchors, se_verifier(se),
                               lambda: int(time.time()), server_name="localhost",
                               signer=se_signer(se, 1), client_chain=client_chain,
                               ticket=ticket, record_size_limit=2048)
    sock = socket.socket()
    sock.settimeout(20)
    sock.connect(socket.getaddrinfo("127.0.0.1", PORT)[0][-1])
    stream = Tls13Stream(sock, tls13.Tls13Client(config), SystemClock(), 30000)
    info = stream.handshake()
    print("handshake", info.version, info.suite, info.group, int(info.resumed),
          int(info.client_certificate), ephemeral.operations)
    for check, verdict in info.chain_report:
        print("check", check)
    stream.send(text)
    print("echo", stream.recv().decode().strip())
    if ticket is None:
        stream.wait(lambda: stream.tickets)
    kept = stream.tickets[-1] if stream.tickets else None
    stream.close()
    gc.collect()
    print("free", gc.mem_free())
    return kept


ticket = session(None, b"board\n")
print("ticket", int(ticket is not None))
session(ticket, b"resumed\n")
try:
    config = tls13.Tls13Config(prims, SeEphemeral(se), anchors, se_verifier(se),
                               lambda: int(time.time()), server_name="elsewhere.example",
                               signer=se_signer(se, 1), client_chain=client_chain)
    sock = socket.socket()
    sock.settimeout(20)
    sock.connect(socket.getaddrinfo("127.0.0.1", PORT)[0][-1])
    Tls13Stream(sock, tls13.Tls13Client(config), SystemClock(), 30000).handshake()
    print("refused none")
except tls13.TlsError as exc:
    print("refused", exc.reason, exc.check, exc.alert)
link.close()
bus.close()
"""


@pytest.fixture(scope="module")
def board_world(tmp_path_factory):
    from tests.device.device_cloud_support import LineAndCloud
    from tests.device.tls13_openssl_support import OPENSSL, LineServerCerts, SServer

    require(OPENSSL is not None, "openssl")
    folder = tmp_path_factory.mktemp("mptls")
    env = LineAndCloud(folder / "env", devices=1)
    servers = []
    try:
        certs = LineServerCerts(env, folder)
        cert_pem, key_pem = certs.fleet()
        tls_server = SServer(folder, cert_pem, key_pem, certs.ca_pem, "-rev")
        servers.append(tls_server)
        chip = env.chips[0].chip
        chip.power_loss()
        se_server, sock = serve_chip(chip, folder, idle_timeout_s=60)
        servers.append(se_server)
        yield Stage(folder / "mp", opt=3), "SOCK = %r\nPORT = %d\n" % (sock, tls_server.port), chip
    finally:
        for server in servers:
            (server.stop if hasattr(server, "stop") else server.close)()
        env.close()


def test_board_tls13_session_with_the_se_key_under_micropython(board_world):
    stage, header, chip = board_world
    writes = chip.nvm.write_count
    out = parse(stage.run("run_tls13", header + SESSION_SCRIPT, timeout=300))
    assert out["handshake"] == ["TLSv1.3 TLS_AES_128_GCM_SHA256 secp256r1 0 1 2",
                                "TLSv1.3 TLS_AES_128_GCM_SHA256 secp256r1 1 0 2"]
    assert out["echo"] == ["draob", "demuser"]
    assert out["ticket"] == ["1"]
    assert "eku" in out["check"] and "name" in out["check"] and "signature" in out["check"]
    assert out["refused"] == ["server_certificate name 42"]
    assert chip.nvm.write_count == writes  # no NVM write in three handshakes
