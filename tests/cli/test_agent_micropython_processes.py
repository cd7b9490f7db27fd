"""`fleetid agent run --runtime micropython`: the board agent carries the whole lifecycle
by itself under the real MicroPython interpreter, through processes.

`fleetid line run` personalises a chip; `fleetid cloud serve` runs the verifier, EST and
the CRL publisher on that line's PKI, with the CRL distribution point new certificates
name behind an HTTPS front (nginx, the cloud's server certificate); `fleetid mqtt broker`
runs mosquitto on the line's PKI and `fleetid mqtt cloud` takes telemetry on the service
listener; `fleetid sim serve` serves the chip.  The agent is `fleetid agent run --runtime
micropython --once`: fleetid.device.board.run (the entry point every board shares) with
fleetid.device.board_net, under the unix port at the heap budget "run_agent_micropython"
(tests/micropython/budgets.py); every TLS connection (HTTPS to the verifier, EST and the
CRL front, MQTT to the broker) is the portable TLS 1.3 client with ECDHE, CertificateVerify
and the servers' chain signatures in the emulated SE; the host's `ssl` is never imported
by the board agent (the CLI says so otherwise).

1. enrolment into slot 2, reported as telemetry over MQTT, which `fleetid mqtt cloud`
   receives under the device's name;
2. a rotation (due at once: --renew-margin) whose SE loses power at its 3rd NVM write
   (`fleetid sim serve --cut-power-at 3`): exit 1, the failure reported as telemetry, the
   journal in the SE says BEGIN (`fleetid agent status`);
3. the next run resumes into slot 3, retires slot 2, refreshes the issuing CA's CRL over
   HTTPS from the distribution point the new certificate names (nginx's log shows the GET;
   the cached file holds the bytes the cloud serves) and reports slot 3 as telemetry; the
   cloud's registry audit shows the re-issuances and the rotation acknowledgements.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import urllib.request

import pytest

from bench.mtls import free_port
from fleetid.cloud.mqtt.broker import find_mosquitto
from tests.cli.test_agent_processes import (_Background, _fleetid, _ok,
                                            _serve_chip, _wait_for)
from tests.conftest import require
from tests.micropython.budgets import heap_for
from tests.micropython.support import MICROPYTHON_LIB, tools

pytestmark = [pytest.mark.micropython, pytest.mark.timeout(300)]

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log %(dir)s/error.log warn;
pid %(dir)s/nginx.pid;
events { worker_connections 64; }
http {
    access_log %(dir)s/access.log;
    client_body_temp_path %(dir)s/tmp;
    proxy_temp_path %(dir)s/tmp;
    fastcgi_temp_path %(dir)s/tmp;
    uwsgi_temp_path %(dir)s/tmp;
    scgi_temp_path %(dir)s/tmp;
    server {
        listen 127.0.0.1:%(port)d ssl;
        ssl_certificate %(cert)s;
        ssl_certificate_key %(key)s;
        ssl_protocols TLSv1.3;
        location /crl/ { proxy_pass http://127.0.0.1:%(crl_port)d; }
    }
}
"""


def _text(path):
    with open(path) as f:
        return f.read()


def _nginx():
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    require(found is not None, "nginx (Debian package nginx-light)")
    return found


def _https_crl_front(tmp_path, port, crl_port, cloud_dir):
    """nginx on 127.0.0.1:port (TLS 1.3, the cloud's server certificate) in front of the
    cloud's plain-HTTP CRL listener."""
    folder = tmp_path / "nginx"
    (folder / "tmp").mkdir(parents=True)
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF % {
        "dir": folder, "port": port, "crl_port": crl_port,
        "cert": os.path.join(cloud_dir, "tls", "server.pem"),
        "key": os.path.join(cloud_dir, "tls", "server.key.pem")})
    proc = subprocess.Popen([_nginx(), "-p", str(folder), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, str(folder / "access.log")


def test_board_agent_under_micropython_enrols_rotates_through_a_cut_and_reports_on_mqtt(
        tmp_path):
    tools()
    require(find_mosquitto() is not None, "mosquitto (Debian package mosquitto)")
    require((MICROPYTHON_LIB / "umqtt" / "simple.py").exists(),
            "var/micropython-lib/umqtt/simple.py (scripts/fetch_micropython_lib.py)")
    _nginx()
    env = dict(os.environ, FLEETID_KEYSTORE_PASS="board runtime process test passphrase")
    line, cloud_dir = str(tmp_path / "line"), str(tmp_path / "cloud")
    _ok(_fleetid("line", "run", "--devices", "1", "--stations", "1", "--keep-chips",
                 "--out", line, env=env))
    _ok(_fleetid("line", "cloud-config", "--line", line, "--out", cloud_dir, env=env))
    crl_port, front_port, port, service_port = (free_port() for _ in range(4))
    servers = []
    try:
        front, access_log = _https_crl_front(tmp_path, front_port, crl_port, cloud_dir)
        servers.append(front)
        # New certificates name the HTTPS front as their CRL distribution point.
        cloud_env = dict(env, FLEETID_CLOUD_CRL_BASE_URL="https://127.0.0.1:%d" % front_port)
        cloud_out = str(tmp_path / "cloud.out")
        cloud = _Background(["cloud", "serve", "--config",
                             os.path.join(cloud_dir, "cloud.toml"), "--crl-port",
                             str(crl_port)], cloud_env, cloud_out)
        servers.append(cloud)
        _wait_for(lambda: '"listening"' in _text(cloud_out), cloud.proc, "cloud server")
        listening = [t for t in _text(cloud_out).splitlines() if '"listening"' in t][0]
        ports = json.loads(listening)["listening"]
        broker_out = str(tmp_path / "broker.out")
        broker = _Background(["mqtt", "broker", "--line", line, "--port", str(port),
                              "--service-port", str(service_port)], env, broker_out)
        servers.append(broker)
        _wait_for(lambda: "mqtt broker: mosquitto pid" in _text(broker_out), broker.proc,
                  "broker")
        telemetry_out = str(tmp_path / "mqtt-cloud.out")
        telemetry = _Background(["mqtt", "cloud", "--line", line, "--broker",
                                 "mqtts://127.0.0.1:%d" % service_port], env, telemetry_out)
        servers.append(telemetry)
        _wait_for(lambda: "crl ca published retained" in _text(telemetry_out),
                  telemetry.proc, "the MQTT cloud", 60)

        (chip,) = glob.glob(os.path.join(line, "chips", "*", "se-*.nvm"))
        sock = str(tmp_path / "se.sock")
        bus = "sim:unix:" + sock
        cache = str(tmp_path / "crl.cache")

        def board(*extra):
            return _fleetid(
                "agent", "run", "--runtime", "micropython", "--once", "--bus", bus,
                "--timeout-ms", "10000", "--mp-heap", heap_for("run_agent_micropython"),
                "--cloud", "https://127.0.0.1:%d" % ports["verifier"],
                "--est", "https://127.0.0.1:%d" % ports["est"],
                "--mqtt", "mqtts://127.0.0.1:%d" % port, "--mqtt-crl-label", "none",
                "--max-attempts", "2", "--max-delay", "1", *extra, env=env, timeout=240)

        # 1. Enrolment, reported over MQTT.
        se = _serve_chip(chip, sock, env, str(tmp_path / "se1.log"))
        try:
            done = board()
        finally:
            se.stop()
        out = _ok(done)
        assert "ssl" not in done.stderr, done.stderr  # the board agent never imported it
        assert "BEGIN enrol: slot 1 -> 2" in out, out
        assert "retry" not in out, out  # no step needed one (e.g. a heap too small)
        assert "journal BASE" in out and "credential: slot 2" in out, out
        name = re.search(r"mqtt: connected as (FID-\d+) ", out).group(1)
        _wait_for(lambda: "telemetry " + name in _text(telemetry_out), telemetry.proc,
                  "the enrolment's telemetry")

        # 2. A due rotation with the power cut at the SE's 3rd NVM write of it.
        se = _serve_chip(chip, sock, env, str(tmp_path / "se2.log"), "--cut-power-at", "3")
        try:
            cut = board("--renew-margin", str(10 ** 9))
            status = _ok(_fleetid("agent", "status", "--bus", bus, env=env))
        finally:
            se.stop()
        assert cut.returncode == 1, cut.stdout + cut.stderr
        assert "FAILED" in cut.stderr and "Traceback" not in cut.stdout + cut.stderr
        assert "credential in use: slot 2 (rotation in flight)" in status, status
        assert "BEGIN cur=2 new=3" in status, status

        # 3. Resumed from the journal; the CRL refreshed over HTTPS; reported over MQTT.
        se = _serve_chip(chip, sock, env, str(tmp_path / "se3.log"))
        try:
            out = _ok(board("--crl-issuer", os.path.join(line, "pki", "ca.pem"),
                            "--crl-cache", cache))
            status = _ok(_fleetid("agent", "status", "--bus", bus, env=env))
        finally:
            se.stop()
        assert "resume BEGIN: redo the enrolment into slot 3" in out, out
        assert "retry" not in out, out
        assert "old key and certificate deleted from slot 2" in out, out
        assert "credential: slot 3" in out and "revocation list updated" in out, out
        assert "credential in use: slot 3 (settled)" in status and "slot 2: empty" in status
        assert re.search(r'"GET /crl/widget\.crl HTTP/1\.1" 200', _text(access_log))
        with urllib.request.urlopen("http://127.0.0.1:%d/crl/widget.crl" % crl_port,
                                    timeout=10) as answer:
            served = answer.read()
        with open(cache, "rb") as f:
            assert f.read() == served
        _wait_for(lambda: "'slot': 3" in _text(telemetry_out), telemetry.proc,
                  "the rotation's telemetry")
        assert "'failed'" in _text(telemetry_out)  # step 2's cycle, reported

        serial = name.split("-")[1].lstrip("0")
        audit = _ok(_fleetid("audit", "show", "--serial", serial, "--registry",
                             "sqlite:" + os.path.join(line, "registry.db"), env=env))
        assert "operation=simpleenroll" in audit, audit
        assert "operation=simplereenroll" in audit, audit
        assert re.search(r"rotation_ack serial=%s " % serial, audit), audit
    finally:
        for server in reversed(servers):
            if isinstance(server, subprocess.Popen):
                server.terminate()
                server.wait(10)
            else:
                server.stop()


def test_options_the_board_agent_lacks_are_refused_by_name(tmp_path):
    from click.testing import CliRunner

    from fleetid.cli.agent import agent

    signer = tmp_path / "signer.pem"
    signer.write_text("")
    runner = CliRunner()
    result = runner.invoke(agent, [
        "run", "--runtime", "micropython", "--bus", "linux:i2c:/dev/i2c-1:0x48",
        "--cloud", "https://127.0.0.1:8443", "--rotate", "--mqtt", "mqtts://127.0.0.1:8883",
        "--mqtt-revset-signer", str(signer), "--mqtt-revset-cache", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    for named in ("--runtime micropython does not support", "--rotate",
                  "--mqtt-revset-signer", "--mqtt-revset-cache",
                  "--bus linux:i2c:/dev/i2c-1:0x48"):
        assert named in result.output, result.output
    result = runner.invoke(agent, ["run", "--bus", "sim:unix:/nonexistent",
                                  "--cloud", "https://127.0.0.1:8443", "--mp-heap", "512K"])
    assert result.exit_code == 2 and "--mp-heap goes with --runtime micropython" in \
        result.output, result.output
