"""`fleetid agent run --runtime micropython`: the board agent (fleetid.device.board.run with
fleetid.device.board_net) under the MicroPython unix port, against the same bus and cloud
as the CPython agent.  A thin shell over fleetid.device.host.micropython_runtime: the
options become the board's constants, certificate files become the DER files a board
keeps, and the interpreter's lines are printed as the CPython agent prints its own.

What the board agent does by itself there: signed boot (--boot-image), enrolment and
re-keying with the journal in the SE, the CRL cache (--crl-issuer/--crl-cache: refreshed
from the distribution point over HTTPS or HTTP, or from the retained MQTT topic; the
servers' chains checked against it, and against the fleet root's CRL with
--root-crl-cache) and, with --mqtt, the MQTT session (telemetry,
retained CRLs, rotate / SCP03-relay / ping commands) -- every TLS connection the portable
TLS 1.3 client with its private-key operations in the SE.
"""

import datetime
import os
import signal
import sys
import tempfile

import click

# `fleetid agent run` options the board agent has no counterpart for, with why.
UNSUPPORTED = (
    ("rotate", "--rotate", "a rotation is asked for by the cloud's MQTT `rotate` command"),
    ("mqtt_revset_signer", "--mqtt-revset-signer", "no compact-set cache on the board yet"),
    ("mqtt_revset_cache", "--mqtt-revset-cache", "no compact-set cache on the board yet"),
)


def refuse_unsupported(bus, options):
    """Raise click.UsageError naming every given option the board agent does not support.
    Params: options: the `fleetid agent run` options by name."""
    given = ["%s (%s)" % (flag, why) for name, flag, why in UNSUPPORTED if options.get(name)]
    if not bus.startswith("sim:"):
        given.append("--bus %s (the unix port reaches an SE through the emulator's socket "
                     "only: sim:unix:PATH or sim:tcp:HOST:PORT)" % bus)
    if given:
        raise click.UsageError("--runtime micropython does not support: " + "; ".join(given))


def _der_files(folder, name, path, option):
    """The certificates of a PEM or DER file as DER files in `folder`.  Returns paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with open(path, "rb") as f:
        data = f.read()
    try:
        certs = (x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                 else [x509.load_der_x509_certificate(data)])
    except ValueError:
        raise click.BadParameter("%s is not a certificate file" % path,
                                 param_hint=option) from None
    out = []
    for i, cert in enumerate(certs):
        target = os.path.join(folder, "%s-%d.der" % (name, i))
        with open(target, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.DER))
        out.append(target)
    return out


def board_options(folder, o):
    """device/board.run keyword arguments from the `fleetid agent run` options `o`."""
    options = {"verifier_url": o["cloud"] or o["est"], "est_url": o["est"] or o["cloud"],
               "renew_fraction": o["renew_fraction"], "renew_margin_s": o["renew_margin"],
               "max_attempts": o["max_attempts"], "max_delay": o["max_delay"],
               "se_keepalive_s": 10}  # below `fleetid sim serve`'s --idle-timeout (30 s)
    if o["label"]:
        options["est_label"] = o["label"]
    if o["boot_image"]:
        options["boot_image"] = os.path.abspath(o["boot_image"])
        options["boot_max_size"] = o["boot_max_size"]
    if o["crl_issuer"] is not None:
        if o["crl_cache"] is None:
            raise click.UsageError("--crl-cache FILE is required with --crl-issuer")
        options["crl_issuer"] = _der_files(folder, "crl-issuer", o["crl_issuer"],
                                           "--crl-issuer")[0]
        options["crl_cache_path"] = os.path.abspath(o["crl_cache"])
        options["crl_grace_s"] = o["crl_grace"]
        options["crl_fail_open"] = o["crl_fail_open"]
    if o.get("root_crl_cache") is not None:
        options["root_crl_cache_path"] = os.path.abspath(o["root_crl_cache"])
        options["crl_grace_s"] = o["crl_grace"]
    if o.get("root_crl_url") is not None:
        options["root_crl_url"] = o["root_crl_url"]
    if o["mqtt_url"]:
        from fleetid.cli.mqtt import DEFAULT_PORT, parse_broker

        host, port = parse_broker(o["mqtt_url"], "--mqtt", DEFAULT_PORT)
        options["mqtt_url"] = "mqtts://%s:%d" % ("[%s]" % host if ":" in host else host, port)
        options["mqtt_crl_labels"] = list(o["mqtt_crl_labels"])
        options["mqtt_timeout_s"] = o["mqtt_timeout"]
        if o["mqtt_ca"]:
            options["mqtt_roots"] = _der_files(folder, "mqtt-ca", o["mqtt_ca"], "--mqtt-ca")
        if o["mqtt_chain"]:
            options["mqtt_chain"] = _der_files(folder, "mqtt-chain", o["mqtt_chain"],
                                               "--mqtt-chain")
    return options


def _when(seconds):
    if seconds in (None, "None"):
        return "-"
    moment = datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class _Output:
    """Prints the interpreter's lines as `fleetid agent run` prints the CPython agent's."""

    def __init__(self, quiet):
        self.quiet = quiet
        self.report = None
        self.failed = False
        self.telemetry = 0
        self.done = False

    def line(self, text):
        word, _, rest = text.rstrip("\n").partition(" ")
        if word == "log":
            if rest.startswith("mqtt: cycle reported as telemetry"):
                self.telemetry += 1
            if rest.startswith("cycle failed"):
                click.echo("FAILED %s (the journal keeps the progress)" % rest[14:], err=True)
            elif not self.quiet:
                click.echo("agent: " + rest)
        elif word == "report":
            slot, serial, not_after, renew_at, journal = rest.split(" ", 4)
            self.report = rest
            click.echo("credential: slot %s, certificate serial %s, valid until %s, renewal "
                       "at %s, journal %s" % (slot, serial, _when(not_after), _when(renew_at),
                                              journal))
        elif word == "revocation":
            click.echo("revocation: %s" % rest)
        elif word == "failed":
            self.failed = True
        elif word == "ssl":
            if rest != "0":
                click.echo("agent: the host's ssl module was imported", err=True)
        elif word == "done":
            self.done = True
        elif word != "stopped":
            click.echo("micropython: " + text.rstrip("\n"), err=True)
        sys.stdout.flush()


def run_micropython(bus, t1_profile, timeout_ms, once, interval, quiet, mp_heap, **o):
    """Run the board agent under the unix port until SIGTERM / Ctrl-C, or one cycle with
    --once.  Returns: the exit status (0: the last cycle succeeded and, with --mqtt, was
    reported as telemetry; 1 otherwise)."""
    from fleetid.device.host import micropython_runtime as runtime

    refuse_unsupported(bus, o)
    if not (o["cloud"] or o["est"]):
        raise click.UsageError("--cloud (and/or --est) is required")
    if "?" not in bus and timeout_ms:
        bus = "%s?timeout_ms=%d" % (bus, timeout_ms)
    with tempfile.TemporaryDirectory(prefix="fleetid-mp-") as folder:
        options = board_options(folder, o)
        try:
            micropython, mpy_cross = runtime.stage(folder, need_umqtt=bool(o["mqtt_url"]))
        except runtime.RuntimeMissing as exc:
            raise click.ClickException("--runtime micropython needs %s" % exc.what) from None
        runtime.board_script(folder, mpy_cross, bus, t1_profile, interval,
                             1 if once else None, options)
        if not quiet:
            click.echo("agent: board agent under MicroPython (%s), core staged as .mpy in %s"
                       % (micropython, folder))
        return _supervise(runtime.start(folder, micropython, mp_heap), _Output(quiet),
                          bool(o["mqtt_url"]))


def _supervise(proc, output, mqtt):
    """Relay the interpreter's lines; SIGTERM / Ctrl-C end it (the SE's journal keeps a
    rotation in flight for the next start).  Returns: the exit status."""
    stopped = []

    def on_signal(signum, frame):
        stopped.append(signum)
        proc.terminate()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for text in proc.stdout:
            output.line(text)
        status = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped:
        click.echo("agent: stopped")
        return 0
    if status != 0 or not output.done:
        click.echo("FAILED the MicroPython interpreter exited with status %d" % status,
                   err=True)
        return 1
    if output.failed or (mqtt and not output.telemetry):
        return 1
    return 0
