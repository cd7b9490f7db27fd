"""`fleetid agent check-peer-offline`: decide on a peer device's certificate from the cached
compact revocation set (the offline tier), verified through the SE.

A thin shell over fleetid.device.revset_cache.  The set (or a delta) arrives by whatever
channel the device has (HTTP when it can, a retained message, a broadcast, a file carried
over): --load FILE hands it to the cache, which keeps it only if it verifies.  This module
defines the command only; the `agent` group attaches it.
"""

import sys

import click

from fleetid.common.errors import FleetidError


def _load_cert(path):
    from fleetid.cli.agent_device import load_cert as load

    return load(path)


@click.command("check-peer-offline")
@click.argument("cert", type=click.Path(exists=True, dir_okay=False))
@click.option("--bus", envvar="FLEETID_BUS", metavar="URI", default=None,
              help="The SE's bus URI (env FLEETID_BUS).")
@click.option("--t1-profile", default="gp", show_default=True,
              type=click.Choice(["gp", "se05x"]))
@click.option("--timeout-ms", default=2000, show_default=True, type=click.IntRange(10))
@click.option("--root", "root_file", type=click.Path(exists=True, dir_okay=False),
              required=True, help="The fleet root certificate (names the fleet).")
@click.option("--signer", "signer_file", type=click.Path(exists=True, dir_okay=False),
              required=True, help="The revocation-set signer's certificate (issued by the "
              "root; <state_dir>/revocation/revset-signer.pem in the cloud).")
@click.option("--cache", "cache_file", type=click.Path(dir_okay=False), required=True,
              help="File holding the cached set.")
@click.option("--load", "load_file", type=click.Path(exists=True, dir_okay=False),
              default=None, help="A set (.frs) or delta (.frd) just received: verified "
              "through the SE and kept only if it passes.")
@click.option("--grace", default=7 * 86400, show_default=True,
              type=click.IntRange(0, 365 * 86400),
              help="Seconds a set stays usable past its next_update.")
@click.option("--clock-skew", default=300, show_default=True,
              type=click.IntRange(0, 30 * 86400),
              help="Seconds a set's this_update may be ahead of this device's clock; a set "
              "from further in the future is refused.")
@click.option("--fail-open", is_flag=True,
              help="With no fresh set, do not treat peers as revoked (default: fail closed).")
def check_peer_offline(cert, bus, t1_profile, timeout_ms, root_file, signer_file, cache_file,
                       load_file, grace, clock_skew, fail_open):
    """Check a peer device's certificate against the cached compact revocation set.

    The peer's device serial (its subject serialNumber as the line writes it,
    FID-000000042 -> device 42, the registry serial the set holds) is looked up in the
    set, and its issuing CA's key identifier (its AKI) among the revoked batches.  Exit 0: not
    revoked; 1: revoked, stale under a fail-closed policy, or a refused --load.

    \b
    Example:
      fleetid agent check-peer-offline peer.pem --bus sim:unix:/tmp/se.sock \\
          --root root.pem --signer revset-signer.pem --cache var/agent/revset.frs \\
          --load received.frd
    """
    import time

    from fleetid.cli.agent_device import Device as _Device
    from fleetid.cloud.revocation.compact import public_point
    from fleetid.common import revset
    from fleetid.device.crl_cache import FileStore
    from fleetid.device.revset_cache import RevsetCache, RevsetCacheError, RevsetPolicy

    root, signer, peer = _load_cert(root_file), _load_cert(signer_file), _load_cert(cert)
    _check_signer(signer, root, signer_file)
    device_serial, ca_key_id = _peer_identity(peer, cert)
    device = _Device(bus, t1_profile, timeout_ms)
    try:
        cache = RevsetCache(device.se, FileStore(cache_file), public_point(signer.public_key()),
                            revset.fleet_id(public_point(root.public_key())),
                            RevsetPolicy(grace_s=grace, fail_open=fail_open,
                                         clock_skew_s=clock_skew))
        now = int(time.time())
        if load_file is not None:
            with open(load_file, "rb") as f:
                data = f.read()
            apply = cache.apply_delta if data[:4] == revset.DELTA_MAGIC else cache.refresh
            try:
                click.echo("load: %s" % apply(lambda: data, now))
            except RevsetCacheError as exc:
                click.echo("Error: %s refused, the old set stays: %s" % (load_file, exc),
                           err=True)
                sys.exit(1)
        try:
            cache.check(device_serial, ca_key_id, now)
        except RevsetCacheError as exc:
            click.echo("peer device %d: REFUSED: %s (%s)" % (device_serial, exc,
                                                           type(exc).__name__), err=True)
            sys.exit(1)
        status = cache.status(now)
        click.echo("peer device %d: not revoked (set #%s %s, %s revoked, %s batches)" % (
            device_serial, status["number"], status["state"], status["revoked"],
            status["revoked_cas"]))
    except FleetidError as exc:
        raise click.ClickException("%s: %s" % (type(exc).__name__, exc)) from None
    finally:
        device.close()


def _check_signer(signer, root, signer_file):
    """The set signer must be issued by the root, with the revocation-set EKU."""
    from cryptography import x509

    from fleetid.cloud.revocation.compact import OID_KP_REVOCATION_SET

    try:
        signer.verify_directly_issued_by(root)
        usages = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if OID_KP_REVOCATION_SET not in usages:
            raise ValueError("not a revocation-set signer (extendedKeyUsage)")
    except (ValueError, TypeError, x509.ExtensionNotFound) as exc:
        raise click.ClickException("%s: %s" % (signer_file, exc)) from None


def _peer_identity(peer, cert):
    """(device serial, issuing CA key id or None) of a peer certificate.  The device
    serial as the line writes it (FID-000000042 -> 42, the registry serial the compact
    set holds); a certificate without serialNumber is named by its CN."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from fleetid.device.revset_cache import RevsetCacheError, device_number

    names = peer.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER) or \
        peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise click.ClickException("%s: the subject names no single device serial "
                                   "(serialNumber or CN)" % cert)
    try:
        device_serial = device_number(names[0].value)
    except RevsetCacheError as exc:
        raise click.ClickException("%s: the subject's device serial %r (serialNumber, else "
                                   "CN) is not PREFIX-<digits> as the line writes it (%s)"
                                   % (cert, names[0].value[:64], exc.reason)) from None
    try:
        ca_key_id = peer.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        ca_key_id = None
    return device_serial, ca_key_id
