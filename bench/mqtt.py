#!/usr/bin/env python3
"""MQTT benchmark on loopback: the cloud side's telemetry throughput, and the time to
deliver a retained CRL to many subscribed devices, through a real mosquitto with the
fleet's configuration (mTLS, identity as user name, CRL file, per-device ACL).

    .venv/bin/python bench/mqtt.py [--devices 1000] [--publishers 20] [--seconds 10]
                                   [--quick]

telemetry   `--publishers` simulated devices in a child process (paho-mqtt, software TLS
            keys: this measures the cloud, not the SE) publish QoS 1 telemetry as fast as
            their PUBACKs allow; the cloud (fleetid.cloud.mqtt.service.CloudMqtt: JSON
            decode, per-device sequence check, device-standing check, sink) counts what it
            accepted.  Reported: accepted messages per second over the window, and the
            cloud process's CPU seconds per 1,000 messages.
crl         `--devices` simulated devices, each with its own certificate (CN = its name),
            connected and subscribed to fleet/crl/ca (QoS 1); the cloud publishes a CRL
            retained; reported: the time from publish until the last device has it, and
            the time for the same devices to get the retained copy when they
            (re)subscribe after it was published (the offline-device case).

Devices here hold software keys (Python's ssl) because 1,000 emulated SEs each running
the pure-Python TLS 1.3 client would measure that client and the emulators, not the
broker; the SE-keyed path is tested in
tests/cloud/test_mqtt_broker.py.  Everything runs on this machine: the broker, the cloud
and the devices share its cores, which the printed figures name.
"""

import argparse
import datetime
import multiprocessing
import os
import platform
import resource
import selectors
import sys
import tempfile
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import paho.mqtt.client as paho_client  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from fleetid.cloud.mqtt.broker import Broker, BrokerConfig, find_mosquitto  # noqa: E402
from fleetid.cloud.mqtt.service import CloudMqtt  # noqa: E402
from fleetid.common import mqttmsg  # noqa: E402

PEM = serialization.Encoding.PEM


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


class BenchPki:
    """A root that signs everything (bench only): server, cloud and device certificates,
    and an empty CRL for the broker's crlfile."""

    def __init__(self, folder):
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.now = now
        self.cert = (x509.CertificateBuilder().subject_name(_name("bench root"))
                     .issuer_name(_name("bench root")).public_key(self.key.public_key())
                     .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.cafile = _write(os.path.join(folder, "ca.pem"), self.cert.public_bytes(PEM))
        crl = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
               .last_update(now).next_update(now + datetime.timedelta(days=1))
               .add_extension(x509.CRLNumber(1), False).sign(self.key, hashes.SHA256()))
        self.crl_der = crl.public_bytes(serialization.Encoding.DER)
        self.crlfile = _write(os.path.join(folder, "crl.pem"), crl.public_bytes(PEM))
        # One device key for all device certificates (signing 1,000 keys would only cost
        # set-up time; each device still has its own certificate and name).
        self.device_key = ec.generate_private_key(ec.SECP256R1())
        self.device_keyfile = self._key_file("device", self.device_key)

    def _key_file(self, name, key):
        return _write(os.path.join(self.folder, name + ".key"), key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def broker_and_cloud(self):
        """(BrokerConfig, CloudMqtt factory(broker)) on this root: the broker's server
        certificate and the cloud's client certificate issued here.  Bench only: one root
        is the trust of both listeners (devices and services)."""
        server_cert, server_key = self.issue("broker", server=True)
        server_keyfile = self._key_file("broker", server_key)
        cloud_cert, cloud_key = self.issue("fleet-cloud")
        cloud_keyfile = self._key_file("fleet-cloud", cloud_key)
        config = BrokerConfig(self.cafile, server_cert, server_keyfile, self.crlfile,
                              self.cafile, self.crlfile)

        def cloud(broker):
            return CloudMqtt(broker.host, broker.service_port, self.cafile, cloud_cert,
                             cloud_keyfile)

        return config, cloud

    def issue(self, name, server=False, key=None):
        key = key or ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(name))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(self.now - datetime.timedelta(hours=1))
                   .not_valid_after(self.now + datetime.timedelta(days=1)))
        if server:
            import ipaddress

            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        cert = builder.sign(self.key, hashes.SHA256())
        certfile = _write(os.path.join(self.folder, name + ".pem"), cert.public_bytes(PEM))
        return certfile, key


def _device_client(pki, name, on_message=None):
    certfile = os.path.join(pki.folder, name + ".pem")
    client = paho_client.Client(CallbackAPIVersion.VERSION2, client_id=name,
                                protocol=paho_client.MQTTv311)
    client.tls_set(ca_certs=pki.cafile, certfile=certfile, keyfile=pki.device_keyfile)
    if on_message is not None:
        client.on_message = on_message
    return client


def _publisher(folder, cafile, keyfile, names, host, port, seconds, ready, counts):
    # Child process: each simulated device publishes QoS 1 telemetry in a loop.
    class P:
        pass

    pki = P()
    pki.folder, pki.cafile, pki.device_keyfile = folder, cafile, keyfile
    clients = []
    for name in names:
        client = _device_client(pki, name)
        client.max_inflight_messages_set(20)
        client.connect(host, port, keepalive=60)
        client.loop_start()
        clients.append((name, client))
    ready.set()
    deadline = time.monotonic() + seconds
    seq = {name: int(time.time() * 1000) for name in names}
    sent = 0
    while time.monotonic() < deadline:
        infos = []
        for name, client in clients:
            seq[name] += 1
            payload = mqttmsg.encode({"seq": seq[name], "m": {"t": 21.5, "n": sent}})
            infos.append(client.publish(mqttmsg.topic(name, mqttmsg.TELEMETRY), payload,
                                        qos=1))
            sent += 1
        for info in infos:
            info.wait_for_publish(10)
    counts.value = sent
    for _name, client in clients:
        client.disconnect()
        client.loop_stop()


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_telemetry(pki, broker, cloud, publishers, seconds):
    names = ["sim-pub-%04d" % i for i in range(publishers)]
    for name in names:
        pki.issue(name, key=pki.device_key)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    counts = ctx.Value("q", 0)
    proc = ctx.Process(target=_publisher, args=(pki.folder, pki.cafile, pki.device_keyfile,
                                                names, broker.host, broker.port, seconds,
                                                ready, counts))
    proc.start()
    if not ready.wait(120):
        raise RuntimeError("publishers did not connect")
    start_count = cloud.sink.metrics()["accepted"]
    start_cpu = cpu_seconds()
    start = time.monotonic()
    proc.join(seconds + 120)
    # Drain: what was PUBACKed by the broker reaches the cloud shortly after.
    cloud.sink.wait_for(lambda s: s.metrics()["accepted"] - start_count >= counts.value,
                        30)
    elapsed = time.monotonic() - start
    accepted = cloud.sink.metrics()["accepted"] - start_count
    cpu = cpu_seconds() - start_cpu
    return {"sent": counts.value, "accepted": accepted, "seconds": elapsed,
            "rate": accepted / elapsed, "cpu_ms_per_1000": 1e6 * cpu / max(accepted, 1),
            "replays": cloud.sink.metrics()["replay"]}


def bench_crl(pki, broker, cloud, devices):
    names = ["sim-dev-%05d" % i for i in range(devices)]
    for name in names:
        pki.issue(name, key=pki.device_key)
    received = {}
    subscribed = set()
    lock = threading.Lock()
    got_all = threading.Event()
    all_subscribed = threading.Event()
    topic = mqttmsg.crl_topic("bench")

    def on_message(client, userdata, message):
        with lock:
            received[userdata] = time.monotonic()
            if len(received) == devices:
                got_all.set()

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        with lock:
            subscribed.add(userdata)
            if len(subscribed) == devices:
                all_subscribed.set()

    connected = set()

    def on_connect(client, userdata, flags, reason_code, properties):
        with lock:
            connected.add(userdata)
        client.subscribe(topic, 1)

    stop = threading.Event()
    resubscribe = threading.Event()  # the offline case, asked of the driving thread
    clients = []

    def drive():
        # One thread drives every client through paho's external-loop API (socket(),
        # loop_read/loop_write/loop_misc) on epoll: paho's own loop() uses select(),
        # which cannot watch descriptors above 1023, and each client holds three.
        selector = selectors.DefaultSelector()
        for name in names:
            client = _device_client(pki, name, on_message)
            client.user_data_set(name)
            client.on_connect = on_connect
            client.on_subscribe = on_subscribe
            client.connect(broker.host, broker.port, keepalive=300)
            selector.register(client.socket(), selectors.EVENT_READ, client)
            with lock:
                clients.append(client)
            _service(selector, clients, 0.0)
        last_misc = time.monotonic()
        while not stop.is_set():
            if resubscribe.is_set():
                # Here, not from the main thread: an SSL socket must not be written by
                # one thread while another reads it (a SUBSCRIBE could be lost).
                resubscribe.clear()
                for client in clients:
                    client.subscribe(topic, 1)  # a new SUBSCRIBE re-sends the retained message
            _service(selector, clients, 0.01)
            if time.monotonic() - last_misc > 1.0:
                for client in clients:
                    client.loop_misc()
                last_misc = time.monotonic()

    t0 = time.monotonic()
    threads = [threading.Thread(target=drive, daemon=True)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 300
    while not all_subscribed.wait(10):
        print("  ... %d of %d devices connected, %d subscribed" % (
            len(connected), devices, len(subscribed)), flush=True)
        if time.monotonic() > deadline:
            raise RuntimeError("%d of %d devices subscribed" % (len(subscribed), devices))
    connect_seconds = time.monotonic() - t0
    publish_at = time.monotonic()
    cloud.publish_crl("bench", pki.crl_der)
    if not got_all.wait(120):
        raise RuntimeError("%d of %d devices got the CRL" % (len(received), devices))
    live = max(received.values()) - publish_at
    # The offline case: the same devices subscribe again and get the retained copy.
    with lock:
        received.clear()
        got_all.clear()
    resub_at = time.monotonic()
    resubscribe.set()
    if not got_all.wait(120):
        raise RuntimeError("retained: %d of %d devices" % (len(received), devices))
    retained = max(received.values()) - resub_at
    stop.set()
    for thread in threads:
        thread.join(10)
    for client in clients:
        client.disconnect()
    return {"devices": devices, "connect_seconds": connect_seconds, "live": live,
            "retained": retained}


def _service(selector, clients, timeout):
    for key, _events in selector.select(timeout):
        key.data.loop_read()
    for client in clients:
        sock = client.socket()
        if sock is not None and getattr(sock, "pending", lambda: 0)():
            client.loop_read()  # TLS records already decrypted inside the SSL object
        if client.want_write():
            client.loop_write()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="100 devices, 3 s")
    parser.add_argument("--json", dest="json_path", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.seconds = 100, 3.0
    if find_mosquitto() is None:
        sys.exit("mosquitto is not installed (apt-get install mosquitto)")
    print("machine: %s, %d cores, Python %s, mosquitto %s" % (
        platform.machine(), os.cpu_count(), platform.python_version(), _mosquitto_version()))
    with tempfile.TemporaryDirectory() as folder:
        pki = BenchPki(folder)
        config, make_cloud = pki.broker_and_cloud()
        with Broker(config, os.path.join(folder, "broker")) as broker:
            cloud = make_cloud(broker)
            cloud.connect()
            try:
                tel = bench_telemetry(pki, broker, cloud, args.publishers, args.seconds)
                print("telemetry: %d publishers (QoS 1), %.1f s: %d accepted by the cloud "
                      "= %.0f msg/s; cloud process CPU %.0f ms per 1,000 messages; replays refused %d" % (
                          args.publishers, tel["seconds"], tel["accepted"], tel["rate"],
                          tel["cpu_ms_per_1000"], tel["replays"]))
                crl = bench_crl(pki, broker, cloud, args.devices)
                print("retained CRL (%d B) to %d subscribed devices: %.3f s after publish; "
                      "retained copy on re-subscribe: %.3f s (devices connected in %.1f s)" % (
                          len(pki.crl_der), crl["devices"], crl["live"], crl["retained"],
                          crl["connect_seconds"]))
                if args.json_path:  # bench/report.py
                    from bench._report_support import figure, write_json

                    write_json(args.json_path, "mqtt", {"telemetry": tel, "crl": crl}, [
                        figure("telemetry accepted by the cloud", tel["rate"], "msg/s"),
                        figure("retained CRL on re-subscribe, %d devices" % crl["devices"],
                               crl["retained"], "s", "the same CRL live to subscribed devices",
                               crl["live"], higher_is_better=False)])
            finally:
                cloud.close()


def _mosquitto_version():
    import subprocess

    out = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True).stdout
    return out.split("\n", 1)[0].replace("mosquitto version ", "")


if __name__ == "__main__":
    main()
