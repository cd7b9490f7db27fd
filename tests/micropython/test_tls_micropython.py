"""The heap of one TLS 1.3 session and one EST re-enrolment on a board (issue 18, Budgets).

Workflow "run_tls": the real MicroPython interpreter (unix port, the suite's harness)
runs what a board does at a renewal, through the modules a board ships
(device/board_net.py over device/https.py and the portable TLS 1.3 client) against
`fleetid cloud serve` and the chip behind `fleetid sim serve`:

1. GET /v1/whoami: a full TLS 1.3 handshake authenticated by the operational key in
   slot 2 (ECDHE in the SE's transient key, CertificateVerify by SIGN, the server chain
   and its CertificateVerify checked by the SE's VERIFY);
2. one EST re-enrolment (RFC 7030 4.2.2): the CA's nonce, a key generated and attested
   in slot 3 with a CSR signed in the SE, POST simplereenroll over slot 2's credential
   (resumed at the EST server with the ticket the verifier gave), the issued certificate parsed out
   of the certs-only PKCS#7.

The chip is first enrolled (slot 2) by the CPython agent (`fleetid agent run --once`).
CPython then checks what the board got: the identity the verifier saw, a certificate
the line's CA signed for the key now in slot 3 with the device's subject, and the
handshake counts.  The heap this needs is what bench/micropython.py bisects.
"""

import glob
import os

import pytest

from tests.cli.test_agent_processes import _ok, _serve_chip
from tests.micropython.budgets import WORKFLOWS
from tests.micropython.support import PRELUDE, Stage, parse
from tests.micropython.test_board_net_micropython import _fleetid, cloud  # noqa: F401

pytestmark = pytest.mark.micropython

SCRIPT = PRELUDE + r"""
for name in MODULES:
    __import__(name)
    gc.collect()
from fleetid.common import t1
from fleetid.common.apdu import ApduProtocol
from fleetid.common.t1link import T1Link
from fleetid.device import enrol
from fleetid.device.board_net import BoardClock, BoardNetwork
from fleetid.device.bus_sim import connect_unix
from fleetid.device.certinfo import certificate_facts
from fleetid.device.se import SeSession

bus = connect_unix(SOCK, 10000)
link = T1Link(bus, t1.PROFILE_GP, None, 64)
link.open()
se = SeSession(ApduProtocol(link))
se.select()
net = BoardNetwork(se, VERIFIER, EST, BoardClock().now)
gc.collect()
identity = net.whoami(2)
print("whoami", identity["kind"], identity["serial"])
facts = certificate_facts(se.get_cert(2))
gc.collect()
nonce = net.nonce(2)
point, signed, csr = enrol.build_attested_csr(se, 3, nonce, facts.common_name,
                                             facts.serial_number)
signed = nonce = None
gc.collect()
cert = net.enroll(2, csr, True)
csr = None
show("point", point)
show("cert", cert)
https = net.https
print("tls", https.handshakes, https.resumed, https.se_operations)
print("ssl", int("ssl" in sys.modules or "tls" in sys.modules))
link.close()
bus.close()
gc.collect()
print("free", gc.mem_free())
"""


def test_board_tls_session_and_est_reenrolment_under_micropython(tmp_path, cloud):  # noqa: F811
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    env, line, ports, _ = cloud
    (chip,) = glob.glob(os.path.join(line, "chips", "*", "se-*.nvm"))
    sock = str(tmp_path / "se.sock")
    bus = "sim:unix:" + sock
    verifier = "https://127.0.0.1:%d" % ports["verifier"]
    est = "https://127.0.0.1:%d" % ports["est"]
    se = _serve_chip(chip, sock, env, str(tmp_path / "se.log"))
    try:
        # The chip's first operational certificate (slot 2), by the CPython agent.
        _ok(_fleetid("agent", "run", "--bus", bus, "--once", "--cloud", verifier, "--est", est,
                     "--max-attempts", "2", "--max-delay", "1", env=env))
        header = "MODULES = %r\nSOCK = %r\nVERIFIER = %r\nEST = %r\n" % (
            WORKFLOWS["run_tls"][1], sock, verifier, est)
        out = parse(Stage(tmp_path / "mp", opt=3).run("run_tls", header + SCRIPT,
                                                      timeout=300))
    finally:
        se.stop()
    kind, serial = out["whoami"][0].split()
    assert kind == "operational", out  # slot 2's key authenticated the handshake
    # One full handshake (whoami, at the verifier); nonce and simplereenroll at the EST
    # resume with its ticket (tickets are kept per server name, and the verifier and EST
    # share one session cache); GENERATE + ECDH in the transient key each.
    assert out["tls"] == ["3 2 6"], out
    assert out["ssl"] == ["0"]
    with open(os.path.join(line, "pki", "ca.pem"), "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    issued = x509.load_der_x509_certificate(bytes.fromhex(out["cert"][0]))
    issued.verify_directly_issued_by(ca)
    point = bytes.fromhex(out["point"][0])
    assert issued.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint) == point
    assert isinstance(issued.public_key(), ec.EllipticCurvePublicKey)
    assert issued.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == serial
