"""`fleetid pki`: the fleet PKI's operator commands (a thin shell over fleetid.cloud.pki)."""

import os

import click

from fleetid.common.errors import FleetidError


def _open_hsm(uri):
    from fleetid.cloud.hsm import open_hsm

    return open_hsm(uri)


# The inputs a pki error line names (labels, subject, folders; never the HSM URI, which
# a PKCS#11 setup may extend with more than the names of secret variables).
_NAMED_PARAMS = ("label", "root_label", "subject", "ceremony_dir")


def _fail(exc):
    # Library errors carry short, secret-free messages; show them as-is, after the
    # command's labels / subject / folder the error may be about.
    ctx = click.get_current_context(silent=True)
    params = ctx.command.params if ctx is not None else ()
    named = ["%s %s" % (p.opts[0] if isinstance(p, click.Option) else p.human_readable_name,
                        ctx.params[p.name])
             for p in params if p.name in _NAMED_PARAMS and ctx.params.get(p.name) is not None]
    return click.ClickException("%s%s: %s" % ("(%s) " % ", ".join(named) if named else "",
                                              type(exc).__name__, exc))


@click.group()
def pki():
    """Fleet PKI: the offline root's key ceremony and the scoped issuing CAs.

    \b
    The root key and every CA key are generated in, and sign inside, the HSM named by
    --hsm (secrets only by environment variable):
      pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=fleetid;pin-env=FLEETID_HSM_PIN
      soft:/var/lib/fleetid/keystore.json;pass-env=FLEETID_KEYSTORE_PASS
    """


@pki.command("init-root")
@click.option("--hsm", "hsm_uri", required=True, metavar="URI",
              help="HSM URI (see `fleetid pki --help`).")
@click.option("--label", required=True, help="Label of the new root key in the HSM.")
@click.option("--subject", required=True,
              help='Root subject, RFC 4514: "CN=Acme Fleet Root,O=Acme".')
@click.option("--validity-years", default=30, show_default=True, type=click.IntRange(1, 50))
@click.option("--ceremony-dir", required=True, type=click.Path(file_okay=False),
              help="Where root.pem and the signed ceremony.json are written "
                   "(must not hold a record).")
@click.option("--operator", "operators", multiple=True, required=True,
              help="A person present at the ceremony (repeat for each; two or more "
                   "for dual control).")
def init_root_cmd(hsm_uri, label, subject, validity_years, ceremony_dir, operators):
    """Run the root key ceremony: root key generated in the HSM, self-signed root
    certificate, and a ceremony record signed by the root key.

    \b
    Example:
      export FLEETID_HSM_PIN=...
      HSM='pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=fleetid;pin-env=FLEETID_HSM_PIN'
      fleetid pki init-root --hsm "$HSM" \\
        --label fleet-root --subject 'CN=Acme Fleet Root,O=Acme' \\
        --ceremony-dir ceremony/2026-11-23 --operator 'Alice Ng' --operator 'Bob Roy'
    Then publish the printed fingerprint through a second channel; auditors check the
    directory with `fleetid pki show-ceremony DIR --fingerprint HEX`.
    """
    from fleetid.cloud.pki import init_root

    try:
        with _open_hsm(hsm_uri) as hsm:
            certificate, record = init_root(hsm, label, subject, validity_years, ceremony_dir,
                                            list(operators))
    except FleetidError as exc:
        raise _fail(exc) from None
    click.echo("root certificate: %s" % os.path.join(ceremony_dir, "root.pem"))
    click.echo("ceremony record:  %s" % os.path.join(ceremony_dir, "ceremony.json"))
    click.echo("subject:          %s" % certificate.subject.rfc4514_string())
    click.echo("not after:        %s" % record["root"]["not_after"])
    click.echo("fingerprint:      %s" % record["root"]["fingerprint_sha256"])


@pki.command("new-ca")
@click.option("--hsm", "hsm_uri", required=True, metavar="URI",
              help="HSM URI holding the root key.")
@click.option("--root-label", required=True, help="Label of the root key in the HSM.")
@click.option("--root-cert", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The root certificate (PEM), e.g. <ceremony-dir>/root.pem.")
@click.option("--label", required=True, help="Label of the new CA key in the HSM.")
@click.option("--product", required=True)
@click.option("--batch", required=True)
@click.option("--region", required=True)
@click.option("--path-len", default=0, show_default=True, type=click.IntRange(0, 8))
@click.option("--validity-days", default=15 * 365 + 4, show_default=True, type=click.IntRange(1))
@click.option("--crl-url", default=None, help="CRL distribution point of the root (optional).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the CA certificate (PEM); must not exist.")
def new_ca_cmd(hsm_uri, root_label, root_cert, label, product, batch, region, path_len,
               validity_days, crl_url, out):
    """Create an issuing CA scoped to one product / batch / region, signed by the root.

    \b
    Example:
      fleetid pki new-ca --hsm 'soft:keystore.json;pass-env=FLEETID_KEYSTORE_PASS' \\
        --root-label fleet-root --root-cert ceremony/2026-11-23/root.pem \\
        --label ca-widget-b42-eu --product widget --batch b42 --region eu \\
        --out ca-widget-b42-eu.pem
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fleetid.cloud.pki import fingerprint, new_ca

    if os.path.exists(out):
        raise click.ClickException("%s exists; refusing to overwrite" % out)
    try:
        with open(root_cert, "rb") as f:
            root = x509.load_pem_x509_certificate(f.read())
    except ValueError:
        raise click.ClickException("%s is not a PEM certificate" % root_cert) from None
    try:
        with _open_hsm(hsm_uri) as hsm:
            certificate = new_ca(hsm, root_label, root, label,
                                 {"product": product, "batch": batch, "region": region},
                                 path_len=path_len,
                                 validity=datetime.timedelta(days=validity_days),
                                 crl_url=crl_url)
    except FleetidError as exc:
        raise _fail(exc) from None
    with open(out, "xb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    click.echo("CA certificate: %s" % out)
    click.echo("subject:        %s" % certificate.subject.rfc4514_string())
    click.echo("fingerprint:    %s" % fingerprint(certificate))


@pki.command("new-fw-key")
@click.option("--hsm", "hsm_uri", required=True, metavar="URI",
              help="HSM URI (see `fleetid pki --help`).")
@click.option("--root-label", required=True, help="Label of the root key in the HSM.")
@click.option("--root-cert", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The root certificate (PEM).")
@click.option("--label", required=True,
              help="Label of the firmware-signing key in the HSM (generated unless "
                   "--existing).")
@click.option("--name", required=True, help="Subject CN of the certificate.")
@click.option("--existing", is_flag=True,
              help="Certify a key already in the HSM (e.g. the line's bare firmware key).")
@click.option("--validity-days", default=5 * 365 + 1, show_default=True,
              type=click.IntRange(1))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Where the certificate (PEM) is written (must not exist).")
def new_fw_key_cmd(hsm_uri, root_label, root_cert, label, name, existing, validity_days, out):
    """A firmware-signing key in the HSM, certified by the fleet root (codeSigning).

    Devices accept images from any installed firmware certificate that chains to their
    fleet root and that their CRL does not list; install it over the air with SCP03
    (fleetid.cloud.mqtt.ota.install_trust_anchor, DGI_FIRMWARE_CERT_A/B), and retire the
    old key by revoking its certificate.

    \b
    Example:
      fleetid pki new-fw-key --hsm 'soft:keystore.json;pass-env=FLEETID_KEYSTORE_PASS' \\
        --root-label fleet-root --root-cert ceremony/root.pem \\
        --label firmware-2027 --name 'Acme firmware 2027' --out firmware-2027.pem
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fleetid.cloud.pki import fingerprint
    from fleetid.cloud.pki.firmware import certify_firmware_key, new_firmware_key

    if os.path.exists(out):
        raise click.ClickException("%s exists; refusing to overwrite" % out)
    try:
        with open(root_cert, "rb") as f:
            root = x509.load_pem_x509_certificate(f.read())
    except ValueError:
        raise click.ClickException("%s is not a PEM certificate" % root_cert) from None
    make = certify_firmware_key if existing else new_firmware_key
    try:
        with _open_hsm(hsm_uri) as hsm:
            certificate = make(hsm, root_label, root, label, name,
                               validity=datetime.timedelta(days=validity_days))
    except FleetidError as exc:
        raise _fail(exc) from None
    with open(out, "xb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    click.echo("firmware certificate: %s" % out)
    click.echo("serial:               %x" % certificate.serial_number)
    click.echo("fingerprint:          %s" % fingerprint(certificate))


@pki.command("show-ceremony")
@click.argument("ceremony_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--fingerprint", "expected", default=None,
              help="SHA-256 fingerprint (hex) of the root you trust; without it only "
                   "self-consistency is proven.")
def show_ceremony_cmd(ceremony_dir, expected):
    """Verify a ceremony record offline and show it.

    \b
    Checks: the root certificate is a validly self-signed CA; the record names this
    certificate and key; the root key signed the record; and (with --fingerprint) the
    root is the one you trust.  Exit status 1 if any check fails.
    \b
    Example:
      fleetid pki show-ceremony ceremony/2026-11-23 --fingerprint 3f1c...e9
    """
    from fleetid.cloud.pki import verify_ceremony

    try:
        _certificate, record = verify_ceremony(ceremony_dir, expected_fingerprint=expected)
    except FleetidError as exc:
        raise _fail(exc) from None
    root = record["root"]
    note = "" if expected else " (self-consistent only: no --fingerprint given)"
    click.echo("ceremony record verified%s" % note)
    click.echo("operators:   %s" % ", ".join(record["operators"]))
    click.echo("started:     %s" % record["started_at"])
    click.echo("completed:   %s" % record["completed_at"])
    hsm = record["hsm"]
    click.echo("hsm:         %s, key label %s" % (hsm["backend"], hsm["key_label"]))
    click.echo("subject:     %s" % root["subject"])
    click.echo("validity:    %s .. %s" % (root["not_before"], root["not_after"]))
    click.echo("fingerprint: %s" % root["fingerprint_sha256"])
