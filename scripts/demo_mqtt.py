#!/usr/bin/env python3
"""The MQTT step of the quick-start demo (scripts/demo.sh calls it; also usable alone):

    python scripts/demo_mqtt.py --line var/demo/line --bus sim:unix:var/demo/se.sock \
        --work var/demo/mqtt

1. a mosquitto broker on a free loopback port, on the line's PKI: mTLS with client
   certificates, user name = certificate CN, the CAs' CRLs as its crlfile, a per-device ACL;
2. the cloud publishes each CA's CRL retained, before the device is connected;
3. the device (its SE behind the bus) connects with TLS whose CertificateVerify its SE
   signs, sends telemetry (the cloud receives it under the device's name) and gets the
   retained CRL;
4. over-the-air SE administration through the device's relay: the cloud rotates the SE's
   SCP03 keys to a set diversified from a new HSM master (KVN 31 -> 32); the old set no
   longer opens a session.

Secrets: FLEETID_KEYSTORE_PASS for the line's keystore, as every line command.
"""

import argparse
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--line", required=True)
    parser.add_argument("--bus", required=True)
    parser.add_argument("--work", required=True)
    args = parser.parse_args(argv)

    from fleetid.cloud.line.workdir import open_line
    from fleetid.cloud.mqtt.broker import Broker
    from fleetid.cloud.mqtt.fleet_files import make_broker_files
    from fleetid.cloud.mqtt.service import CloudMqtt
    from fleetid.cloud.revocation import CrlIssuer, CrlPublisher
    from fleetid.device.mqtt import DeviceChannel
    from fleetid.device.stack import open_se

    line = open_line(args.line)
    stack = None
    broker = None
    cloud = None
    channel = None
    try:
        publisher = CrlPublisher(line.registry, [
            CrlIssuer("ca", line.hsm, line.labels["ca"], line.ca_cert),
            CrlIssuer("root", line.hsm, line.labels["root"], line.root_cert)])
        files = make_broker_files(line.hsm, line.labels["root"], line.root_cert,
                                  [line.ca_cert], publisher, os.path.join(args.work, "pki"))
        broker = Broker(files.config, os.path.join(args.work, "broker")).start()
        print("mqtt: mosquitto on %s:%d, services on %d (mTLS, identity = certificate CN, "
              "crlfile, ACL)" % (broker.host, broker.port, broker.service_port))
        cloud = CloudMqtt(broker.host, broker.service_port, files.cafile, files.cloud_cert,
                          files.cloud_key).connect()
        print("mqtt: cloud published retained CRLs: %s" % ", ".join(
            cloud.publish_crls(publisher)))

        stack = open_se(args.bus)
        se = stack.se
        name, transport = _device_transport(se, line, broker)
        crls = []
        channel = DeviceChannel(transport, name, relay=stack.protocol.transceive_raw,
                                on_crl=lambda label, crl: crls.append(label),
                                clock=lambda: int(time.time()))
        channel.start()
        _telemetry_and_retained_crls(channel, cloud, name, transport, crls)

        _ota_scp03_rotation(line, cloud, channel, se, name)
    finally:
        if channel is not None:
            channel.close()
        if cloud is not None:
            cloud.close()
        if broker is not None:
            broker.stop()
        if stack is not None:
            stack.close()
        line.close()


def _device_transport(se, line, broker):
    """(the device's name, its MQTT transport): TLS with the SE's identity key and
    certificate, the server checked to the fleet root the SE holds."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    from fleetid.common import se_consts as C
    from fleetid.device.host.mqtt_paho import PahoSeTransport

    identity = bytes(se.get_cert(C.SLOT_IDENTITY))
    name = x509.load_der_x509_certificate(identity).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME)[0].value
    ca_der = line.ca_cert.public_bytes(serialization.Encoding.DER)
    transport = PahoSeTransport(se, C.SLOT_IDENTITY, [identity, ca_der],
                                [bytes(se.get_data(C.DATA_TRUST_FLEET_ROOT, -1, 65536))],
                                broker.host, broker.port, timeout=20)
    return name, transport


def _telemetry_and_retained_crls(channel, cloud, name, transport, crls):
    """Step 3: the device sends telemetry the cloud must receive under its name, and gets
    the CRLs retained while it was offline (into `crls`); exits the demo if either is
    missing after 10 s."""
    print("mqtt: device %s connected; TLS CertificateVerify signed in its SE (%d)"
          % (name, transport.tls_client.signatures))
    seq = channel.send_telemetry({"uptime_s": 42, "fw": "1.2.3"})
    deadline = time.monotonic() + 10
    while (len(crls) < 2 or name not in cloud.sink.last) and time.monotonic() < deadline:
        channel.step(0.1)
    got = cloud.sink.last.get(name, {})
    if got.get("seq") != seq or sorted(crls) != ["ca", "root"]:
        sys.exit("demo_mqtt: telemetry or retained CRLs missing")
    print("mqtt: cloud received telemetry seq %d from %s: %s" % (seq, name, got["m"]))
    print("mqtt: device received the retained CRLs published while it was offline: %s"
          % ", ".join(sorted(crls)))


def _ota_scp03_rotation(line, cloud, channel, se, name):
    """Step 4: the cloud rotates the SE's SCP03 keys over the air (KVN 31 -> 32), the
    device relaying the APDUs; then the old set must no longer open a session."""
    from fleetid.cloud.mqtt.ota import KeySet, OtaError, open_admin, rotate_scp03_keys
    from fleetid.common import se_consts as C
    from fleetid.common.host.hostcrypto import CryptographyPrimitives

    # OTA: the device relays SCP03 APDUs between the HSM's keys and its SE.
    stop = threading.Event()
    pump = threading.Thread(target=lambda: [channel.step(0.05)
                                            for _ in iter(stop.is_set, True)], daemon=True)
    pump.start()
    try:
        new_master = "scp03-master-ota"
        try:
            line.hsm.create_master_key(new_master)
        except Exception:  # noqa: BLE001 - already there (a second demo run)
            pass
        old = KeySet(line.labels["master"], C.SCP03_KVN_DEVICE)
        new = KeySet(new_master, C.SCP03_KVN_DEVICE + 1)
        prims = CryptographyPrimitives()
        channel_apdu = cloud.apdu_channel(name, timeout=30)
        se_uid = se.uid()
        result = rotate_scp03_keys(line.hsm, channel_apdu, prims, se_uid, old, new)
        print("mqtt: OTA SCP03 key rotation relayed by the device (level 0x33): %s, "
              "KVN %02X -> %02X, %d APDUs relayed" % (result, old.kvn, new.kvn,
                                                      channel.relayed))
        try:
            open_admin(line.hsm, channel_apdu, prims, se_uid, [old]).close()
            sys.exit("demo_mqtt: the old SCP03 keys still work")
        except OtaError:
            print("mqtt: the old SCP03 key set no longer opens a session")
    finally:
        stop.set()
        pump.join(10)


if __name__ == "__main__":
    main()
