"""`fleetid line ...`: run the factory personalisation line on emulated chips, reconcile
after a crash.  A thin shell over fleetid.cloud.line (workdir, runner, report, reconcile),
with the emulated lot of fleetid.sim.lot / fleetid.sim.metering wired in."""

import contextlib
import os
import signal
import threading

import click

from fleetid.cli.hsm_secret import environ_with_secret, pass_file_option
from fleetid.common.errors import FleetidError

_PROFILES = ("none", "atecc608", "optiga", "se050")


def _fail(exc):
    # Named after the line folder the command works on (its --out / OUT).
    ctx = click.get_current_context(silent=True)
    out = ctx.params.get("out") if ctx is not None else None
    where = "line %s: " % out if out else ""
    if type(exc).__name__ == "NvmError":
        return click.ClickException("%schip NVM: %s" % (where, exc))
    if isinstance(exc, OSError):
        return click.ClickException("%s%s%s" % (where, exc.strerror or exc, (
            ": %s" % exc.filename) if exc.filename else ""))
    return click.ClickException("%s%s: %s" % (where, type(exc).__name__, exc))


def _environ(out, hsm_uri, pass_file, witness_hsm_uri=None):
    """The environment with the HSM secrets of the line in `out` supplied (hsm_secret):
    the line's HSM, then the audit witness's keystore or token when it names another
    variable."""
    from fleetid.cloud.hsm import secret_variable
    from fleetid.cloud.line import workdir

    uri = workdir.line_hsm_uri(out, hsm_uri)
    creating = not os.path.exists(os.path.join(out, workdir.CONFIG_FILE)) and not hsm_uri
    environ = environ_with_secret(secret_variable(uri), pass_file, creating=creating)
    witness = witness_hsm_uri or workdir.line_witness_hsm_uri(out)
    if witness and secret_variable(witness) != secret_variable(uri):
        environ = environ_with_secret(secret_variable(witness), None,
                                      creating=bool(witness_hsm_uri), environ=environ)
    return environ


def _open_or_init(out, hsm_uri, registry_uri, max_sessions=None, init_if_missing=True,
                  pass_file=None, vendor_dir=None):
    from fleetid.cloud.line import workdir

    exists = os.path.exists(os.path.join(out, workdir.CONFIG_FILE))
    if not exists and not init_if_missing:
        raise click.ClickException("no line in %s: run `fleetid line init %s` first"
                                   % (out, out))
    environ = _environ(out, hsm_uri, pass_file)
    if exists:
        return workdir.open_line(out, hsm_uri, registry_uri, max_sessions=max_sessions,
                                 environ=environ)
    click.echo("initialising a line in %s (vendor CA, root ceremony, issuing CA, keys)" % out)
    line = _init_demo_line(out, hsm_uri, registry_uri, environ, vendor_dir=vendor_dir)
    if max_sessions:
        line.close()
        line = workdir.open_line(out, hsm_uri, registry_uri, max_sessions=max_sessions,
                                 environ=environ)
    return line


def _vendor_dir(out, vendor_dir):
    """The simulated SE vendor's folder: --vendor-dir, else "<OUT>.se-vendor" beside the
    line (sim.lot.default_vendor_dir); never inside the line's folder."""
    folder = os.path.abspath(vendor_dir or (os.path.abspath(out).rstrip(os.sep) + ".se-vendor"))
    line_dir = os.path.abspath(out)
    if folder == line_dir or folder.startswith(line_dir + os.sep):
        raise click.BadParameter("%s is inside the line's folder: the SE vendor's keys stay "
                                 "with the vendor" % vendor_dir, param_hint="--vendor-dir")
    return folder


def _init_demo_line(out, hsm_uri, registry_uri, environ, vendor_dir=None, **custody):
    """init_line on the demo's simulated SE vendor: the vendor (its CA and keys in
    `vendor_dir`) publishes its root certificate, only that, into OUT/vendor first (the
    line trusts it; the vendor side, sim.lot, makes the chips with it).  A vendor root
    already in OUT/vendor (a real vendor's, put there by the operator) is kept unless
    --vendor-dir names the simulated one.  `custody`: init_line's root / cas /
    witness_hsm_uri."""
    from fleetid.cloud.line import workdir
    from fleetid.sim import fab

    trust_dir = os.path.join(out, "vendor")
    if not os.path.exists(os.path.join(out, workdir.CONFIG_FILE)) and (
            vendor_dir or not os.path.exists(os.path.join(trust_dir, workdir.VENDOR_ROOT_FILE))):
        fab.publish_vendor_root(_vendor_dir(out, vendor_dir), trust_dir)
    return workdir.init_line(out, hsm_uri, registry_uri, environ=environ, **custody)


_VENDOR_DIR_HELP = ("The simulated SE vendor's folder (its CA key and the chips' transport "
                    "keys; default: OUT.se-vendor beside the line, never inside it).")


@click.group()
def line():
    """The factory personalisation line: stations, reconcile, report.

    \b
    Examples:
      fleetid line init work/line1
      fleetid line run --devices 200 --stations 8 --se-profile se050 --out work/line1
      fleetid line run --devices 64 --stations 1,2,4,8 --out work/line1   # scaling curve
      fleetid line reconcile --out work/line1
      fleetid audit verify --registry sqlite:work/line1/registry.db \\
          --line-pub work/line1/pki/audit-line.pub.pem \\
          --witness-pub work/line1/pki/audit-witness.pub.pem
    """


@line.command("init")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--hsm", "hsm_uri", metavar="URI",
              help="HSM URI (default: a soft keystore in OUT). See `fleetid pki --help`.")
@click.option("--registry", "registry_uri", metavar="URI",
              help="Registry URI (default: sqlite:OUT/registry.db).")
@click.option("--root-cert", type=click.Path(exists=True, dir_okay=False),
              help="Adopt this fleet root (from `fleetid pki init-root`); with --root-label.")
@click.option("--root-label", help="HSM label of the adopted root's key.")
@click.option("--ca", "cas", multiple=True, metavar="LABEL=PEM",
              help="Adopt an issuing CA (from `fleetid pki new-ca`): its HSM key label and "
                   "certificate.  Repeat for one CA per product/batch/region; the first "
                   "is the default, `line run --ca-batch` chooses another.")
@click.option("--witness-hsm", "witness_hsm_uri", metavar="URI",
              help="The audit witness's own keystore or token (required with --hsm; "
                   "default: a soft keystore of its own in OUT/witness).")
@click.option("--vendor-dir", type=click.Path(file_okay=False), help=_VENDOR_DIR_HELP)
@pass_file_option
def init_cmd(out, hsm_uri, registry_uri, root_cert, root_label, cas, witness_hsm_uri,
             vendor_dir, pass_file):
    """Set up a line work directory: the SE vendor's root (the simulated vendor's, on the
    demo path), the fleet root and issuing CAs, SCP03 master key, audit line key and
    firmware key in the HSM, the audit witness key in its own keystore, the registry.

    With --hsm, the root and the issuing CAs are adopted (--root-cert, --root-label,
    --ca), as `fleetid pki init-root` and `fleetid pki new-ca` made them; without, the
    embedded demo creates them (root key ceremony, one CA).

    The embedded soft keystore's passphrase comes from FLEETID_KEYSTORE_PASS, a file
    named with --keystore-pass-file, or a prompt; it is never stored in OUT.

    \b
    Examples (the README's walkthrough runs the first):
      fleetid line init var/line
      HSM="pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=fleetid;pin-env=PIN"
      fleetid line init var/line --hsm "$HSM" --root-cert var/ceremony/root.pem \\
          --root-label fleet-root --ca ca-widget-b42=var/ca-b42.pem \\
          --witness-hsm "soft:var/witness/keystore.json;pass-env=WITNESS_PASS"
    """
    from fleetid.cloud.line import workdir

    root, adopted = _custody_options(root_cert, root_label, cas)
    try:
        if os.path.exists(os.path.join(out, workdir.CONFIG_FILE)):
            raise FileExistsError(out)
        environ = _environ(out, hsm_uri, pass_file, witness_hsm_uri)
        opened = _init_demo_line(out, hsm_uri, registry_uri, environ, vendor_dir=vendor_dir,
                                 root=root, cas=adopted, witness_hsm_uri=witness_hsm_uri)
    except FileExistsError:
        raise click.ClickException("%s already holds a line" % out) from None
    except (FleetidError, OSError) as exc:
        raise _fail(exc) from None
    try:
        click.echo("line initialised in %s" % out)
        click.echo("  root:   %s" % os.path.join(out, opened.config["root_cert"]))
        for entry in opened.config["cas"]:
            click.echo("  CA:     %s (batch %s)" % (os.path.join(out, entry["cert"]),
                                                    entry["scope"]["batch"]))
        click.echo("  audit:  %s" % os.path.join(out, "pki", "audit-line.pub.pem"))
        click.echo("  witness: %s" % os.path.join(out, "pki", "audit-witness.pub.pem"))
        click.echo("  transport wrapping key (for chip vendors): %s"
                   % os.path.join(out, workdir.TRANSPORT_WRAP_PUB))
    finally:
        opened.close()


def _custody_options(root_cert, root_label, cas):
    """(root, cas) for init_line from --root-cert / --root-label / --ca LABEL=PEM."""
    if bool(root_cert) != bool(root_label):
        raise click.UsageError("--root-cert and --root-label go together")
    adopted = []
    for item in cas:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise click.BadParameter("%r: expected LABEL=PEM" % item, param_hint="--ca")
        adopted.append((label, path))
    return ((root_label, root_cert) if root_cert else None), adopted


def _station_counts(text):
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise click.BadParameter("%r: a number or a comma-separated list of numbers, e.g. "
                                 "1,2,4,8" % text, param_hint="--stations")
    counts = [int(part) for part in parts]
    if not counts or any(k < 1 or k > 1024 for k in counts):
        raise click.BadParameter("%r: station counts must be 1..1024" % text,
                                 param_hint="--stations")
    return counts


@contextlib.contextmanager
def _sigterm_interrupts():
    """While the block runs, SIGTERM (a supervisor stopping the line) ends it like Ctrl-C:
    the stations finish their device, the run signs a last audit checkpoint, the command
    exits 1.  The previous handler is put back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@line.command("run")
@click.option("--devices", "-n", type=click.IntRange(1, 1000000), default=None,
              help="Chips to personalise (per station count when several are given); the "
                   "simulated vendor makes them.  Or --chips with --shipment.")
@click.option("--stations", "-k", default="4", show_default=True, metavar="K[,K...]",
              help="Parallel stations; a list runs each count in turn (scaling curve).")
@click.option("--se-profile", type=click.Choice(_PROFILES), default="none",
              show_default=True, help="Latency profile of the emulated SEs.")
@click.option("--hsm", "hsm_uri", metavar="URI", help="HSM URI (default: from the line).")
@click.option("--registry", "registry_uri", metavar="URI",
              help="Registry URI, e.g. sqlite:PATH (default: from the line).")
@click.option("--max-sessions", type=click.IntRange(1, 100000), default=None,
              help="HSM session pool bound (default: the URI's, else 8 or K).")
@click.option("--keep-chips", is_flag=True,
              help="Keep chip NVM files in OUT/chips/<lot> (for reconcile with chip access).")
@click.option("--ca-batch", default=None,
              help="Issue with the line's CA for this product batch (default: its default CA).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Line work directory (initialised on first use); the report goes here.")
@click.option("--vendor-dir", type=click.Path(file_okay=False), help=_VENDOR_DIR_HELP)
@click.option("--chips", "chips_dir", type=click.Path(file_okay=False, exists=True),
              help="Personalise these chips (se-*.nvm from `fleetid sim fab`) instead of a "
                   "simulated lot; with --shipment.")
@click.option("--shipment", type=click.Path(dir_okay=False, exists=True),
              help="Their vendor's transport-key shipment (`fleetid sim ship`), received "
                   "into OUT/shipments/ and the HSM first.")
@pass_file_option
def run_cmd(devices, stations, se_profile, hsm_uri, registry_uri, max_sessions, keep_chips,
            ca_batch, out, vendor_dir, chips_dir, shipment, pass_file):
    """Personalise N emulated chips on K parallel stations sharing the HSM session pool
    and the registry; print a summary and write OUT/report-<lot>.html.

    The simulated SE vendor (in --vendor-dir) makes each lot and ships its chips'
    transport keys wrapped for the line's HSM (OUT/shipments/<lot>.json); the HSM
    unwraps them inside, one chip at a time.

    \b
    Examples (the README's walkthrough runs the first):
      fleetid line run --devices 4 --stations 2 --keep-chips --out var/line
      fleetid line run --devices 64 --stations 1,2,4,8 --se-profile se050 --out var/line
    """
    from rich.console import Console

    counts = _station_counts(stations)
    if bool(chips_dir) != bool(shipment):
        raise click.UsageError("--chips and --shipment go together")
    if bool(devices) == bool(chips_dir):
        raise click.UsageError("give --devices (a simulated lot) or --chips with --shipment")
    if chips_dir and len(counts) > 1:
        raise click.UsageError("--chips runs one station count (a chip is personalised once)")
    console = Console()
    delivered = (chips_dir, shipment) if chips_dir else None
    with _sigterm_interrupts():
        summaries, report = _run_lots(out, hsm_uri, registry_uri, max_sessions, keep_chips,
                                      counts, devices, se_profile, pass_file, console,
                                      ca_batch, vendor_dir, delivered)
    _print_summaries(console, summaries, se_profile, report)


def _delivered_lot(opened, chips_dir, shipment):
    """A ChipLot of the chips in `chips_dir`, their vendor's `shipment` received by the
    line (its KEK into the HSM; a refused shipment raises ShipmentError / HsmError)."""
    import json

    from fleetid.sim import lot as lot_mod

    with open(shipment, "rb") as f:
        try:
            doc = json.loads(f.read().decode("utf-8"))
        except ValueError:
            raise click.ClickException("%s: not a JSON shipment" % shipment) from None
    chips = lot_mod.load_chips(chips_dir)
    if not chips:
        raise click.ClickException("no chips (se-*.nvm) in %s" % chips_dir)
    return lot_mod.ChipLot(opened.receive_shipment(doc), list(chips.values()))


def _run_lots(out, hsm_uri, registry_uri, max_sessions, keep_chips, counts, devices,
              se_profile, pass_file, console, ca_batch=None, vendor_dir=None, delivered=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    from fleetid.cloud.line import reconcile as reconcile_mod
    from fleetid.cloud.line import report as report_mod
    from fleetid.cloud.line import runner
    from fleetid.sim import lot as lot_mod
    from fleetid.sim.metering import EmulatedBuses

    try:
        opened = _open_or_init(out, hsm_uri, registry_uri, max_sessions or max(8, max(counts)),
                               pass_file=pass_file, vendor_dir=vendor_dir)
    except (FleetidError, OSError) as exc:
        raise _fail(exc) from None
    summaries = []
    try:
        pending = reconcile_mod.in_flight_count(opened.registry)
        if pending:
            raise click.ClickException("%d devices are in flight from an earlier run: run "
                                       "`fleetid line reconcile --out %s` first" % (pending, out))
        opened.issuing_ca_for(ca_batch)  # an unknown batch fails before any lot is made
        for k in counts:
            if delivered:
                lot = _delivered_lot(opened, *delivered)
                devices = len(lot.chips)
            else:
                batch = lot_mod.new_batch_name()
                chip_dir = os.path.join(out, "chips", batch) if keep_chips else None
                lot = lot_mod.make_lot(opened, devices, batch=batch, chip_dir=chip_dir,
                                       vendor_dir=_vendor_dir(out, vendor_dir))
            resources = opened.resources_for(lot.batch, ca_batch=ca_batch)
            with Progress(TextColumn("[bold]%d stations" % k), BarColumn(),
                          MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                          TimeElapsedColumn(), console=console, transient=False) as bar:
                task = bar.add_task("line", total=devices, status="")
                failed = [0]

                def progress(done, total, run, bar=bar, task=task, failed=failed):
                    if not run.result.ok:
                        failed[0] += 1
                    bar.update(task, completed=done,
                               status="ok %d  held %d" % (done - failed[0], failed[0]))

                summary = runner.run_line(resources, lot.chips, EmulatedBuses(se_profile),
                                          stations=k, progress=progress)
            summaries.append(summary)
        report = os.path.join(out, "report-%s.html" % summaries[-1].batch)
        report_mod.write_report(summaries, report)
    except (FleetidError, OSError, ValueError) as exc:
        raise _fail(exc) from None
    finally:
        opened.close()
    return summaries, report


def _print_summaries(console, summaries, se_profile, report):
    from rich.table import Table

    table = Table(title="factory line, SE profile %s" % se_profile,
                  caption="K stations, N devices; cycle time, SE time and audit bytes "
                          "per device")
    # Short headers: the table must fit 80 columns (CI logs, narrow terminals).
    for column in ("K", "N", "yield%", "dev/s", "p50ms", "p95ms", "p99ms", "SE ms",
                   "auditB"):
        table.add_column(column, justify="right")
    for s in summaries:
        d = s.as_dict()
        table.add_row(str(s.stations), str(s.devices), "%.2f" % s.yield_pct,
                      "%.2f" % s.throughput, "%.1f" % s.cycle_ms(50), "%.1f" % s.cycle_ms(95),
                      "%.1f" % s.cycle_ms(99), "%.1f" % d["se_ms_mean"],
                      "%.0f" % d["audit_bytes_per_device"])
    console.print(table)
    failures = summaries[-1].failures()
    if failures:
        console.print("failures by cause:")
        for cause, n in failures.items():
            console.print("  %-40s %d" % (cause, n))
    console.print("report: %s" % report)


@line.command("reconcile")
@click.option("--out", required=True, type=click.Path(file_okay=False, exists=True),
              help="Line work directory.")
@click.option("--hsm", "hsm_uri", metavar="URI", help="HSM URI (default: from the line).")
@click.option("--registry", "registry_uri", metavar="URI",
              help="Registry URI (default: from the line).")
@click.option("--operator", default="reconcile", show_default=True)
@click.option("--no-chips", is_flag=True,
              help="Do not look for chips in OUT/chips: revoke instead of resuming.")
@pass_file_option
def reconcile_cmd(out, hsm_uri, registry_uri, operator, no_chips, pass_file):
    """Resolve every in-flight device after a crash: resume it (chip still on a
    programmer and passes the confirmation gate), or quarantine it, revoking any
    certificate that has no committed record.  Safe to run twice.

    \b
    Example (after a crash or a kill of `line run`; the README's walkthrough runs it):
      fleetid line reconcile --out var/line
    """
    from fleetid.cloud.line import reconcile as reconcile_mod
    from fleetid.sim import lot as lot_mod
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.nvm import NvmError

    try:
        opened = _open_or_init(out, hsm_uri, registry_uri, init_if_missing=False,
                               pass_file=pass_file)
    except (FleetidError, OSError) as exc:
        raise _fail(exc) from None
    try:
        chips = {}
        chips_root = os.path.join(out, "chips")
        # Chip NVM temp files of a killed run hold key scalars: gone before anything else.
        for path in lot_mod.remove_stale_chip_files(chips_root):
            click.echo("removed a stale chip temp file: %s" % path)
        if not no_chips and os.path.isdir(chips_root):
            for lot in sorted(os.listdir(chips_root)):
                chips.update(lot_mod.load_chips(os.path.join(chips_root, lot)))

        def chip_bus(se_uid):
            made = chips.get(bytes(se_uid))
            return BusEndpoint(made.chip) if made is not None else None

        report = reconcile_mod.reconcile(opened.resources_for("reconcile"),
                                         chip_bus if chips else None, operator=operator)
    except (FleetidError, OSError, NvmError) as exc:
        raise _fail(exc) from None
    finally:
        opened.close()
    if not report.decisions and not report.swept:
        click.echo("nothing in flight")
    if report.checkpoint is not None:
        click.echo("audit checkpoint signed: covers %d entries"
                   % report.checkpoint.fields["covers"])
    for serial, outcome, detail in report.decisions:
        click.echo("device %s: %s%s" % (serial, outcome, (" (%s)" % detail) if detail else ""))
    for fingerprint in report.swept:
        click.echo("revoked journaled certificate %s" % fingerprint)


@line.command("cloud-config")
@click.option("--line", "line_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="The line work directory (from `fleetid line run`).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The cloud's state directory (cloud.toml and tls/ are written there).")
@click.option("--label", default="widget", show_default=True,
              help="EST label of the line's issuing CA.")
@click.option("--verifier-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="0: any free port.")
@click.option("--est-port", type=click.IntRange(0, 65535), default=0, show_default=True)
@pass_file_option
def cloud_config_cmd(line_dir, out, label, verifier_port, est_port, pass_file):
    """Write a `fleetid cloud serve` configuration on this line's PKI, registry and HSM.

    The TLS server certificate is signed by the fleet root inside the line's HSM, so the
    line's devices trust the server with the anchor in their SE.  The soft keystore's
    passphrase comes from FLEETID_KEYSTORE_PASS, --keystore-pass-file or a prompt.

    \b
    Example (the README's walkthrough runs it; 0, the default, takes any free port):
      fleetid line cloud-config --line var/line --out var/cloud \\
          --verifier-port 8443 --est-port 8444
      fleetid cloud serve --config var/cloud/cloud.toml
    """
    from fleetid.cli.line_cloud_config import write_cloud_config

    try:
        environ = _environ(line_dir, None, pass_file)
        path = write_cloud_config(line_dir, out, label, verifier_port, est_port,
                                  environ=environ)
    except (FleetidError, OSError, ValueError) as exc:
        raise _fail(exc) from None
    click.echo("cloud configuration: %s (label %s -> the line's issuing CA; server certificate"
               " signed by the fleet root in the HSM)" % (path, label))
