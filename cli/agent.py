"""`fleetid agent`: the device agent on a Linux host (and the device-side diagnostics).

A thin shell over fleetid.device.agent (the portable state machine), fleetid.device.stack
(the SE) and fleetid.device.host.agent_net (HTTPS with the client key in the SE).
Errors from any layer become one short line, never a traceback.  Exit status: 0 success,
1 refused / failed (the reason is printed), 2 usage.
"""

import datetime
import json
import random
import re
import signal
import sys

import click

from fleetid.cli.agent_device import Device as _Device
from fleetid.cli.agent_device import fail as _fail
from fleetid.cli.agent_device import load_cert as _load_cert
from fleetid.cli.agent_mqtt import mqtt_options, run_on_mqtt
from fleetid.cli.options import bus_options
from fleetid.common.errors import FleetidError

def _when(seconds):
    if seconds is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


_bus_options = bus_options()


def _bad_heap(value):
    raise click.BadParameter("%r: a size in bytes, or with a K or M suffix (512K)" % value,
                             param_hint="--mp-heap")


def _revocation_options(f):
    f = click.option("--crl-fail-open", is_flag=True,
                     help="With no fresh CRL, do not treat peers as revoked (default: "
                          "fail closed).")(f)
    f = click.option("--crl-grace", default=86400, show_default=True,
                     type=click.IntRange(0, 30 * 86400),
                     help="Seconds a CRL stays usable after its nextUpdate.")(f)
    f = click.option("--crl-issuer", type=click.Path(exists=True, dir_okay=False),
                     default=None, help="The issuing CA certificate (PEM/DER) whose CRL "
                     "the device caches; enables the revocation cache.")(f)
    f = click.option("--crl-cache", type=click.Path(dir_okay=False), default=None,
                     help="File holding the cached CRL (required with --crl-issuer).")(f)
    return f


def _root_crl_options(f):
    f = click.option("--root-crl-url", default=None, metavar="URL",
                     help="The fleet root's CRL (default: root.crl beside the issuing "
                          "CA's CRL URL, as the cloud's revocation listener serves it).")(f)
    f = click.option("--root-crl-cache", type=click.Path(dir_okay=False), default=None,
                     help="File caching the fleet root's CRL (verified in the SE against "
                          "the fleet root; refreshed every cycle).  With it or --crl-issuer, "
                          "every server the agent connects to (verifier, EST, CRL, MQTT) "
                          "is refused when a cached CRL lists its certificate.")(f)
    return f


def _root_revocation(device, root_crl_cache, crl_grace):
    """The fleet root's CRL cache (device/board.root_crl_cache) as `agent status` reads
    it: on the file `agent run --root-crl-cache` keeps, or with none given on no file at
    all (os.devnull: nothing cached, the SE's high-water mark alone).  None when the SE
    holds no fleet root."""
    import os

    from fleetid.common.errors import DerError, ReferenceNotFound
    from fleetid.device.board import root_crl_cache as open_root_cache

    try:
        return open_root_cache(device.se, root_crl_cache or os.devnull, crl_grace)
    except (ReferenceNotFound, DerError):
        return None


def _root_status_line(status, cache_file):
    if status is None:
        return "root CRL: no fleet root in the SE"
    mark = "none" if status["high_water"] is None else "#%d" % status["high_water"]
    where = "SE high-water mark %s (data object 4)" % mark
    if cache_file is None:
        return "root CRL: no cache file given (--root-crl-cache); %s" % where
    if status["number"] is None:
        return "root CRL: none cached in %s; %s" % (cache_file, where)
    return "root CRL: #%d %s (this update %s, next update %s, %d revoked); %s" % (
        status["number"], status["state"], _when(status["this_update"]),
        _when(status["next_update"]), status["revoked"], where)


def _revocation(device, crl_cache, crl_issuer, crl_grace, crl_fail_open):
    """device/crl_cache.CrlCache for the agent, or None when not configured."""
    if crl_issuer is None:
        return None
    if crl_cache is None:
        raise click.UsageError("--crl-cache FILE is required with --crl-issuer")
    from cryptography.hazmat.primitives import serialization

    from fleetid.device.crl_cache import CrlCache, CrlPolicy, FileStore

    issuer = _load_cert(crl_issuer)
    point = issuer.public_key().public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint)
    return CrlCache(device.se, FileStore(crl_cache), point, issuer.subject.public_bytes(),
                    CrlPolicy(grace_s=crl_grace, fail_open=crl_fail_open))


def _cloud_options(f):
    f = click.option("--label", default=None, help="EST label (default: the server's).")(f)
    f = click.option("--est", default=None,
                     help="EST server, https://HOST:PORT (default: the --cloud URL).")(f)
    f = click.option("--cloud", envvar="FLEETID_CLOUD", default=None,
                     help="Verifier, https://HOST:PORT (or FLEETID_CLOUD).")(f)
    return f


@click.group()
def agent():
    """The device agent: enrol, rotate without recall, report; and device diagnostics.

    \b
    The agent keeps its state in the SE (the rotation journal, data object 0), so a
    power cut anywhere resumes where it stopped.  Keys never leave the SE.
    \b
    Examples:
      fleetid agent run --bus sim:unix:/tmp/se.sock --cloud https://127.0.0.1:8443 \\
          --est https://127.0.0.1:8444 --once
      fleetid agent status --bus sim:unix:/tmp/se.sock
      fleetid agent whoami --bus sim:unix:/tmp/se.sock --cloud https://127.0.0.1:8443
    """


@agent.command("run")
@_bus_options
@_cloud_options
@click.option("--once", is_flag=True, help="One cycle, then exit (0 ok, 1 failed).")
@click.option("--rotate", is_flag=True, help="Rotate now (as a cloud command would).")
@click.option("--interval", default=3600.0, show_default=True,
              type=click.FloatRange(1.0, 86400.0),
              help="Seconds between cycles (the next renewal may wake it earlier).")
@click.option("--renew-fraction", default=0.66, show_default=True,
              type=click.FloatRange(0.01, 1.0), help="Renew at this fraction of validity.")
@click.option("--renew-margin", default=0, show_default=True, type=click.IntRange(0),
              help="Also renew when fewer than this many seconds of validity are left "
                   "(the threshold for short-lived certificates, e.g. 28800 for 24 h ones).")
@click.option("--max-attempts", default=5, show_default=True, type=click.IntRange(1, 50),
              help="Tries per network step (exponential backoff with jitter).")
@click.option("--max-delay", default=60.0, show_default=True,
              type=click.FloatRange(1.0, 3600.0), help="Longest backoff / Retry-After (s).")
@click.option("--quiet", is_flag=True, help="Only the summary line per cycle.")
@click.option("--boot-image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="MCUboot image to check before the first connection (signed boot: "
                   "the agent does not connect with a refused image) and to confirm after "
                   "the first accepted one.")
@click.option("--boot-max-size", default=0x100000, show_default=True,
              type=click.IntRange(32), help="Slot size for --boot-image.")
@_revocation_options
@_root_crl_options
@mqtt_options
@click.option("--runtime", default="cpython", show_default=True,
              type=click.Choice(["cpython", "micropython"]),
              help="cpython: this process.  micropython: the board agent "
                   "(fleetid.device.board.run, as flashed to boards) under the MicroPython "
                   "unix port, on a sim: bus; options it lacks are refused by name.")
@click.option("--mp-heap", default=None, metavar="SIZE", callback=lambda ctx, param, value: (
              value if value is None or re.fullmatch(r"[1-9][0-9]*[KkMm]?", value) else
              _bad_heap(value)),
              help="With --runtime micropython: the interpreter's -X heapsize (e.g. 512K; "
                   "default: the unix port's).")
def run_cmd(bus, t1_profile, timeout_ms, cloud, est, label, once, rotate, interval,
            renew_fraction, renew_margin, max_attempts, max_delay, quiet, boot_image,
            boot_max_size, crl_cache, crl_issuer, crl_grace, crl_fail_open, root_crl_cache,
            root_crl_url, runtime, mp_heap, **mqtt):
    """Run the agent: enrol, renew when due (or --rotate), acknowledge, retire the old key.

    \b
    Without --once it loops until SIGTERM / Ctrl-C, which stop it cleanly between steps
    (a rotation in flight resumes at the next start, from the journal in the SE).
    --runtime micropython: the board agent does it all by itself (cli/agent_micropython.py).
    \b
    Examples:
      fleetid agent run --bus sim:unix:/tmp/se.sock --cloud https://127.0.0.1:8443 \\
          --est https://127.0.0.1:8444 --once
      fleetid agent run --bus linux:i2c:/dev/i2c-1:0x48 --t1-profile se05x \\
          --cloud https://verifier.example:8443 --est https://est.example:8444
      fleetid agent run --bus sim:unix:/tmp/se.sock --cloud https://127.0.0.1:8443 \\
          --mqtt mqtts://127.0.0.1:8883 --crl-issuer ca.pem --crl-cache var/agent/ca.crl
      fleetid agent run --runtime micropython --bus sim:unix:/tmp/se.sock \\
          --cloud https://127.0.0.1:8443 --est https://127.0.0.1:8444 --mqtt mqtts://127.0.0.1:8883
    """
    if runtime == "micropython":  # the board agent: cli/agent_micropython.py
        from fleetid.cli.agent_micropython import run_micropython
        options = dict(locals(), **mqtt)
        sys.exit(run_micropython(**{k: v for k, v in options.items() if k not in (
            "mqtt", "runtime", "run_micropython")}))
    import threading

    from fleetid.device.agent import AgentPolicy
    from fleetid.device.host.agent_net import SystemClock

    if mp_heap is not None:
        raise click.UsageError("--mp-heap goes with --runtime micropython")
    if not (cloud or est):
        raise click.UsageError("--cloud (and/or --est) is required")
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    policy = AgentPolicy(renew_fraction=renew_fraction, renew_margin_s=renew_margin,
                         max_attempts=max_attempts,
                         max_delay=max_delay, max_wait=max(max_delay * max_attempts, 60.0))
    cycle = _Cycle(SystemClock(stop), policy,
                   None if quiet else (lambda line: click.echo("agent: " + line)),
                   (cloud, est, label), (crl_cache, crl_issuer, crl_grace, crl_fail_open),
                   boot_image, boot_max_size, (root_crl_cache, root_crl_url))
    try:
        if mqtt["mqtt_url"]:  # the agent with its MQTT session: cli/agent_mqtt.py
            sys.exit(run_on_mqtt(cycle, lambda: _Device(bus, t1_profile, timeout_ms), stop,
                                 once=once, rotate=rotate, interval=interval,
                                 max_delay=max_delay, **mqtt))
        status = _run_cycles(cycle, lambda: _Device(bus, t1_profile, timeout_ms), stop,
                             once, rotate, interval)
    finally:
        cycle.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    sys.exit(status)


def _run_cycles(cycle, open_device, stop, once, rotate, interval):
    """Run agent cycles until `stop` (or one with `once`), each on a freshly opened SE;
    an SE that does not open is retried after `interval` unless `once`.  Returns the last
    cycle's exit status."""
    status = 0
    while not stop.is_set():
        command = "rotate" if rotate else None
        rotate = False
        try:
            device = open_device()
        except click.ClickException as exc:
            if once:
                raise
            click.echo("agent: SE unavailable (%s); next try in %.0f s"
                       % (exc.message, interval), err=True)
            stop.wait(interval)
            continue
        try:
            status, renew_at = cycle.run(device, command)
        finally:
            device.close()
        if once:
            break
        next_wake = interval
        if renew_at is not None:
            next_wake = min(interval, max(1.0, renew_at - cycle.clock.now()))
        stop.wait(next_wake)
    return status


class _Cycle:
    """One cycle of `fleetid agent run` on a freshly opened SE, and what lasts between
    cycles: the clock, the policy, and the signed-boot check (the image is checked once
    per process and confirmed once, whichever SE session the cycle has).

    Params: clock, policy, log: for device.agent.Agent.  net_args: (cloud, est, label).
        revocation_args: (crl_cache, crl_issuer, crl_grace, crl_fail_open).
        boot_image, boot_max_size: --boot-image (None: no signed boot) and its slot size.
        root_crl_args: (root_crl_cache, root_crl_url).
    """

    def __init__(self, clock, policy, log, net_args, revocation_args, boot_image,
                 boot_max_size, root_crl_args=(None, None)):
        self.clock = clock
        self.policy = policy
        self.log = log
        self.net_args = net_args
        self.revocation_args = revocation_args
        self.boot_image = boot_image
        self.boot_max_size = boot_max_size
        self.root_crl_args = root_crl_args
        self.boot = None
        self.report = self.failure = None
        # The servers' session tickets outlive a cycle's SE session and network: the
        # next cycle's first request resumes (a rotation then does one full handshake,
        # the new key's).
        from fleetid.device.host.se_https import TicketCache

        self.tickets = TicketCache()

    def _signed_boot(self, se):
        if self.boot is None and self.boot_image is not None:
            from fleetid.cli.agent_boot import agent_boot_check
            from fleetid.device import boot as boot_mod
            from fleetid.device.agent import SignedBoot

            # The firmware keys installed in the SE (fwkeys.FirmwareKeys), not only the
            # factory key; the log names the key that verified the image.
            crl_cache, crl_issuer = self.revocation_args[:2]
            check = agent_boot_check(self.log, lambda: int(self.clock.now()),
                                     crl_issuer=crl_issuer, crl_cache=crl_cache)
            self.boot = SignedBoot(check, boot_mod.confirm_boot, se,
                                   open(self.boot_image, "rb"), self.boot_max_size)
        if self.boot is not None:
            self.boot.se = se  # checked once per process, confirmed once
        return self.boot

    def revocation(self, device):
        """(issuing CA's CrlCache or None, root's CrlCache or None, the servers'
        revocation hook over both or None: device/board.server_revocation, the board
        agent's own) for a cycle on `device`."""
        from fleetid.device.board import root_crl_cache, server_revocation

        cache = _revocation(device, *self.revocation_args)
        root = None
        if self.root_crl_args[0] is not None:
            root = root_crl_cache(device.se, self.root_crl_args[0], self.revocation_args[2])
        caches = [c for c in (cache, root) if c is not None]
        hook = server_revocation(caches, self.clock.now) if caches else None
        return cache, root, hook

    def agent(self, device, revocation=None):
        """The Agent for a cycle on `device` (a _Device).  revocation: what
        self.revocation(device) returned, to share (None: made here)."""
        from fleetid.device.agent import Agent

        cache, root, hook = revocation or self.revocation(device)
        net = device.net(*self.net_args, tickets=self.tickets, revocation=hook,
                         root_crl_url=self.root_crl_args[1])
        return Agent(device.se, net, self.clock, random.SystemRandom().random,
                     boot=self._signed_boot(device.se), revocation=cache,
                     policy=self.policy, log=self.log, root_revocation=root)

    def run(self, device, command):
        """Run the agent once on `device` (a _Device) and print the outcome.

        Params: command: "rotate" or None.
        Returns: (exit status 0 or 1, the next renewal time or None).  Afterwards
            `report` is the cycle's report, or None and `failure` its reason (for the
            MQTT session's telemetry).
        """
        from fleetid.device.agent import AgentError, NetError

        self.report = self.failure = None
        try:
            report = self.agent(device).run_once(command=command)
        except (AgentError, NetError, InterruptedError, FleetidError) as exc:
            self.failure = getattr(exc, "reason", None) or type(exc).__name__
            _print_failure(exc)
            return 1, None
        self.report = report
        click.echo("credential: slot %d, certificate serial %x, valid until %s, "
                   "renewal at %s, journal %s"
                   % (report.slot, report.serial, _when(report.not_after),
                      _when(report.renew_at), report.journal))
        if report.revocation is not None:
            click.echo("revocation: %s" % report.revocation)
        return 0, report.renew_at

    def close(self):
        """Close the boot image, if one was opened."""
        if self.boot is not None:
            self.boot.reader.close()


def _print_failure(exc):
    from fleetid.device.agent import AgentError, NetError

    if isinstance(exc, AgentError) and exc.reason == AgentError.REFUSED:
        click.echo("REFUSED by the verifier: %s (nothing rotated)" % exc.detail, err=True)
    elif isinstance(exc, AgentError):
        click.echo("FAILED %s" % exc, err=True)
    elif isinstance(exc, NetError):
        click.echo("FAILED network: %s (the journal keeps the progress)" % exc, err=True)
    elif not isinstance(exc, InterruptedError):
        from fleetid.cli.se_connection import describe_error, where

        click.echo("FAILED %s%s" % (where(exc=exc), describe_error(exc)), err=True)


@agent.command("status")
@_bus_options
@click.option("--renew-fraction", default=0.66, show_default=True,
              type=click.FloatRange(0.01, 1.0))
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@_revocation_options
@click.option("--root-crl-cache", type=click.Path(dir_okay=False), default=None,
              help="The file `agent run --root-crl-cache` keeps the fleet root's CRL in "
                   "(default: show the SE's high-water mark alone).")
def status_cmd(bus, t1_profile, timeout_ms, renew_fraction, as_json, crl_cache, crl_issuer,
               crl_grace, crl_fail_open, root_crl_cache):
    """Credentials, key slots, the rotation journal, the next renewal and the CRL caches
    (the issuing CA's, the fleet root's with its high-water mark in the SE; no network).

    \b
    Example:
      fleetid agent status --bus sim:unix:/tmp/se.sock
    """
    from fleetid.device.agent import Agent, AgentError, AgentPolicy
    from fleetid.device.host.agent_net import SystemClock

    device = _Device(bus, t1_profile, timeout_ms)
    try:
        runner = Agent(device.se, None, SystemClock(), random.random,
                       revocation=_revocation(device, crl_cache, crl_issuer, crl_grace,
                                              crl_fail_open),
                       policy=AgentPolicy(renew_fraction=renew_fraction),
                       root_revocation=_root_revocation(device, root_crl_cache, crl_grace))
        try:
            state = runner.status()
        except AgentError as exc:
            raise click.ClickException(str(exc)) from None
        except FleetidError as exc:
            _fail(exc)
    finally:
        device.close()
    if as_json:
        if state["root_revocation"] is not None:
            state["root_revocation"]["cache_file"] = root_crl_cache
            # Not a peers' policy: no fresh root CRL refuses no server (server_revocation).
            state["root_revocation"].pop("policy", None)
        click.echo(json.dumps(state, sort_keys=True))
        return
    click.echo("credential in use: slot %d (%s)" % (
        state["credential_slot"], "settled" if state["final"] else "rotation in flight"))
    for slot, entry in sorted(state["slots"].items()):
        if not entry["key"]:
            click.echo("slot %d: empty" % slot)
        elif not entry["cert"]:
            click.echo("slot %d: key, no certificate" % slot)
        else:
            click.echo("slot %d: key + certificate serial %x, valid until %s"
                       % (slot, entry["serial"], _when(entry["not_after"])))
    click.echo("journal: %s" % ("; ".join(state["journal"]) or "empty (not enrolled)"))
    click.echo("next renewal: %s" % _when(state["renew_at"]))
    if state["revocation"] is not None:
        click.echo("revocation list: %s" % state["revocation"])
    else:
        click.echo("revocation list: not configured (--crl-issuer, --crl-cache)")
    click.echo(_root_status_line(state["root_revocation"], root_crl_cache))


def _refusal(response):
    return response.body.decode("utf-8", "replace").strip()


@agent.command("whoami")
@_bus_options
@_cloud_options
@click.option("--slot", default=None, type=click.IntRange(1, 15),
              help="Key slot to authenticate with (default: the journal's credential).")
@click.option("--save", type=click.Path(dir_okay=False), help="Write the identity JSON here.")
def whoami_cmd(bus, t1_profile, timeout_ms, cloud, est, label, slot, save):
    """GET /v1/whoami at the verifier over mTLS signed in the SE.

    \b
    Example:
      fleetid agent whoami --bus sim:unix:/tmp/se.sock --cloud https://127.0.0.1:8443 --slot 1
    """
    from fleetid.common.mqttmsg import MessageError, decode_document
    from fleetid.device import rotation_journal as rj
    from fleetid.device.host.agent_net import parse_url
    from fleetid.device.host.se_https import SeTlsClient

    if not cloud:
        raise click.UsageError("--cloud is required")
    device = _Device(bus, t1_profile, timeout_ms)
    try:
        if slot is None:
            slot = rj.credential_slot(rj.RotationJournal(device.se).load())
        client = SeTlsClient(device.se, slot, [device.se.get_cert(slot)], [device.root_der()],
                             connect_timeout=10, io_timeout=30)
        host, port = parse_url(cloud)
        response = client.request(host, port, "GET", "/v1/whoami")
    except FleetidError as exc:
        _fail(exc)
    except ValueError as exc:
        raise click.BadParameter("%s: %s" % (cloud, exc), param_hint="--cloud") from None
    finally:
        device.close()
    info = client.last_info
    click.echo("TLS 1.3 %s, client key in SE slot %d (%d signature(s) by the SE, ECDHE in "
               "its transient key, %d VERIFY(s) of the server's chain and CertificateVerify)"
               % (info.suite, slot, client.signatures, client.verifications))
    if response.status != 200:
        click.echo("REFUSED %d %s" % (response.status, _refusal(response)))
        sys.exit(1)
    try:
        identity = decode_document(response.body)
    except MessageError as exc:
        raise click.ClickException("whoami answer: %s" % exc) from None
    click.echo(json.dumps(identity, indent=1))
    if save:
        try:
            with open(save, "w") as f:
                json.dump(identity, f)
        except OSError as exc:
            raise click.ClickException("--save %s: %s" % (save, exc.strerror or exc)) from None


@agent.command("submit-csr")
@_bus_options
@_cloud_options
@click.option("--csr", "csr_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="PKCS#10 request, PEM or DER (e.g. from `openssl req`).")
@click.option("--slot", default=1, show_default=True, type=click.IntRange(1, 15))
@click.option("--op", default="simpleenroll", show_default=True,
              type=click.Choice(["simpleenroll", "simplereenroll"]))
@click.option("--expect-status", default=403, show_default=True, type=int)
def submit_csr_cmd(bus, t1_profile, timeout_ms, cloud, est, label, csr_file, slot, op,
                   expect_status):
    """POST a CSR file over the device's mTLS channel (a negative test: an unattested
    CSR must be refused).  Exit 0 when the server answers --expect-status.

    \b
    Example:
      fleetid agent submit-csr --bus sim:unix:/tmp/se.sock --est https://127.0.0.1:8444 \\
          --csr software.csr --expect-status 403
    """
    import base64

    from fleetid.device.host.agent_net import parse_url
    from fleetid.device.host.se_https import SeTlsClient

    with open(csr_file, "rb") as f:
        data = f.read()
    if b"-----BEGIN" in data:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            data = x509.load_pem_x509_csr(data).public_bytes(serialization.Encoding.DER)
        except ValueError:
            raise click.BadParameter("%s is not a PEM CSR" % csr_file,
                                     param_hint="--csr") from None
    target = est or cloud
    if not target:
        raise click.UsageError("--est is required")
    device = _Device(bus, t1_profile, timeout_ms)
    try:
        client = SeTlsClient(device.se, slot, [device.se.get_cert(slot)], [device.root_der()],
                             connect_timeout=10, io_timeout=30)
        host, port = parse_url(target)
        path = "/.well-known/est/%s%s" % (label + "/" if label else "", op)
        response = client.request(host, port, "POST", path, base64.encodebytes(data),
                                  {"Content-Type": "application/pkcs10"})
    except FleetidError as exc:
        _fail(exc)
    except ValueError as exc:
        raise click.BadParameter("%s: %s" % (target, exc), param_hint="--est/--cloud") from None
    finally:
        device.close()
    if response.status == 200:
        click.echo("ACCEPTED (unexpected for a CSR without attestation)")
        sys.exit(1)
    click.echo("REFUSED %d %s" % (response.status, _refusal(response)))
    sys.exit(0 if response.status == expect_status else 1)


@agent.command("get-cert")
@_bus_options
@click.option("--slot", default=None, type=click.IntRange(1, 15),
              help="Slot (default: the journal's credential).")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def get_cert_cmd(bus, t1_profile, timeout_ms, slot, out):
    """Write the certificate of an SE slot as PEM.

    \b
    Example:
      fleetid agent get-cert --bus sim:unix:/tmp/se.sock --out device.pem
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fleetid.device import rotation_journal as rj

    device = _Device(bus, t1_profile, timeout_ms)
    try:
        if slot is None:
            slot = rj.credential_slot(rj.RotationJournal(device.se).load())
        cert = x509.load_der_x509_certificate(bytes(device.se.get_cert(slot)))
    except FleetidError as exc:
        _fail(exc)
    except ValueError:
        raise click.ClickException("slot %d does not hold a DER certificate" % slot) from None
    finally:
        device.close()
    try:
        with open(out, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise click.ClickException("--out %s: %s" % (out, exc.strerror or exc)) from None
    click.echo("slot %d certificate -> %s" % (slot, out))


def _attach_boot_check():
    # cli/agent_boot.py defines `fleetid agent boot-check` (signed boot, device/boot.py).
    from fleetid.cli.agent_boot import boot_check

    agent.add_command(boot_check)
    # cli/agent_revset.py: `fleetid agent check-peer-offline` (the compact set).
    from fleetid.cli.agent_revset import check_peer_offline

    agent.add_command(check_peer_offline)


_attach_boot_check()


@agent.command("check-peer")
@click.argument("cert", type=click.Path(exists=True, dir_okay=False))
@_bus_options
@_revocation_options
@click.option("--refresh-from", metavar="URL", default=None,
              help="GET a new CRL from this URL first (a connectivity event); default: "
                   "decide on the cached CRL alone, as an offline device does.")
def check_peer_cmd(cert, bus, t1_profile, timeout_ms, crl_cache, crl_issuer, crl_grace,
                   crl_fail_open, refresh_from):
    """Check a peer device's certificate against the cached CRL (no other network).

    The certificate must be issued by --crl-issuer (its signature is checked); its serial
    is then looked up in the CRL the agent cached and verified through the SE.  Exit 0:
    not revoked; 1: revoked, stale under a fail-closed policy, or not from that issuer.

    \b
    Example:
      fleetid agent check-peer peer.pem --bus sim:unix:/tmp/se.sock \\
          --crl-issuer ca.pem --crl-cache var/agent/crl.der
    """
    import time

    from fleetid.device.anchored_store import RevocationCacheError

    if crl_issuer is None:
        raise click.UsageError("--crl-issuer is required: the CA whose CRL decides")
    peer, issuer = _load_cert(cert), _load_cert(crl_issuer)
    try:
        peer.verify_directly_issued_by(issuer)
    except (ValueError, TypeError) as exc:
        click.echo("Error: %s is not issued by %s (%s)" % (cert, crl_issuer, exc), err=True)
        sys.exit(1)
    device = _Device(bus, t1_profile, timeout_ms)
    try:
        cache = _revocation(device, crl_cache, crl_issuer, crl_grace, crl_fail_open)
        now = int(time.time())
        if refresh_from is not None:
            from fleetid.device.host.agent_net import fetch_url

            try:
                # https:// over the device's TLS 1.3 client, anchored at the SE's root.
                roots = [device.root_der()] if refresh_from.startswith("https://") else None
                click.echo("refresh: %s" % cache.refresh(
                    lambda: fetch_url(refresh_from, se=device.se, trust_roots_der=roots), now))
            except FleetidError as exc:
                click.echo("refresh refused, the old cache stays: %s" % exc, err=True)
        try:
            cache.check_serial(peer.serial_number, now)
        except RevocationCacheError as exc:
            click.echo("peer serial %x: REFUSED: %s (%s)" % (
                peer.serial_number, exc, type(exc).__name__), err=True)
            sys.exit(1)
        except FleetidError as exc:
            _fail(exc)
        click.echo("peer serial %x: not revoked (%s)" % (
            peer.serial_number, _status_line(cache.status(now))))
    finally:
        device.close()


def _status_line(status):
    from fleetid.device.agent import status_text

    return status_text(status)


from fleetid.cli.agent_tls import probe_tls  # noqa: E402  `fleetid agent probe-tls` (TLS 1.3)

agent.add_command(probe_tls)
