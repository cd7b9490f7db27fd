"""The device agent end to end through real processes: `fleetid sim serve` (the chip, its
NVM in a file) + `fleetid cloud serve` (EST + verifier on the line's PKI) + `fleetid agent
run --once`: enrolment; a rotation whose SE loses power in the middle (the emulator's
--cut-power-at), then resumed by the next run from the journal in the SE; and a refusal
once the operator revoked the device."""

import glob
import json
import os
import subprocess
import sys
import time

import pytest

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


def test_agent_enrols_survives_a_power_cut_mid_rotation_and_is_refused_once_revoked(tmp_path):
    # The operator supplies the keystore passphrase by environment (never stored in the line).
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"],
               FLEETID_KEYSTORE_PASS="agent process test passphrase")
    line, cloud = str(tmp_path / "line"), str(tmp_path / "cloud")
    _ok(_fleetid("line", "run", "--devices", "1", "--stations", "1", "--keep-chips",
                 "--out", line, env=env))
    _ok(_fleetid("line", "cloud-config", "--line", line, "--out", cloud, env=env))
    serve_out = str(tmp_path / "serve.out")
    cloud_server = _Background(["cloud", "serve", "--config", os.path.join(cloud, "cloud.toml")],
                               env, serve_out)
    servers = [cloud_server]
    try:
        _wait_for(lambda: '"listening"' in open(serve_out).read(), cloud_server.proc,
                  "cloud server")
        line_text = [t for t in open(serve_out).read().splitlines() if '"listening"' in t][0]
        ports = json.loads(line_text)["listening"]
        chip = sorted(glob.glob(os.path.join(line, "chips", "*", "se-*.nvm")))[0]
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
