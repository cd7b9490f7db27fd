"""`fleetid sim`: make emulated chips (fab) and serve one over a socket (serve).

A thin shell over fleetid.sim.fab, fleetid.sim.chip, fleetid.sim.endpoint and
fleetid.sim.server; heavy imports stay inside the commands.
"""

import os
import signal

import click


@click.group()
def sim():
    """The secure-element emulator: make chips, serve one over a bus socket.

    \b
    Examples:
      fleetid sim fab --vendor-dir var/vendor --out var/chip.nvm
      fleetid sim fab --vendor-dir var/vendor --out var/chips/ --count 100
      fleetid sim serve --nvm var/chip.nvm --listen unix:/tmp/se.sock --latency se050
    """


@sim.command()
@click.option(
    "--vendor-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="SE-vendor CA folder (created with a new root CA if absent; key file mode 0600).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="The chip's NVM file; with --count > 1 (or a path ending in /), a folder that "
    "receives se-<uid>.nvm files.",
)
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 100000),
              help="How many chips to make.")
def fab(vendor_dir, out, count):
    """Chip fab: make emulated SEs (UID, MAK and its certificate, SCP03 transport keys).

    Each chip gets an NVM file and, beside it, a JSON fab record (<name>.json, mode 0600)
    with its UID, MAK certificate chain and transport key set number, but no key: the
    SCP03 transport keys stay with the SE vendor, in VENDOR_DIR/transport-keys/ (mode
    0600).  The vendor CA is reused across runs.  Temp files a killed run left are
    removed first.

    \b
    Examples:
      fleetid sim fab --vendor-dir var/vendor --out var/chip.nvm
      fleetid sim fab --vendor-dir var/vendor --out var/chips/ --count 100
    """
    from fleetid.sim import fab as fab_mod

    batch = count > 1 or out.endswith(os.sep) or os.path.isdir(out)
    try:
        if not batch:
            parent = os.path.dirname(os.path.abspath(out))
            os.makedirs(parent, exist_ok=True)
            record = fab_mod.fab_chip(vendor_dir, out)
            click.echo("chip %s -> %s (fab record %s)" % (record.uid_hex, out, record.record_path))
            return
        records = _fab_batch_with_progress(fab_mod, vendor_dir, out, count)
    except FileExistsError as exc:
        raise click.ClickException("%s already exists: fab never overwrites a chip" % exc)
    except (OSError, ValueError) as exc:
        raise click.ClickException("fab of %s (vendor CA %s) failed: %s" % (out, vendor_dir, exc))
    click.echo("%d chips in %s (vendor CA %s)" % (len(records), out, vendor_dir))


def _fab_batch_with_progress(fab_mod, vendor_dir, out, count):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("fab"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("fab", total=count)

        def advance(done, total, record):
            progress.update(task, completed=done)

        return fab_mod.fab_batch(vendor_dir, out, count, progress=advance)


@sim.command()
@click.option("--nvm", "nvm_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The chip's NVM file (from `fleetid sim fab`); updated atomically.")
@click.option("--listen", required=True,
              help="unix:/path/se.sock or tcp:127.0.0.1:PORT (loopback only).")
@click.option("--latency", default="none", show_default=True,
              type=click.Choice(["none", "atecc608", "optiga", "se050"]),
              help="SE latency profile (published-order figures; none = zero latency).")
@click.option("--t1-profile", default="gp", show_default=True, type=click.Choice(["gp", "se05x"]),
              help="T=1' framing: GlobalPlatform, or NXP SE05x (1-byte LEN).")
@click.option("--ber", default=0.0, show_default=True, type=click.FloatRange(0.0, 0.1),
              help="Bit error rate injected on the bus (e.g. 1e-4 for a noisy line).")
@click.option("--seed", type=int, default=None,
              help="Seed of the fault injector (default: random, printed at start).")
@click.option("--idle-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds before an idle client is dropped (frees the bus for the next).")
@click.option("--cut-power-at", type=click.IntRange(1), default=None, metavar="K",
              help="Fault injection: cut the chip's power at its K-th NVM commit from now "
                   "(once; the chip loses its RAM state and the host sees no answer).")
@click.option("--cut-after-atomic", is_flag=True,
              help="With --cut-power-at: cut just after the commit's atomic point (the "
                   "write took effect, the answer is lost) instead of just before it.")
def serve(nvm_path, listen, latency, t1_profile, ber, seed, idle_timeout, cut_power_at,
          cut_after_atomic):
    """Serve one emulated chip over a Unix or loopback TCP socket, speaking T=1'.

    The socket carries raw bus transactions (write a frame, read N bytes, NACK while the
    SE is busy), so the device side runs its real T=1' link against it.  Clients are
    served one at a time, like hosts on one I2C bus.  Stop with Ctrl-C or SIGTERM.

    \b
    Examples:
      fleetid sim serve --nvm var/chip.nvm --listen unix:/tmp/se.sock --latency se050
      fleetid sim serve --nvm var/chip.nvm --listen tcp:127.0.0.1:7050 --ber 1e-4
      fleetid sim serve --nvm var/chip.nvm --listen unix:/tmp/se.sock --t1-profile se05x
      fleetid sim serve --nvm var/chip.nvm --listen unix:/tmp/se.sock --cut-power-at 3
    """
    from fleetid.sim.nvm import NvmError
    from fleetid.sim.server import ListenAddressError, SimServer

    try:
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "big")
        endpoint = _make_endpoint(nvm_path, latency, t1_profile, ber, seed)
        if cut_power_at is not None:
            endpoint.chip.nvm.cut_power_at(cut_power_at, after_atomic=cut_after_atomic)
            endpoint.on_power_loss = _say_power_cut
        server = SimServer(endpoint, listen, idle_timeout_s=idle_timeout)
        server.bind()
    except ListenAddressError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen")
    except OSError as exc:
        raise click.ClickException("cannot listen on %s: %s" % (listen, exc.strerror or exc))
    except NvmError as exc:
        raise click.ClickException("cannot load the chip's NVM %s: %s" % (nvm_path, exc))
    except ValueError as exc:
        raise click.ClickException("cannot serve %s: %s" % (nvm_path, exc))

    def stop(signum, frame):
        server.shutdown()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    click.echo(
        "serving %s on %s (latency %s, T=1' %s, BER %g%s); Ctrl-C stops"
        % (os.path.basename(nvm_path), server.bus_uri, latency, t1_profile, ber,
           ", fault seed %d" % seed if ber else ""),
        err=True,
    )
    try:
        server.serve_forever()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    click.echo("stopped after %d clients, %d bus transactions"
               % (server.clients_served, server.transactions), err=True)


def _say_power_cut(cut):
    """--cut-power-at fired: one line on stderr, as it happens."""
    click.echo("power cut (--cut-power-at): %s; the commit %s, the chip lost its RAM state "
               "and the host gets no answer to this command"
               % (cut, "took effect" if cut.applied else "was lost"), err=True)


def _make_endpoint(nvm_path, latency, t1_profile, ber, seed):
    from fleetid.common import t1
    from fleetid.sim import profiles
    from fleetid.sim.chip import Chip
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.nvm import Nvm

    chip = Chip(Nvm(nvm_path))
    faults = None
    if ber:
        from fleetid.sim.faults import FaultPlan

        faults = FaultPlan(seed=seed, ber=ber)
    return BusEndpoint(
        chip, profile=t1.PROFILES[t1_profile], latency=profiles.get(latency), faults=faults
    )
