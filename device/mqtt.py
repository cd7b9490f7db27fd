# The device's MQTT channel: telemetry out, retained CRLs and commands in, SCP03-wrapped
# APDUs relayed to the SE.  Portable and sans-I/O above one small transport interface,
# which each platform implements:
#
#   transport.connect()                         TLS to the broker, then MQTT CONNECT
#   transport.subscribe(topic, qos=1) -> int    granted QoS (0x80: refused by the ACL)
#   transport.publish(topic, payload, retain=False, qos=1)
#   transport.poll(timeout) -> [(topic str, payload bytes), ...]
#   transport.close()
#   each raises TransportError(reason) on failure.
#
#   CPython:     device/host/mqtt_paho.PahoSeTransport (paho-mqtt over the portable TLS
#                1.3 client, SE-keyed: the client key never leaves the SE)
#   MicroPython: UmqttTransport below (micropython-lib's umqtt.simple, pulled into firmware
#                by `require("umqtt.simple")` in boards/fleetid_manifest.py)
#
# Topics and message formats: fleetid.common.mqttmsg.  What the channel does with them:
#   * fleet/crl/<label> (retained): handed to on_crl(label, der) (device/crl_cache.py
#     verifies it through the SE and keeps the highest cRLNumber: replays are harmless);
#   * fleet/<me>/cmd: the sequence number must be above the last one taken (SeqWindow,
#     optionally persisted), else refused; then by kind:
#       apdu:   only SCP03 traffic is relayed (INITIALIZE UPDATE 80 50, or a secure-
#               messaging command, CLA 84): the bytes go to the SE unchanged through
#               `relay(apdu) -> (data, sw)` (ApduProtocol.transceive_raw) and the
#               response goes back unchanged; the channel holds no key and the SE wraps
#               every answer (R-MAC, R-ENC at level 0x33), so it reads no plaintext either.
#               Plain commands (DELETE KEY, SIGN ...) are refused: a compromised cloud or
#               broker cannot drive the SE in clear through the relay.
#       rotate: on_rotate() (the agent renews its credential on its next cycle);
#       ping:   reply only.
#   * a reply goes to fleet/<me>/reply with the channel's own sequence number.

from fleetid.common import mqttmsg
from fleetid.common.errors import FleetidError

_CLA_GP = 0x80
_CLA_SM = 0x84  # GP Amd D 6.2.1: CLA b3 set when wrapped
_INS_INITIALIZE_UPDATE = 0x50


class TransportError(FleetidError):
    """The MQTT transport failed.  reason: CONNECT (TLS or TCP), TIMEOUT, REFUSED
    (CONNACK refused), CLOSED."""

    CONNECT = "connect"
    TIMEOUT = "timeout"
    REFUSED = "refused"
    CLOSED = "closed"

    def __init__(self, reason, detail=""):
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail


def relayable(apdu):
    """True for the APDUs the relay passes: INITIALIZE UPDATE or an SCP03-wrapped command."""
    if len(apdu) < 4:
        return False
    cla = apdu[0] & 0xFC  # logical channel bits aside
    if cla == _CLA_SM:
        return True
    return cla == _CLA_GP and apdu[1] == _INS_INITIALIZE_UPDATE


class DeviceChannel:
    """The device side of the fleet's MQTT channel.

    Params: transport: an object with the interface above.  device: this device's name
        (its certificate CN).  relay: fn(apdu bytes) -> (data, sw) into the SE, or None
        (no OTA).  on_crl: fn(label, der) or None.  on_rotate: fn() or None.
        clock: fn() -> int seconds (telemetry timestamps).  seq_start: the first
        telemetry/reply sequence number; None: the clock in milliseconds when a clock is
        given (so a restarted device keeps increasing them: the cloud refuses numbers not
        above the last it took), else 1.  commands: SeqWindow for the cloud's command
        numbers (se_command_window(se) keeps it in an SE data object across restarts).
    """

    def __init__(self, transport, device, relay=None, on_crl=None, on_rotate=None,
                 clock=None, seq_start=None, commands=None):
        self.transport = transport
        self.device = device
        self.relay = relay
        self.on_crl = on_crl
        self.on_rotate = on_rotate
        self.clock = clock
        if seq_start is None:
            seq_start = int(clock() * 1000) if clock is not None else 1
        self._seq = seq_start - 1
        self.commands = commands if commands is not None else mqttmsg.SeqWindow()
        self.refused = 0
        self.relayed = 0
        self.crls = 0
        # Messages whose handling raised (a bug, or input no check foresaw): counted, the
        # first of each kind kept in `failures` (kind -> message) for the caller to log
        # once; the channel goes on with the next message.
        self.failed = 0
        self.failures = {}

    def start(self, crl_labels=("+",)):
        """Connect and subscribe to this device's commands and the retained CRLs.
        Returns: the granted QoS list.  Raises: TransportError."""
        self.transport.connect()
        granted = [self.transport.subscribe(mqttmsg.topic(self.device, mqttmsg.COMMAND))]
        for label in crl_labels:
            granted.append(self.transport.subscribe(mqttmsg.crl_topic(label)))
        return granted

    def _next_seq(self):
        self._seq += 1
        return self._seq

    def send_telemetry(self, metrics):
        """Publish one telemetry message.  Returns: its sequence number."""
        seq = self._next_seq()
        fields = {"seq": seq, "m": metrics}
        if self.clock is not None:
            fields["t"] = self.clock()
        self.transport.publish(mqttmsg.topic(self.device, mqttmsg.TELEMETRY),
                               mqttmsg.encode(fields))
        return seq

    def step(self, timeout):
        """Handle what arrives within `timeout` seconds.  Returns: messages handled."""
        handled = 0
        for name, payload in self.transport.poll(timeout):
            try:
                self.handle(name, payload)
            except TransportError:
                raise  # the session is lost (a reply not published): the caller reconnects
            except Exception as exc:  # one message must never end the device's loop
                self._failed(exc)
            handled += 1
        return handled

    def _failed(self, exc):
        self.failed += 1
        kind = type(exc).__name__
        if kind not in self.failures:
            self.failures[kind] = str(exc)[:120]

    def handle(self, name, payload):
        """Dispatch one received message (see the module header)."""
        try:
            device, leaf = mqttmsg.split_topic(name)
        except mqttmsg.MessageError:
            self.refused += 1
            return
        if device is None:
            if self.on_crl is not None and payload:
                self.crls += 1
                self.on_crl(leaf, payload)
            return
        if device != self.device or leaf != mqttmsg.COMMAND:
            self.refused += 1
            return
        try:
            command = mqttmsg.decode(payload)
            self.commands.accept("cloud", command["seq"])
        except mqttmsg.MessageError as exc:
            self.refused += 1
            seq = _seq_of(payload) if exc.reason == mqttmsg.MessageError.REPLAY else None
            if seq is not None:
                self._reply(seq, False, {"error": exc.reason})
            return
        kind = command.get("kind")
        if kind == mqttmsg.KIND_APDU:
            self._relay(command)
        elif kind == mqttmsg.KIND_ROTATE:
            if self.on_rotate is not None:
                self.on_rotate()
            self._reply(command["seq"], self.on_rotate is not None, {"kind": kind})
        elif kind == mqttmsg.KIND_PING:
            self._reply(command["seq"], True, {"kind": kind})
        else:
            self.refused += 1
            self._reply(command["seq"], False, {"error": "kind"})

    def _relay(self, command):
        seq = command["seq"]
        if self.relay is None:
            self._reply(seq, False, {"error": "no_relay"})
            return
        try:
            apdu = _unhex(command.get("apdu"))
        except ValueError:
            self._reply(seq, False, {"error": "malformed"})
            return
        if not relayable(apdu):
            self.refused += 1
            self._reply(seq, False, {"error": "not_scp03"})
            return
        try:
            data, sw = self.relay(apdu)
        except Exception as exc:  # the link's error, by name only
            self._reply(seq, False, {"error": "se:" + type(exc).__name__})
            return
        self.relayed += 1
        response = bytes(data) + bytes(((sw >> 8) & 0xFF, sw & 0xFF))
        self._reply(seq, True, {"kind": mqttmsg.KIND_APDU, "resp": _hex(response)})

    def _reply(self, command_seq, ok, fields):
        body = {"seq": self._next_seq(), "re": command_seq, "ok": ok}
        for key in fields:
            body[key] = fields[key]
        self.transport.publish(mqttmsg.topic(self.device, mqttmsg.REPLY),
                               mqttmsg.encode(body))

    def close(self):
        self.transport.close()


_MQTT_SEQ_OBJECT = 0x02  # se_consts.DATA_OBJECT_MQTT_SEQ


def se_command_window(se, object_id=_MQTT_SEQ_OBJECT):
    """A SeqWindow for the cloud's command numbers kept in an SE data object (u64 big-
    endian; one atomic NVM write per accepted command), so a command captured before a
    restart is still refused after it.  Params: se: SeSession."""

    def load(_key):
        from fleetid.common.errors import ReferenceNotFound

        try:
            data = se.read_object(object_id)
        except ReferenceNotFound:
            return None
        value = 0
        for byte in data:
            value = (value << 8) | byte
        return value

    def store(_key, seq):
        se.write_object(object_id, bytes((seq >> (8 * i)) & 0xFF for i in range(7, -1, -1)))

    return mqttmsg.SeqWindow(load, store)


def _hex(data):
    from binascii import hexlify

    return hexlify(data).decode()


def _unhex(text):
    from binascii import unhexlify

    if not isinstance(text, str) or len(text) % 2:
        raise ValueError("hex")
    try:
        return unhexlify(text)
    except Exception:
        raise ValueError("hex")


def _seq_of(payload):
    try:
        return mqttmsg.decode(payload)["seq"]
    except Exception:
        return None


class UmqttTransport:
    """The transport on MicroPython: micropython-lib's umqtt.simple (MQTT 3.1.1).

    Params: client_id: this device's name.  host, port: where its MQTT connection goes.
        keepalive: seconds.  tls: None (plain TCP) or device/tls_socket.SeTlsWrapper: TLS
        1.3 with every private-key operation in the SE (MicroPython's own `ssl` needs the
        key in RAM, which fleetid never allows).  umqtt.simple 1.4+ takes it as its `ssl`
        context; 1.3 imports `ussl` on connect, so the wrapper stands in for that module
        during connect() only.
    umqtt.simple is imported on connect(): firmware freezes it (require("umqtt.simple")),
    the unix-port tests stage it from var/micropython-lib (scripts/fetch_micropython_lib.py).
    """

    def __init__(self, client_id, host, port, keepalive=60, tls=None):
        self.client_id = client_id
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.tls = tls
        self.client = None
        self._inbox = []

    def connect(self):
        import sys

        from umqtt.simple import MQTTClient, MQTTException

        if self.tls is None:
            client = MQTTClient(self.client_id, self.host, self.port, keepalive=self.keepalive)
        else:
            client = MQTTClient(self.client_id, self.host, self.port, keepalive=self.keepalive,
                                ssl=self.tls)
        client.set_callback(self._on_message)
        previous = sys.modules.get("ussl")
        if self.tls is not None:
            sys.modules["ussl"] = self.tls  # umqtt.simple 1.3: `import ussl` in connect()
        try:
            client.connect()
        except MQTTException as exc:
            raise TransportError(TransportError.REFUSED, "CONNACK %s" % exc)
        except OSError as exc:
            raise TransportError(TransportError.CONNECT, str(exc))
        finally:
            if self.tls is not None:
                if previous is None:
                    del sys.modules["ussl"]
                else:
                    sys.modules["ussl"] = previous
        self.client = client

    def _on_message(self, topic, payload):
        self._inbox.append((bytes(topic).decode(), bytes(payload)))

    def subscribe(self, topic, qos=1):
        from umqtt.simple import MQTTException

        try:
            self.client.subscribe(topic, qos)
        except MQTTException:
            return 0x80  # umqtt.simple raises on a SUBACK failure code (0x80)
        except OSError as exc:
            raise TransportError(TransportError.CLOSED, str(exc))
        return qos

    def publish(self, topic, payload, retain=False, qos=1):
        try:
            self.client.publish(topic, payload, retain, qos)
        except OSError as exc:
            raise TransportError(TransportError.CLOSED, str(exc))

    def poll(self, timeout):
        import time

        deadline = time.ticks_add(time.ticks_ms(), int(timeout * 1000))
        try:
            while not self._inbox:
                self.client.check_msg()  # non-blocking read of at most one packet
                if self._inbox or time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                    break
                time.sleep_ms(10)
        except OSError as exc:
            raise TransportError(TransportError.CLOSED, str(exc))
        out = self._inbox
        self._inbox = []
        return out

    def close(self):
        if self.client is not None:
            try:
                self.client.disconnect()
            except OSError:
                pass
            self.client = None
