"""`fleetid revoke` and `fleetid revocation ...`: one revocation state behind every tier.
A thin shell over fleetid.cloud.revocation (service.py, tiers.py)."""

import json
import sys
import time

import click

from fleetid.cli.cloud import _load, _open_registry
from fleetid.cli.hsm_secret import environ_with_secret, pass_file_option
from fleetid.common.errors import FleetidError

_REASONS = ("unspecified", "keyCompromise", "cACompromise", "affiliationChanged",
            "superseded", "cessationOfOperation", "certificateHold", "privilegeWithdrawn",
            "aACompromise")
_CONFIG = [
    click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                 help="TOML configuration as for `fleetid cloud serve`."),
    click.option("--state-dir", default=None, help="Override [cloud] state_dir."),
]


def _config_options(function):
    for option in reversed(_CONFIG):
        function = option(function)
    return function


def _ca_certs(config):
    from fleetid.cloud.server import trust_from_config

    try:
        return list(trust_from_config(config).intermediates)
    except (OSError, ValueError) as exc:
        raise click.ClickException("trust configuration: %s" % exc) from None


def _service(config, registry, ca_certs):
    from fleetid.cloud.revocation.service import RevocationService
    from fleetid.cloud.revocation.tiers import events_path

    return RevocationService(registry, ca_certs, config.revoked_cas_file,
                             events_path(config.state_dir))


@click.command("revoke")
@click.option("--serial", "device_serial", type=int, default=None,
              help="A device's registry serial: every certificate of it is revoked.")
@click.option("--batch", default=None,
              help="A batch (the batch of an issuing CA's scope, or its subject): the CA "
              "is revoked, one entry for every device under it.")
@click.option("--reason", type=click.Choice(_REASONS), default="unspecified",
              show_default=True, help="RFC 5280 5.3.1 CRLReason.")
@click.option("--operator", default="", help="Who revokes (written to the audit chain).")
@click.option("--registry", "registry_uri", default=None,
              help="Registry URI (default: from the configuration).")
@_config_options
def revoke(device_serial, batch, reason, operator, registry_uri, config_path, state_dir):
    """Revoke a device or a whole batch in every tier.

    \b
    Writes the registry (verifier and OCSP see it at their next request), the audit chain
    (one entry per certificate, or one ca_revoke entry for a batch), and the revocation
    event file, which makes running servers re-publish the CRLs and the compact set at
    once (or within their poll interval, 5 s, if the event is missed).
    \b
    Examples:
      fleetid revoke --serial 1042 --reason keyCompromise --operator alice
      fleetid revoke --batch b42 --reason cACompromise --operator alice
    """
    from fleetid.cloud.registry import RegistryError
    from fleetid.cloud.revocation.service import RevocationError

    if (device_serial is None) == (batch is None):
        raise click.UsageError("give exactly one of --serial, --batch")
    config = _load(config_path, state_dir)
    ca_certs = _ca_certs(config)  # the trust first: nothing is opened for a bad one
    registry = _open_registry(config, registry_uri)
    try:
        service = _service(config, registry, ca_certs)
        if device_serial is not None:
            done = service.revoke_device(device_serial, reason, operator=operator)
            out = {"device": device_serial, "revoked_certificates": done, "reason": reason}
        else:
            entry, new = service.revoke_batch(batch, reason, operator=operator)
            out = {"batch": batch, "revoked_ca": entry["subject"], "new": new,
                   "reason": entry["reason"], "revoked_at": entry["revoked_at"]}
    except RevocationError as exc:
        raise click.ClickException("%s" % exc) from None
    except RegistryError as exc:
        raise click.ClickException("registry: %s %s" % (exc.reason, exc)) from None
    except OSError as exc:
        raise click.ClickException("cannot write revocation state: %s" % exc) from None
    finally:
        registry.close()
    out["event"] = _read_event(config)
    click.echo(json.dumps(out))


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
@_config_options
@pass_file_option
def init_cmd(root_label, config_path, state_dir, pass_file):
    """Create the OCSP responder keys (one per issuing CA) and the compact-set signer
    (under the fleet root) in the HSM, with their certificates under
    <state_dir>/revocation/.  `fleetid cloud serve --crl-port N` then also answers OCSP
    and serves the compact set on that port."""
    from fleetid.cloud.hsm import secret_variable
    from fleetid.cloud.revocation import tiers
    from fleetid.cloud.server import build_context

    config = _load(config_path, state_dir)
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


def _fetch(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as resp:
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
              "publishes (CRLs, compact set, an OCSP probe).")
@click.option("--registry", "registry_uri", default=None,
              help="Registry URI (default: from the configuration).")
@_config_options
def status_cmd(url, registry_uri, config_path, state_dir):
    """Per tier: what is published, its number or version, and how fresh it is.

    \b
    verifier: the registry and revoked-CA file it reads per request (always current);
    ocsp:     a probe answer's thisUpdate / nextUpdate (answers are made per request);
    crl:      per CA label, cRLNumber, thisUpdate, nextUpdate, age;
    compact:  set number, entries, size, thisUpdate, nextUpdate, age.
    Exit status: 0; 1 when --url is given and a tier there cannot be fetched or read
    (each named with its URL and the cause: connection refused, HTTP status, ...).
    """
    from cryptography import x509

    from fleetid.common import revset

    config = _load(config_path, state_dir)
    ca_certs = _ca_certs(config)
    registry = _open_registry(config, registry_uri)
    try:
        shared = _service(config, registry, ca_certs).status()
    finally:
        registry.close()
    now = int(time.time())
    out = {"verifier": dict(shared, freshness="live (registry per request)")}
    if url:
        url = url.rstrip("/")
        crls = {}
        names = [e["name"] for e in getattr(config, "labels", None) or [{"name": "default"}]]
        for name in names + ["root"]:
            crl_url = "%s/crl/%s.crl" % (url, name)
            try:
                crl = x509.load_der_x509_crl(_fetch(crl_url))
                number = crl.extensions.get_extension_for_class(x509.CRLNumber).value
                crls[name] = {"number": number.crl_number,
                              "this_update": crl.last_update_utc.isoformat(),
                              "next_update": crl.next_update_utc.isoformat(),
                              "revoked": len(crl),
                              "age_s": now - int(crl.last_update_utc.timestamp())}
            except Exception as exc:  # noqa: BLE001 - report per tier, never a traceback
                if name == "root" and getattr(exc, "code", None) == 404:
                    continue  # no root CRL on this cloud (offline root)
                crls[name] = _tier_error(crl_url, exc)
        out["crl"] = crls
        try:
            info = revset.parse(_fetch(url + "/revset/current.frs"))
            out["compact"] = {"number": info.number, "revoked": info.count,
                              "revoked_cas": info.ca_count, "universe": info.universe,
                              "bytes": len(info.data), "this_update": info.this_update,
                              "next_update": info.next_update,
                              "age_s": now - info.this_update}
        except Exception as exc:  # noqa: BLE001
            out["compact"] = _tier_error(url + "/revset/current.frs", exc)
        out["ocsp"] = _ocsp_probe(url, ca_certs)
    click.echo(json.dumps(out, indent=2, sort_keys=True))
    if url:
        _exit_on_tier_errors(url, out)


def _exit_on_tier_errors(url, out):
    """Exit 1 naming each tier that could not be fetched (its URL and the cause), or the
    listener once when nothing there answered."""
    tiers = [("crl " + name, answer) for name, answer in sorted(out["crl"].items())]
    tiers += [("compact", out["compact"]), ("ocsp", out["ocsp"])]
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


def _ocsp_probe(url, ca_certs):
    # Ask about serial 1 of the first issuing CA: any answer (good / unknown / revoked)
    # shows the responder is up, signed and how long its answers last.
    import hashlib
    import urllib.request

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp

    if not ca_certs:
        return {"error": "NoIssuingCa", "url": url + "/ocsp",
                "cause": "no issuing CA configured"}
    ca = ca_certs[0]
    point = ca.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)
    request = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        hashlib.sha1(ca.subject.public_bytes()).digest(), hashlib.sha1(point).digest(), 1,
        hashes.SHA1()).build().public_bytes(serialization.Encoding.DER)
    try:
        req = urllib.request.Request(url + "/ocsp", data=request,
                                     headers={"Content-Type": "application/ocsp-request"})
        with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT_S) as resp:
            answer = ocsp.load_der_ocsp_response(resp.read())
    except Exception as exc:  # noqa: BLE001
        return _tier_error(url + "/ocsp", exc)
    if answer.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return {"response_status": answer.response_status.name}
    return {"response_status": "SUCCESSFUL", "this_update": answer.this_update_utc.isoformat(),
            "next_update": answer.next_update_utc.isoformat(),
            "responder": answer.certificates[0].subject.rfc4514_string(),
            "freshness": "live (signed per request)"}
