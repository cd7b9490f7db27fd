"""The fleet cloud's MQTT client (paho-mqtt): retained CRLs out, commands out, telemetry and
command replies in.

    cloud = CloudMqtt(host, port, cafile, certfile, keyfile, device_refusal=refusal_fn,
                      sink=TelemetrySink())
    cloud.connect()
    cloud.publish_crl("b42", crl_der)               # retained: late subscribers get it
    reply = cloud.request(device, "ping")           # command, then wait for its reply
    channel = cloud.apdu_channel(device)            # transceive(apdu) -> response over MQTT
    cloud.sink.metrics()                            # received / refused counters
    cloud.close()

Trust: the broker authenticates every client by its certificate, names it by the
certificate CN, and its ACL lets a device publish only under fleet/<its CN>/ (broker.py):
so the <device> level of a telemetry or reply topic *is* the TLS identity that sent it.
On top, the cloud refuses messages from devices the registry no longer trusts
(`device_refusal`, e.g. revoked: the broker refuses their new connections through its CRL,
and this closes the window of a session opened before the revocation) and replayed or
reordered messages (SeqWindow per device and topic).

A broker restart: paho reconnects (bounded backoff, RECONNECT_MAX_DELAY), the
subscriptions are renewed on every CONNACK, and the retained CRLs this client published
are published again (the fleet's mosquitto runs without persistence, so a restarted
broker holds no retained message; a device subscribing after the restart must still get
the current CRL).  QoS 1 messages in flight are resent by paho; their duplicates are
refused by the sequence windows.

Commands carry this client's own strictly increasing sequence numbers (start: the
wall-clock milliseconds, so a restarted cloud keeps increasing them); devices refuse any
number not above the last they took.
"""

import logging
import threading
import time

import paho.mqtt.client as paho_client
from paho.mqtt.enums import CallbackAPIVersion

from fleetid.common import mqttmsg
from fleetid.common.errors import FleetidError

DEFAULT_TIMEOUT = 10.0
# paho reconnects by itself after a lost connection (a broker restart), waiting 1, 2, 4 ...
# seconds between attempts, capped here: a restarted broker is found again within this
# bound after it listens (paho's default cap, 120 s, would leave the fleet unserved).
RECONNECT_MIN_DELAY = 1
RECONNECT_MAX_DELAY = 4
QOS = 1  # at least once: duplicates are caught by the sequence numbers
_log = logging.getLogger("fleetid.cloud.mqtt")


class MqttError(FleetidError):
    """The MQTT exchange failed.  reason: CONNECT, TIMEOUT, REFUSED (the device answered
    ok=false: `reply` has its answer)."""

    CONNECT = "connect"
    TIMEOUT = "timeout"
    REFUSED = "refused"

    def __init__(self, reason, detail="", reply=None):
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail
        self.reply = reply


class TelemetrySink:
    """Keeps the last telemetry of each device and counters (thread-safe).

    Params: on_telemetry: optional fn(device, fields) called for each accepted message
        (e.g. a write into the registry or a time-series store).
    """

    def __init__(self, on_telemetry=None):
        self._lock = threading.RLock()  # wait_for's predicate may call metrics()
        self.last = {}
        self.counts = {"accepted": 0, "replay": 0, "malformed": 0, "refused_device": 0,
                       "too_deep": 0, "too_large": 0, "failed": 0}
        self.on_telemetry = on_telemetry
        self._event = threading.Condition(self._lock)

    def accept(self, device, fields):
        with self._lock:
            self.last[device] = fields
            self.counts["accepted"] += 1
            self._event.notify_all()
        if self.on_telemetry is not None:
            self.on_telemetry(device, fields)

    def refuse(self, what):
        with self._lock:
            self.counts[what] += 1
            self._event.notify_all()

    def metrics(self):
        """A copy of the counters."""
        with self._lock:
            return dict(self.counts)

    def wait_for(self, predicate, timeout):
        """Wait until predicate(sink) is true.  Returns: its last value."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = predicate(self)
                left = deadline - time.monotonic()
                if value or left <= 0:
                    return value
                self._event.wait(left)


class CallbackGuard:
    """Keeps paho's network thread alive: paho re-raises an exception from a callback out
    of its loop, which ends the thread (the process stays up and handles nothing more).
    A guarded callback logs the first failure of each exception type (a flood of bad
    messages must not flood the log) and counts every one in `sink`'s "failed" counter.

    Params: sink: TelemetrySink (its "failed" counter).  log: logging.Logger.
    """

    def __init__(self, sink, log=_log):
        self.sink = sink
        self.log = log
        self._seen = set()

    def wrap(self, callback):
        """fn(*args) -> callback(*args), never raising."""

        def guarded(*args):
            try:
                return callback(*args)
            except Exception as exc:  # any message, any bug: the thread must survive
                self.failed(callback, exc)
            return None

        return guarded

    def failed(self, callback, exc):
        self.sink.refuse("failed")
        kind = type(exc).__name__
        if kind not in self._seen:
            self._seen.add(kind)
            self.log.warning("MQTT %s failed (%s: %s); further %s failures only counted "
                             "(metric 'failed')", getattr(callback, "__name__", "callback"),
                             kind, str(exc)[:200], kind)


def registry_refusal(registry, parse_serial):
    """A device_refusal function over a Registry: the reason a device's messages are
    refused ("unknown", "revoked", "held", ...) or None when it is in good standing.

    Params: parse_serial: fn(device name) -> registry serial (int), raising ValueError.
    """

    def refusal(device):
        try:
            record = registry.get_device(parse_serial(device))
        except Exception:  # ValueError, DeviceNotFound: not ours
            return "unknown"
        return None if record.status == "committed" else record.status

    return refusal


class CloudMqtt:
    """The cloud's MQTT session.

    Params: host, port: the broker.  cafile: CA bundle the broker's certificate chains to.
        certfile, keyfile: this client's certificate (CN = the cloud identity the ACL
        names) and key.  client_id: MQTT client id.  sink: TelemetrySink.
        device_refusal: fn(device) -> reason or None (default: every device accepted).
        clock: () -> seconds (message timestamps; the first command sequence number).
    """

    def __init__(self, host, port, cafile, certfile, keyfile, client_id="fleet-cloud",
                 sink=None, device_refusal=None, clock=time.time):
        self.host = host
        self.port = port
        self.sink = sink or TelemetrySink()
        self.device_refusal = device_refusal or (lambda device: None)
        self.clock = clock
        self._seq = int(clock() * 1000)
        self._lock = threading.Lock()
        self._replies = {}  # (device, command seq) -> reply fields
        self._reply_cond = threading.Condition(self._lock)
        self._windows = mqttmsg.SeqWindow()
        self._connected = threading.Event()
        self._retained = {}  # topic -> payload: published again after each reconnection
        self.connections = 0  # CONNACKs accepted (1 + reconnections)
        self.refused_replies = 0
        client = paho_client.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                    protocol=paho_client.MQTTv311, clean_session=True)
        client.tls_set(ca_certs=cafile, certfile=certfile, keyfile=keyfile)
        client.reconnect_delay_set(RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY)
        self.guard = CallbackGuard(self.sink)
        client.on_connect = self.guard.wrap(self._on_connect)
        client.on_message = self.guard.wrap(self._on_message)
        self.client = client

    # -- connection ----------------------------------------------------------------------

    def connect(self, timeout=DEFAULT_TIMEOUT):
        """Connect, subscribe to every device's telemetry and replies, start the network
        thread.  Raises: MqttError(CONNECT / TIMEOUT)."""
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise MqttError(MqttError.CONNECT, str(exc)) from None
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.client.loop_stop()
            raise MqttError(MqttError.TIMEOUT, "CONNACK")
        return self

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        client.subscribe([(mqttmsg.topic("+", mqttmsg.TELEMETRY), QOS),
                          (mqttmsg.topic("+", mqttmsg.REPLY), QOS)])
        with self._lock:
            retained = list(self._retained.items())
            self.connections += 1
            again = self.connections > 1
        if again:
            _log.warning("MQTT reconnected to %s:%d (connection %d); %d retained "
                         "message(s) published again", self.host, self.port,
                         self.connections, len(retained))
        for topic, payload in retained:  # queued; paho sends them on this connection
            client.publish(topic, payload, qos=QOS, retain=True)
        self._connected.set()

    def close(self):
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()

    # -- incoming ------------------------------------------------------------------------

    def _on_message(self, client, userdata, message):
        try:
            device, leaf = mqttmsg.split_topic(message.topic)
            fields = mqttmsg.decode(message.payload)
        except mqttmsg.MessageError as exc:
            self.sink.refuse(exc.reason if exc.reason in self.sink.counts else "malformed")
            return
        if device is None:
            return
        if self.device_refusal(device) is not None:
            self.sink.refuse("refused_device") if leaf == mqttmsg.TELEMETRY else None
            return
        try:
            self._windows.accept((device, leaf), fields["seq"])
        except mqttmsg.MessageError:
            if leaf == mqttmsg.TELEMETRY:
                self.sink.refuse("replay")
            return
        if leaf == mqttmsg.TELEMETRY:
            self.sink.accept(device, fields)
        elif leaf == mqttmsg.REPLY and isinstance(fields.get("re"), int):
            with self._lock:
                self._replies[(device, fields["re"])] = fields
                self._reply_cond.notify_all()

    # -- outgoing ------------------------------------------------------------------------

    def publish_crl(self, label, crl_der, timeout=DEFAULT_TIMEOUT):
        """Publish the DER CRL of CA `label` retained on fleet/crl/<label>: the broker
        keeps it and hands it to every device that subscribes later (offline ones on
        reconnect).  Raises: MqttError(TIMEOUT) if the broker did not acknowledge."""
        topic, payload = mqttmsg.crl_topic(label), bytes(crl_der)
        with self._lock:
            self._retained[topic] = payload
        info = self.client.publish(topic, payload, qos=QOS, retain=True)
        self._wait(info, timeout)

    def publish_crls(self, publisher, labels=None, timeout=DEFAULT_TIMEOUT):
        """publish_crl for each label of a CrlPublisher (cloud/revocation), its current
        CRL (rebuilt there when revocation changed).  Returns: the labels published."""
        labels = publisher.labels() if labels is None else labels
        for label in labels:
            self.publish_crl(label, publisher.current_der(label), timeout)
        return list(labels)

    def _wait(self, info, timeout):
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise MqttError(MqttError.CONNECT, str(exc)) from None
        if not info.is_published():
            raise MqttError(MqttError.TIMEOUT, "PUBACK")

    def next_seq(self):
        with self._lock:
            self._seq = max(self._seq + 1, int(self.clock() * 1000))
            return self._seq

    def send_command(self, device, kind, timeout=DEFAULT_TIMEOUT, **fields):
        """Publish one command to `device`.  Returns: its sequence number."""
        seq = self.next_seq()
        body = dict(fields)
        body.update({"seq": seq, "t": int(self.clock()), "kind": kind})
        info = self.client.publish(mqttmsg.topic(device, mqttmsg.COMMAND),
                                   mqttmsg.encode(body), qos=QOS)
        self._wait(info, timeout)
        return seq

    def wait_reply(self, device, seq, timeout=DEFAULT_TIMEOUT):
        """The device's reply to command `seq`.  Raises: MqttError(TIMEOUT)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while (device, seq) not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MqttError(MqttError.TIMEOUT, "no reply to %d from %s" % (seq, device))
                self._reply_cond.wait(left)
            return self._replies.pop((device, seq))

    def request(self, device, kind, timeout=DEFAULT_TIMEOUT, **fields):
        """send_command, then wait_reply.  Raises: MqttError (TIMEOUT, or REFUSED when the
        device answers ok=false)."""
        seq = self.send_command(device, kind, timeout, **fields)
        reply = self.wait_reply(device, seq, timeout)
        if not reply.get("ok"):
            raise MqttError(MqttError.REFUSED, str(reply.get("error", "")), reply)
        return reply

    def apdu_channel(self, device, timeout=DEFAULT_TIMEOUT):
        """A `transceive(apdu) -> response` over MQTT to `device`'s SE: the device relays
        each command verbatim and returns the SE's response as it came out.  Give it to
        fleetid.common.scp03.Scp03Host: the secure channel then runs between the HSM-held
        keys here and the SE, through a device that holds no key.
        Raises (from transceive): MqttError."""

        def transceive(apdu):
            reply = self.request(device, mqttmsg.KIND_APDU, timeout, apdu=bytes(apdu).hex())
            return bytes.fromhex(reply["resp"])

        return transceive
