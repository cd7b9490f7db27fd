"""One bounded JSON decoder for every network document (common/mqttmsg.decode_document),
and network callbacks that survive any message: fuzzed messages on every MQTT topic and
the verifier's /v1/telemetry, then the exact 8 KB `[[[...]]]` through a real mosquitto to
the cloud's client and to a device's channel, each of which must still handle a valid
message afterwards."""

import json
import queue
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleetid.cloud.mqtt.service import CloudMqtt, TelemetrySink
from fleetid.common import mqttmsg
from fleetid.device.mqtt import DeviceChannel, TransportError

pytestmark = pytest.mark.timeout(300)

NESTED_8K = b"[" * 4096 + b"]" * 4096  # the reported message: 8,192 bytes
DEVICE = "FID-000000001"


def test_the_reported_8k_nesting_is_a_typed_refusal_not_a_recursion_error():
    assert len(NESTED_8K) == mqttmsg.MAX_MESSAGE
    with pytest.raises(RecursionError):  # what the unbounded json.loads did
        json.loads(NESTED_8K)
    with pytest.raises(mqttmsg.MessageError) as refused:
        mqttmsg.decode_document(NESTED_8K)
    assert refused.value.reason == mqttmsg.MessageError.TOO_DEEP


def test_depth_bound_is_exact_and_strings_do_not_count():
    at_bound = b"[" * mqttmsg.MAX_DEPTH + b"]" * mqttmsg.MAX_DEPTH
    assert mqttmsg.decode_document(at_bound) == eval(at_bound.decode())
    with pytest.raises(mqttmsg.MessageError) as refused:
        mqttmsg.decode_document(b"[" + at_bound + b"]")
    assert refused.value.reason == mqttmsg.MessageError.TOO_DEEP
    brackets = '{"seq": 1, "s": "%s\\"[{", "e": "\\\\"}' % ("[" * 100)
    assert mqttmsg.decode(brackets.encode())["s"] == "[" * 100 + '"[{'
    with pytest.raises(mqttmsg.MessageError) as refused:
        mqttmsg.decode_document(b" " * (mqttmsg.MAX_MESSAGE + 1))
    assert refused.value.reason == mqttmsg.MessageError.TOO_LARGE


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=30)


def _nested(depth, opener):
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "{":
        return ('{"a":' * depth + "1" + "}" * depth).encode()
    return (opener * depth + closer * depth).encode()


payloads = st.one_of(
    st.binary(max_size=600),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda d, o: _nested(d, o), st.integers(0, 5000), st.sampled_from("[{")),
    st.builds(lambda seq, kind, extra: json.dumps(dict(extra, seq=seq, kind=kind)).encode(),
              st.integers(-2, 2**70), st.sampled_from(["apdu", "rotate", "ping", "x", 7]),
              st.dictionaries(st.sampled_from(["apdu", "re", "ok", "m", "resp"]),
                              json_values, max_size=3)),
)


@given(payloads)
@settings(max_examples=300, deadline=None)
def test_decode_document_raises_only_message_error(payload):
    try:
        mqttmsg.decode(payload)
    except mqttmsg.MessageError as exc:
        assert exc.reason in ("malformed", "too_large", "too_deep")


# -- the device's channel: every topic it can receive --------------------------------------


class QueueTransport:
    """device/mqtt.py's transport interface over an in-memory inbox."""

    def __init__(self):
        self.inbox = queue.Queue()
        self.published = []

    def connect(self):
        pass

    def subscribe(self, topic, qos=1):
        return qos

    def publish(self, topic, payload, retain=False, qos=1):
        self.published.append((topic, bytes(payload)))

    def poll(self, timeout):
        out = []
        while not self.inbox.empty():
            out.append(self.inbox.get_nowait())
        return out

    def close(self):
        pass


device_topics = st.sampled_from([
    mqttmsg.topic(DEVICE, mqttmsg.COMMAND), mqttmsg.topic(DEVICE, mqttmsg.TELEMETRY),
    mqttmsg.topic("FID-000000002", mqttmsg.COMMAND), mqttmsg.crl_topic("ca"),
    mqttmsg.crl_topic("revset"), "fleet/x", "other/topic/here", b"fleet/\xff/cmd"])


def _ping(channel, transport, seq):
    transport.published.clear()
    transport.inbox.put((mqttmsg.topic(DEVICE, mqttmsg.COMMAND),
                         mqttmsg.encode({"seq": seq, "kind": mqttmsg.KIND_PING})))
    channel.step(0)
    replies = [mqttmsg.decode(p) for t, p in transport.published]
    return [r for r in replies if r.get("re") == seq and r.get("ok")]


@given(st.lists(st.tuples(device_topics, payloads), min_size=1, max_size=8))
@example([(mqttmsg.topic(DEVICE, mqttmsg.COMMAND), b'{"seq":1180591620717411303424,"":""}')])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_device_channel_survives_any_message_on_any_topic(messages):
    def crl_handler(label, payload):  # a handler that itself breaks on some input
        if payload[:1] == b"[":
            raise ValueError("handler bug")

    def relay(apdu):
        raise OSError("link down")

    transport = QueueTransport()
    channel = DeviceChannel(transport, DEVICE, relay=relay, on_crl=crl_handler,
                            on_rotate=lambda: None, seq_start=1)
    for name, payload in messages:
        transport.inbox.put((name, payload))
    channel.step(0)  # never raises
    # A fresh command (above any seq the drawn messages used: hypothesis draws 2**70 too).
    fresh = channel.commands.highest("cloud") + 1
    assert _ping(channel, transport, fresh), "the channel stopped answering"


def test_a_failing_handler_is_counted_once_per_kind_and_the_channel_goes_on():
    transport = QueueTransport()

    def broken(label, payload):
        raise KeyError(label)

    channel = DeviceChannel(transport, DEVICE, on_crl=broken, seq_start=1)
    for _ in range(3):
        transport.inbox.put((mqttmsg.crl_topic("ca"), b"x"))
    transport.inbox.put((mqttmsg.topic(DEVICE, mqttmsg.COMMAND), NESTED_8K))
    channel.step(0)
    assert channel.failed == 3 and list(channel.failures) == ["KeyError"]
    assert channel.refused == 1  # the nesting: a typed refusal, not a failure
    assert _ping(channel, transport, 5)


def test_a_transport_error_still_ends_the_step_so_the_caller_reconnects():
    transport = QueueTransport()

    def lost(topic, payload, retain=False, qos=1):
        raise TransportError(TransportError.CLOSED, "gone")

    transport.publish = lost
    channel = DeviceChannel(transport, DEVICE, seq_start=1)
    transport.inbox.put((mqttmsg.topic(DEVICE, mqttmsg.COMMAND),
                         mqttmsg.encode({"seq": 1, "kind": "ping"})))
    with pytest.raises(TransportError):
        channel.step(0)


# -- the cloud's client: paho's on_message, without and with a broker -----------------------


class Message:
    def __init__(self, topic, payload):
        self.topic = topic
        self.payload = payload


cloud_topics = st.sampled_from([
    mqttmsg.topic(DEVICE, mqttmsg.TELEMETRY), mqttmsg.topic(DEVICE, mqttmsg.REPLY),
    mqttmsg.topic(DEVICE, mqttmsg.COMMAND), mqttmsg.crl_topic("ca"), "fleet/a/b/c", "x"])


@given(st.lists(st.tuples(cloud_topics, payloads), min_size=1, max_size=8))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_cloud_on_message_never_raises_and_goes_on(messages):
    flaky = {"calls": 0}

    def on_telemetry(device, fields):  # a sink that breaks (e.g. its store is down)
        flaky["calls"] += 1
        if "boom" in fields:
            raise RuntimeError("store down")

    cloud = CloudMqtt("127.0.0.1", 1, None, None, None, sink=TelemetrySink(on_telemetry),
                      clock=lambda: 1000.0)
    on_message = cloud.client.on_message
    for name, payload in messages:
        on_message(cloud.client, None, Message(name, payload))
    on_message(cloud.client, None, Message(mqttmsg.topic(DEVICE, mqttmsg.TELEMETRY),
                                           mqttmsg.encode({"seq": 2**80, "boom": 1})))
    on_message(cloud.client, None, Message(mqttmsg.topic(DEVICE, mqttmsg.TELEMETRY),
                                           mqttmsg.encode({"seq": 2**80 + 1, "m": {}})))
    assert cloud.sink.last[DEVICE]["seq"] == 2**80 + 1
    assert cloud.sink.metrics()["failed"] >= 1


def test_the_8k_nesting_through_mosquitto_leaves_cloud_and_device_listening(tmp_path):
    from fleetid.common import se_consts as C
    from fleetid.device.host.mqtt_paho import PahoSeTransport
    from tests.cloud.mqtt_support import MqttFleet

    fleet = MqttFleet(tmp_path, devices=1)
    try:
        cloud = fleet.cloud(client_id="fleet-cloud-bounds")
        cloud.connect()
        se = fleet.session(0)
        name, _ = fleet.device_name(se)
        link = PahoSeTransport(se, C.SLOT_IDENTITY, fleet.chain_der(se), [fleet.root_der()],
                               fleet.broker.host, fleet.broker.port, timeout=10)
        channel = DeviceChannel(link, name, clock=lambda: int(time.time()))
        channel.start()
        try:
            # The device's paho callbacks as installed: one that raises is survived, counted.
            link.client.on_message(link.client, None, object())  # no .topic: AttributeError
            link.client.on_subscribe(link.client, None, 1, None, None)
            assert link.callback_failures == 2
            # On the device's telemetry topic (the device's own identity publishes it).
            link.publish(mqttmsg.topic(name, mqttmsg.TELEMETRY), NESTED_8K)
            assert cloud.sink.wait_for(lambda s: s.metrics()["too_deep"] == 1, 10)
            seq = channel.send_telemetry({"after": 1})
            assert cloud.sink.wait_for(lambda s: s.last.get(name, {}).get("seq") == seq, 10)
            # On the device's command topic (the cloud's identity publishes it).
            info = cloud.client.publish(mqttmsg.topic(name, mqttmsg.COMMAND), NESTED_8K,
                                        qos=1)
            info.wait_for_publish(10)
            deadline = time.monotonic() + 10
            while channel.refused < 1 and time.monotonic() < deadline:
                channel.step(0.2)
            assert channel.refused == 1 and channel.failed == 0

            answered = []

            def answer():
                answered.append(cloud.request(name, mqttmsg.KIND_PING, timeout=10))

            import threading

            thread = threading.Thread(target=answer)
            thread.start()
            deadline = time.monotonic() + 15
            while thread.is_alive() and time.monotonic() < deadline:
                channel.step(0.2)
            thread.join(5)
            assert answered and answered[0]["ok"] is True
        finally:
            channel.close()
            cloud.close()
    finally:
        fleet.close()
