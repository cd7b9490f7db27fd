"""MQTT from the board over the SE-keyed TLS 1.3 client, under the real MicroPython
interpreter (unix port): micropython-lib's umqtt.simple on device/tls_socket.TlsSocket,
straight to the real broker (mosquitto, mutual TLS, a client certificate required) -- no
host tunnel and no host TLS.  The chip is a line-personalised one behind the emulator's
Unix socket: ECDHE in its transient key, the CertificateVerify signed by SIGN with the
identity key, the broker's chain checked to the fleet root with VERIFY.

Checked: the broker names the session by the certificate's CN (the telemetry arrives
under the device's identity); a retained CRL published while the device was offline
reaches it over TLS; a command (rotate) reaches it; no NVM write in the SE.

Heap: the script runs at its budget in tests/micropython/budgets.py ("run_mqtt_tls").
"""

import pytest

from tests.micropython.budgets import WORKFLOWS
from tests.micropython.mqtt_support import (check_session, rotate_once_seen,
                                            script_wait_and_report, umqtt_broker)
from tests.micropython.support import PRELUDE, Stage, open_se_script, parse, serve_chip

pytestmark = [pytest.mark.micropython, pytest.mark.timeout(300)]

SCRIPT = PRELUDE + open_se_script(*WORKFLOWS["run_mqtt_tls"][1][9:]) + r"""
import sys
import time

from fleetid.device.mqtt import DeviceChannel, UmqttTransport
from fleetid.device.tls_socket import SeTlsWrapper

anchors = [se.get_data(0x0111, -1, 65536)]  # DATA_TRUST_FLEET_ROOT
with open(CA, "rb") as f:
    chain = [se.get_cert(1), f.read()]
tls = SeTlsWrapper(se, 1, anchors, lambda: int(time.time()), "127.0.0.1",
                   client_chain=chain)
crls = []
rotations = []
transport = UmqttTransport(NAME, "127.0.0.1", PORT, tls=tls)
channel = DeviceChannel(transport, NAME, on_crl=lambda label, der: crls.append((label, der)),
                        on_rotate=lambda: rotations.append(1), clock=lambda: 1700000000)
print("granted", channel.start(crl_labels=("ca",)))
print("tls", tls.stream.info.version, tls.stream.info.suite,
      int(tls.stream.info.client_certificate), tls.ephemeral.operations)
gc.collect()
print("telemetry", channel.send_telemetry({"heap": gc.mem_free()}))
""" + script_wait_and_report(400) + r"""
print("ssl", int("ssl" in sys.modules or "tls" in sys.modules))
channel.close()
link.close()
bus.close()
gc.collect()
print("done", gc.mem_free())
"""


def test_umqtt_over_the_se_keyed_tls13_client_under_micropython(tmp_path):
    from cryptography.hazmat.primitives import serialization

    with umqtt_broker(tmp_path, devices=1) as (fleet, cloud, crl):
        stage = Stage(tmp_path / "stage", opt=3)
        name, _cert = fleet.device_name(fleet.session(0))
        ca = tmp_path / "ca.der"
        ca.write_bytes(fleet.line.ca_cert.public_bytes(serialization.Encoding.DER))
        chip = fleet.chips[0].chip
        chip.power_loss()
        writes = chip.nvm.write_count
        se_server, sock = serve_chip(chip, tmp_path, idle_timeout_s=60)
        helper = rotate_once_seen(cloud, name)
        header = "SOCK = %r\nNAME = %r\nPORT = %d\nCA = %r\n" % (
            sock, name, fleet.broker.port, str(ca))
        try:
            out = parse(stage.run("run_mqtt_tls", header + SCRIPT, timeout=200))
        finally:
            se_server.stop()
        helper.join(30)
        assert out["tls"] == ["TLSv1.3 TLS_AES_128_GCM_SHA256 1 2"]
        check_session(out, cloud, crl, name)
        assert out["ssl"] == ["0"]
        assert chip.nvm.write_count == writes  # the handshake wrote no NVM
