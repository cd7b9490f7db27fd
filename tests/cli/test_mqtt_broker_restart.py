"""The broker restarted under a running fleet (issue 19 item 6), through real processes:
`fleetid mqtt broker` (mosquitto, no persistence), `fleetid mqtt cloud`, `fleetid cloud
serve` and `fleetid agent run --mqtt` (its TLS signed in the emulated SE).  mosquitto is
killed (SIGKILL: no clean disconnect, its retained messages gone) and a new broker starts
on the same two ports.  Without anyone's help: the cloud reconnects (paho, bounded
backoff) and publishes the retained CRL again, the agent reconnects (its own bounded
backoff, a new SE-signed handshake) and gets that CRL, its telemetry after the restart
arrives, and nothing is counted twice (QoS 1 resends refused as replays, never accepted)."""

import glob
import os
import re
import signal
import time

import pytest

from bench.mtls import free_port
from fleetid.cloud.mqtt.broker import find_mosquitto
from tests.cli.test_agent_processes import (_Background, _fleetid, _ok,
                                            _serve_chip, _wait_for)
from tests.cli.test_mqtt_processes import _start_cloud, _stop_cleanly, _text, _until
from tests.conftest import require

pytestmark = pytest.mark.timeout(240)


def _telemetry_lines(path, name):
    return re.findall(r"telemetry %s seq (\d+):" % re.escape(name), _text(path))


def _start_broker(tmp_path, env, line, port, service_port, round_):
    out = str(tmp_path / ("broker-%d.out" % round_))
    broker = _Background(["mqtt", "broker", "--line", line, "--port", str(port),
                          "--service-port", str(service_port)], env, out)
    _until(out, broker.proc, "mqtt broker: mosquitto pid", "broker")
    pid = int(re.search(r"mosquitto pid (\d+)", _text(out)).group(1))
    return broker, out, pid


def test_a_killed_broker_restarted_on_its_ports_is_found_again_by_cloud_and_agent(tmp_path):
    require(find_mosquitto() is not None, "mosquitto (Debian package mosquitto)")
    env = dict(os.environ, FLEETID_KEYSTORE_PASS="broker restart test passphrase")
    line = str(tmp_path / "line")
    _ok(_fleetid("line", "run", "--devices", "1", "--stations", "1", "--keep-chips",
                 "--out", line, env=env))
    servers = []
    try:
        cloud, ports = _start_cloud(tmp_path, env, line)
        servers.append(cloud)
        port, service_port = free_port(), free_port()
        while service_port == port:
            service_port = free_port()
        broker, broker_out, mosquitto_pid = _start_broker(tmp_path, env, line, port,
                                                          service_port, 1)
        servers.append(broker)
        mq_out = str(tmp_path / "mqtt-cloud.out")
        mq_cloud = _Background(["mqtt", "cloud", "--line", line, "--broker",
                                "mqtts://127.0.0.1:%d" % service_port], env, mq_out)
        servers.append(mq_cloud)
        _until(mq_out, mq_cloud.proc, "crl ca published retained", "retained CRL")

        chip = sorted(glob.glob(os.path.join(line, "chips", "*", "se-*.nvm")))[0]
        sock = str(tmp_path / "se.sock")
        servers.append(_serve_chip(chip, sock, env, str(tmp_path / "se.log")))
        agent_out = str(tmp_path / "agent.out")
        url = "mqtts://127.0.0.1:%d" % port
        agent = _Background([
            "agent", "run", "--bus", "sim:unix:" + sock,
            "--cloud", "https://127.0.0.1:%d" % ports["verifier"],
            "--est", "https://127.0.0.1:%d" % ports["est"], "--max-attempts", "2",
            "--max-delay", "1", "--interval", "2", "--mqtt", url, "--mqtt-crl-label", "ca",
            "--crl-issuer", os.path.join(line, "pki", "ca.pem"),
            "--crl-cache", str(tmp_path / "agent-ca.crl")], env, agent_out)
        servers.append(agent)
        _until(agent_out, agent.proc, "reported as telemetry", "the agent's first cycle")
        name = re.search(r"mqtt: connected to %s as (FID-\d+) " % re.escape(url),
                         _text(agent_out)).group(1)
        _until(mq_out, mq_cloud.proc, "telemetry " + name, "telemetry")
        assert _text(agent_out).count("retained CRL -> cache") == 1

        # The fault: mosquitto killed; its `fleetid mqtt broker` says so and exits 1.
        os.kill(mosquitto_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert broker.proc.wait(20) == 1
        broker.out.close()
        assert "mosquitto exited with status" in _text(broker_out)
        before = len(_telemetry_lines(mq_out, name))
        time.sleep(1.0)  # down for a while: both clients see refused connections
        broker, broker_out, _pid = _start_broker(tmp_path, env, line, port, service_port, 2)
        servers.append(broker)

        # Recovery, bounded (paho's capped backoff, the agent's --max-delay).
        deadline = 45
        _wait_for(lambda: _text(agent_out).count("mqtt: connected to") == 2, agent.proc,
                  "the agent's reconnection", deadline)
        _wait_for(lambda: _text(agent_out).count("retained CRL -> cache") == 2, agent.proc,
                  "the retained CRL published again after the restart", deadline)
        _wait_for(lambda: len(_telemetry_lines(mq_out, name)) > before, mq_cloud.proc,
                  "telemetry after the restart", deadline)
        recovered_s = time.monotonic() - killed_at
        assert recovered_s < deadline
        assert mq_cloud.proc.poll() is None and agent.proc.poll() is None

        seqs = [int(s) for s in _telemetry_lines(mq_out, name)]
        assert seqs == sorted(set(seqs)), seqs  # each accepted once, in order: no fork
        _stop_cleanly(agent, agent_out, "agent: stopped")
        _stop_cleanly(mq_cloud, mq_out, "mqtt cloud: stopped; accepted %d, failed 0"
                      % len(seqs))
        stopped = _text(mq_out)
        assert "refused_device 0" in stopped and "malformed 0" in stopped
        assert "Traceback" not in _text(agent_out) + stopped
        _stop_cleanly(broker, broker_out, "mqtt broker: stopped")
    finally:
        for server in reversed(servers):
            if not server.out.closed:
                server.stop()
