"""`fleetid revoke` and `fleetid revocation ...`: one revocation state behind every tier.
A thin shell over fleetid.cloud.revocation (service.py, tiers.py)."""

import json
import sys
import time

import click

from fleetid.cli.hsm_secret import environ_with_secret
from fleetid.cli.options import (
    config_options,
    load_config,
    open_registry,
    pass_file_option,
    read_certificates,
    registry_option,
)
from fleetid.common.errors import FleetidError


def _ca_certs(config):
    from fleetid.cloud.server import trust_from_config

    try:
        return list(trust_from_config(config).intermediates)
    except (OSError, ValueError) as exc:
        raise click.ClickException("trust configuration: %s" % exc) from None


def _roots(config):
    from fleetid.cloud.server import trust_from_config

    try:
        return trust_from_config(config).roots
    except (OSError, ValueError):
        return []  # no roots configured: none to protect


def _service(config, registry, ca_certs):
    from fleetid.cloud.revocation.service import RevocationService
    from fleetid.cloud.revocation.tiers import events_path

    return RevocationService(registry, ca_certs, config.revoked_cas_file,
                             events_path(config.state_dir))


def _revoke_options(function):
    """--reason, --operator, --registry, --config, --state-dir: every revoke command."""
    from fleetid.cloud.verifier.revoked_cas import REASONS

    function = config_options()(function)
    function = registry_option()(function)
    function = click.option("--operator", default="",
                            help="Who revokes (written to the audit chain).")(function)
    return click.option("--reason", type=click.Choice(REASONS), default="unspecified",
                        show_default=True, help="RFC 5280 5.3.1 CRLReason.")(function)


def _hex_serial(text, option):
    text = text.strip().replace(":", "").lower()
    if text.startswith("0x"):
        text = text[2:]
    try:
        return int(text, 16)
    except ValueError:
        raise click.UsageError("%s must be hexadecimal" % option) from None


def _is_ca(certificate):
    from cryptography import x509

    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _write(service, target, reason, operator, roots):
    """One revocation through the service; the JSON report."""
    kind, value = target
    if kind == "devices":
        return _write_devices(service, value, reason, operator)
    if kind == "device":
        done = service.revoke_device(value, reason, operator=operator)
        return {"device": value, "revoked_certificates": done, "reason": reason}
    if kind in ("batch", "ca", "server"):
        if kind == "batch":
            entry, new = service.revoke_batch(value, reason, operator=operator)
        elif kind == "server":
            entry, new = service.revoke_server_cert(value, reason, operator=operator,
                                                    roots=roots)
        else:
            entry, new = service.revoke_ca(value, reason, operator=operator, roots=roots)
        out = {"batch": value} if kind == "batch" else {}
        out.update({"revoked_server" if kind == "server" else "revoked_ca": entry["subject"], "fingerprint": entry["fingerprint"],
                    "new": new, "reason": entry["reason"], "revoked_at": entry["revoked_at"],
                    "file": service.revoked_cas_path})
        return out
    cert_serial, issuer = value
    record = service.revoke_certificate(cert_serial, reason, operator=operator,
                                        issuer=issuer)
    return {"revoked": record.cert_serial, "fingerprint": record.fingerprint,
            "device": record.device_serial, "kind": record.kind,
            "reason": record.revocation_reason, "revoked_at": record.revoked_at}


def read_serial_list(path):
    """The device serials of a --from-file list: one registry serial per line (decimal;
    blank lines and `#` comments skipped; a repeated serial counts once).  Returns
    (path, [serial], {serial: line number}).  Raises click.ClickException naming the first
    bad line, before anything is written."""
    serials, lines = [], {}
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException("cannot read %s: %s" % (path, exc)) from None
    for number, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        if not item.isdigit() or not 0 < int(item) < 2 ** 63:
            raise click.ClickException("%s line %d: %r is not a device serial (one registry "
                                       "serial per line); nothing revoked"
                                       % (path, number, item[:40]))
        serial = int(item)
        if serial not in lines:
            lines[serial] = number
            serials.append(serial)
    if not serials:
        raise click.ClickException("%s: no device serials in it; nothing revoked" % path)
    return path, serials, lines


def _write_devices(service, value, reason, operator):
    """`fleetid revoke --from-file`: every listed device, one event, a progress bar on
    stderr (stdout keeps the JSON report)."""
    from fleetid.cloud.revocation.service import RevocationError

    path, serials, lines = value
    with click.progressbar(length=len(serials), label="revoking", file=sys.stderr) as bar:
        try:
            done = service.revoke_devices(serials, reason, operator=operator,
                                          progress=bar.update)
        except RevocationError as exc:
            if exc.reason != "unknown_device":
                raise
            raise click.ClickException("%s line %d: device %s is not in the registry; "
                                       "nothing revoked" % (path, lines[int(exc.detail)],
                                                            exc.detail)) from None
    return {"devices": len(serials), "file": path,
            "revoked_certificates": sum(len(v) for v in done.values()),
            "already_revoked": sum(1 for v in done.values() if not v), "reason": reason}


_REVOCATION_REFUSALS = {
    "not_a_ca": "%s is not a CA certificate (use `fleetid revoke --cert` for a device)",
    "fleet_root": "%s is a fleet root: remove it from the configuration instead",
    "not_a_server": "%s is not a TLS server certificate (serverAuth, not a CA)",
    "not_root_issued": "%s is not issued by a configured fleet root (the root's CRL "
                       "lists only the root's certificates)",
}


def revoke_target(target, reason, operator, config_path, state_dir, registry_uri):
    """Run one revocation: target is ("device", registry serial), ("devices", (path,
    serials, line numbers): read_serial_list), ("batch", name), ("ca", certificate),
    ("server", certificate) or ("certificate", (serial int, issuer or None)).  Prints the
    JSON report with the event number.  Every `fleetid revoke` form and the `fleetid
    cloud revoke*` aliases come here."""
    from fleetid.cloud.registry import RegistryError
    from fleetid.cloud.revocation.service import RevocationError

    config = load_config(config_path, state_dir)
    ca_certs = _ca_certs(config) if target[0] == "batch" else []  # trust before registry
    roots = _roots(config) if target[0] in ("ca", "server") else []
    registry = open_registry(registry_uri or config.registry)
    try:
        service = _service(config, registry, ca_certs)
        out = _write(service, target, reason, operator, roots)
    except RevocationError as exc:
        text = _REVOCATION_REFUSALS.get(exc.reason)
        raise click.ClickException(text % exc.detail if text else "%s" % exc) from None
    except RegistryError as exc:
        raise click.ClickException("registry: %s %s" % (exc.reason, exc)) from None
    except OSError as exc:
        raise click.ClickException("cannot write revocation state: %s" % exc) from None
    finally:
        registry.close()
    out["event"] = _read_event(config)
    click.echo(json.dumps(out))


def _certificate_target(cert_file, issuer=None):
    certificate = read_certificates(cert_file)[0]
    if _is_ca(certificate):
        return ("ca", certificate)
    return ("certificate", (certificate.serial_number,
                            issuer or certificate.issuer.rfc4514_string()))


@click.command("revoke")
@click.option("--serial", "device_serial", type=int, default=None,
              help="A device's registry serial: every certificate of it is revoked.")
@click.option("--batch", default=None,
              help="A batch (the batch of an issuing CA's scope, or its subject): the CA "
              "is revoked, one entry for every device under it.")
@click.option("--cert", "cert_file", type=click.Path(exists=True, dir_okay=False),
              default=None, help="A certificate file (PEM or DER): a device certificate "
              "is revoked alone, an issuing CA certificate as its batch.")
@click.option("--cert-serial", default=None,
              help="A certificate's serial number, hex as `openssl x509 -noout -serial` "
              "prints it (a 0x prefix is accepted).")
@click.option("--issuer", default=None,
              help="Issuer (RFC 4514) when --cert-serial alone is ambiguous.")
@click.option("--server-cert", "server_cert_file", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="One of the cloud's own TLS server certificates (verifier / EST "
              "listener, broker; issued by the fleet root): listed on the root's CRL and "
              "the server's OCSP staple, so agents refuse that server.")
@click.option("--from-file", "serial_file", type=click.Path(exists=True, dir_okay=False),
              default=None, help="A list of devices' registry serials, one per line: all "
              "revoked, one event for the list (checked first: a bad line revokes nothing).")
@_revoke_options
def revoke(device_serial, batch, cert_file, cert_serial, issuer, server_cert_file,
           serial_file, reason,
           operator, registry_uri, config_path, state_dir):
    """Revoke a device, a certificate or a whole batch in every tier.

    \b
    Writes the registry (verifier and OCSP see it at their next request), the audit chain
    (one entry per certificate, or one ca_revoke entry for a batch), and the revocation
    event file, which makes running servers re-publish the CRLs and the revocation set at
    once (or within their poll interval, 5 s, if the event is missed).
    `fleetid cloud revoke`, `revoke-ca` and `revoke-device` are aliases of this command.
    \b
    Examples:
      fleetid revoke --serial 1042 --reason keyCompromise --operator alice
      fleetid revoke --batch b42 --reason cACompromise --operator alice
      fleetid revoke --config var/cloud/cloud.toml --cert var/device.pem \\
          --reason keyCompromise --operator alice
      fleetid revoke --cert-serial 4F3A...9C --operator alice
      fleetid revoke --config var/cloud/cloud.toml --server-cert var/cloud/tls.pem \
          --reason keyCompromise --operator alice
      fleetid revoke --from-file recall.txt --reason keyCompromise --operator alice
    """
    given = [v for v in (device_serial, batch, cert_file, cert_serial, server_cert_file,
                         serial_file) if v is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --serial, --batch, --cert, --cert-serial, "
                               "--server-cert, --from-file")
    if server_cert_file is not None:
        target = ("server", read_certificates(server_cert_file)[0])
        return revoke_target(target, reason, operator, config_path, state_dir, registry_uri)
    if serial_file is not None:
        revoke_target(("devices", read_serial_list(serial_file)), reason, operator,
                      config_path, state_dir, registry_uri)
        return
    target = _target(device_serial, batch, cert_file, cert_serial, issuer, "--cert-serial")
    revoke_target(target, reason, operator, config_path, state_dir, registry_uri)


def _target(device_serial, batch, cert_file, cert_serial, issuer, serial_option):
    """The one given of the options as revoke_target's target."""
    if device_serial is not None:
        return ("device", device_serial)
    if batch is not None:
        return ("batch", batch)
    if cert_file is not None:
        return _certificate_target(cert_file, issuer)
    return ("certificate", (_hex_serial(cert_serial, serial_option), issuer))


# -- `fleetid cloud revoke`, `revoke-ca`, `revoke-device`: hidden aliases (cli/cloud.py) ---

@click.command("revoke", hidden=True)
@click.option("--serial", "cert_serial", default=None,
              help="Certificate serial number, hex (`fleetid revoke --cert-serial`).")
@click.option("--cert", "cert_file", type=click.Path(exists=True, dir_okay=False),
              default=None, help="The certificate (PEM or DER) to revoke.")
@click.option("--issuer", default=None,
              help="Issuer (RFC 4514) when --serial alone is ambiguous.")
@_revoke_options
def cloud_revoke(cert_serial, cert_file, issuer, reason, operator, registry_uri,
                 config_path, state_dir):
    """Alias of `fleetid revoke --cert-serial/--cert`."""
    if (cert_serial is None) == (cert_file is None):
        raise click.UsageError("give exactly one of --serial and --cert")
    target = _target(None, None, cert_file, cert_serial, issuer, "--serial")
    revoke_target(target, reason, operator, config_path, state_dir, registry_uri)


@click.command("revoke-ca", hidden=True)
@click.option("--cert", "cert_file", type=click.Path(exists=True, dir_okay=False),
              required=True, help="The issuing (batch) CA certificate, PEM or DER.")
@_revoke_options
def cloud_revoke_ca(cert_file, reason, operator, registry_uri, config_path, state_dir):
    """Alias of `fleetid revoke --cert CA_FILE`."""
    target = _certificate_target(cert_file)
    if target[0] != "ca":
        raise click.ClickException(_REVOCATION_REFUSALS["not_a_ca"] % cert_file)
    revoke_target(target, reason, operator, config_path, state_dir, registry_uri)


@click.command("revoke-device", hidden=True)
@click.option("--serial", "device_serial", required=True, type=int,
              help="The device's registry serial (whoami's registry_serial).")
@_revoke_options
def cloud_revoke_device(device_serial, reason, operator, registry_uri, config_path,
                        state_dir):
    """Alias of `fleetid revoke --serial`."""
    revoke_target(("device", device_serial), reason, operator, config_path, state_dir,
                  registry_uri)


def _read_event(config):
    from fleetid.cloud.revocation.service import read_event
    from fleetid.cloud.revocation.tiers import events_path

    return read_event(events_path(config.state_dir))


@click.group()
def revocation():
    """Revocation tiers: set-up and status (see also `fleetid revoke`)."""


@revocation.command("init")
@click.option("--root-label", default="fleet-root", show_default=True,
              help="HSM label of the fleet root key (certifies the compact-set signer).")
@config_options()
@pass_file_option
def init_cmd(root_label, config_path, state_dir, pass_file):
    """Create the OCSP responder keys (one per issuing CA) and the compact-set signer
    (under the fleet root) in the HSM, with their certificates under
    <state_dir>/revocation/.  `fleetid cloud serve --crl-port N` then also answers OCSP
    and serves the compact set on that port.

    \b
    Example (the README's walkthrough runs it):
      fleetid revocation init --config var/cloud/cloud.toml
    """
    from fleetid.cloud.hsm import secret_variable
    from fleetid.cloud.revocation import tiers
    from fleetid.cloud.server import build_context

    config = load_config(config_path, state_dir)
    environ = environ_with_secret(secret_variable(config.hsm), pass_file)
    try:
        context = build_context(config, environ)
    except (FleetidError, OSError, ValueError) as exc:
        raise click.ClickException("%s: %s" % (type(exc).__name__, exc)) from None
    try:
        issuers = [(i.key_label, i.ca_certificate) for i in context.crl_issuers]
        roots = [r for r in context.trust.roots if r.subject == issuers[0][1].issuer]
        written = tiers.init_keys(context.hsm, config.state_dir, root_label, roots[0],
                                  issuers)
    except (FleetidError, OSError, ValueError, IndexError) as exc:
        raise click.ClickException("%s: %s" % (type(exc).__name__, exc)) from None
    finally:
        context.close()
    click.echo(json.dumps({"written": written}))


FETCH_TIMEOUT_S = 10


def _fetch(url, data=None, content_type=None):
    import urllib.request

    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as resp:
        return resp.read()


def _cause(exc):
    """What went wrong with a fetch, in words: the HTTP status, the socket's reason
    (connection refused, name not known, timed out) or the parse failure."""
    import socket
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        return "HTTP %d %s" % (exc.code, exc.reason)
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, OSError) and reason.strerror:
            return reason.strerror
        return str(reason)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no answer within %d s" % FETCH_TIMEOUT_S
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "%s: %s" % (type(exc).__name__, exc)


def _tier_error(url, exc):
    return {"error": type(exc).__name__, "url": url, "cause": _cause(exc)}


@revocation.command("status")
@click.option("--url", default=None,
              help="The revocation listener (e.g. http://127.0.0.1:8446): fetch what it "
              "publishes (CRLs, the compact revocation set, an OCSP probe).")
@registry_option()
@config_options()
def status_cmd(url, registry_uri, config_path, state_dir):
    """Per tier: what is published, its number or version, and how fresh it is.

    \b
    verifier: the registry and revoked-CA file it reads per request (always current);
    ocsp:     a probe answer's thisUpdate / nextUpdate (answers are made per request);
    crl:      per CA label, cRLNumber, thisUpdate, nextUpdate, age;
    revset:   the compact revocation set: number, entries, size, thisUpdate,
              nextUpdate, age.
    Exit status: 0; 1 when --url is given and a tier there cannot be fetched or read
    (each named with its URL and the cause: connection refused, HTTP status, ...).

    \b
    Examples (the README's walkthrough runs the second):
      fleetid revocation status --config var/cloud/cloud.toml
      fleetid revocation status --config var/cloud/cloud.toml --url http://127.0.0.1:8446
    """
    from fleetid.cloud.revocation.tiers import TIERS

    config = load_config(config_path, state_dir)
    ca_certs = _ca_certs(config)
    registry = open_registry(registry_uri or config.registry)
    try:
        shared = _service(config, registry, ca_certs).status()
    finally:
        registry.close()
    out = {"verifier": dict(shared, freshness="live (registry per request)")}
    if url:
        url = url.rstrip("/")
        names = [e["name"] for e in getattr(config, "labels", None) or [{"name": "default"}]]
        facts = {"labels": names, "ca_certs": ca_certs, "now": int(time.time())}
        for tier in TIERS:
            answer = tier.status(url, facts, _fetch, _tier_error)
            if answer is not None:
                out[tier.name] = answer
    click.echo(json.dumps(out, indent=2, sort_keys=True))
    if url:
        _exit_on_tier_errors(url, out)


def _exit_on_tier_errors(url, out):
    """Exit 1 naming each tier that could not be fetched (its URL and the cause), or the
    listener once when nothing there answered."""
    from fleetid.cloud.revocation.tiers import TIERS

    tiers = []
    for tier in TIERS:
        answer = out.get(tier.name)
        if answer is not None and tier.per_label:
            tiers += [(tier.name + " " + name, a) for name, a in sorted(answer.items())]
        elif answer is not None:
            tiers.append((tier.name, answer))
    failed = [(tier, answer) for tier, answer in tiers if "error" in answer]
    if not failed:
        return
    causes = set((answer["error"], answer["cause"]) for _tier, answer in failed)
    if len(failed) == len(tiers) and len(causes) == 1 and \
            next(iter(causes))[0] == "URLError":  # not an HTTP answer: nothing is there
        click.echo("Error: revocation listener %s: %s" % (url, causes.pop()[1]), err=True)
    else:
        for tier, answer in failed:
            click.echo("Error: %s: %s: %s" % (tier, answer["url"], answer["cause"]), err=True)
    sys.exit(1)
