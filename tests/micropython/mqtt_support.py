"""The broker side both umqtt tests under MicroPython share: test_mqtt_micropython.py (the
interpreter's plain MQTT through the host's SE-signed tunnel) and
test_mqtt_tls_micropython.py (the device's own SE-keyed TLS 1.3 client).

`umqtt_broker(tmp_path, devices)` skips without umqtt.simple (fails under CI), starts a
fleet with its broker (tests/cloud/mqtt_support.MqttFleet), connects the cloud and
publishes the issuing CA's CRL retained before any device is up; it yields
(fleet, cloud, crl) and closes both.  `rotate_once_seen` asks a device to rotate once its
telemetry is in; `script_wait_and_report(steps)` is the scripts' shared MicroPython tail
(step the channel until the CRL and the rotate command are in, print them) and
`check_session` the checks both tests make of its output.
"""

import contextlib
import threading

from fleetid.common import mqttmsg
from tests.cloud.mqtt_support import MqttFleet
from tests.conftest import require
from tests.micropython.support import MICROPYTHON_LIB

UMQTT = MICROPYTHON_LIB / "umqtt" / "simple.py"


@contextlib.contextmanager
def umqtt_broker(tmp_path, devices):
    """(fleet, cloud, crl): a running broker for `devices` chips, the cloud connected, the
    "ca" CRL's DER published retained."""
    require(UMQTT.exists(), "var/micropython-lib/umqtt/simple.py "
                            "(scripts/fetch_micropython_lib.py)")
    fleet = MqttFleet(tmp_path / "fleet", devices=devices)
    cloud = None
    try:
        cloud = fleet.cloud()
        cloud.connect()
        crl = fleet.crl_der("ca")
        cloud.publish_crl("ca", crl)  # retained, before the device is up
        yield fleet, cloud, crl
    finally:
        if cloud is not None:
            cloud.close()
        fleet.close()


def rotate_once_seen(cloud, name):
    """Start (and return) a thread that, once `name`'s telemetry is in (so it is
    subscribed), asks it to rotate."""

    def cloud_side():
        if cloud.sink.wait_for(lambda s: name in s.last, 60):
            cloud.request(name, mqttmsg.KIND_ROTATE, timeout=30)

    helper = threading.Thread(target=cloud_side, daemon=True)
    helper.start()
    return helper


def script_wait_and_report(steps):
    """MicroPython script lines (`channel`, `crls`, `rotations` and PRELUDE's `show` in
    scope): step the channel at most `steps` times 0.05 s until a CRL and a rotate command
    are in, then print them ("crl", "crlder", "rotations")."""
    return r"""
for _ in range(%d):
    channel.step(0.05)
    if crls and rotations:
        break
for label, der in crls:
    print("crl", label, len(der))
    show("crlder", der[:32])
print("rotations", len(rotations))
""" % steps


def check_session(out, cloud, crl, name):
    """One subscription granted, the retained CRL received whole, the rotate command
    received, the telemetry arrived under the device's identity with its sequence number."""
    assert out["granted"] == ["[1, 1]"]
    assert out["crl"] == ["ca %d" % len(crl)]
    assert out["crlder"] == [crl[:32].hex()]
    assert out["rotations"] == ["1"]
    seq = int(out["telemetry"][0])
    assert cloud.sink.last[name]["seq"] == seq and "heap" in cloud.sink.last[name]["m"]
