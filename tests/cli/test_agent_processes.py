"""The device agent end to end through real processes: `fleetid sim serve` (the chip, its
NVM in a file) + `fleetid cloud serve` (EST + verifier on the line's PKI) + `fleetid agent
run --once`: enrolment; a rotation whose SE loses power in the middle (the emulator's
--cut-power-at), then resumed by the next run from the journal in the SE; a peer device's
revocation seen through the CRL the agent refreshed at its next connection (served by the
cloud at the distribution point its new certificate names, verified through the SE); and
a refusal once the operator revoked the device itself."""

import glob
import json
import os
import subprocess
import sys
import time

import pytest

from bench.mtls import free_port

BIN = os.path.dirname(sys.executable)


def _fleetid(*args, env, timeout=120):
    return subprocess.run([os.path.join(BIN, "fleetid")] + list(args), env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ok(done):
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


class _Background:
    def __init__(self, args, env, out_path):
        self.out = open(out_path, "w")
        self.proc = subprocess.Popen([os.path.join(BIN, "fleetid")] + list(args), env=env,
                                     stdout=self.out, stderr=subprocess.STDOUT)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.out.close()


def _wait_for(check, proc, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        assert proc.poll() is None, "%s exited" % what
        time.sleep(0.05)
    pytest.fail("no %s after %d s" % (what, timeout))


def _serve_chip(chip, sock, env, log, *extra):
    if os.path.exists(sock):
        os.unlink(sock)
    server = _Background(["sim", "serve", "--nvm", chip, "--listen", "unix:" + sock]
                         + list(extra), env, log)
    _wait_for(lambda: os.path.exists(sock), server.proc, "SE socket")
    return server


def _crl_lists(url, serial, timeout=30):
    """Wait until the CRL served at `url` lists `serial` (the publisher polls the registry
    every few seconds).  Returns: True once listed, False at the timeout."""
    import urllib.request

    from cryptography import x509

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=5) as answer:
            crl = x509.load_der_x509_crl(answer.read())
        if crl.get_revoked_certificate_by_serial_number(serial) is not None:
            return True
        time.sleep(0.5)
    return False


def test_agent_enrols_survives_a_power_cut_mid_rotation_and_is_refused_once_revoked(tmp_path):
    # The operator supplies the keystore passphrase by environment (never stored in the line).
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"],
               FLEETID_KEYSTORE_PASS="agent process test passphrase")
    line, cloud = str(tmp_path / "line"), str(tmp_path / "cloud")
    _ok(_fleetid("line", "run", "--devices", "2", "--stations", "1", "--keep-chips",
                 "--out", line, env=env))
    _ok(_fleetid("line", "cloud-config", "--line", line, "--out", cloud, env=env))
    serve_out = str(tmp_path / "serve.out")
    crl_port = free_port()
    cloud_server = _Background(["cloud", "serve", "--config", os.path.join(cloud, "cloud.toml"),
                                "--crl-port", str(crl_port)], env, serve_out)
    servers = [cloud_server]
    try:
        _wait_for(lambda: '"listening"' in open(serve_out).read(), cloud_server.proc,
                  "cloud server")
        line_text = [t for t in open(serve_out).read().splitlines() if '"listening"' in t][0]
        ports = json.loads(line_text)["listening"]
        chip, peer_chip = sorted(glob.glob(os.path.join(line, "chips", "*", "se-*.nvm")))
        sock = str(tmp_path / "se.sock")
        bus = "sim:unix:" + sock
        agent = ["agent", "run", "--bus", bus, "--once",
                 "--cloud", "https://127.0.0.1:%d" % ports["verifier"],
                 "--est", "https://127.0.0.1:%d" % ports["est"], "--max-attempts", "2",
                 "--max-delay", "1"]

        # Enrolment.
        se = _serve_chip(chip, sock, env, str(tmp_path / "se1.log"))
        servers.append(se)
        out = _ok(_fleetid(*agent, env=env))
        assert "agent: BEGIN enrol: slot 1 -> 2" in out and "journal BASE" in out
        # The long-running agent: one cycle, then a bounded wait that SIGTERM ends cleanly.
        loop_out = str(tmp_path / "loop.out")
        loop = _Background([a for a in agent if a != "--once"] + ["--interval", "3600"],
                           env, loop_out)
        _wait_for(lambda: "credential: slot 2" in open(loop_out).read(), loop.proc,
                  "agent cycle")
        started = time.monotonic()
        loop.proc.terminate()
        assert loop.proc.wait(10) == 0 and time.monotonic() - started < 5
        loop.out.close()
        se.stop()
        servers.remove(se)

        # Rotation with a power cut at the SE's 3rd NVM write of it (BEGIN, GENERATE KEY,
        # then PUT CERT: cut before its atomic point, so the certificate is lost).
        se = _serve_chip(chip, sock, env, str(tmp_path / "se2.log"), "--cut-power-at", "3")
        servers.append(se)
        cut = _fleetid(*(agent + ["--rotate"]), env=env)
        assert cut.returncode == 1, cut.stdout + cut.stderr
        assert "agent: ISSUED" not in cut.stdout and "FAILED" in cut.stderr
        status = _ok(_fleetid("agent", "status", "--bus", bus, env=env))
        assert "credential in use: slot 2 (rotation in flight)" in status
        assert "slot 3: key, no certificate" in status and "BEGIN cur=2 new=3" in status
        # The next run resumes from the journal: same slots, no leak, settled.
        out = _ok(_fleetid(*agent, env=env))
        assert "agent: resume BEGIN: redo the enrolment into slot 3" in out
        assert "agent: old key and certificate deleted from slot 2" in out
        status = _ok(_fleetid("agent", "status", "--bus", bus, env=env))
        assert "credential in use: slot 3 (settled)" in status and "slot 2: empty" in status
        who = _ok(_fleetid("agent", "whoami", "--bus", bus, "--cloud",
                           "https://127.0.0.1:%d" % ports["verifier"], env=env))
        identity = json.loads(who[who.index("{"):])
        assert identity["kind"] == "operational" and not identity["in_overlap"]

        # A peer's revocation, seen through the refreshed CRL.  The peer's certificate and
        # registry serial come from its own SE; the operator revokes it.
        se.stop()
        servers.remove(se)
        peer_sock = str(tmp_path / "peer.sock")
        peer_bus = "sim:unix:" + peer_sock
        peer = _serve_chip(peer_chip, peer_sock, env, str(tmp_path / "peer.log"))
        servers.append(peer)
        peer_pem = str(tmp_path / "peer.pem")
        _ok(_fleetid("agent", "get-cert", "--bus", peer_bus, "--slot", "1", "--out", peer_pem,
                     env=env))
        peer_who = _ok(_fleetid("agent", "whoami", "--bus", peer_bus, "--slot", "1", "--cloud",
                                "https://127.0.0.1:%d" % ports["verifier"], env=env))
        peer_identity = json.loads(peer_who[peer_who.index("{"):])
        peer.stop()
        servers.remove(peer)
        se = _serve_chip(chip, sock, env, str(tmp_path / "se3.log"))
        servers.append(se)
        ca_pem = os.path.join(line, "pki", "ca.pem")
        crl_args = ["--crl-issuer", ca_pem, "--crl-cache", str(tmp_path / "crl.der")]
        check_peer = ["agent", "check-peer", peer_pem, "--bus", bus] + crl_args
        # The rotated certificate names the CRL; the agent caches it at its next cycle.
        out = _ok(_fleetid(*(agent + crl_args), env=env))
        assert "revocation list updated" in out, out
        assert "not revoked" in _ok(_fleetid(*check_peer, env=env))
        _ok(_fleetid("cloud", "revoke-device", "--registry",
                     "sqlite:" + os.path.join(line, "registry.db"), "--serial",
                     str(peer_identity["registry_serial"]), "--reason", "keyCompromise",
                     env=env))
        from cryptography import x509

        with open(peer_pem, "rb") as f:
            peer_serial = x509.load_pem_x509_certificate(f.read()).serial_number
        assert _crl_lists("http://127.0.0.1:%d/crl/widget.crl" % crl_port, peer_serial)
        # Offline, the cached CRL still says "not revoked": nothing was fetched yet.
        assert "not revoked" in _ok(_fleetid(*check_peer, env=env))
        # The next connection refreshes the cache; from then on the peer is refused.
        out = _ok(_fleetid(*(agent + crl_args), env=env))
        assert "revocation list updated" in out, out
        refused_peer = _fleetid(*check_peer, env=env)
        assert refused_peer.returncode == 1, refused_peer.stdout + refused_peer.stderr
        assert "REFUSED" in refused_peer.stderr and "RevokedError" in refused_peer.stderr

        # Refusal: the operator revokes the device; the agent stops with the reason.
        _ok(_fleetid("cloud", "revoke-device", "--registry",
                     "sqlite:" + os.path.join(line, "registry.db"), "--serial",
                     str(identity["registry_serial"]), "--reason", "keyCompromise", env=env))
        refused = _fleetid(*agent, env=env)
        assert refused.returncode == 1
        assert "REFUSED by the verifier: revoked (nothing rotated)" in refused.stderr
    finally:
        for server in servers:
            server.stop()
