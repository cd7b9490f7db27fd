"""MQTT and OTA end to end through real processes: `fleetid mqtt broker` (mosquitto on the
line's PKI), `fleetid mqtt cloud` (retained CRLs, telemetry), `fleetid sim serve` (the
chip), `fleetid cloud serve` (EST + verifier) and `fleetid agent run --mqtt` (its MQTT
session TLS-signed in the SE).  `fleetid ota rotate-scp03` rotates the device's SCP03 keys
through the agent's relay, `fleetid ota install-fw-key` installs a firmware certificate
with the new keys (and is refused with the old ones), `fleetid ota rotate` makes the agent
rotate its credential, a device that is not online times out, a revocation reaches the
broker's CRL file (the revoked device's handshake is refused) and the online agent's CRL
cache, and SIGTERM stops every long-running command cleanly.  With the cloud's revocation
tiers initialised, `fleetid mqtt cloud --config` publishes the compact revocation set
retained and the agent (--mqtt-revset-signer/--mqtt-revset-cache) takes it into its cache,
again after a revocation.  The cloud and `fleetid ota` connect to the broker's service
listener; the exact 8 KB `[[[...]]]` on the device's telemetry and command topics leaves
both `fleetid mqtt cloud` and `fleetid agent run --mqtt` handling what follows."""

import glob
import json
import os
import re

import pytest

from bench.mtls import free_port
from fleetid.cloud.mqtt.broker import find_mosquitto
from tests.cli.test_agent_processes import (_Background, _fleetid, _ok,
                                            _serve_chip, _wait_for)
from tests.conftest import require

pytestmark = pytest.mark.timeout(300)


def _text(path):
    with open(path) as f:
        return f.read()


def _until(path, proc, needle, what, timeout=60):
    _wait_for(lambda: needle in _text(path), proc, what, timeout)


def _stop_cleanly(server, path, needle):
    server.proc.terminate()
    assert server.proc.wait(20) == 0, _text(path)[-2000:]
    server.out.close()
    assert needle in _text(path), _text(path)[-2000:]


NESTED_8K = b"[" * 4096 + b"]" * 4096


def _publish_as_service(line, port, topic, payload):
    """Publish one message with the cloud's certificate (service listener), QoS 1."""
    import paho.mqtt.client as paho_client
    from paho.mqtt.enums import CallbackAPIVersion

    files = os.path.join(line, "mqtt")
    client = paho_client.Client(CallbackAPIVersion.VERSION2, client_id="test-nested",
                                protocol=paho_client.MQTTv311)
    client.tls_set(ca_certs=os.path.join(files, "ca-bundle.pem"),
                   certfile=os.path.join(files, "cloud.pem"),
                   keyfile=os.path.join(files, "cloud.key"))
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(20)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def _start_cloud(tmp_path, env, line):
    cloud = str(tmp_path / "cloud")
    _ok(_fleetid("line", "cloud-config", "--line", line, "--out", cloud, env=env))
    out = str(tmp_path / "cloud.out")
    server = _Background(["cloud", "serve", "--config", os.path.join(cloud, "cloud.toml")],
                         env, out)
    _until(out, server.proc, '"listening"', "cloud server")
    listening = [t for t in _text(out).splitlines() if '"listening"' in t][0]
    return server, json.loads(listening)["listening"]


def test_ota_over_the_broker_to_an_agent_process_rotates_its_scp03_keys(tmp_path):
    require(find_mosquitto() is not None, "mosquitto (Debian package mosquitto)")
    env = dict(os.environ, FLEETID_KEYSTORE_PASS="mqtt process test passphrase")
    line = str(tmp_path / "line")
    _ok(_fleetid("line", "run", "--devices", "2", "--stations", "1", "--keep-chips",
                 "--out", line, env=env))
    written = _ok(_fleetid("mqtt", "broker", "--line", line, "--out", str(tmp_path / "wo"),
                           "--port", "8883", "--write-only", env=env))
    assert "-c %s" % (tmp_path / "wo" / "mosquitto.conf") in written, written
    assert "listener 8883 127.0.0.1" in _text(str(tmp_path / "wo" / "mosquitto.conf"))
    assert "pattern read fleet/%u/cmd" in _text(str(tmp_path / "wo" / "mosquitto.acl"))
    assert "listener 8884 127.0.0.1" in _text(str(tmp_path / "wo" / "mosquitto.conf"))
    servers = []
    try:
        cloud, ports = _start_cloud(tmp_path, env, line)
        servers.append(cloud)
        cloud_toml = str(tmp_path / "cloud" / "cloud.toml")
        assert "revset-signer.pem" in _ok(_fleetid("revocation", "init", "--config",
                                                   cloud_toml, env=env))
        signer = str(tmp_path / "cloud" / "revocation" / "revset-signer.pem")
        port, service_port = free_port(), free_port()
        while service_port == port:
            service_port = free_port()
        url = "mqtts://127.0.0.1:%d" % port  # devices
        service_url = "mqtts://127.0.0.1:%d" % service_port  # the cloud, operators
        broker_out = str(tmp_path / "broker.out")
        broker = _Background(["mqtt", "broker", "--line", line, "--port", str(port),
                              "--service-port", str(service_port),
                              "--crl-interval", "1"], env, broker_out)
        servers.append(broker)
        _until(broker_out, broker.proc, "mqtt broker: mosquitto pid", "broker")
        for name in ("ca-bundle.pem", "cloud.pem", "crl.pem", "mosquitto.conf"):
            assert os.path.exists(os.path.join(line, "mqtt", name))
        conf = _text(os.path.join(line, "mqtt", "mosquitto.conf"))
        assert "require_certificate true" in conf and "listener %d" % port in conf

        mq_cloud_out = str(tmp_path / "mqtt-cloud.out")
        mq_cloud = _Background(["mqtt", "cloud", "--line", line, "--broker", service_url,
                                "--crl-interval", "1", "--config", cloud_toml], env,
                               mq_cloud_out)
        servers.append(mq_cloud)
        _until(mq_cloud_out, mq_cloud.proc, "crl ca published retained", "retained CRL")
        _wait_for(lambda: re.search(r"compact set #\d+ published retained",
                                    _text(mq_cloud_out)), mq_cloud.proc,
                  "retained compact set", 60)

        # The agent, its SE served by the emulator, connected after the CRL was published.
        chip = sorted(glob.glob(os.path.join(line, "chips", "*", "se-*.nvm")))[0]
        sock = str(tmp_path / "se.sock")
        servers.append(_serve_chip(chip, sock, env, str(tmp_path / "se.log")))
        agent_out = str(tmp_path / "agent.out")
        agent = _Background([
            "agent", "run", "--bus", "sim:unix:" + sock,
            "--cloud", "https://127.0.0.1:%d" % ports["verifier"],
            "--est", "https://127.0.0.1:%d" % ports["est"], "--max-attempts", "2",
            "--max-delay", "1", "--mqtt", url, "--mqtt-crl-label", "ca",
            "--crl-issuer", os.path.join(line, "pki", "ca.pem"),
            "--crl-cache", str(tmp_path / "agent-ca.crl"),
            "--mqtt-revset-signer", signer,
            "--mqtt-revset-cache", str(tmp_path / "agent.frs")], env, agent_out)
        servers.append(agent)
        _until(agent_out, agent.proc, "reported as telemetry", "the agent's first cycle")
        # Chips are named by SE UID, so which serial this one carries is read off the agent.
        name = re.search(r"mqtt: connected to %s as (FID-\d+) " % re.escape(url),
                         _text(agent_out)).group(1)
        other = "FID-000000002" if name == "FID-000000001" else "FID-000000001"
        assert "retained CRL -> cache: updated" in _text(agent_out)
        assert "retained compact set -> cache: updated" in _text(agent_out)
        assert os.path.getsize(str(tmp_path / "agent.frs")) > 0
        _until(mq_cloud_out, mq_cloud.proc, "telemetry " + name, "telemetry")

        # The reported 8 KB nesting on the device's telemetry and command topics: both
        # listeners refuse it, count it, and go on (the OTA below needs the agent's relay,
        # the rotation's telemetry the cloud's listener).
        _publish_as_service(line, service_port, "fleet/%s/telemetry" % name, NESTED_8K)
        _publish_as_service(line, service_port, "fleet/%s/cmd" % name, NESTED_8K)
        _until(agent_out, agent.proc, "1 message(s) refused", "the refused nesting")
        assert "Traceback" not in _text(agent_out)

        ota = ["--line", line, "--broker", service_url, "--device", name, "--timeout", "20"]
        out = _ok(_fleetid("ota", "rotate-scp03", *ota, "--new-master", "scp03-master-ota",
                           "--create-master", env=env))
        assert "relayed PUT KEY" in out and "SCP03 keys: rotated" in out, out
        assert "the old set KeySet('scp03-master', 0x31) no longer opens a session" in out
        _until(agent_out, agent.proc, "APDU(s) relayed to the SE", "the relay")

        # The firmware-signing certificate: refused with the old keys, installed with the new.
        hsm = json.loads(_text(os.path.join(line, "line.json")))["hsm"]
        fw_cert = str(tmp_path / "fw.pem")
        _ok(_fleetid("pki", "new-fw-key", "--hsm", hsm, "--root-label", "fleet-root",
                     "--root-cert", os.path.join(line, "pki", "ceremony", "root.pem"),
                     "--label", "fw-2027", "--name", "fw 2027", "--out", fw_cert, env=env))
        refused = _fleetid("ota", "install-fw-key", *ota, "--fw-cert", fw_cert, env=env)
        assert refused.returncode == 1 and "holds none of the key sets" in refused.stderr
        out = _ok(_fleetid("ota", "install-fw-key", *ota, "--fw-cert", fw_cert, "--slot", "b",
                           "--master", "scp03-master-ota", "--kvn", "0x32", env=env))
        assert "firmware certificate installed (DGI 7F05)" in out, out

        # A rotation on the cloud's command; the result comes back as telemetry.
        _ok(_fleetid("ota", "rotate", *ota, env=env))
        _until(agent_out, agent.proc, "BEGIN command: slot 2 -> 3", "rotation on command")
        _until(mq_cloud_out, mq_cloud.proc, "'slot': 3", "telemetry of the rotation")

        # A device that is not online: bounded wait, exit 1 with the reason.
        late = _fleetid("ota", "rotate", "--line", line, "--broker", service_url,
                        "--device", other, "--timeout", "2", env=env)
        assert late.returncode == 1 and "no answer within 2 s" in late.stderr, late.stderr
        unknown = _fleetid("ota", "rotate", "--line", line, "--broker", service_url,
                           "--device", "FID-000000099", env=env)
        assert unknown.returncode == 1 and "not in the line's registry" in unknown.stderr
        no_broker = _fleetid("ota", "rotate", "--line", line, "--broker",
                             "mqtts://127.0.0.1:%d" % free_port(), "--device", name, env=env)
        assert no_broker.returncode == 1 and "Connection refused" in no_broker.stderr

        # Revocation: the broker rewrites its CRL file (the device's next handshake is
        # refused), the cloud republishes the retained CRL, the online agent takes it.
        registry = "sqlite:" + os.path.join(line, "registry.db")
        _ok(_fleetid("cloud", "revoke-device", "--serial", other.split("-")[1].lstrip("0"),
                     "--registry", registry, env=env))
        _until(broker_out, broker.proc, "CRL file rewritten", "the broker's CRL reload")
        _wait_for(lambda: _text(mq_cloud_out).count("crl ca published retained") == 2,
                  mq_cloud.proc, "the republished CRL", 60)
        _wait_for(lambda: _text(agent_out).count("retained CRL -> cache: updated") == 2,
                  agent.proc, "the new CRL in the agent's cache", 60)
        _wait_for(lambda: len(re.findall(r"compact set #\d+ published retained",
                                         _text(mq_cloud_out))) == 2,
                  mq_cloud.proc, "the republished compact set", 60)
        _wait_for(lambda: _text(agent_out).count("retained compact set -> cache: updated")
                  == 2, agent.proc, "the new compact set in the agent's cache", 60)
        revoked_sock = str(tmp_path / "se2.sock")
        chip2 = sorted(glob.glob(os.path.join(line, "chips", "*", "se-*.nvm")))[1]  # other
        servers.append(_serve_chip(chip2, revoked_sock, env, str(tmp_path / "se2.log")))
        refused = _fleetid("agent", "run", "--bus", "sim:unix:" + revoked_sock, "--once",
                           "--cloud", "https://127.0.0.1:%d" % ports["verifier"],
                           "--mqtt", url, "--mqtt-timeout", "5", env=env)
        assert refused.returncode == 1 and "certificate_revoked" in refused.stderr, (
            refused.stdout + refused.stderr)

        _stop_cleanly(agent, agent_out, "agent: stopped")
        _stop_cleanly(mq_cloud, mq_cloud_out, "mqtt cloud: stopped; accepted 2, failed 0")
        assert "too_deep 1" in _text(mq_cloud_out)
        _stop_cleanly(broker, broker_out, "mqtt broker: stopped")
    finally:
        for server in reversed(servers):
            if not server.out.closed:
                server.stop()
