"""`fleetid agent run --mqtt mqtts://HOST:PORT`: the agent with its MQTT session, a thin
shell over fleetid.device.agent_mqtt (AgentMqtt), device/mqtt.py (DeviceChannel) and
device/host/mqtt_paho.py (PahoSeTransport: TLS signed in the SE).

One SE connection serves everything, all on this (main) thread: the agent's cycles, the
TLS handshakes (the SE signs), the CRL cache's checks and the OTA relay.  paho's network
thread only queues messages; they are handled between bounded waits.  What it does:

* telemetry after each cycle ({"agent": summary} or {"agent": {"failed": reason}});
* retained CRLs (fleet/crl/<label>) into the agent's CRL cache (--crl-issuer/--crl-cache);
* the retained compact revocation set (fleet/crl/revset) into the device's compact-set
  cache (--mqtt-revset-signer/--mqtt-revset-cache), verified through the SE;
* a `rotate` command runs a rotation at once; `apdu` commands (SCP03 only) are relayed
  to the SE verbatim; `ping` is answered;
* a lost broker connection is re-opened (backoff up to --max-delay); a lost SE link is
  re-opened and the relayed APDU tried once more (the emulator drops a client idle for
  --idle-timeout, so an idle SE gets a GET RANDOM every KEEPALIVE_S);
* SIGTERM / Ctrl-C stop it between steps.
"""

import sys
import time

import click

from fleetid.common.errors import FleetidError

KEEPALIVE_S = 10.0  # below `fleetid sim serve`'s default --idle-timeout (30 s)
STEP_S = 0.2  # longest wait for MQTT input before the loop looks at its timers


def mqtt_options(function):
    """--mqtt and its companions (decorator for `fleetid agent run`)."""
    function = click.option(
        "--mqtt-crl-label", "mqtt_crl_labels", multiple=True, default=("+",),
        show_default=True, help="Retained CRL topics to take (fleet/crl/LABEL; + = all); "
                                "the cache keeps those of --crl-issuer.")(function)
    function = click.option(
        "--mqtt-revset-cache", type=click.Path(dir_okay=False), default=None,
        help="File of the cached compact revocation set: retained sets (fleet/crl/revset) "
             "are verified through the SE and kept here (needs --mqtt-revset-signer).")(
        function)
    function = click.option(
        "--mqtt-revset-signer", type=click.Path(exists=True, dir_okay=False), default=None,
        help="The compact-set signer's certificate (issued by the fleet root; "
             "<state_dir>/revocation/revset-signer.pem in the cloud).")(function)
    function = click.option(
        "--mqtt-chain", type=click.Path(exists=True, dir_okay=False), default=None,
        help="PEM intermediates sent after the SE's identity certificate (a broker whose "
             "trust store lacks the issuing CA).")(function)
    function = click.option(
        "--mqtt-ca", type=click.Path(exists=True, dir_okay=False), default=None,
        help="PEM roots the broker's certificate must chain to (default: the fleet root "
             "anchor in the SE; a managed broker's public CA here).")(function)
    function = click.option(
        "--mqtt-timeout", default=20.0, show_default=True, type=click.FloatRange(1.0, 300.0),
        help="Bound on each MQTT wait (TLS handshake, CONNACK, SUBACK, PUBACK).")(function)
    function = click.option(
        "--mqtt", "mqtt_url", default=None, metavar="URL",
        help="Open an MQTT session, mqtts://HOST[:PORT]: telemetry, retained CRLs, "
             "rotate commands, OTA relay (TLS signed in the SE).")(function)
    return function


def _pem_certs_der(path, option):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with open(path, "rb") as f:
        data = f.read()
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise click.BadParameter("%s holds no PEM certificate" % path,
                                 param_hint=option) from None
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def _revset_signer(signer_path, cache_path):
    """The compact-set signer's certificate (--mqtt-revset-signer), checked to be one;
    None when not configured.  Raises: click.UsageError, click.BadParameter."""
    if signer_path is None and cache_path is None:
        return None
    if signer_path is None or cache_path is None:
        raise click.UsageError("--mqtt-revset-signer and --mqtt-revset-cache go together")
    from fleetid.cli.agent_device import load_cert
    from fleetid.device.host.revset_signer import is_revocation_signer

    signer = load_cert(signer_path, "--mqtt-revset-signer")
    if not is_revocation_signer(signer):
        raise click.BadParameter("%s is not a revocation-set signer (extendedKeyUsage)"
                                 % signer_path, param_hint="--mqtt-revset-signer")
    return signer


class MqttAgent:
    """The --mqtt loop.

    Params: cycle: cli.agent._Cycle (the Agent for an SE, one printed cycle, the clock).
        open_device: fn() -> an open cli.agent._Device (raises click.ClickException).
        stop: threading.Event (set by SIGTERM / Ctrl-C).  options: the `fleetid agent run`
        options it uses, by name.
    """

    def __init__(self, cycle, open_device, stop, **options):
        from fleetid.cli.mqtt import DEFAULT_PORT, parse_broker

        self.o = options
        self.cycle = cycle
        self.clock = cycle.clock
        self._open_device = open_device
        self.host, self.port = parse_broker(options["mqtt_url"], "--mqtt", DEFAULT_PORT)
        self.roots = (_pem_certs_der(options["mqtt_ca"], "--mqtt-ca")
                      if options["mqtt_ca"] else None)
        self.chain = (_pem_certs_der(options["mqtt_chain"], "--mqtt-chain")
                      if options["mqtt_chain"] else [])
        self.stop = stop
        self.device = None
        self.link = None
        self.revset_signer = _revset_signer(options.get("mqtt_revset_signer"),
                                            options.get("mqtt_revset_cache"))
        self.revset = None  # device.revset_mqtt.RevsetDispatch while connected
        self.used_at = 0.0
        self.reported = (0, 0)
        self.failure_kinds = set()

    # -- the SE ------------------------------------------------------------------------

    def open_device(self):
        """The SE (opened when needed); the agent and its CRL cache follow it."""
        if self.device is None:
            self.device = self._open_device()
            self.used_at = time.monotonic()
            if self.link is not None:
                self.link.agent = self.cycle.agent(self.device)
        return self.device

    def close_device(self):
        if self.device is not None:
            self.device.close()
            self.device = None

    def relay(self, apdu):
        """The channel's relay into the SE; a lost link is re-opened and tried once more
        (an SCP03 session open before it is gone: the SE then answers 6982)."""
        from fleetid.common.errors import BusError, LinkError

        for attempt in (0, 1):
            try:
                answer = self.open_device().stack.protocol.transceive_raw(apdu)
                self.used_at = time.monotonic()
                return answer
            except (BusError, LinkError, OSError):
                self.close_device()
                if attempt:
                    raise

    def keepalive(self):
        if self.device is not None and time.monotonic() - self.used_at > KEEPALIVE_S:
            try:
                self.device.se.get_random(1)
                self.used_at = time.monotonic()
            except (FleetidError, OSError):  # the SE link broke: reconnect everything
                self.close_device()
                self.drop()

    # -- MQTT --------------------------------------------------------------------------

    def connect(self):
        """(Re)open the MQTT session.  Returns: True when connected."""
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        from fleetid.common import se_consts as C
        from fleetid.device.agent_mqtt import AgentMqtt
        from fleetid.device.host.mqtt_paho import PahoSeTransport
        from fleetid.device.mqtt import DeviceChannel, TransportError

        self.drop()
        device = self.open_device()
        try:
            identity = bytes(device.se.get_cert(C.SLOT_IDENTITY))
            name = x509.load_der_x509_certificate(identity).subject.get_attributes_for_oid(
                NameOID.COMMON_NAME)[0].value
            # The broker's chain is checked against the agent's CRL caches (the same
            # device/board.server_revocation as its HTTPS connections).
            revocation = self.cycle.revocation(device)
            transport = PahoSeTransport(device.se, C.SLOT_IDENTITY, [identity] + self.chain,
                                        self.roots or [device.root_der()], self.host,
                                        self.port, timeout=self.o["mqtt_timeout"],
                                        revocation=revocation[2])
            cache = (self._revset_cache(device) if self.revset_signer is not None
                     else None)
        except (FleetidError, OSError) as exc:  # the SE link broke: open it again later
            click.echo("agent: SE identity unavailable: %s" % (exc,), err=True)
            self.close_device()
            return False
        channel = DeviceChannel(transport, name, relay=self.relay,
                                clock=lambda: int(time.time()))
        self.link = AgentMqtt(self.cycle.agent(device, revocation), channel)
        labels = list(self.o["mqtt_crl_labels"])
        if cache is not None:
            from fleetid.device.revset_mqtt import REVSET_LABEL, RevsetDispatch

            self.revset = RevsetDispatch(cache, lambda: int(time.time()),
                                         on_crl=channel.on_crl)
            channel.on_crl = self.revset
            if "+" not in labels and REVSET_LABEL not in labels:
                labels.append(REVSET_LABEL)
        try:
            channel.start(crl_labels=labels)
        except TransportError as exc:
            channel.close()
            self.link = None
            click.echo("mqtt: cannot connect to mqtts://%s:%d: %s" % (self.host, self.port,
                                                                     exc), err=True)
            return False
        self.used_at = time.monotonic()
        click.echo("mqtt: connected to mqtts://%s:%d as %s (TLS signed in the SE, identity "
                   "slot %d)" % (self.host, self.port, name, C.SLOT_IDENTITY))
        sys.stdout.flush()
        return True

    def _revset_cache(self, device):
        """The device's compact-set cache, its fleet named by the SE's root anchor (the
        signer must be issued by that root).  Raises: click.UsageError."""
        from cryptography import x509

        from fleetid.device.anchored_store import FileStore
        from fleetid.device.host.revset_signer import signer_anchor
        from fleetid.device.revset_cache import RevsetCache

        root = x509.load_der_x509_certificate(device.root_der())
        try:
            point, fleet = signer_anchor(self.revset_signer, root)
        except ValueError as exc:
            raise click.UsageError("--mqtt-revset-signer %s: %s (the SE's fleet root)"
                                   % (self.o["mqtt_revset_signer"], exc)) from None
        return RevsetCache(device.se, FileStore(self.o["mqtt_revset_cache"]), point, fleet)

    def drop(self):
        """Close the MQTT session (the loop opens it again)."""
        if self.link is not None:
            self.link.channel.close()
            self.link = None

    @property
    def connected(self):
        return self.link is not None and self.link.channel.transport.connected

    def pump(self, seconds):
        """Handle MQTT input for up to `seconds` (bounded steps).  Returns: "rotate" when
        a rotate command arrived, else None."""
        from fleetid.device.mqtt import TransportError

        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and self.connected:
            try:
                self.link.channel.step(max(0.0, min(STEP_S, deadline - time.monotonic())))
            except TransportError as exc:  # a reply could not be published
                click.echo("mqtt: session lost: %s" % exc, err=True)
                self.drop()
                return None
            self._say_news()
            if self.link.pending is not None:
                command, self.link.pending = self.link.pending, None
                click.echo("mqtt: %s command from the cloud" % command)
                return command
            self.keepalive()
            if time.monotonic() >= deadline:
                break
        return None

    def _say_news(self):
        channel = self.link.channel
        while self.link.crl_results:
            click.echo("mqtt: retained CRL -> cache: %s" % self.link.crl_results.pop(0))
        while self.revset is not None and self.revset.results:
            click.echo("mqtt: retained compact set -> cache: %s" % self.revset.results.pop(0))
        if (channel.relayed, channel.refused) != self.reported:
            click.echo("mqtt: %d APDU(s) relayed to the SE, %d message(s) refused"
                       % (channel.relayed, channel.refused))
            self.reported = (channel.relayed, channel.refused)
        for kind in sorted(set(channel.failures) - self.failure_kinds):  # once per kind
            self.failure_kinds.add(kind)
            click.echo("mqtt: a message failed in handling (%s: %s); skipped, further "
                       "ones counted" % (kind, channel.failures[kind]), err=True)
        sys.stdout.flush()

    # -- the agent ---------------------------------------------------------------------

    def run_cycle(self, command):
        """One agent cycle (printed by _Cycle.run), its outcome sent as telemetry.
        Returns: (exit status, next renewal time or None)."""
        from fleetid.device.agent_mqtt import summary

        try:
            device = self.open_device()
        except click.UsageError:
            raise
        except click.ClickException as exc:  # the SE is unreachable: reconnect later
            click.echo("FAILED %s" % exc.message, err=True)
            self.drop()
            return 1, None
        status, renew_at = self.cycle.run(device, command)
        self.used_at = time.monotonic()
        if status == 0:
            seq = self._telemetry({"agent": summary(self.cycle.report)})
        else:
            seq = self._telemetry({"agent": {"failed": str(self.cycle.failure)}})
        if seq is not None:
            click.echo("mqtt: cycle reported as telemetry (seq %d)" % seq)
        return status, renew_at

    def _telemetry(self, metrics):
        from fleetid.device.mqtt import TransportError

        try:
            return self.link.channel.send_telemetry(metrics)
        except TransportError as exc:
            click.echo("mqtt: telemetry not sent: %s" % exc, err=True)
            self.drop()
            return None

    def close(self):
        self.drop()
        self.close_device()


def run_on_mqtt(cycle, open_device, stop, **options):
    """`fleetid agent run --mqtt`: the loop until `stop` (or one cycle with --once).
    Params: as MqttAgent.  Returns: the exit status of the last cycle."""
    agent = MqttAgent(cycle, open_device, stop, **options)
    try:
        status = _loop(agent, options)
    finally:
        agent.close()
    if stop.is_set():
        click.echo("agent: stopped")
    return status


def _loop(agent, o):
    status = 0
    command = "rotate" if o["rotate"] else None
    next_run = 0.0  # a cycle at start
    backoff = 1.0
    while not agent.stop.is_set():
        if not agent.connected:
            try:
                ok = agent.connect()
            except click.UsageError:
                raise
            except click.ClickException as exc:  # the SE is unreachable
                if o["once"]:
                    raise
                click.echo("agent: SE unavailable (%s)" % exc.message, err=True)
                agent.close_device()
                ok = False
            if not ok:
                if o["once"]:
                    return 1
                agent.stop.wait(backoff)
                backoff = min(backoff * 2, o["max_delay"])
                continue
            backoff = 1.0
            agent.pump(1.0)  # the retained CRLs before the first cycle
        if command is not None or time.monotonic() >= next_run:
            status, renew_at = agent.run_cycle(command)
            command = None
            wake = o["interval"]
            if renew_at is not None:
                wake = min(wake, max(1.0, renew_at - agent.clock.now()))
            next_run = time.monotonic() + wake
            if o["once"]:
                return status
        command = agent.pump(max(0.0, next_run - time.monotonic()))
    return status
