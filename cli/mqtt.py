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

DEFAULT_PORT = 8883  # IANA: MQTT over TLS


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
                             "ca-bundle.pem, cloud.pem, cloud.key.")(function)


def broker_option(function):
    """--broker mqtts://HOST:PORT (decorator)."""
    return click.option("--broker", "broker_url", required=True, metavar="URL",
                        help="The broker, mqtts://HOST[:PORT] (default port %d)."
                        % DEFAULT_PORT)(function)


def parse_broker(url, option="--broker"):
    """(host, port) of an mqtts:// URL.  Raises: click.UsageError naming the option."""
    scheme, sep, rest = (url or "").partition("://")
    if not sep or scheme != "mqtts" or not rest or "/" in rest.rstrip("/"):
        raise click.UsageError("%s %r: expected mqtts://HOST[:PORT]" % (option, url))
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon:
        return rest.rstrip("/"), DEFAULT_PORT
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
    the broker's and the cloud's certificates)."""
    from fleetid.cloud.revocation import CrlIssuer, CrlPublisher

    return CrlPublisher(line.registry, [
        CrlIssuer("ca", line.hsm, line.labels["ca"], line.ca_cert),
        CrlIssuer("root", line.hsm, line.labels["root"], line.root_cert)])


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
      fleetid mqtt cloud --line var/line --broker mqtts://127.0.0.1:8883
    """


@mqtt.command("broker")
@line_option
@click.option("--port", default=DEFAULT_PORT, show_default=True,
              type=click.IntRange(1, 65535), help="TCP port of the TLS listener.")
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
def broker_cmd(line_dir, port, host, out, write_only, start_timeout, crl_interval, pass_file):
    """mosquitto on the fleet PKI, in the foreground until SIGTERM / Ctrl-C.

    Writes into OUT: ca-bundle.pem (root + issuing CA), server.pem/.key (signed by the
    fleet root in the line's HSM), cloud.pem/.key (CN fleet-cloud, for `fleetid mqtt
    cloud` and `fleetid ota`), crl.pem (the CAs' CRLs), mosquitto.conf (mTLS,
    require_certificate, use_identity_as_username, crlfile) and mosquitto.acl (each device
    its own topics).  mosquitto's log: OUT/mosquitto.log.  While it runs, a revocation in
    the line's registry rewrites crl.pem and reloads mosquitto, so the revoked device's
    next TLS handshake is refused.

    \b
    Examples:
      fleetid mqtt broker --line var/line --port 8883
      fleetid mqtt broker --line var/line --out /etc/fleetid/mqtt --write-only
    """
    from fleetid.cloud.mqtt.broker import Broker
    from fleetid.cloud.mqtt.fleet_files import make_broker_files

    out = out or os.path.join(line_dir, "mqtt")
    line = open_line(line_dir, pass_file)
    try:
        hosts = [host] + [name for name in ("localhost", "127.0.0.1") if name != host]
        files = make_broker_files(line.hsm, line.labels["root"], line.root_cert,
                                  [line.ca_cert], crl_publisher(line), out,
                                  server_hosts=hosts)
        files.config.host = host
        broker = Broker(files.config, out, port=port)
        if write_only:
            command = broker.write_files(port)
            click.echo("broker files: %s (mosquitto.conf, mosquitto.acl, ca-bundle.pem, "
                       "server.pem, cloud.pem, crl.pem)" % out)
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
        click.echo("mqtt broker: mosquitto pid %d on mqtts://%s:%d (mTLS, identity = "
                   "certificate CN, crlfile, ACL); log %s"
                   % (broker.pid, broker.host, broker.port, broker.log_path))
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
    publisher = files.publisher
    return tuple(publisher.current_der(label) for label in publisher.labels())


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
              help="Seconds between checks for a changed CRL (published retained).")
@click.option("--timeout", default=10.0, show_default=True,
              type=click.FloatRange(1.0, 300.0), help="Bound on each broker exchange (s).")
@pass_file_option
def cloud_cmd(line_dir, broker_url, files_dir, crl_interval, timeout, pass_file):
    """The cloud's MQTT side until SIGTERM / Ctrl-C: each CA's CRL published retained
    (again whenever it changes), telemetry received (one line each), refused messages
    counted (revoked or unknown devices, replays, malformed).

    \b
    Example:
      fleetid mqtt cloud --line var/line --broker mqtts://127.0.0.1:8883
    """
    from fleetid.cloud.mqtt.service import MqttError, registry_refusal

    parse_broker(broker_url)
    line = open_line(line_dir, pass_file)
    try:
        client = cloud_client(line_dir, files_dir, broker_url, "fleet-cloud",
                              registry_refusal(line.registry, device_serial(line)))
        client.sink.on_telemetry = lambda device, fields: click.echo(
            "telemetry %s seq %d: %s" % (device, fields["seq"], fields.get("m")))
        connect(client, timeout)
        click.echo("mqtt cloud: connected to mqtts://%s:%d as fleet-cloud"
                   % (client.host, client.port))
        sys.stdout.flush()
        with StopSignals() as stop:
            _publish_loop(client, crl_publisher(line), crl_interval, timeout, stop)
    except (MqttError, FleetidError) as exc:
        raise fail(exc) from None
    finally:
        line.close()
    client.close()
    click.echo("mqtt cloud: stopped; %s" % ", ".join(
        "%s %d" % item for item in sorted(client.sink.metrics().items())))


def _publish_loop(client, publisher, interval, timeout, stop):
    """Publish each label's CRL when it differs from the last published, every
    `interval` s, until `stop` (the publisher rebuilds a CRL when the registry's
    revocations changed, at its own poll interval, or when it is half-way to nextUpdate)."""
    from fleetid.cloud.mqtt.service import MqttError

    published = {}
    while not stop.is_set():
        for label in publisher.labels():
            der = publisher.current_der(label)
            if published.get(label) != der:
                try:
                    client.publish_crl(label, der, timeout)
                except MqttError as exc:  # paho reconnects; tried again at the next check
                    click.echo("crl %s not published (%s); next try in %.0f s"
                               % (label, exc, interval), err=True)
                    continue
                published[label] = der
                click.echo("crl %s published retained (%d bytes)" % (label, len(der)))
        sys.stdout.flush()
        deadline = time.monotonic() + interval
        while not stop.is_set() and time.monotonic() < deadline:
            stop.wait(min(0.5, deadline - time.monotonic()))
