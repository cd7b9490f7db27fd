"""The device agent on MQTT (device/agent_mqtt.py): the real agent, line, EST and verifier
(tests/device/agent_support.Fleet), and a real mosquitto on the same PKI.  The agent's MQTT
session is TLS signed by its SE's identity key; a retained CRL feeds its CRL cache (verified
through the SE); a "rotate" command from the cloud runs an overlap rotation, whose result
comes back as telemetry."""

import threading

import pytest
from cryptography.hazmat.primitives import serialization

from fleetid.common import mqttmsg
from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.device import crl_cache
from fleetid.device.agent_mqtt import AgentMqtt
from fleetid.device.host.mqtt_paho import PahoSeTransport
from fleetid.device.mqtt import DeviceChannel
from tests.cloud.mqtt_support import MqttFleet
from tests.device.agent_support import Fleet

pytestmark = pytest.mark.timeout(300)


class MemoryStore:
    def __init__(self):
        self.data = None

    def load(self):
        return self.data

    def store(self, data):
        self.data = bytes(data)


def test_agent_takes_crls_and_rotation_commands_over_mqtt(tmp_path):
    fleet = Fleet(tmp_path / "agent", devices=1)
    mq = MqttFleet(tmp_path / "mqtt", line=fleet.cloud.line, chips=fleet.cloud.chips)
    cloud = mq.cloud()
    cloud.connect()
    channel = None
    try:
        line = fleet.cloud.line
        se = fleet.cloud.session(0)
        ca_point = line.ca_cert.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        cache = crl_cache.CrlCache(se, MemoryStore(), ca_point,
                                   line.ca_cert.subject.public_bytes())
        agent = fleet.agent(0, revocation=cache)
        name, _cert = mq.device_name(agent.se)
        protocol = ApduProtocol(fleet.cloud.chips[0].chip.process)
        transport = PahoSeTransport(agent.se, C.SLOT_IDENTITY, mq.chain_der(agent.se),
                                    [mq.root_der()], mq.broker.host, mq.broker.port)
        channel = DeviceChannel(transport, name, relay=protocol.transceive_raw)
        link = AgentMqtt(agent, channel)
        channel.start(crl_labels=("ca",))

        # First cycle: enrolment; its summary arrives as telemetry under the device's name.
        report = link.run()
        assert report.slot == C.SLOT_OPERATIONAL_A
        assert cloud.sink.wait_for(
            lambda s: s.last.get(name, {}).get("m", {}).get("agent", {}).get("slot") == 2, 10)

        # A retained CRL reaches the agent's cache, verified through the SE.
        cloud.publish_crl("ca", mq.crl_der("ca"))
        for _ in range(100):
            link.cycle(0.05)
            if link.crl_results:
                break
        assert link.crl_results == ["updated"]
        assert cache.status(fleet.clock.now())

        # The cloud asks for a rotation; the agent runs it at its next cycle.
        replies = []
        asker = threading.Thread(
            target=lambda: replies.append(cloud.request(name, mqttmsg.KIND_ROTATE)))
        asker.start()
        rotated = None
        for _ in range(200):
            rotated = link.cycle(0.05)
            if rotated is not None:
                break
        asker.join(20)
        assert replies and replies[0]["ok"] is True
        assert rotated.slot == C.SLOT_OPERATIONAL_B
        assert fleet.settled() == C.SLOT_OPERATIONAL_B
        assert cloud.sink.wait_for(
            lambda s: s.last.get(name, {}).get("m", {}).get("agent", {}).get("slot") == 3, 10)
    finally:
        if channel is not None:
            channel.close()
        cloud.close()
        mq.close()
        fleet.close()
