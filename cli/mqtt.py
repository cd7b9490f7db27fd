"""`fleetid mqtt`: the fleet's MQTT broker (mosquitto on the fleet PKI) and the cloud's
MQTT side (retained CRLs out, telemetry in), as thin shells over fleetid.cloud.mqtt.

Both work on a factory line's directory (its HSM signs the broker's and the cloud's TLS
certificates under the fleet root; its registry decides revocation), as the quick-start
demo's MQTT step does.  Exit status: 0 success (or a clean SIGTERM / Ctrl-C), 1 refused /
failed (the reason is printed), 2 usage.
"""

import os
import signal
import sys
import threading
import time

import click

from fleetid.cli.hsm_secret import environ_with_secret, pass_file_option
from fleetid.common.errors import FleetidError

DEFAULT_PORT = 8883  # IANA: MQTT over TLS (the device listener)
DEFAULT_SERVICE_PORT = 8884  # the service listener (the cloud, operators): PORT + 1


def line_option(function):
    """--line DIR (decorator): the factory line whose PKI, HSM and registry are used."""
    return click.option("--line", "line_dir", required=True,
                        type=click.Path(file_okay=False, exists=True),
                        help="The line work directory (from `fleetid line run`).")(function)


def files_option(function):
    """--files DIR (decorator): the folder `fleetid mqtt broker` wrote its files into."""
    return click.option("--files", "files_dir", default=None,
                        type=click.Path(file_okay=False),
                        help="The broker's files folder (default LINE/mqtt): "
                             "ca-bundle.pem, cloud.pem, cloud.key (the cloud's identity, "
                             "from the service CA).")(function)


def broker_option(function):
    """--broker mqtts://HOST:PORT (decorator): the broker's *service* listener."""
    return click.option("--broker", "broker_url", required=True, metavar="URL",
                        help="The broker's service listener, mqtts://HOST[:PORT] (default "
                             "port %d; devices use %d)." % (DEFAULT_SERVICE_PORT,
                                                            DEFAULT_PORT))(function)


def parse_broker(url, option="--broker", default_port=DEFAULT_SERVICE_PORT):
    """(host, port) of an mqtts:// URL.  Raises: click.UsageError naming the option."""
    scheme, sep, rest = (url or "").partition("://")
    if not sep or scheme != "mqtts" or not rest or "/" in rest.rstrip("/"):
        raise click.UsageError("%s %r: expected mqtts://HOST[:PORT]" % (option, url))
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon:
        return rest.rstrip("/"), default_port
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.UsageError("%s %r: bad host or port" % (option, url))
    return host.strip("[]"), int(port)


def fail(exc):
    """A library error as one `Error:` line (click.ClickException)."""
    from fleetid.cli.se_connection import describe_error

    if isinstance(exc, OSError):
        return click.ClickException("%s%s" % (exc.strerror or exc, (": %s" % exc.filename)
                                              if exc.filename else ""))
    if isinstance(exc, FleetidError):
        return click.ClickException(describe_error(exc))
    return click.ClickException("%s: %s" % (type(exc).__name__, exc))


def open_line(line_dir, pass_file):
    """The line in `line_dir`, its HSM secret supplied as for every line command."""
    from fleetid.cloud.hsm import secret_variable
    from fleetid.cloud.line import workdir

    if not os.path.exists(os.path.join(line_dir, workdir.CONFIG_FILE)):
        raise click.ClickException("--line %s: no line there (%s missing)"
                                   % (line_dir, workdir.CONFIG_FILE))
    try:
        environ = environ_with_secret(secret_variable(workdir.line_hsm_uri(line_dir)),
                                      pass_file)
        return workdir.open_line(line_dir, environ=environ)
    except (FleetidError, OSError, ValueError) as exc:
        raise fail(exc) from None


def crl_publisher(line):
    """A CrlPublisher for the line's issuing CA ("ca") and its root ("root", which signs
    the broker's server certificate)."""
    from fleetid.cloud.revocation import CrlIssuer, CrlPublisher

    return CrlPublisher(line.registry, [
        CrlIssuer("ca", line.hsm, line.labels["ca"], line.ca_cert),
        CrlIssuer("root", line.hsm, line.labels["root"], line.root_cert)])


def service_crl_publisher(line, files):
    """A CrlPublisher for the service CA ("service"): revocations of service
    certificates recorded in the line's registry reach the service listener's CRL."""
    from fleetid.cloud.revocation import CrlIssuer, CrlPublisher

    return CrlPublisher(line.registry, [CrlIssuer("service", line.hsm, files.service_ca_label,
                                                  files.service_ca_cert)])


def device_serial(line):
    """fn(device name) -> registry serial for the line's names (PREFIX-000000042)."""
    prefix = line.config.get("serial_prefix", "FID")

    def parse(name):
        head, _, number = name.rpartition("-")
        if head != prefix or not number.isdigit():
            raise ValueError("not a device of this line: %r" % name)
        return int(number, 10)

    return parse


def cloud_client(line_dir, files_dir, broker_url, client_id, device_refusal=None):
    """A CloudMqtt (not connected) with the cloud certificate from the broker's files."""
    from fleetid.cloud.mqtt.service import CloudMqtt

    host, port = parse_broker(broker_url)
    files_dir = files_dir or os.path.join(line_dir, "mqtt")
    paths = [os.path.join(files_dir, name) for name in ("ca-bundle.pem", "cloud.pem",
                                                        "cloud.key")]
    for path in paths:
        if not os.path.exists(path):
            raise click.ClickException("--files %s: %s missing (run `fleetid mqtt broker "
                                       "--line %s` first)" % (files_dir, path, line_dir))
    return CloudMqtt(host, port, *paths, client_id=client_id, device_refusal=device_refusal)


def connect(client, timeout):
    """client.connect(timeout); an MqttError becomes one `Error:` line."""
    from fleetid.cloud.mqtt.service import MqttError

    try:
        return client.connect(timeout)
    except MqttError as exc:
        raise click.ClickException("broker %s:%d: %s" % (client.host, client.port,
                                                         exc)) from None


class StopSignals:
    """SIGTERM and SIGINT set `event` while in the with-block (restored after)."""

    def __init__(self):
        self.event = threading.Event()
        self._previous = {}

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, lambda s, f: self.event.set())
        return self.event

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


@click.group()
def mqtt():
    """The fleet's MQTT broker and the cloud's MQTT side.

    \b
    Examples:
      fleetid mqtt broker --line var/line --port 8883          # mosquitto, foreground
      fleetid mqtt broker --line var/line --write-only         # just the files
      fleetid mqtt cloud --line var/line --broker mqtts://127.0.0.1:8884
    """


@mqtt.command("broker")
@line_option
@click.option("--port", default=DEFAULT_PORT, show_default=True,
              type=click.IntRange(1, 65535), help="TCP port of the devices' TLS listener.")
@click.option("--service-port", default=None, type=click.IntRange(1, 65535),
              help="TCP port of the service listener (the cloud, operators; trusts only "
                   "the service CA) [default: PORT + 1].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (and a name in the server certificate).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for the broker's and the cloud's files (default LINE/mqtt).")
@click.option("--write-only", is_flag=True,
              help="Write the files, print the mosquitto command, do not start it.")
@click.option("--start-timeout", default=10.0, show_default=True,
              type=click.FloatRange(1.0, 120.0), help="Seconds to wait for mosquitto.")
@click.option("--crl-interval", default=60.0, show_default=True,
              type=click.FloatRange(1.0, 86400.0),
              help="Seconds between checks of the registry's revocations: a change rewrites "
                   "the CRL file and reloads mosquitto (SIGHUP).")
@pass_file_option
def broker_cmd(line_dir, port, service_port, host, out, write_only, start_timeout,
               crl_interval, pass_file):
    """mosquitto on the fleet PKI, in the foreground until SIGTERM / Ctrl-C.

    Two listeners: devices on PORT (trust: the fleet root and issuing CA; each device its
    own topics, no name more), services on SERVICE_PORT (trust: the service CA alone; the
    whole fleet/# tree).  Writes into OUT: ca-bundle.pem (root + issuing CA), server.pem/.key
    (signed by the fleet root in the line's HSM), service-ca.pem (the service CA, its key
    in the line's HSM), cloud.pem/.key (CN fleet-cloud from the service CA, for `fleetid
    mqtt cloud` and `fleetid ota`), crl.pem and service-crl.pem, mosquitto.conf (mTLS,
    require_certificate, use_identity_as_username, crlfile, per listener) and the ACLs
    mosquitto.acl and mosquitto-service.acl.  mosquitto's log: OUT/mosquitto.log.  While
    it runs, a revocation in the line's registry rewrites the CRL files and reloads
    mosquitto, so the revoked device's next TLS handshake is refused.

    \b
    Examples:
      fleetid mqtt broker --line var/line --port 8883      # services on 8884
      fleetid mqtt broker --line var/line --out /etc/fleetid/mqtt --write-only
    """
    from fleetid.cloud.mqtt.broker import Broker
    from fleetid.cloud.mqtt.fleet_files import make_broker_files

    if service_port is None:
        if port == 65535:
            raise click.UsageError("--port 65535: give --service-port too")
        service_port = port + 1
    if service_port == port:
        raise click.UsageError("--service-port %d: must differ from --port" % port)
    out = out or os.path.join(line_dir, "mqtt")
    line = open_line(line_dir, pass_file)
    try:
        hosts = [host] + [name for name in ("localhost", "127.0.0.1") if name != host]
        files = make_broker_files(line.hsm, line.labels["root"], line.root_cert,
                                  [line.ca_cert], crl_publisher(line), out,
                                  server_hosts=hosts)
        files.service_publisher = service_crl_publisher(line, files)
        files.write_crl()
        files.config.host = host
        broker = Broker(files.config, out, port=port, service_port=service_port)
        if write_only:
            command = broker.write_files(port, service_port)
            click.echo("broker files: %s (mosquitto.conf, mosquitto.acl, "
                       "mosquitto-service.acl, ca-bundle.pem, service-ca.pem, server.pem, "
                       "cloud.pem, crl.pem, service-crl.pem)" % out)
            click.echo("run: %s" % " ".join(command))
            return
        if broker.binary is None:
            raise click.ClickException("mosquitto is not installed (Debian: apt-get install "
                                       "mosquitto); --write-only writes the files without it")
        _run_broker(broker, files, start_timeout, crl_interval)
    except (FleetidError, OSError, ValueError) as exc:
        raise fail(exc) from None
    finally:
        line.close()


def _run_broker(broker, files, start_timeout, crl_interval):
    from fleetid.cloud.mqtt.broker import BrokerError

    with StopSignals() as stop:
        try:
            broker.start(start_timeout)
        except BrokerError as exc:
            raise click.ClickException("mosquitto did not start on %s:%d: %s" % (
                broker.host, broker.port, str(exc).splitlines()[0])) from None
        click.echo("mqtt broker: mosquitto pid %d on mqtts://%s:%d (devices) and "
                   "mqtts://%s:%d (services: the service CA only); mTLS, identity = "
                   "certificate CN, crlfile, ACL; log %s"
                   % (broker.pid, broker.host, broker.port, broker.host, broker.service_port,
                      broker.log_path))
        sys.stdout.flush()
        status = None
        written = _crl_state(files)
        next_check = time.monotonic() + crl_interval
        while status is None and not stop.is_set():
            status = broker.wait(0.2)
            if status is None and time.monotonic() >= next_check:
                written = _refresh_crl_file(files, broker, written)
                next_check = time.monotonic() + crl_interval
        broker.stop()
    if status is not None:
        tail = broker.log().strip().splitlines()[-1:] or ["(no log)"]
        raise click.ClickException("mosquitto exited with status %s: %s" % (status, tail[0]))
    click.echo("mqtt broker: stopped")


def _crl_state(files):
    return tuple(publisher.current_der(label)
                 for publisher in (files.publisher, files.service_publisher)
                 for label in publisher.labels())


def _refresh_crl_file(files, broker, written):
    """Rewrite the CRL file and reload mosquitto when a CRL changed.  Returns: the state
    now in the file."""
    state = _crl_state(files)
    if state != written:
        files.write_crl()
        broker.reload()
        click.echo("mqtt broker: CRL file rewritten (revocations changed); mosquitto "
                   "reloaded")
        sys.stdout.flush()
    return state


@mqtt.command("cloud")
@line_option
@broker_option
@files_option
@click.option("--crl-interval", default=60.0, show_default=True,
              type=click.FloatRange(1.0, 86400.0),
              help="Seconds between checks for a changed CRL or compact set (published "
                   "retained).")
@click.option("--timeout", default=10.0, show_default=True,
              type=click.FloatRange(1.0, 300.0), help="Bound on each broker exchange (s).")
@click.option("--config", "config_path", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="The cloud's TOML (as for `fleetid cloud serve`, from `fleetid line "
                   "cloud-config`): when its revocation tiers are initialised (`fleetid "
                   "revocation init`), the compact revocation set is published retained "
                   "on fleet/crl/revset too.")
@pass_file_option
def cloud_cmd(line_dir, broker_url, files_dir, crl_interval, timeout, config_path, pass_file):
    """The cloud's MQTT side until SIGTERM / Ctrl-C: each CA's CRL published retained
    (again whenever it changes), the compact revocation set too with --config once
    revocation is initialised, telemetry received (one line each), refused messages
    counted (revoked or unknown devices, replays, malformed, too deep, failed).

    \b
    Examples:
      fleetid mqtt cloud --line var/line --broker mqtts://127.0.0.1:8884
      fleetid mqtt cloud --line var/line --broker mqtts://127.0.0.1:8884 \\
          --config var/cloud/cloud.toml
    """
    from fleetid.cloud.mqtt.service import MqttError, registry_refusal

    parse_broker(broker_url)
    config = None
    if config_path is not None:
        from fleetid.cli.options import load_config

        config = load_config(config_path)
    line = open_line(line_dir, pass_file)
    try:
        client = cloud_client(line_dir, files_dir, broker_url, "fleet-cloud",
                              registry_refusal(line.registry, device_serial(line)))
        client.sink.on_telemetry = lambda device, fields: click.echo(
            "telemetry %s seq %d: %s" % (device, fields["seq"], fields.get("m")))
        publisher = crl_publisher(line)
        tiers = _revocation_tiers(line, config, publisher)
        connect(client, timeout)
        click.echo("mqtt cloud: connected to mqtts://%s:%d as fleet-cloud"
                   % (client.host, client.port))
        sys.stdout.flush()
        with StopSignals() as stop:
            _publish_loop(client, publisher, crl_interval, timeout, stop, tiers)
    except (MqttError, FleetidError, OSError) as exc:
        raise fail(exc) from None
    finally:
        line.close()
    client.close()
    click.echo("mqtt cloud: stopped; %s" % ", ".join(
        "%s %d" % item for item in sorted(client.sink.metrics().items())))


def _revocation_tiers(line, config, publisher):
    """The cloud's revocation tiers (cloud/revocation/tiers.py) for the compact set, or
    None (no --config, or not initialised: said on stdout)."""
    if config is None:
        return None
    from fleetid.cloud.revocation import tiers as tiers_mod

    tiers = tiers_mod.load(line.hsm, line.registry, config.state_dir, line.root_cert,
                           [(line.labels["ca"], line.ca_cert)], config.revoked_cas_file,
                           crl_publisher=publisher)
    if tiers is None:
        click.echo("compact set: not published (revocation not initialised in %s: run "
                   "`fleetid revocation init --config ...`)" % config.state_dir)
    return tiers


def _publish_loop(client, publisher, interval, timeout, stop, tiers=None):
    """Publish each label's CRL, and the compact set when `tiers` is given, when it
    differs from the last published, every `interval` s, until `stop` (the publishers
    rebuild when the registry's revocations changed, at their own poll interval, on a
    revocation event, or when half-way to nextUpdate)."""
    from fleetid.cloud.mqtt.service import MqttError
    from fleetid.cloud.revocation.mqtt_delivery import REVSET_LABEL

    published = {}
    while not stop.is_set():
        if tiers is not None:
            tiers.watcher.poll()  # a `fleetid revoke` elsewhere: rebuild now
        current = [(label, "crl %s" % label, publisher.current_der(label))
                   for label in publisher.labels()]
        if tiers is not None:
            from fleetid.common import revset

            wire = tiers.tier("revset").publisher.current()
            current.append((REVSET_LABEL, "compact set #%d" % revset.parse(wire).number,
                            wire))
        for label, what, der in current:
            if published.get(label) != der:
                try:
                    client.publish_crl(label, der, timeout)
                except MqttError as exc:  # paho reconnects; tried again at the next check
                    click.echo("%s not published (%s); next try in %.0f s"
                               % (what, exc, interval), err=True)
                    continue
                published[label] = der
                click.echo("%s published retained (%d bytes)" % (what, len(der)))
        sys.stdout.flush()
        deadline = time.monotonic() + interval
        while not stop.is_set() and time.monotonic() < deadline:
            stop.wait(min(0.5, deadline - time.monotonic()))
