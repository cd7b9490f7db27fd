"""The device's MQTT channel under the real MicroPython interpreter (unix port) with
micropython-lib's umqtt.simple, against the real broker.

umqtt.simple 1.3.4 comes from PyPI by name, pinned by version and sha256
(scripts/fetch_micropython_lib.py, run by scripts/setup.sh --test) and is staged beside the
compiled core, as firmware gets it from `require("umqtt.simple")`.  MicroPython's own TLS
needs the client key in RAM, which fleetid never allows, so the interpreter's plain MQTT
goes through the host's SE-signed TLS tunnel (device/host/mqtt_paho.SeTlsTunnel): the
broker authenticates the chip's SE key and names the session by its certificate CN.

Checked: telemetry arrives at the cloud under the device's identity; a retained CRL
published while the device was offline reaches it; a command (ping) is answered with the
device's sequence number; a publication under another device's topic never reaches the
cloud; a command nested 600 deep is refused (the bracket scan, not a parser recursion).
"""

import pytest

from fleetid.common import se_consts as C
from fleetid.device.host.mqtt_paho import PahoSeTransport, SeTlsTunnel
from tests.micropython.mqtt_support import (check_session, rotate_once_seen,
                                            script_wait_and_report, umqtt_broker)
from tests.micropython.support import PRELUDE, Stage, parse

pytestmark = [pytest.mark.micropython, pytest.mark.timeout(300)]

SCRIPT = PRELUDE + r"""
for name in ("fleetid.common.mqttmsg", "fleetid.device.mqtt", "umqtt.simple"):
    __import__(name)
    gc.collect()
from fleetid.device.mqtt import DeviceChannel, UmqttTransport

# Nesting far deeper than MAX_DEPTH on the command topic (issue 16): at this heap
# MicroPython's json.loads runs out of memory (MemoryError, not ValueError) at 600 levels;
# the bracket scan refuses it first (a typed refusal, counted; nothing sent on a refusal
# without a sequence number).  Done before the session, while the heap is unfragmented.
deep = bytearray(1200)  # one allocation: [ x 600, then ] x 600
for i in range(600):
    deep[i] = 0x5B
    deep[600 + i] = 0x5D
probe = DeviceChannel(None, NAME)
probe.handle("fleet/" + NAME + "/cmd", deep)
deep = None
print("deep", probe.refused, probe.failed)
probe = None
gc.collect()

crls = []
rotations = []
transport = UmqttTransport(NAME, "127.0.0.1", PORT)
channel = DeviceChannel(transport, NAME, on_crl=lambda label, der: crls.append((label, der)),
                        on_rotate=lambda: rotations.append(1), clock=lambda: 1700000000)
print("granted", channel.start(crl_labels=("ca",)))
gc.collect()
print("telemetry", channel.send_telemetry({"heap": gc.mem_free()}))
# A publication under another device's topic (the broker's ACL drops it).
transport.publish("fleet/" + OTHER + "/telemetry", b'{"seq":1,"m":{"forged":1}}')
""" + script_wait_and_report(200) + r"""
print("refused", channel.refused)
channel.close()
gc.collect()
print("done", gc.mem_free())
"""


def test_umqtt_channel_under_micropython_against_the_broker(tmp_path):
    with umqtt_broker(tmp_path, devices=2) as (fleet, cloud, crl):
        stage = Stage(tmp_path / "stage", opt=3)  # stages umqtt/simple.py from var/ too
        se = fleet.session(0)
        name, _cert = fleet.device_name(se)
        other, _ = fleet.device_name(fleet.session(1))
        host_side = PahoSeTransport(se, C.SLOT_IDENTITY, fleet.chain_der(se),
                                    [fleet.root_der()], fleet.broker.host, fleet.broker.port)
        tunnel = SeTlsTunnel(host_side.tls_client, fleet.broker.host, fleet.broker.port)
        port = tunnel.open()
        tunnel.dangerous_authorise_first_peer()  # the peer is the micropython child
        helper = rotate_once_seen(cloud, name)
        script = "NAME = %r\nOTHER = %r\nPORT = %d\n" % (name, other, port) + SCRIPT
        try:
            out = parse(stage.run("run_mqtt", script, timeout=120))
        finally:
            tunnel.close()
        helper.join(30)
        check_session(out, cloud, crl, name)
        assert out["refused"] == ["0"]
        assert out["deep"] == ["1 0"]  # refused, not failed
        assert other not in cloud.sink.last  # the forged publication was dropped
        assert host_side.tls_client.signatures == 1  # the TLS signature: in the SE
