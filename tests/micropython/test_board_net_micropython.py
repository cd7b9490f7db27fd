"""A MicroPython board agent carries the lifecycle by itself, through processes.

`fleetid line run` personalises a chip (its NVM in a file); `fleetid cloud serve` runs the
verifier, EST and the CRL publisher on that line's PKI; `fleetid sim serve` serves the
chip on a Unix socket.  The board is the real MicroPython interpreter (unix port, the
suite's harness, heap budget "run_board_net") running `fleetid.device.board.run` with
`fleetid.device.board_net` -- the module a board ships -- and the board's constants
(verifier / EST URLs, the CRL cache): HTTP/1.1 over the portable TLS 1.3 client, every
private-key operation (ECDHE in the SE's transient key, CertificateVerify, the server
chain's signatures) in the emulated SE; no host TLS anywhere (the script checks `ssl` was
never imported).

1. enrolment: the identity key enrols an operational key into slot 2 (simpleenroll with a
   base64 PKCS#10, a base64 certs-only PKCS#7 parsed by common/der.py), acknowledged over
   the new credential; the cycle's other connections resume with session tickets;
2. a rotation (the board's renewal constant set to renew at once) whose SE loses power at
   its 3rd NVM write (`fleetid sim serve --cut-power-at 3`): the cycle fails, the journal
   in the SE says BEGIN (checked by `fleetid agent status`);
3. the next run resumes from the journal into slot 3, retires slot 2 and refreshes the
   issuing CA's CRL over HTTP from the distribution point the new certificate names
   (verified in the SE, cached in a file; the same bytes the cloud serves).
"""

import glob
import json
import os
import subprocess
import sys
import urllib.request

import pytest

from bench.mtls import free_port
from tests.cli.test_agent_processes import _Background, _ok, _serve_chip, _wait_for
from tests.micropython.budgets import WORKFLOWS
from tests.micropython.support import Stage, parse

pytestmark = pytest.mark.micropython

BIN = os.path.dirname(sys.executable)

SCRIPT = r"""
import gc
import sys

for name in MODULES:
    __import__(name)
    gc.collect()
from fleetid.device import board_net
from fleetid.device.board import run

made = []
_make_net = board_net.make_net


def make_net(se, **options):
    net = _make_net(se, **options)
    made.append(net)
    return net


board_net.make_net = make_net


def log(text):
    print("log", text)


report = run(BUS, "gp", 0, net_module="fleetid.device.board_net", verifier_url=VERIFIER,
             est_url=EST, renew_fraction=RENEW, crl_issuer=ISSUER, crl_cache_path=CACHE,
             log=log, cycles=1)
if report is not None:
    print("report", report.slot, report.journal, report.resumed)
    print("revocation", report.revocation)
https = made[0].https
print("tls", https.handshakes, https.resumed, https.se_operations)
print("ssl", int("ssl" in sys.modules or "tls" in sys.modules))
gc.collect()
print("free", gc.mem_free())
"""


def _fleetid(*args, env, timeout=300):
    return subprocess.run([os.path.join(BIN, "fleetid")] + list(args), env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cloud(tmp_path):
    """A line of one device and `fleetid cloud serve` on its PKI.  Yields
    (env, line folder, ports dict, crl_port)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"],
               FLEETID_KEYSTORE_PASS="board agent process test passphrase")
    line, config = str(tmp_path / "line"), str(tmp_path / "cloud")
    _ok(_fleetid("line", "run", "--devices", "1", "--stations", "1", "--keep-chips",
                 "--out", line, env=env))
    _ok(_fleetid("line", "cloud-config", "--line", line, "--out", config, env=env))
    with open(os.path.join(line, "pki", "ca.pem"), "rb") as f:
        issuer = x509.load_pem_x509_certificate(f.read())
    with open(str(tmp_path / "issuer.der"), "wb") as f:
        f.write(issuer.public_bytes(serialization.Encoding.DER))
    serve_out = str(tmp_path / "serve.out")
    crl_port = free_port()
    server = _Background(["cloud", "serve", "--config", os.path.join(config, "cloud.toml"),
                          "--crl-port", str(crl_port)], env, serve_out)
    try:
        _wait_for(lambda: '"listening"' in open(serve_out).read(), server.proc,
                  "cloud server")
        text = [t for t in open(serve_out).read().splitlines() if '"listening"' in t][0]
        yield env, line, json.loads(text)["listening"], crl_port
    finally:
        server.stop()


def test_board_agent_enrols_rotates_through_a_power_cut_and_refreshes_its_crl(tmp_path,
                                                                             cloud):
    env, line, ports, crl_port = cloud
    (chip,) = glob.glob(os.path.join(line, "chips", "*", "se-*.nvm"))
    sock = str(tmp_path / "se.sock")
    bus = "sim:unix:" + sock
    stage = Stage(tmp_path / "mp", opt=3)
    cache = str(tmp_path / "crl.cache")

    def board(renew, crl):
        header = ("MODULES = %r\nBUS = %r\nVERIFIER = %r\nEST = %r\nRENEW = %r\n"
                  "ISSUER = %r\nCACHE = %r\n") % (
            WORKFLOWS["run_board_net"][1], bus + "?timeout_ms=10000",
            "https://127.0.0.1:%d" % ports["verifier"], "https://127.0.0.1:%d" % ports["est"],
            renew, str(tmp_path / "issuer.der") if crl else None, cache if crl else None)
        return parse(stage.run("run_board_net", header + SCRIPT, timeout=300))

    def status():
        return _ok(_fleetid("agent", "status", "--bus", bus, env=env))

    # 1. Enrolment.
    se = _serve_chip(chip, sock, env, str(tmp_path / "se1.log"))
    try:
        out = board(0.66, False)
    finally:
        se.stop()
    assert "BEGIN enrol: slot 1 -> 2" in out["log"], out
    # No step needed a retry (a failed handshake, e.g. the heap too fragmented for it).
    assert not any("retry" in line for line in out["log"]), out
    assert out["report"] == ["2 BASE none"]
    handshakes, resumed, se_operations = map(int, out["tls"][0].split())
    # whoami, cacerts, nonce, enroll with slot 1; ack, then later calls with slot 2:
    # one full handshake per slot, the others resumed with the ticket.
    assert handshakes >= 5 and resumed >= 3 and handshakes - resumed == 2
    assert se_operations == 2 * handshakes  # GENERATE + ECDH in the transient key each
    assert out["ssl"] == ["0"]

    # 2. A due rotation with the power cut at the SE's 3rd NVM write of it.
    se = _serve_chip(chip, sock, env, str(tmp_path / "se2.log"), "--cut-power-at", "3")
    try:
        out = board(0.000001, False)
        assert any(line.startswith("cycle failed") for line in out["log"]), out
        assert "report" not in out
        text = status()
    finally:
        se.stop()
    assert "credential in use: slot 2 (rotation in flight)" in text, text
    assert "BEGIN cur=2 new=3" in text, text

    # 3. The next run resumes from the journal, retires slot 2 and refreshes the CRL.
    se = _serve_chip(chip, sock, env, str(tmp_path / "se3.log"))
    try:
        out = board(0.66, True)
        text = status()
    finally:
        se.stop()
    assert "resume BEGIN: redo the enrolment into slot 3" in out["log"], out
    assert not any("retry" in line for line in out["log"]), out
    assert "old key and certificate deleted from slot 2" in out["log"], out
    assert out["report"] == ["3 BASE BEGIN"]
    assert "revocation list updated" in " ".join(out["log"]), out
    assert out["revocation"][0].startswith("CRL #"), out
    assert "credential in use: slot 3 (settled)" in text and "slot 2: empty" in text, text
    with urllib.request.urlopen("http://127.0.0.1:%d/crl/widget.crl" % crl_port,
                                timeout=10) as answer:
        served = answer.read()
    with open(cache, "rb") as f:
        assert f.read() == served
    assert out["ssl"] == ["0"]
