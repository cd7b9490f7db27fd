"""`fleetid agent check-peer-offline`: decide on a peer device's certificate from the cached
compact revocation set (the offline tier), verified through the SE.

A thin shell over fleetid.device.revset_cache.  The set (or a delta) arrives by whatever
channel the device has (HTTP when it can, a retained message, a broadcast, a file carried
over): --load FILE hands it to the cache, which keeps it only if it verifies; --fetch URL
gets it first (https:// over the device's TLS 1.3 client, the server checked by the SE to
--root).  This module defines the command only; the `agent` group attaches it.
"""

import sys

import click

from fleetid.cli.options import bus_options
from fleetid.common.errors import FleetidError


def _load_cert(path):
    from fleetid.cli.agent_device import load_cert as load

    return load(path)


@click.command("check-peer-offline")
@click.argument("cert", type=click.Path(exists=True, dir_okay=False))
@bus_options(timeout_ms=2000, shortest_ms=10)
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
@click.option("--fetch", "fetch_url", metavar="URL", default=None,
              help="GET the set or delta from URL, then as --load: https:// goes over the "
              "device's TLS 1.3 client with the server verified by the SE to --root.")
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
                       load_file, fetch_url, grace, clock_skew, fail_open):
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
    from fleetid.device.anchored_store import FileStore, RevocationCacheError
    from fleetid.device.revset_cache import RevsetCache, RevsetPolicy

    if load_file is not None and fetch_url is not None:
        raise click.UsageError("--load and --fetch are exclusive")
    point, fleet = _signer_anchor(root_file, signer_file)
    facts, device_serial = _peer(cert)
    device = _Device(bus, t1_profile, timeout_ms)
    try:
        cache = RevsetCache(device.se, FileStore(cache_file), point, fleet,
                            RevsetPolicy(grace_s=grace, fail_open=fail_open,
                                         clock_skew_s=clock_skew))
        now = int(time.time())
        if load_file is not None or fetch_url is not None:
            _receive_set(cache, device, load_file, fetch_url, root_file, now)
        try:
            cache.check(facts, now)
        except RevocationCacheError as exc:
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


def _receive_set(cache, device, load_file, fetch_url, root_file, now):
    """Hand a set or delta from --load FILE or --fetch URL to the cache; exit 1 if it
    cannot be had or the cache refuses it (the old set stays)."""
    from fleetid.device.anchored_store import RevocationCacheError

    if fetch_url is not None:
        from cryptography.hazmat.primitives import serialization

        from fleetid.device.host.agent_net import fetch_url as fetch

        try:
            data = fetch(fetch_url, 30, se=device.se, trust_roots_der=[
                _load_cert(root_file).public_bytes(serialization.Encoding.DER)])
        except FleetidError as exc:
            click.echo("Error: --fetch %s: %s, the old set stays" % (fetch_url, exc), err=True)
            sys.exit(1)
        load_file = fetch_url
    else:
        with open(load_file, "rb") as f:
            data = f.read()
    try:
        click.echo("load: %s" % cache.receive(data, now))
    except RevocationCacheError as exc:
        click.echo("Error: %s refused, the old set stays: %s" % (load_file, exc), err=True)
        sys.exit(1)


def _signer_anchor(root_file, signer_file):
    """(signer point, fleet id): the set signer must be issued by the root, with the
    revocation-set EKU (device/host/revset_signer.py)."""
    from fleetid.device.host.revset_signer import signer_anchor

    try:
        return signer_anchor(_load_cert(signer_file), _load_cert(root_file))
    except ValueError as exc:
        raise click.ClickException("%s: %s" % (signer_file, exc)) from None


def _peer(cert):
    """(certinfo.CertFacts, device serial) of the peer certificate file."""
    from cryptography.hazmat.primitives import serialization

    from fleetid.device.certinfo import certificate_facts
    from fleetid.device.revset_cache import RevsetCacheError, peer_device

    try:
        facts = certificate_facts(_load_cert(cert).public_bytes(serialization.Encoding.DER))
    except FleetidError as exc:
        raise click.ClickException("%s: not a fleet certificate (%s)" % (cert, exc)) from None
    try:
        return facts, peer_device(facts)
    except RevsetCacheError as exc:
        name = facts.serial_number if facts.serial_number is not None else facts.common_name
        raise click.ClickException("%s: the subject's device serial %r (serialNumber, else "
                                   "CN) is not PREFIX-<digits> as the line writes it (%s)"
                                   % (cert, (name or "")[:64], exc.reason)) from None
