"""Broker authority does not come from a name (issue 16, item 3), against a real mosquitto.

A certificate from the issuing (device) CA named exactly like the cloud (CN fleet-cloud),
signed by that CA's own key in the line's HSM (what an insider, or the CA before it refused
reserved names, could make), is on the device listener just a device called
"fleet-cloud": it reads no device's telemetry, its commands and forged retained CRLs reach
nobody, and the service listener refuses its TLS handshake.  The real cloud certificate
(from the service CA) is refused on the device listener and has the whole tree on the
service listener.  The issuing CA refuses reserved names whatever path calls it."""

import datetime
import os
import queue
import threading

import paho.mqtt.client as paho_client
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from fleetid.cloud.pki.errors import PkiError
from fleetid.cloud.pki.profiles import device_builder, tls_certificate_builder
from fleetid.cloud.pki.signing import sign_certificate
from fleetid.common import mqttmsg
from tests.cloud.mqtt_support import MqttFleet

pytestmark = pytest.mark.timeout(180)
PEM = serialization.Encoding.PEM
WAIT = 10.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    made = MqttFleet(tmp_path_factory.mktemp("mqttid"), devices=1)
    yield made
    made.close()


def _rogue_cloud_files(fleet, folder):
    """A clientAuth certificate CN "fleet-cloud" signed by the *issuing* CA's key."""
    line = fleet.line
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = tls_certificate_builder(key.public_key(), line.ca_cert, "fleet-cloud", now)
    cert = sign_certificate(line.hsm, line.labels["ca"], builder, line.ca_cert.public_key())
    cert_path, key_path = os.path.join(folder, "rogue.pem"), os.path.join(folder, "rogue.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(PEM) + line.ca_cert.public_bytes(PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class Client:
    """A plain paho client with its key in a file (what an attacker holding a certificate
    and its key would run)."""

    def __init__(self, fleet, port, certfile, keyfile, name):
        self.inbox = queue.Queue()
        self.connected = threading.Event()
        self.refused = threading.Event()
        client = paho_client.Client(CallbackAPIVersion.VERSION2, client_id=name,
                                    protocol=paho_client.MQTTv311)
        client.tls_set(ca_certs=fleet.files["cafile"], certfile=certfile, keyfile=keyfile)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *args: self.refused.set()
        client.on_message = lambda c, u, m: self.inbox.put((m.topic, bytes(m.payload),
                                                            m.retain))
        self.client = client
        self.port = port
        self.host = fleet.broker.host

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        (self.refused if reason_code.is_failure else self.connected).set()

    def connect(self):
        """Returns: True when the broker accepted the session (CONNACK 0)."""
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except OSError:  # the TLS handshake refused the certificate
            return False
        self.client.loop_start()
        for _ in range(int(WAIT * 10)):
            if self.connected.is_set() or self.refused.is_set():
                break
            self.connected.wait(0.1)
        return self.connected.is_set()

    def subscribe(self, topic):
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic, 1)
        assert done.wait(WAIT)

    def publish(self, topic, payload, retain=False):
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published()

    def until(self, predicate):
        """Messages received up to and including the first one `predicate` accepts."""
        seen = []
        while True:
            item = self.inbox.get(timeout=WAIT)
            seen.append(item)
            if predicate(item):
                return seen

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_a_device_ca_certificate_named_like_the_cloud_gets_nothing(fleet, tmp_path):
    rogue_cert, rogue_key = _rogue_cloud_files(fleet, str(tmp_path))
    device = "FID-000000001"
    cloud = Client(fleet, fleet.broker.service_port, fleet.files["cloud_cert"],
                   fleet.files["cloud_key"], "fleet-cloud-observer")
    rogue = Client(fleet, fleet.broker.port, rogue_cert, rogue_key, "rogue-device-listener")
    assert cloud.connect(), fleet.broker.log()[-2000:]
    try:
        # The service listener: the rogue's handshake is refused (it does not chain to the
        # service CA, the listener's only anchor).
        at_service = Client(fleet, fleet.broker.service_port, rogue_cert, rogue_key,
                            "rogue-service-listener")
        assert not at_service.connect()
        at_service.client.loop_stop()
        # The real cloud certificate is refused on the device listener.
        cloud_at_devices = Client(fleet, fleet.broker.port, fleet.files["cloud_cert"],
                                  fleet.files["cloud_key"], "fleet-cloud-at-devices")
        assert not cloud_at_devices.connect()
        cloud_at_devices.client.loop_stop()

        # The device listener accepts the rogue (a valid device-CA chain), as a device
        # named "fleet-cloud": only its own subtree.
        assert rogue.connect()
        cloud.subscribe("fleet/#")
        rogue.subscribe("fleet/+/telemetry")
        rogue.subscribe(mqttmsg.topic(device, mqttmsg.COMMAND))
        rogue.subscribe(mqttmsg.crl_topic("+"))
        # Its publications: a command to a device, a forged retained CRL: dropped.
        rogue.publish(mqttmsg.topic(device, mqttmsg.COMMAND),
                      mqttmsg.encode({"seq": 10**15, "kind": "rotate"}))
        rogue.publish(mqttmsg.crl_topic("ca"), b"forged CRL", retain=True)
        # The cloud's own traffic afterwards: a device's telemetry topic and a command.
        cloud.publish(mqttmsg.topic(device, mqttmsg.TELEMETRY), b'{"seq": 1}')
        marker = mqttmsg.topic(device, mqttmsg.COMMAND)
        cloud.publish(marker, b'{"seq": 2, "kind": "ping"}')
        seen = cloud.until(lambda item: item[1] == b'{"seq": 2, "kind": "ping"}')
        assert [payload for _t, payload, _r in seen] == [b'{"seq": 1}',
                                                          b'{"seq": 2, "kind": "ping"}']
        # The rogue reads the retained CRLs (every device may) and nothing else: its queue
        # up to the cloud's next CRL publication holds no telemetry and no command.
        real_crl = fleet.crl_der("ca")
        cloud.publish(mqttmsg.crl_topic("ca"), real_crl, retain=True)
        got = rogue.until(lambda item: item[1] == real_crl and not item[2])
        assert all(topic.startswith("fleet/crl/") for topic, _p, _r in got), got
        assert all(payload != b"forged CRL" for _t, payload, _r in got)
        # A late subscriber gets the cloud's retained CRL, never the rogue's.
        late = Client(fleet, fleet.broker.service_port, fleet.files["cloud_cert"],
                      fleet.files["cloud_key"], "fleet-cloud-late")
        assert late.connect()
        try:
            late.subscribe(mqttmsg.crl_topic("ca"))
            assert late.inbox.get(timeout=WAIT)[1] == real_crl
        finally:
            late.close()
    finally:
        rogue.close()
        cloud.close()


def test_the_broker_files_give_no_name_authority_on_the_device_listener(fleet):
    with open(fleet.broker.acl_path) as f:
        device_acl = f.read()
    assert "user " not in device_acl and "fleet-cloud" not in device_acl
    assert "readwrite" not in device_acl
    with open(fleet.broker.conf_path) as f:
        conf = f.read()
    assert "per_listener_settings true" in conf
    assert "cafile %s" % fleet.files["service_cafile"] in conf


@pytest.mark.parametrize("name", ["fleet-cloud", "Fleet-Cloud", "FLEET-operator", "fleet-x"])
def test_the_issuing_ca_refuses_reserved_names(fleet, name):
    line = fleet.line
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    with pytest.raises(PkiError, match="reserved service name space"):
        device_builder("identity", name, key.public_key(), line.ca_cert, now)
    # The line's and EST's issuance path: refused before the CSR is even parsed.
    with pytest.raises(PkiError, match="reserved service name space"):
        line.issuing_ca.issue(b"not a CSR", b"\x01" * 8, name, "identity", now=now)
