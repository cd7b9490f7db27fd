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
      fleetid sim ship --vendor-dir var/vendor --chips var/chips \
          --line-key var/line/pki/transport-wrap.pub.pem --out var/shipment.json
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
    0600); `fleetid sim ship` delivers them to a line wrapped for its HSM.  The vendor CA
    is reused across runs.  Temp files a killed run left are removed first.

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
@click.option("--vendor-dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="The SE vendor's folder (from `fleetid sim fab`): its CA key signs the "
                   "shipment, its transport-keys/ hold the chips' keys.")
@click.option("--chips", "chips_dir", required=True,
              type=click.Path(file_okay=False, exists=True),
              help="Folder of chips from `fleetid sim fab` (their <name>.json fab records).")
@click.option("--line-key", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The line's transport wrapping public key (LINE/pki/transport-wrap.pub.pem).")
@click.option("--lot", default=None, help="Lot name (default: lot-<UTC time>-<4 hex>).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The shipment file to write (JSON; wrapped keys only, never plaintext).")
def ship(vendor_dir, chips_dir, line_key, lot, out):
    """Ship a lot to a factory line: every chip's SCP03 transport keys wrapped for the
    line's HSM (a fresh AES-256 KEK under the line's RSA key with RSAES-OAEP, each key
    under the KEK with AES key wrap, RFC 3394), with KCVs and the vendor's signature per
    chip.  The line unwraps them inside its HSM (`fleetid line run --chips --shipment`).

    \b
    Example:
      fleetid sim ship --vendor-dir var/vendor --chips var/chips \
          --line-key var/line/pki/transport-wrap.pub.pem --out var/shipment.json
    """
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from fleetid.sim import fab as fab_mod
    from fleetid.sim import lot as lot_mod
    from fleetid.sim import ship as ship_mod

    try:
        with open(line_key, "rb") as f:
            public = load_pem_public_key(f.read())
        records = [fab_mod.load_fab_record(os.path.join(chips_dir, name))
                   for name in sorted(os.listdir(chips_dir))
                   if name.startswith("se-") and name.endswith(".json")]
        if not records:
            raise click.ClickException("no fab records (se-*.json) in %s" % chips_dir)
        lot = lot or lot_mod.new_batch_name()
        doc = ship_mod.ship_fab_records(vendor_dir, records, public, lot)
        ship_mod.write_shipment(out, doc)
    except (OSError, ValueError) as exc:
        raise click.ClickException("ship failed: %s" % exc)
    click.echo("lot %s: %d chips' transport keys wrapped for %s -> %s"
               % (lot, len(records), line_key, out))


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


@sim.command("i2c-dev")
@click.option("--listen", required=True, metavar="/dev/NAME",
              help="The i2c-dev node to create (a CUSE character device), e.g. "
              "/dev/i2c-fleetid.")
@click.option("--se", "se_uri", required=True, metavar="URI",
              help="The emulator's socket, as `sim serve --listen` gave it: unix:/path or "
              "tcp:127.0.0.1:PORT (a sim: prefix is accepted).")
@click.option("--address", default="0x48", show_default=True,
              help="The emulated SE's 7-bit I2C address; other addresses NACK.")
@click.option("--cuse-device", default="/dev/cuse", show_default=True,
              type=click.Path(dir_okay=False),
              help="The kernel's CUSE channel (misc char device 10:203).")
@click.option("--timeout-ms", default=5000, show_default=True, type=click.IntRange(100, 600000),
              help="Bound on each wait for the emulator.")
def i2c_dev(listen, se_uri, address, cuse_device, timeout_ms):
    """Put the emulator behind a real i2c-dev node, so `--bus linux:i2c:...` reaches it.

    Creates /dev/NAME through CUSE (character device in user space; Linux with the cuse
    module, run as root) that answers open, read, write and the I2C_SLAVE, I2C_FUNCS and
    I2C_RDWR ioctls as the kernel's i2c-dev does for a plain-I2C adapter, and carries each
    I2C message to the emulator's socket as one bus transaction.  Stop with Ctrl-C or
    SIGTERM (the node disappears).

    \b
    Examples:
      fleetid sim serve --nvm var/chip.nvm --listen unix:/tmp/se.sock &
      sudo fleetid sim i2c-dev --listen /dev/i2c-fleetid --se unix:/tmp/se.sock &
      fleetid se --bus linux:i2c:/dev/i2c-fleetid:0x48 info
    """
    import threading

    from fleetid.sim import cuse

    devname, bus_uri, bridge, protocol = _i2c_dev_bridge(listen, se_uri, address, timeout_ms)
    try:
        fd = cuse.open_cuse(cuse_device)
    except cuse.CuseError as exc:
        raise click.ClickException("cannot start CUSE: %s" % exc.reason)
    stop_event = threading.Event()
    previous = {s: signal.signal(s, lambda signum, frame: stop_event.set())
                for s in (signal.SIGINT, signal.SIGTERM)}

    made_nodes = []

    def announce():
        node, created = cuse.ensure_node(devname)
        if created:
            made_nodes.append(node)
        click.echo("serving %s (i2c-dev, SE at 0x%02x) -> emulator %s; Ctrl-C stops"
                   % (node, bridge.address, bus_uri.uri), err=True)

    try:
        cuse.serve(fd, protocol, stop_event, on_ready=announce)
    except cuse.CuseError as exc:
        raise click.ClickException("CUSE session for %s failed: %s" % (listen, exc.reason))
    finally:
        os.close(fd)  # the kernel removes the device
        for node in made_nodes:
            os.unlink(node)
        for s, handler in previous.items():
            signal.signal(s, handler)
    click.echo("stopped after %d I2C messages to the emulator" % bridge.transfers, err=True)


def _i2c_dev_bridge(listen, se_uri, address, timeout_ms):
    """(device name, emulator bus URI, I2cDevBridge, CuseProtocol) for `sim i2c-dev`'s
    options; a bad one is a BadParameter naming it."""
    from fleetid.device.bus import BusUriError, open_bus, parse_bus_uri
    from fleetid.sim import cuse
    from fleetid.sim.i2cdev import I2cDevBridge

    if not listen.startswith("/dev/") or listen.endswith("/") or len(listen) <= 5:
        raise click.BadParameter("must be a path under /dev/, e.g. /dev/i2c-fleetid",
                                 param_hint="--listen")
    devname = listen[len("/dev/"):]
    try:
        bus_uri = parse_bus_uri(se_uri if se_uri.startswith("sim:") else "sim:" + se_uri)
        if bus_uri.backend != "sim":
            raise BusUriError(se_uri, "not an emulator socket")
        bus_uri.options.setdefault("timeout_ms", str(timeout_ms))
        bridge = I2cDevBridge(lambda: open_bus(bus_uri), address=int(address, 0))
        return devname, bus_uri, bridge, cuse.CuseProtocol(bridge, devname)
    except BusUriError as exc:
        raise click.BadParameter(str(exc), param_hint="--se")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--address or --listen")
