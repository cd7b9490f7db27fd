# The board agent's MQTT session: device/board.run opens it when the board has a broker
# (the MQTT_URL constant), so a board reports and takes commands by itself.  Portable:
# MicroPython and CPython.
#
#     session = BoardMqtt(stack, agent, make_transport, ("+",), clock, log)
#     report = run_on_mqtt(session, interval_s, log, cycles=None)   # never returns
#
# What the loop does, the same as `fleetid agent run --mqtt` on Linux (cli/agent_mqtt.py):
#   * connect: TLS 1.3 to the broker with the identity key in the SE (the transport comes
#     from the network module's make_mqtt: device/board_net.make_mqtt gives umqtt.simple on
#     device/tls_socket.SeTlsWrapper), subscribe to fleet/<name>/cmd and the retained CRLs
#     (device/mqtt.DeviceChannel); <name> is the identity certificate's CN, which the
#     broker takes as the user name;
#   * the retained CRLs before the first cycle, into the agent's CRL cache
#     (device/agent_mqtt.AgentMqtt);
#   * one agent cycle, its summary published as telemetry ({"agent": {...}}, or
#     {"agent": {"failed": reason}}); then MQTT input until the next cycle is due (the
#     next renewal or interval_s): a `rotate` command runs a rotation at once, `apdu`
#     commands (SCP03 only) are relayed to the SE verbatim, `ping` is answered;
#   * a lost session is opened again before the next cycle (the cycle runs without it:
#     the lifecycle does not depend on the broker); every wait is bounded.
# A PINGREQ goes out every keepalive/2 seconds of silence (umqtt.simple sends none by
# itself), and the SE is sent one GET RANDOM every se_keepalive_s when set (the emulator
# drops an idle client; a chip on I2C does not need it).

from fleetid.common.errors import FleetidError

_STEP_S = 0.2  # longest MQTT wait before the loop looks at its timers
_SLOT_IDENTITY = 0x01  # se_consts.SLOT_IDENTITY: the MQTT session's key (as on Linux)


def _ticks():
    # Milliseconds on a counter that may wrap (MicroPython's ticks_ms): compare only
    # through _since().
    import time

    ticks_ms = getattr(time, "ticks_ms", None)
    return ticks_ms() if ticks_ms is not None else int(time.monotonic() * 1000)


def _since(start):
    """Seconds since `start` (a _ticks() value)."""
    import time

    ticks_diff = getattr(time, "ticks_diff", None)
    now = _ticks()
    return (ticks_diff(now, start) if ticks_diff is not None else now - start) / 1000


class BoardMqtt:
    """The agent's MQTT session on a board.

    Params: stack: device/stack.SeStack (the SE session and the APDU protocol the relay
        uses).  agent: device/agent.Agent.  make_transport: fn(name) -> a device/mqtt
        transport.  crl_labels: retained CRL labels to subscribe to ("+": all).  clock:
        now() in epoch seconds.  log: fn(str).  keepalive_s: the transport's keepalive.
        se_keepalive_s: seconds of SE idleness before a GET RANDOM (None: never).
        name: the MQTT client id (None: the identity certificate's CN, read from the SE).
    Attributes: link (AgentMqtt while connected), sent (telemetry sequence numbers).
    """

    def __init__(self, stack, agent, make_transport, crl_labels, clock, log,
                 keepalive_s=60, se_keepalive_s=None, name=None):
        self.stack = stack
        self.agent = agent
        self.make_transport = make_transport
        self.crl_labels = tuple(crl_labels)
        self.clock = clock
        self.log = log
        self.keepalive_s = keepalive_s
        self.se_keepalive_s = se_keepalive_s
        self.link = None
        self.sent = []
        self._name = name
        self._mqtt_at = self._se_at = _ticks()

    def device_name(self):
        """The identity certificate's CN (the broker's user name for this device)."""
        if self._name is None:
            from fleetid.common.x509 import parse_certificate

            cert = parse_certificate(bytes(self.stack.se.get_cert(_SLOT_IDENTITY)))
            if not cert.common_name:
                raise ValueError("the identity certificate has no CN")
            self._name = cert.common_name
        return self._name

    def connect(self):
        """Open the session.  Returns: True when connected (a failure is logged)."""
        from fleetid.device.agent_mqtt import AgentMqtt
        from fleetid.device.mqtt import DeviceChannel

        self.drop()
        try:
            name = self.device_name()
            channel = DeviceChannel(self.make_transport(name), name,
                                    relay=self.stack.protocol.transceive_raw,
                                    clock=self.clock.now)
            link = AgentMqtt(self.agent, channel)
            granted = channel.start(crl_labels=self.crl_labels)
        except (FleetidError, OSError, ValueError) as exc:
            self.log("mqtt: cannot connect: %s" % (exc,))
            return False
        self.link = link
        self._mqtt_at = self._se_at = _ticks()
        self.log("mqtt: connected as %s (TLS 1.3 signed in the SE, identity slot %d), "
                 "granted %s" % (name, _SLOT_IDENTITY, granted))
        return True

    def drop(self):
        """Close the session (the loop opens it again)."""
        if self.link is not None:
            try:
                self.link.channel.close()
            except (FleetidError, OSError):
                pass
            self.link = None

    def telemetry(self, metrics):
        """Publish `metrics`.  Returns: the sequence number, or None (not connected, or
        the publish failed: the session is dropped)."""
        if self.link is None:
            return None
        try:
            seq = self.link.channel.send_telemetry(metrics)
        except (FleetidError, OSError) as exc:
            self.log("mqtt: telemetry not sent: %s" % (exc,))
            self.drop()
            return None
        self._mqtt_at = _ticks()
        self.sent.append(seq)
        self.log("mqtt: cycle reported as telemetry (seq %d)" % seq)
        return seq

    def cycle(self, command=None):
        """One agent cycle, reported as telemetry.  Returns: the AgentReport, or None
        when the cycle failed (logged; the journal in the SE keeps the progress)."""
        from fleetid.device.agent_mqtt import summary

        try:
            report = self.agent.run_once(command=command)
        except FleetidError as exc:
            self.log("cycle failed: %s" % exc)
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self.telemetry({"agent": {"failed": str(reason)}})
            return None
        self._se_at = _ticks()
        self.telemetry({"agent": summary(report)})
        return report

    def _news(self):
        while self.link.crl_results:
            self.log("mqtt: retained CRL -> cache: %s" % self.link.crl_results.pop(0))

    def _keepalive(self):
        client = getattr(self.link.channel.transport, "client", None)
        if client is not None and _since(self._mqtt_at) > self.keepalive_s / 2:
            client.ping()  # umqtt.simple: PINGREQ (the answer is read by check_msg)
            self._mqtt_at = _ticks()
        if self.se_keepalive_s is not None and _since(self._se_at) > self.se_keepalive_s:
            self.stack.se.get_random(1)
            self._se_at = _ticks()

    def pump(self, seconds):
        """MQTT input for up to `seconds`.  Returns: "rotate" when the cloud asked for a
        rotation, else None (also when the session was lost: dropped, logged)."""
        start = _ticks()
        while self.link is not None:
            try:
                self.link.channel.step(max(0.0, min(_STEP_S, seconds - _since(start))))
                self._news()
                if self.link.pending is not None:
                    command, self.link.pending = self.link.pending, None
                    self.log("mqtt: %s command from the cloud" % command)
                    return command
                self._keepalive()
            except (FleetidError, OSError) as exc:
                self.log("mqtt: session lost: %s" % (exc,))
                self.drop()
                return None
            if _since(start) >= seconds:
                break
        return None


def run_on_mqtt(session, interval_s, log, cycles=None, sleep=None):
    """The board loop with its MQTT session (module header).

    Params: session: BoardMqtt.  interval_s: seconds between cycles at most.  log:
        fn(str).  cycles: stop after this many (None: forever).  sleep: fn(seconds) for a
        wait without a session (None: time.sleep).
    Returns: the last cycle's AgentReport (None when it failed).
    """
    import time

    sleep = sleep or time.sleep
    done = 0
    last = None
    command = None
    while cycles is None or done < cycles:
        if session.link is None and session.connect():
            # The retained CRLs before the cycle (and a command already waiting).
            command = session.pump(1.0) or command
        done += 1
        last = session.cycle(command)
        command = None
        if cycles is not None and done >= cycles:
            break
        pause = interval_s
        if last is not None and last.renew_at is not None:
            pause = min(interval_s, max(1, last.renew_at - session.clock.now()))
        command = _wait(session, pause, sleep)
    return last


def _wait(session, seconds, sleep):
    # MQTT input until the next cycle is due; without a session, sleep in slices of a
    # minute at most (the SE kept awake when asked) and try the broker again after each.
    start = _ticks()
    while True:
        remaining = seconds - _since(start)
        if remaining <= 0:
            return None
        if session.link is None and not session.connect():
            sleep(min(remaining, session.se_keepalive_s or 60, 60))
            if session.se_keepalive_s is not None:
                session.stack.se.get_random(1)
            continue
        command = session.pump(remaining)
        if command is not None:
            return command
