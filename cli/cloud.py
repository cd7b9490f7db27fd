"""`fleetid cloud`: run the fleet cloud (verifier + EST) and diagnose certificates.
A thin shell over fleetid.cloud.config and fleetid.cloud.verifier."""

import json

import click

from fleetid.cli import revocation as revoke_aliases
from fleetid.cli.hsm_secret import environ_with_secret
from fleetid.cli.options import (
    config_options,
    load_config,
    pass_file_option,
    read_certificates,
    registry_options,
)
from fleetid.common.errors import FleetidError

_VERDICT = {True: "PASS", False: "FAIL", None: "SKIP"}


@click.group()
def cloud():
    """Fleet cloud: the EST CA and the mTLS verifier, and certificate diagnosis.

    \b
    Configuration: --config FILE (TOML, [cloud] table) and FLEETID_CLOUD_* environment
    variables; every key is documented in fleetid/cloud/config.py.  Without any, the
    embedded defaults apply: software keystore, SQLite registry, one issuing CA, all
    under var/cloud (created on first run).
    """


def _adopt(config, root_certs, cas):
    """--root-cert / --ca LABEL=PEM into the configuration (key custody: adopted, not
    made; the server only makes a root and CA on the embedded keystore)."""
    import os

    if root_certs:
        config.roots = [os.path.abspath(p) for p in root_certs]
    labels = []
    for index, item in enumerate(cas):
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise click.BadParameter("%r: expected LABEL=PEM" % item, param_hint="--ca")
        labels.append({"name": label, "ca_key": label, "ca_cert": os.path.abspath(path),
                       "default": index == 0})
    if labels:
        config.labels = labels


@cloud.command("serve")
@config_options("TOML configuration file.")
@click.option("--host", default=None, help="Listen address (default 127.0.0.1).")
@click.option("--verifier-port", type=click.IntRange(0, 65535), default=None)
@click.option("--est-port", type=click.IntRange(0, 65535), default=None)
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Plain-HTTP /metrics on 127.0.0.1 (0 = off).")
@click.option("--crl-port", type=click.IntRange(0, 65535), default=None,
              help="Plain-HTTP CRLs, GET /crl/<label>.crl (0 = off, the default); new "
              "certificates name it as their CRL distribution point.")
@click.option("--root-cert", "root_certs", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Adopt this fleet root (from `fleetid pki init-root`); replaces [cloud] "
                   "roots.")
@click.option("--ca", "cas", multiple=True, metavar="LABEL=PEM",
              help="Adopt an issuing CA (from `fleetid pki new-ca`): its HSM key label, which "
                   "is also its EST label, and its certificate; replaces [[cloud.labels]]; "
                   "the first is the default.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes serving the same ports, supervised by this one "
                   "(restarted when they die, stopped on SIGTERM).  Their shared state "
                   "is in the registry: sqlite:<path> on one host, postgresql://... "
                   "across hosts; a memory: registry is refused.")
@pass_file_option
def serve_cmd(config_path, state_dir, host, verifier_port, est_port, metrics_port, crl_port,
              root_certs, cas, workers, pass_file):
    """Run the verifier (mTLS, client certificate required) and the EST server.

    \b
    Example (on a line's PKI; the README's walkthrough runs these lines):
      fleetid line cloud-config --line var/line --out var/cloud \\
          --verifier-port 8443 --est-port 8444
      fleetid cloud serve --config var/cloud/cloud.toml --crl-port 8446
      curl -sS --cacert var/line/pki/ceremony/root.pem \\
          https://127.0.0.1:8444/.well-known/est/cacerts | tr -d '\\r' | base64 -d \\
          | openssl pkcs7 -inform DER -print_certs -noout
    (EST answers base64 with CRLF line breaks, RFC 8951; coreutils base64 wants the CRs
    gone.)  With no configuration at all, `fleetid cloud serve` runs on embedded
    defaults in var/cloud: a root and an issuing CA of its own, made there.
    Put SE vendor roots (PEM) in var/cloud/vendor-roots/ or name them in the config,
    e.g. the emulator's: var/vendor/vendor_root.pem.
    Only the embedded keystore gets a root and CA made here; on an HSM they are adopted:

    \b
      FLEETID_CLOUD_HSM='pkcs11:module=...;token=fleet;pin-env=PIN' \\
      FLEETID_CLOUD_TLS_CERT=tls.pem FLEETID_CLOUD_TLS_KEY=tls.key.pem \\
      fleetid cloud serve --root-cert ceremony/root.pem --ca ca-widget-b42-eu=ca-b42.pem

    Logs are JSON lines on stderr; the first stdout line is JSON with the bound ports.
    The HSM secret (the embedded keystore's passphrase) comes from its environment
    variable (FLEETID_KEYSTORE_PASS), --keystore-pass-file, or a prompt.
    """
    import logging
    import os

    from fleetid.cloud.http.middleware import configure_json_logging
    from fleetid.cloud.server import ListenError, serve_forever

    env = {} if crl_port is None else {"CRL_PORT": str(crl_port)}
    config = load_config(config_path, state_dir, env, host=host, verifier_port=verifier_port,
                   est_port=est_port, metrics_port=metrics_port)
    _adopt(config, root_certs, cas)
    environ = _environ_with_hsm_secrets(config, pass_file)
    configure_json_logging(getattr(logging, config.log_level.upper(), logging.INFO))
    if workers > 1:
        _serve_workers(config, environ, workers)
        return
    context, server = _compose_server(config, environ)

    def ready(ports):
        click.echo(json.dumps({"listening": ports, "host": config.host,
                               "root": os.path.join(config.state_dir, "ceremony", "root.pem")
                               if not config.roots else config.roots[0],
                               "labels": sorted(server.est_service.labels)}))

    try:
        serve_forever(server, ready, event_loop=config.event_loop)
    except ListenError as exc:  # a busy port: one line naming it, exit 1
        raise click.ClickException(str(exc)) from None
    finally:
        context.close()


def _serve_workers(config, environ, workers):
    """`serve --workers N`: the parent prints the ready line (with the workers' pids)
    and supervises; exit status 1 after a crash loop."""
    import os

    from fleetid.cloud.serve_workers import serve_workers

    def ready(ports, pids):
        click.echo(json.dumps({"listening": ports, "host": config.host, "workers": pids,
                               "root": os.path.join(config.state_dir, "ceremony", "root.pem")
                               if not config.roots else config.roots[0],
                               "labels": sorted(entry["name"] for entry in config.labels)
                               or ["default"]}), nl=True)

    try:
        status = serve_workers(config, environ, workers, ready)
    except (FleetidError, OSError, ValueError) as exc:
        raise click.ClickException("%s: %s" % (type(exc).__name__, exc)) from None
    if status:
        raise click.exceptions.Exit(status)


def _environ_with_hsm_secrets(config, pass_file):
    """The environment with the HSM's secret (and the audit witness's, when it is another
    one) in place: from its variable, --keystore-pass-file, or a prompt."""
    import os

    from fleetid.cloud.hsm import secret_variable

    environ = environ_with_secret(secret_variable(config.hsm), pass_file,
                                  creating=not os.path.exists(config.state_dir))
    witness = config.audit_witness_hsm
    if witness and secret_variable(witness) != secret_variable(config.hsm):
        environ = environ_with_secret(secret_variable(witness), None, environ=environ)
    return environ


def _compose_server(config, environ):
    """(context, CloudServer) from the configuration; a failure is one ClickException
    naming its type (the context is closed when the server cannot be made)."""
    import logging

    from fleetid.cloud.server import CloudServer, build_context

    try:
        context = build_context(config, environ)
    except (FleetidError, OSError, ValueError) as exc:
        raise click.ClickException("%s: %s" % (type(exc).__name__, exc)) from None
    if not context.trust.vendor_roots:
        # A log line like every other one on stderr (JSON), not plain text.
        logging.getLogger("fleetid.cloud").warning(
            "no SE vendor roots configured: every attestation will be refused "
            "(unknown_vendor)")
    try:
        return context, CloudServer.from_context(context)
    except (FleetidError, OSError, ValueError) as exc:
        context.close()
        raise click.ClickException("%s: %s" % (type(exc).__name__, exc)) from None


def _approval_table(config_path, state_dir, registry_uri):
    """(registry, its ApprovalTable) of the configured registry; refused for a registry
    that keeps approvals in the server's process (memory:)."""
    from fleetid.cli.options import open_registry
    from fleetid.cloud.registry.shared_state import shared_tables

    uri = registry_uri or load_config(config_path, state_dir).registry
    registry = open_registry(uri)
    tables = shared_tables(registry)
    if tables is None:
        registry.close()
        raise click.ClickException("registry %s keeps no approvals (use sqlite: or "
                                   "postgresql://)" % uri.partition(":")[0])
    return registry, tables.approvals


@cloud.command("pending")
@registry_options("TOML configuration (its registry) as for serve.")
def pending_cmd(config_path, state_dir, registry_uri):
    """List the EST enrolments waiting for approval (labels with require_approval), one
    "LABEL DEVICE" line each, as every EST worker sharing the registry sees them."""
    registry, approvals = _approval_table(config_path, state_dir, registry_uri)
    try:
        for label, device in approvals.pending():
            click.echo("%s %s" % (label, device))
    except FleetidError as exc:
        raise click.ClickException("%s: %s" % (type(exc).__name__, exc)) from None
    finally:
        registry.close()


@cloud.command("approve")
@click.argument("label")
@click.argument("device")
@registry_options("TOML configuration (its registry) as for serve.")
def approve_cmd(label, device, config_path, state_dir, registry_uri):
    """Approve the deferred EST enrolment (RFC 7030 4.2.3) of DEVICE (its serial, as
    `fleetid cloud pending` lists it) under LABEL: the device's next request to any EST
    worker sharing the registry is issued.

    \b
    Example:
      fleetid cloud approve --config var/cloud/cloud.toml widget-b42 17
    """
    registry, approvals = _approval_table(config_path, state_dir, registry_uri)
    try:
        approvals.approve(label, device)
    except FleetidError as exc:
        raise click.ClickException("%s: %s" % (type(exc).__name__, exc)) from None
    finally:
        registry.close()
    click.echo("approved %s %s" % (label, device))


@cloud.command("check-cert")
@click.argument("cert_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--chain", "chain_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="PEM file(s) with intermediates to offer (repeatable).")
@registry_options("TOML configuration (trust, registry) as for serve.")
@click.option("--at", "at_time", default=None,
              help="Check as of this time (RFC 3339, e.g. 2027-01-01T00:00:00Z).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check_cert_cmd(cert_file, chain_files, config_path, state_dir, registry_uri, at_time,
                   as_json):
    """Explain, check by check, whether the verifier would accept CERT_FILE.

    \b
    Checks (each with PASS / FAIL / SKIP and why): certificate parses, validity, EKU
    clientAuth, chain to a fleet root, CA revocation, registry record, certificate
    revocation, device status, attestation extension (SE vendor chain, attested key,
    policy, SE UID == registry), overlap / supersession.
    Exit status: 0 accepted, 1 refused.
    \b
    Examples (the README's walkthrough runs the first):
      fleetid cloud check-cert --config var/cloud/cloud.toml var/device.pem
      fleetid cloud check-cert --config var/cloud/cloud.toml device.pem --chain ca-b42.pem
    """
    from cryptography.hazmat.primitives import serialization

    from fleetid.cloud.registry import open_registry
    from fleetid.cloud.server import trust_from_config
    from fleetid.cloud.verifier.service import FleetVerifier

    config = load_config(config_path, state_dir)
    certs = read_certificates(cert_file)
    extra = []
    for path in chain_files:  # each file named on its own when it is the bad one
        extra.extend(read_certificates(path, "--chain "))
    extra.extend(certs[1:])  # a PEM bundle: leaf first, then its chain
    when = _check_time(at_time)
    # The registry first: a bad --registry is named as such, not as a missing root.
    try:
        registry = open_registry(registry_uri or config.registry)
    except (FleetidError, OSError, ValueError) as exc:
        raise click.ClickException("registry %s: %s" % (registry_uri or config.registry,
                                                        exc)) from None
    try:
        trust = trust_from_config(config, extra)
    except (FleetidError, OSError, ValueError) as exc:
        registry.close()
        raise click.ClickException("trust (roots, intermediates, vendor roots): %s: %s"
                                   % (type(exc).__name__, exc)) from None
    try:
        verifier = FleetVerifier(trust, registry, accept_identity=config.accept_identity)
        der = certs[0].public_bytes(serialization.Encoding.DER)
        results = verifier.explain(der, now=when)
    finally:
        registry.close()
    accepted = all(r.ok is True for r in results)
    _echo_checks(results, accepted, as_json)
    raise SystemExit(0 if accepted else 1)


def _check_time(at_time):
    """--at as an aware datetime (None: now)."""
    import datetime

    if not at_time:
        return None
    try:
        when = datetime.datetime.fromisoformat(at_time.replace("Z", "+00:00"))
    except ValueError:
        raise click.ClickException("--at must be RFC 3339") from None
    if when.tzinfo is None:
        raise click.ClickException("--at needs a time zone (e.g. Z)")
    return when


def _echo_checks(results, accepted, as_json):
    """Print the verifier's verdict per check, then the overall one."""
    if as_json:
        click.echo(json.dumps({"accepted": accepted, "checks": [
            {"check": r.name, "verdict": _VERDICT[r.ok], "detail": r.detail}
            for r in results]}, indent=2))
    else:
        width = max(len(r.name) for r in results)
        for r in results:
            click.echo("%-*s  %s  %s" % (width, r.name, _VERDICT[r.ok], r.detail))
        click.echo("verdict: %s" % ("ACCEPTED" if accepted else "REFUSED"))


# The revoke commands of earlier releases: hidden aliases of `fleetid revoke`, which owns
# their code (cli/revocation.py) and writes through the one RevocationService.
cloud.add_command(revoke_aliases.cloud_revoke)
cloud.add_command(revoke_aliases.cloud_revoke_ca)
cloud.add_command(revoke_aliases.cloud_revoke_device)
