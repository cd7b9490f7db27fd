"""`fleetid agent boot-check`: check an MCUboot image the way the device's signed boot
does, against the SE on a bus, and print every check with its verdict.

A thin shell over fleetid.device.boot (check_image, confirm_boot) with the firmware keys
the SE holds (fleetid.device.fwkeys.FirmwareKeys: the factory key until a firmware
certificate is installed, then the installed certificates under the fleet root); the SE
is opened from the bus URI the way `fleetid se` opens it (cli/se_connection.py).  This
module defines the command and the check `fleetid agent run --boot-image` uses; the
`agent` group attaches the command.
"""

import time

import click

from fleetid.cli.options import bus_options
from fleetid.cli.se_connection import SeConnection, describe_error
from fleetid.common.errors import FleetidError


def _print_checks(report):
    for name, verdict, detail in report.checks:
        click.echo("  %-17s %-8s %s" % (name, verdict, detail))


def key_text(key_serial, key_name):
    """Which key a report says signed: "firmware certificate serial 1a2b (CN ...)" or the
    factory key."""
    if key_serial is None:
        return "the factory firmware key (DATA_TRUST_FIRMWARE_KEY; no firmware " \
               "certificate installed)"
    return "firmware certificate serial %x (CN %s)" % (key_serial, key_name)


def check_with_installed_keys(se, reader, max_size, now=None, revoked=None):
    """device.boot.check_image with the firmware keys installed in the SE.

    Params: se: SeSession.  reader: the image (file object or bytes).  max_size: slot
        size.  now: seconds since 1970 (certificate validity checked when given).
        revoked: optional fn(serial) -> bool (a firmware certificate the fleet root's CRL
        lists is not accepted).
    Returns: (BootReport, FirmwareKeys) -- the keys' `refused` lists the installed
        certificates not accepted, with the reason.
    Raises: BootError (its report attached) with `firmware_keys` set on it; LinkError /
        ApduError from the SE.
    """
    from fleetid.device import boot
    from fleetid.device.fwkeys import FirmwareKeys

    keys = FirmwareKeys(se, revoked=revoked, now=now)
    try:
        return boot.check_image(se, reader, max_size=max_size, now=now,
                                firmware_keys=keys), keys
    except boot.BootError as exc:
        exc.firmware_keys = keys
        raise


def _is_fleet_root(se, issuer_path):
    # Whether the certificate in `issuer_path` has the key of the SE's fleet root anchor.
    from cryptography.hazmat.primitives import serialization

    from fleetid.cli.agent_device import load_cert
    from fleetid.common.errors import DerError, ReferenceNotFound
    from fleetid.device.certinfo import certificate_facts
    from fleetid.device.fwkeys import _DATA_TRUST_FLEET_ROOT, _LE_LONG

    point = load_cert(issuer_path, param_hint="--crl-issuer").public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    try:
        root = certificate_facts(se.get_data(_DATA_TRUST_FLEET_ROOT, -1, _LE_LONG))
    except (ReferenceNotFound, DerError):
        return False
    return bytes(root.point) == point


def agent_boot_check(log, now, crl_issuer=None, crl_cache=None):
    """A check_image for device.agent.SignedBoot (`fleetid agent run --boot-image`): the
    installed firmware keys, and a log line naming the key that verified the image or
    why none did.

    Params: log: fn(text) or None.  now: fn() -> seconds since 1970.  crl_issuer,
        crl_cache: the agent's --crl-issuer / --crl-cache; when the issuer is the fleet
        root (which certifies firmware keys), firmware certificates its cached CRL lists
        are not accepted; an issuing CA's CRL says nothing about them and is not used.
    """
    from fleetid.device import boot

    def check(se, reader, max_size=boot.DEFAULT_MAX_SIZE):
        when = now()
        revoked = None
        if crl_issuer is not None and crl_cache is not None and \
                _is_fleet_root(se, crl_issuer):
            revoked = root_crl_revoked(se, crl_issuer, crl_cache, when)
        try:
            report, keys = check_with_installed_keys(se, reader, max_size, when, revoked)
        except boot.BootError as exc:
            if log is not None:
                for serial, reason in exc.firmware_keys.refused:
                    log("signed boot: firmware certificate %s not accepted: %s" % (
                        "?" if serial is None else "%x" % serial, reason))
            raise
        if log is not None:
            log("signed boot: image %s, security counter %d, verified by %s" % (
                report.version_string(), report.security_counter,
                key_text(report.key_serial, report.key_name)))
        return report

    return check


def root_crl_revoked(se, crl_issuer, crl_cache, now):
    """fn(serial) -> bool over the fleet root's CRL cached in `crl_cache` (device/crl_cache,
    verified in the SE with `crl_issuer`'s key), or None when neither is given.

    A listed serial is revoked even when the CRL is stale; a missing or stale CRL revokes
    nothing (a device must still boot without a network: the certificates' validity and
    the anti-rollback counter still hold).
    Raises: click.UsageError when only one of the two is given."""
    if crl_issuer is None and crl_cache is None:
        return None
    if crl_issuer is None or crl_cache is None:
        raise click.UsageError("--crl-issuer and --crl-cache go together")
    from cryptography.hazmat.primitives import serialization

    from fleetid.cli.agent_device import load_cert
    from fleetid.device.crl_cache import (CrlCache, CrlPolicy, FileStore, RevokedError,
                                          StaleRevocationError)

    issuer = load_cert(crl_issuer, param_hint="--crl-issuer")
    point = issuer.public_key().public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint)
    cache = CrlCache(se, FileStore(crl_cache), point, issuer.subject.public_bytes(),
                     CrlPolicy())

    def revoked(serial):
        try:
            cache.check_serial(serial, now)
        except RevokedError:
            return True
        except StaleRevocationError:
            return False
        return False

    return revoked


def _print_keys(keys):
    for serial, reason in keys.refused:
        click.echo("firmware certificate %s not accepted: %s" % (
            "?" if serial is None else "%x" % serial, reason))


@click.command("boot-check")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@bus_options("bus_uri", required=True)
@click.option("--max-size", default=0x100000, show_default=True, type=click.IntRange(32),
              help="Slot size in bytes: a larger image, or a longer file, is refused.")
@click.option("--confirm", is_flag=True,
              help="After the checks pass, advance the SE's firmware counter to the image's "
              "security counter (do this only once the image has booted well).")
@click.option("--crl-issuer", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The fleet root certificate (PEM/DER), whose CRL in --crl-cache lists "
                   "retired firmware certificates: those are not accepted.")
@click.option("--crl-cache", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The fleet root's CRL as the agent caches it (e.g. `fleetid agent "
                   "check-peer --crl-issuer root.pem --crl-cache FILE --refresh-from URL`).")
def boot_check(image, bus_uri, max_size, confirm, crl_issuer, crl_cache, t1_profile,
               timeout_ms):
    """Check an MCUboot IMAGE (signed with imgtool or `fleetid ota sign-image`) against
    the firmware keys installed in the SE and its anti-rollback counter; print each check,
    its verdict and the key that verified the image.  Exit 1 on refusal.

    \b
    Keys accepted: the factory key until a firmware certificate is installed (`fleetid
    ota install-fw-key`), then only the installed certificates the fleet root signed and
    that are within their validity and not on the root's CRL (--crl-issuer, --crl-cache):
    the factory key is retired.

    \b
    Examples:
      fleetid agent boot-check app.signed.bin --bus sim:unix:/tmp/se.sock
      fleetid agent boot-check app.signed.bin --bus sim:unix:/tmp/se.sock --confirm
      fleetid agent boot-check app.signed.bin --bus sim:unix:/tmp/se.sock \\
          --crl-issuer var/line/pki/ceremony/root.pem --crl-cache var/agent/root.crl
    """
    from fleetid.device import boot

    conn = SeConnection(bus_uri, t1_profile, timeout_ms)
    try:
        se = conn.session()
        with open(image, "rb") as reader:
            try:
                now = int(time.time())
                if crl_issuer is not None and not _is_fleet_root(se, crl_issuer):
                    raise click.UsageError("--crl-issuer %s: not the SE's fleet root, which "
                                           "certifies firmware keys" % crl_issuer)
                report, keys = check_with_installed_keys(
                    se, reader, max_size, now, root_crl_revoked(se, crl_issuer, crl_cache,
                                                                now))
            except boot.BootError as exc:
                click.echo("image %s" % image)
                if exc.report is not None:
                    _print_checks(exc.report)
                _print_keys(exc.firmware_keys)
                raise click.ClickException("refused: %s" % exc) from None
        click.echo("image %s" % image)
        _print_checks(report)
        _print_keys(keys)
        click.echo("verified by %s" % key_text(report.key_serial, report.key_name))
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
