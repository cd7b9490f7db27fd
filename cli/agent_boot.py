"""`fleetid agent boot-check`: check an MCUboot image the way the device's signed boot
does, against the SE on a bus, and print every check with its verdict.

A thin shell over fleetid.device.boot (check_image, confirm_boot); the SE is opened from
the bus URI the way `fleetid se` opens it (cli/se_connection.py).  This module defines the
command only; the `agent` group attaches it.
"""

import click

from fleetid.cli.se_connection import SeConnection, describe_error
from fleetid.common.errors import FleetidError


def _print_checks(report):
    for name, verdict, detail in report.checks:
        click.echo("  %-17s %-8s %s" % (name, verdict, detail))


@click.command("boot-check")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--bus", "bus_uri", envvar="FLEETID_BUS", metavar="URI", required=True,
              help="sim:unix:/path | sim:tcp:HOST:PORT | linux:i2c:/dev/i2c-N:0xADDR  "
              "(env FLEETID_BUS)")
@click.option("--max-size", default=0x100000, show_default=True, type=click.IntRange(32),
              help="Slot size in bytes: a larger image is refused.")
@click.option("--confirm", is_flag=True,
              help="After the checks pass, advance the SE's firmware counter to the image's "
              "security counter (do this only once the image has booted well).")
@click.option("--t1-profile", default="gp", show_default=True, type=click.Choice(["gp", "se05x"]),
              help="T=1' framing: GlobalPlatform, or NXP SE05x (1-byte LEN).")
@click.option("--timeout-ms", default=5000, show_default=True, type=click.IntRange(100, 600000),
              help="Bound on each socket wait of the sim bus.")
def boot_check(image, bus_uri, max_size, confirm, t1_profile, timeout_ms):
    """Check an MCUboot IMAGE (signed with imgtool) against the SE's firmware key and
    anti-rollback counter; print each check and its verdict.  Exit 1 on refusal.

    \b
    Examples:
      fleetid agent boot-check app.signed.bin --bus sim:unix:/tmp/se.sock
      fleetid agent boot-check app.signed.bin --bus sim:unix:/tmp/se.sock --confirm
    """
    from fleetid.device import boot

    conn = SeConnection(bus_uri, t1_profile, timeout_ms)
    try:
        se = conn.session()
        with open(image, "rb") as reader:
            try:
                report = boot.check_image(se, reader, max_size=max_size)
            except boot.BootError as exc:
                click.echo("image %s" % image)
                if exc.report is not None:
                    _print_checks(exc.report)
                raise click.ClickException("refused: %s" % exc) from None
        click.echo("image %s" % image)
        _print_checks(report)
        click.echo("version %s, security counter %d (SE counter %d)" % (
            report.version_string(), report.security_counter, report.se_counter))
        if confirm:
            value = boot.confirm_boot(se, report)
            click.echo("confirmed: SE firmware counter now %d" % value)
        click.echo("accepted")
    except FleetidError as exc:
        raise click.ClickException(describe_error(exc)) from None
    except ValueError as exc:  # BusUriError and friends
        raise click.ClickException(str(exc)) from None
    finally:
        conn.close()
