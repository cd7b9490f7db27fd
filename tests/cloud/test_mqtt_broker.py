"""The fleet's MQTT channel against a real mosquitto: devices on CPython speak paho-mqtt
through TLS whose client key stays in their emulated SE (device/host/mqtt_paho.py); the
cloud speaks paho-mqtt with its own certificate (cloud/mqtt/service.py)."""

import threading
import time

import pytest

from fleetid.common import mqttmsg
from fleetid.common import se_consts as C
from fleetid.device.host.mqtt_paho import PahoSeTransport
from fleetid.device.mqtt import DeviceChannel, TransportError
from tests.cloud.mqtt_support import MqttFleet

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    made = MqttFleet(tmp_path_factory.mktemp("mqtt"), devices=3)
    yield made
    made.close()


@pytest.fixture
def cloud(fleet):
    client = fleet.cloud(client_id="fleet-cloud-%d" % time.monotonic_ns())
    client.connect()
    yield client
    client.close()


def transport(fleet, index):
    se = fleet.session(index)
    name, _cert = fleet.device_name(se)
    return name, se, PahoSeTransport(se, C.SLOT_IDENTITY, fleet.chain_der(se),
                                     [fleet.root_der()], fleet.broker.host, fleet.broker.port,
                                     timeout=10)


def test_telemetry_arrives_under_the_identity_the_se_key_proved(fleet, cloud):
    name, se, link = transport(fleet, 0)
    channel = DeviceChannel(link, name, clock=lambda: int(time.time()))
    channel.start()
    try:
        seq = channel.send_telemetry({"temp": 21.5})
        assert cloud.sink.wait_for(lambda s: s.last.get(name, {}).get("seq") == seq, 10)
        assert cloud.sink.last[name]["m"] == {"temp": 21.5}
        # TLS 1.3 with the CertificateVerify signed in the SE: the tunnel's client counted
        # one SIGN, and the broker's chain was checked by the SE's VERIFY.
        assert link.tls_client.last_info.version == "TLSv1.3"
        assert link.tls_client.signatures == 1 and link.tls_client.verifications >= 2
    finally:
        channel.close()


def test_replayed_telemetry_is_refused_by_the_cloud(fleet, cloud):
    name, se, link = transport(fleet, 0)
    link.connect()
    try:
        topic = mqttmsg.topic(name, mqttmsg.TELEMETRY)
        link.publish(topic, mqttmsg.encode({"seq": 10**15, "m": {"n": 1}}))
        assert cloud.sink.wait_for(lambda s: s.last.get(name, {}).get("seq") == 10**15, 10)
        before = cloud.sink.metrics()["replay"]
        link.publish(topic, mqttmsg.encode({"seq": 10**15, "m": {"n": 2}}))  # captured copy
        assert cloud.sink.wait_for(lambda s: s.metrics()["replay"] == before + 1, 10)
        assert cloud.sink.last[name]["m"] == {"n": 1}
    finally:
        link.close()


def test_a_device_cannot_publish_or_subscribe_outside_its_own_topics(fleet, cloud):
    name_a, _se_a, link_a = transport(fleet, 0)
    name_b, _se_b, link_b = transport(fleet, 1)
    link_a.connect()
    link_b.connect()
    try:
        assert link_a.subscribe(mqttmsg.topic(name_a, mqttmsg.COMMAND)) == 1
        assert link_a.subscribe(mqttmsg.crl_topic("ca")) == 1
        # mosquitto 2.0 answers an MQTT 3.1.1 SUBSCRIBE the ACL denies with a grant
        # (3.1.1 has no "not authorised" code) but delivers nothing through it: the ACL
        # is checked per message.  So what is proven is the delivery, below.
        for foreign in (mqttmsg.topic(name_b, mqttmsg.COMMAND),
                        mqttmsg.topic(name_b, mqttmsg.TELEMETRY), "fleet/#", "#"):
            link_a.subscribe(foreign)
        assert link_b.subscribe(mqttmsg.topic(name_b, mqttmsg.COMMAND)) == 1
        # Publishing as B, a command to B, a retained CRL: dropped by the broker.
        accepted = cloud.sink.metrics()["accepted"]
        link_a.publish(mqttmsg.topic(name_b, mqttmsg.TELEMETRY),
                       mqttmsg.encode({"seq": 10**16, "m": {"forged": True}}))
        link_a.publish(mqttmsg.topic(name_b, mqttmsg.COMMAND),
                       mqttmsg.encode({"seq": 10**16, "kind": "forged"}))
        link_a.publish(mqttmsg.crl_topic("ca"), b"forged", retain=True)
        # What the cloud sends B and what B publishes reach only their addressees.
        seq_cmd = cloud.send_command(name_b, mqttmsg.KIND_PING)
        seq = int(time.time() * 1000)
        link_b.publish(mqttmsg.topic(name_b, mqttmsg.TELEMETRY),
                       mqttmsg.encode({"seq": seq, "m": {"real": True}}))
        assert cloud.sink.wait_for(lambda s: s.last.get(name_b, {}).get("seq") == seq, 10)
        assert cloud.sink.metrics()["accepted"] == accepted + 1
        got_b = link_b.poll(5)
        assert [(t, mqttmsg.decode(p)["seq"]) for t, p in got_b] == [
            (mqttmsg.topic(name_b, mqttmsg.COMMAND), seq_cmd)]
        got_a = link_a.poll(1)
        assert all(t == mqttmsg.crl_topic("ca") or t.startswith("fleet/crl/") for t, _ in got_a)
        assert all(p != b"forged" for _t, p in got_a)
    finally:
        link_a.close()
        link_b.close()


def test_a_retained_crl_reaches_a_device_that_was_offline_when_it_was_published(fleet, cloud):
    der = fleet.crl_der("ca")
    assert cloud.publish_crls(fleet.publisher) == ["ca", "root"]  # no device is connected
    name, se, link = transport(fleet, 2)
    got = []
    channel = DeviceChannel(link, name, on_crl=lambda label, crl: got.append((label, crl)))
    channel.start(crl_labels=("ca",))
    try:
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            channel.step(0.2)
        assert got == [("ca", der)]
    finally:
        channel.close()


def test_commands_are_replay_safe_on_the_device(fleet, cloud):
    name, se, link = transport(fleet, 1)
    channel = DeviceChannel(link, name)
    channel.start()
    stop = threading.Event()
    pump = threading.Thread(target=lambda: [channel.step(0.1) for _ in iter(stop.is_set, True)])
    pump.start()
    try:
        seq = cloud.next_seq()
        captured = mqttmsg.encode({"seq": seq, "t": int(time.time()), "kind": "ping"})
        topic = mqttmsg.topic(name, mqttmsg.COMMAND)
        cloud.client.publish(topic, captured, qos=1).wait_for_publish(10)
        assert cloud.wait_reply(name, seq)["ok"] is True
        # The same command again (a duplicate, or a copy replayed by whoever could publish
        # there): the device refuses its sequence number.
        cloud.client.publish(topic, captured, qos=1).wait_for_publish(10)
        reply = cloud.wait_reply(name, seq)
        assert reply["ok"] is False and reply["error"] == "replay"
    finally:
        stop.set()
        pump.join(10)
        channel.close()


def test_a_revoked_device_is_refused_by_the_broker_and_by_the_cloud(tmp_path):
    fleet = MqttFleet(tmp_path, devices=1)
    try:
        cloud = fleet.cloud()
        cloud.connect()
        name, se, link = transport(fleet, 0)
        link.connect()  # connected before the revocation
        _name, cert = fleet.device_name(se)
        fleet.revoke(cert)
        # The cloud refuses what the still-open session sends ...
        link.publish(mqttmsg.topic(name, mqttmsg.TELEMETRY),
                     mqttmsg.encode({"seq": 1, "m": {}}))
        assert cloud.sink.wait_for(lambda s: s.metrics()["refused_device"] == 1, 10)
        assert name not in cloud.sink.last
        link.close()
        # ... and the broker, its CRL reloaded, refuses the next TLS handshake.
        _n, _s, again = transport(fleet, 0)
        with pytest.raises(TransportError) as refused:
            again.connect()
        assert refused.value.reason == TransportError.CONNECT
        assert "certificate_revoked" in str(refused.value)  # the broker's TLS alert
        again.close()
        cloud.close()
    finally:
        fleet.close()


def test_commands_are_refused_after_a_restart_when_the_window_is_in_the_se(fleet, cloud):
    from fleetid.device.mqtt import se_command_window

    name, se, link = transport(fleet, 2)
    channel = DeviceChannel(link, name, commands=se_command_window(se))
    channel.start()
    stop = threading.Event()
    pump = threading.Thread(target=lambda: [channel.step(0.1) for _ in iter(stop.is_set, True)])
    pump.start()
    seq = cloud.next_seq()
    captured = mqttmsg.encode({"seq": seq, "t": int(time.time()), "kind": "ping"})
    topic = mqttmsg.topic(name, mqttmsg.COMMAND)
    try:
        cloud.client.publish(topic, captured, qos=1).wait_for_publish(10)
        assert cloud.wait_reply(name, seq)["ok"] is True
    finally:
        stop.set()
        pump.join(10)
        channel.close()
    # The device restarts (RAM gone); its window comes back from the SE data object.
    name, se, link = transport(fleet, 2)
    channel = DeviceChannel(link, name, commands=se_command_window(se),
                            clock=lambda: int(time.time()))
    channel.start()
    stop.clear()
    pump = threading.Thread(target=lambda: [channel.step(0.1) for _ in iter(stop.is_set, True)])
    pump.start()
    try:
        cloud.client.publish(topic, captured, qos=1).wait_for_publish(10)
        reply = cloud.wait_reply(name, seq)
        assert reply["ok"] is False and reply["error"] == "replay"
        assert se.read_object(C.DATA_OBJECT_MQTT_SEQ) == seq.to_bytes(8, "big")
    finally:
        stop.set()
        pump.join(10)
        channel.close()
