"""`fleetid cloud`: run the fleet cloud (verifier + EST) and diagnose certificates.
A thin shell over fleetid.cloud.config and fleetid.cloud.verifier."""

import json

import click

from fleetid.cli.hsm_secret import environ_with_secret, pass_file_option
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


def _load(config_path, state_dir=None, env=None, **overrides):
    import os

    from fleetid.cloud.config import ENV_PREFIX, ConfigError, load_config

    environ = dict(os.environ)
    for key, value in (env or {}).items():  # keys whose defaults derive others
        environ[ENV_PREFIX + key] = value
    if state_dir:
        environ[ENV_PREFIX + "STATE_DIR"] = os.path.abspath(state_dir)
    try:
        config = load_config(config_path, environ)
    except ConfigError as exc:
        raise click.ClickException("config: %s" % exc) from None
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    return config


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
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="TOML configuration file.")
@click.option("--state-dir", default=None, help="Override [cloud] state_dir.")
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
@pass_file_option
def serve_cmd(config_path, state_dir, host, verifier_port, est_port, metrics_port, crl_port,
              root_certs, cas, pass_file):
    """Run the verifier (mTLS, client certificate required) and the EST server.

    \b
    Example (embedded defaults, one command):
      fleetid cloud serve
      curl --cacert var/cloud/ceremony/root.pem \\
           https://127.0.0.1:8444/.well-known/est/cacerts | base64 -d |
           openssl pkcs7 -inform DER -print_certs
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

    from fleetid.cloud.hsm import secret_variable
    from fleetid.cloud.http.middleware import configure_json_logging
    from fleetid.cloud.server import CloudServer, ListenError, build_context, serve_forever

    env = {} if crl_port is None else {"CRL_PORT": str(crl_port)}
    config = _load(config_path, state_dir, env, host=host, verifier_port=verifier_port,
                   est_port=est_port, metrics_port=metrics_port)
    _adopt(config, root_certs, cas)
    environ = environ_with_secret(secret_variable(config.hsm), pass_file,
                                  creating=not os.path.exists(config.state_dir))
    witness = config.audit_witness_hsm
    if witness and secret_variable(witness) != secret_variable(config.hsm):
        environ = environ_with_secret(secret_variable(witness), None, environ=environ)
    configure_json_logging(getattr(logging, config.log_level.upper(), logging.INFO))
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
        server = CloudServer.from_context(context)
    except (FleetidError, OSError, ValueError) as exc:
        context.close()
        raise click.ClickException("%s: %s" % (type(exc).__name__, exc)) from None

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


def _registry_options(config_help, registry_help="Registry URI (default: from the "
                                                 "configuration)."):
    """--config, --state-dir and --registry: where a command finds the cloud's registry."""
    def decorate(function):
        function = click.option("--registry", "registry_uri", default=None,
                                help=registry_help)(function)
        function = click.option("--state-dir", default=None,
                                help="Override [cloud] state_dir.")(function)
        return click.option("--config", "config_path",
                            type=click.Path(exists=True, dir_okay=False),
                            help=config_help)(function)
    return decorate


@cloud.command("check-cert")
@click.argument("cert_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--chain", "chain_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="PEM file(s) with intermediates to offer (repeatable).")
@_registry_options("TOML configuration (trust, registry) as for serve.")
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
    Example:
      fleetid cloud check-cert device.pem --chain ca-widget-b42-eu.pem
    """
    import datetime

    from cryptography.hazmat.primitives import serialization

    from fleetid.cloud.registry import open_registry
    from fleetid.cloud.server import trust_from_config
    from fleetid.cloud.verifier.service import FleetVerifier

    config = _load(config_path, state_dir)
    certs = _read_certificates(cert_file)
    extra = []
    for path in chain_files:  # each file named on its own when it is the bad one
        extra.extend(_read_certificates(path, "--chain "))
    extra.extend(certs[1:])  # a PEM bundle: leaf first, then its chain
    when = None
    if at_time:
        try:
            when = datetime.datetime.fromisoformat(at_time.replace("Z", "+00:00"))
        except ValueError:
            raise click.ClickException("--at must be RFC 3339") from None
        if when.tzinfo is None:
            raise click.ClickException("--at needs a time zone (e.g. Z)")
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
    if as_json:
        click.echo(json.dumps({"accepted": accepted, "checks": [
            {"check": r.name, "verdict": _VERDICT[r.ok], "detail": r.detail}
            for r in results]}, indent=2))
    else:
        width = max(len(r.name) for r in results)
        for r in results:
            click.echo("%-*s  %s  %s" % (width, r.name, _VERDICT[r.ok], r.detail))
        click.echo("verdict: %s" % ("ACCEPTED" if accepted else "REFUSED"))
    raise SystemExit(0 if accepted else 1)


def _open_registry(config, registry_uri):
    from fleetid.cloud.registry import open_registry

    try:
        return open_registry(registry_uri or config.registry)
    except (FleetidError, OSError, ValueError) as exc:
        raise click.ClickException("%s: %s" % (type(exc).__name__, exc)) from None


def _read_certificates(path, what=""):
    """Every certificate in a PEM/DER file; a ClickException naming the file otherwise."""
    from fleetid.cloud.verifier.service import load_certificates

    try:
        with open(path, "rb") as f:
            certs = load_certificates(f.read())
    except OSError as exc:
        raise click.ClickException("%scannot read %s: %s" % (what, path, exc.strerror)) \
            from None
    except ValueError:
        raise click.ClickException("%s%s is not a PEM/DER certificate" % (what, path)) \
            from None
    if not certs:
        raise click.ClickException("%s%s holds no certificate" % (what, path))
    return certs


def _read_certificate(path):
    return _read_certificates(path)[0]


def _reason_option():
    from fleetid.cloud.verifier.revoked_cas import REASONS

    return click.option("--reason", type=click.Choice(REASONS), default="unspecified",
                        show_default=True, help="RFC 5280 5.3.1 CRLReason.")


@cloud.command("revoke")
@click.option("--serial", "cert_serial", default=None,
              help="Certificate serial number, hex as `openssl x509 -noout -serial` prints "
                   "it (a 0x prefix is accepted).")
@click.option("--cert", "cert_file", type=click.Path(exists=True, dir_okay=False),
              default=None, help="The certificate (PEM or DER) to revoke.")
@click.option("--issuer", default=None,
              help="Issuer (RFC 4514) when --serial alone is ambiguous.")
@_reason_option()
@click.option("--operator", default="", help="Who revokes (written to the audit chain).")
@_registry_options("TOML configuration (registry) as for serve.")
def revoke_cmd(cert_serial, cert_file, issuer, reason, operator, config_path, state_dir,
               registry_uri):
    """Revoke one device certificate in the registry (with its audit entry).

    \b
    Running verifiers and EST servers sharing the registry refuse it from their next
    request on (they read its status on every request).  Revoking a device's identity
    certificate also marks the device revoked.
    \b
    Examples:
      fleetid cloud revoke --cert device.pem --reason keyCompromise
      fleetid cloud revoke --serial 4F3A...9C --operator alice
    """
    from fleetid.cloud.registry import RegistryError

    if (cert_serial is None) == (cert_file is None):
        raise click.UsageError("give exactly one of --serial and --cert")
    if cert_file is not None:
        certificate = _read_certificate(cert_file)
        serial_number = certificate.serial_number
        issuer = issuer or certificate.issuer.rfc4514_string()
    else:
        text = cert_serial.strip().replace(":", "").lower()
        if text.startswith("0x"):
            text = text[2:]
        try:
            serial_number = int(text, 16)
        except ValueError:
            raise click.UsageError("--serial must be hexadecimal") from None
    config = _load(config_path, state_dir)
    registry = _open_registry(config, registry_uri)
    try:
        registry.mark_revoked(serial_number, reason, operator=operator, issuer=issuer)
        record = registry.certificate_status(serial_number, issuer=issuer)
    except RegistryError as exc:
        raise click.ClickException("registry: %s %s" % (exc.reason, exc)) from None
    finally:
        registry.close()
    click.echo(json.dumps({"revoked": record.cert_serial, "fingerprint": record.fingerprint,
                           "device": record.device_serial, "kind": record.kind,
                           "reason": record.revocation_reason,
                           "revoked_at": record.revoked_at}))


@cloud.command("revoke-ca")
@click.option("--cert", "cert_file", type=click.Path(exists=True, dir_okay=False),
              required=True, help="The issuing (batch) CA certificate, PEM or DER.")
@_reason_option()
@click.option("--operator", default="", help="Who revokes.")
@_registry_options("TOML configuration as for serve.",
                   registry_help="Registry URI for the audit entry (default: from the "
                                 "configuration).")
def revoke_ca_cmd(cert_file, reason, operator, config_path, state_dir, registry_uri):
    """Revoke a batch (issuing) CA: every device chaining through it is refused.

    \b
    The revocation is written to the registry's audit chain (a ca_revoke entry) and
    appended to the revoked-CA file (config key revoked_cas_file,
    default <state_dir>/revoked-cas.jsonl); running verifiers and EST servers of this
    configuration re-read it when it changes and refuse the batch (reason ca_revoked)
    from their next request on.  A fleet root cannot be revoked this way: take it out
    of the configuration.
    \b
    Example:
      fleetid cloud revoke-ca --cert var/cloud/pki/ca-widget-b42-eu.pem \\
          --reason cACompromise --operator alice
    """
    from cryptography import x509

    from fleetid.cloud.registry import RegistryError
    from fleetid.cloud.verifier.revoked_cas import revoke
    from fleetid.cloud.server import trust_from_config

    certificate = _read_certificate(cert_file)
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        is_ca = constraints.value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise click.ClickException("%s is not a CA certificate (use `fleetid cloud revoke` "
                                   "for a device)" % cert_file)
    config = _load(config_path, state_dir)
    try:
        roots = trust_from_config(config).roots
    except (OSError, ValueError):
        roots = []
    if certificate in roots:
        raise click.ClickException("that is a fleet root: remove it from the configuration "
                                   "instead")
    registry = _open_registry(config, registry_uri)
    try:
        entry, _new = revoke(config.revoked_cas_file, certificate, registry, reason, operator)
    except RegistryError as exc:
        raise click.ClickException("registry (audit entry): %s %s" % (exc.reason, exc)) \
            from None
    except OSError as exc:
        raise click.ClickException("cannot write %s: %s" % (config.revoked_cas_file,
                                                            exc.strerror)) from None
    finally:
        registry.close()
    click.echo(json.dumps({"revoked_ca": entry["subject"],
                           "fingerprint": entry["fingerprint"], "reason": entry["reason"],
                           "revoked_at": entry["revoked_at"],
                           "file": config.revoked_cas_file}))


@cloud.command("revoke-device")
@click.option("--serial", "device_serial", required=True, type=int,
              help="The device's registry serial (whoami's registry_serial).")
@_reason_option()
@click.option("--operator", default="", help="Who revokes (written to the audit chain).")
@_registry_options("TOML configuration (registry) as for serve.")
def revoke_device_cmd(device_serial, reason, operator, config_path, state_dir, registry_uri):
    """Revoke every certificate of one device (each with its audit entry).

    \b
    Newest first, the identity certificate last (revoking it also marks the device
    revoked).  Verifiers and EST servers sharing the registry refuse the device from their
    next request on.
    \b
    Example:
      fleetid cloud revoke-device --serial 1042 --reason keyCompromise \\
          --registry sqlite:var/line/registry.db --operator alice
    """
    from fleetid.cloud.registry import RegistryError

    config = _load(config_path, state_dir)
    registry = _open_registry(config, registry_uri)
    try:
        revoked = 0
        for record in reversed(registry.certificates(device_serial)):
            if record.revoked:
                continue
            registry.mark_revoked(record.cert_serial, reason, operator=operator,
                                  issuer=record.issuer)
            revoked += 1
            click.echo("revoked %s certificate %s (%s)" % (record.kind, record.cert_serial,
                                                           reason))
        device = registry.get_device(device_serial)
    except RegistryError as exc:
        raise click.ClickException("registry: %s %s" % (exc.reason, exc)) from None
    finally:
        registry.close()
    click.echo("device %d: status %s (%d certificate(s) revoked, audit entries written)"
               % (device.serial, device.status, revoked))
