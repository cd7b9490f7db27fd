"""`fleetid agent probe-tls`: one TLS 1.3 handshake with the SE's key, and what was
negotiated.

A thin shell over fleetid.device.host.tls13_socket (the portable client of
fleetid.common.tls13 over a CPython socket).  The ECDHE share is the SE's transient key,
the CertificateVerify is signed by the SE, the server chain and CertificateVerify are
verified by the SE's VERIFY.  This module defines the command only; the `agent` group
attaches it.
"""

import sys

import click

from fleetid.common.errors import FleetidError

_TICKET_WAIT_MS = 2000  # servers send their tickets right after the handshake


def _anchors(path):
    # A PEM bundle (one or more certificates) or one DER certificate.
    from fleetid.cli.agent_device import load_cert

    with open(path, "rb") as f:
        data = f.read()
    if b"-----BEGIN" not in data:
        from cryptography.hazmat.primitives import serialization

        return [load_cert(path, "--roots").public_bytes(serialization.Encoding.DER)]
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise click.BadParameter("%s holds no certificate" % path, param_hint="--roots") from None
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def _split_target(target):
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter("expected HOST:PORT", param_hint="HOST:PORT")
    return host.strip("[]"), int(port)


def _handshake(device, host, port, anchors, server_name, slot, ticket, timeout):
    from fleetid.device.host.se_https import CountedCall
    from fleetid.device.host.tls13_socket import connect, se_client_config

    config, ephemeral = se_client_config(device.se, slot, anchors, server_name, ticket=ticket)
    config.signer = CountedCall(config.signer)
    config.verify = CountedCall(config.verify)
    stream = connect(host, port, config, connect_timeout=timeout, io_timeout=timeout)
    try:
        try:
            # Servers send their session tickets right after the handshake.
            stream.wait(lambda: stream.tickets, _TICKET_WAIT_MS)
        except FleetidError:
            pass  # no ticket within the timeout: the report says so
        ops = "generate %d, ecdh %d, sign %d, verify %d" % (
            1 if ephemeral.operations else 0, ephemeral.operations - 1,
            config.signer.calls, config.verify.calls)
        return stream.info, stream.tickets, ops
    finally:
        stream.close()


def _report(info, tickets, ops, slot):
    click.echo("version: %s" % info.version)
    click.echo("suite: %s" % info.suite)
    click.echo("group: %s (ECDHE share in the SE's transient key)" % info.group)
    click.echo("signature scheme: %s" % info.signature_scheme)
    click.echo("hello retry: %s" % ("yes" if info.hello_retry else "no"))
    click.echo("resumption: %s" % ("yes (PSK-DHE, session ticket)" if info.resumed
                                   else "no (full handshake)"))
    click.echo("client certificate: %s" % (("sent, signed by SE slot %d" % slot)
                                           if info.client_certificate else "not requested"))
    if info.peer_record_size_limit:
        click.echo("server record_size_limit: %d" % info.peer_record_size_limit)
    click.echo("session tickets received: %d" % len(tickets))
    click.echo("SE operations: %s" % ops)
    if info.chain_report:
        click.echo("server chain:")
        for check, verdict in info.chain_report:
            click.echo("  %-18s ok  %s" % (check, verdict))
    else:
        click.echo("server chain: not sent (the resumption PSK authenticates the server)")


@click.command("probe-tls")
@click.argument("target", metavar="HOST:PORT")
@click.option("--bus", envvar="FLEETID_BUS", metavar="URI", default=None,
              help="The SE's bus URI (env FLEETID_BUS).")
@click.option("--t1-profile", default="gp", show_default=True,
              type=click.Choice(["gp", "se05x"]))
@click.option("--timeout-ms", default=2000, show_default=True, type=click.IntRange(10),
              help="SE link timeout.")
@click.option("--roots", "roots_file", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Trust anchors (PEM bundle or DER); default: the fleet "
              "root stored in the SE.")
@click.option("--server-name", default=None, metavar="NAME",
              help="Name (or IP) the server certificate must carry; default: HOST.")
@click.option("--slot", default=1, show_default=True, type=click.IntRange(1, 15),
              help="The SE key slot of the client key (1 identity, 2/3 operational).")
@click.option("--resume", is_flag=True,
              help="After the full handshake, a second one resuming with its ticket.")
@click.option("--net-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds for the TCP connect and every network wait.")
def probe_tls(target, bus, t1_profile, timeout_ms, roots_file, server_name, slot, resume,
              net_timeout):
    """One TLS 1.3 handshake to HOST:PORT with the key in the SE; print what was negotiated
    and the server chain's verdict per check.  Exit 1 with the reason on refusal.

    \b
    Example:
      fleetid agent probe-tls verifier.example:8443 --bus sim:unix:/tmp/se.sock
    """
    from fleetid.cli.agent_device import Device, fail
    from fleetid.common.errors import TlsCertificateError, TlsError

    host, port = _split_target(target)
    anchors = _anchors(roots_file) if roots_file else None
    device = Device(bus, t1_profile, timeout_ms)
    try:
        if anchors is None:
            anchors = [device.root_der()]
        name = server_name or host
        click.echo("probe %s:%d, server name %s, client key in SE slot %d" % (host, port, name,
                                                                            slot))
        try:
            info, tickets, ops = _handshake(device, host, port, anchors, name, slot, None,
                                            net_timeout)
            _report(info, tickets, ops, slot)
            if resume:
                if not tickets:
                    click.echo("resume: the server sent no session ticket", err=True)
                    sys.exit(1)
                click.echo("-- resumed handshake --")
                info, tickets, ops = _handshake(device, host, port, anchors, name, slot,
                                                tickets[-1], net_timeout)
                _report(info, tickets, ops, slot)
        except TlsCertificateError as exc:
            click.echo("REFUSED: server chain failed check %r: %s (alert %d)" % (
                exc.check, exc.detail, exc.alert), err=True)
            sys.exit(1)
        except TlsError as exc:
            alert = "" if exc.alert is None else " (alert %d)" % exc.alert
            click.echo("REFUSED: %s%s" % (exc, alert), err=True)
            sys.exit(1)
        except FleetidError as exc:
            fail(exc)
    finally:
        device.close()
