"""A `fleetid cloud serve` configuration on a factory line's PKI, registry and HSM.

    path = write_cloud_config(line_dir, out_dir, label="widget")

The cloud's TLS server key is the cloud host's (a file, as for any web server); its
certificate is signed by the fleet root inside the line's HSM, so devices validate the
server with the fleet root anchor the line stored in their SE.  Used by the quick-start
demo (`fleetid line cloud-config`) and by tests that run the cloud as a process.

It composes the line (fleetid.cloud.line) with the cloud server's certificate profile, two
layers that do not import each other, so it lives with the CLI that sits on both.
"""

import datetime
import json
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.line import workdir
from fleetid.cloud.pki.profiles import server_certificate_builder
from fleetid.cloud.pki.signing import sign_certificate

SERVER_CERT_DAYS = 30


def _write(path, data, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # an existing file keeps its mode otherwise (a private key: 0600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_cloud_config(line_dir, out, label="widget", verifier_port=0, est_port=0,
                       names=("localhost", "127.0.0.1"), environ=None):
    """Write <out>/cloud.toml and <out>/tls/server{.pem,.key.pem} for the line in line_dir.

    Params: label: the EST label naming the line's issuing CA (the default label).
        verifier_port / est_port: 0 = any free port.  names: the server certificate's
        DNS names / IP addresses.  environ: the HSM secret by variable (default
        os.environ), as for workdir.open_line.
    Returns: the path of cloud.toml.
    Raises: OSError, the line's HSM / PKI errors.
    """
    line_dir = os.path.abspath(line_dir)
    out = os.path.abspath(out)
    os.makedirs(os.path.join(out, "tls"), exist_ok=True)
    line = workdir.open_line(line_dir, environ=environ)
    try:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = server_certificate_builder(key.public_key(), line.root_cert, list(names),
                                             now, days=SERVER_CERT_DAYS)
        cert = sign_certificate(line.hsm, line.labels["root"], builder,
                                line.root_cert.public_key())
        config = line.config
        labels = line.labels
    finally:
        line.close()
    pem = serialization.Encoding.PEM
    tls_cert = os.path.join(out, "tls", "server.pem")
    tls_key = os.path.join(out, "tls", "server.key.pem")
    _write(tls_key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()), 0o600)
    _write(tls_cert, cert.public_bytes(pem))

    toml = _cloud_toml(line_dir, out, config, labels, label, verifier_port, est_port,
                       tls_cert, tls_key)
    path = os.path.join(out, "cloud.toml")
    with open(path, "w") as f:
        f.write(toml)
    return path


def _q(path):
    return json.dumps(path)  # a TOML basic string is JSON-compatible for paths


def _cloud_toml(line_dir, out, config, labels, label, verifier_port, est_port, tls_cert,
                tls_key):
    """The text of cloud.toml: the line's registry, HSM, root, vendor root and issuing CA
    (its key label as the default EST label), and the server's TLS files."""
    return "\n".join([
        "# fleetid cloud on the factory line's PKI (written by fleetid line cloud-config)",
        "[cloud]",
        "state_dir = %s" % _q(out),
        "host = \"127.0.0.1\"",
        "verifier_port = %d" % verifier_port,
        "est_port = %d" % est_port,
        "metrics_port = 0",
        "registry = %s" % _q(config["registry"]),
        "hsm = %s" % _q(config["hsm"]),
        "roots = [%s]" % _q(os.path.join(line_dir, config["root_cert"])),
        "vendor_roots = [%s]" % _q(os.path.join(line_dir, config["vendor_dir"],
                                                workdir.VENDOR_ROOT_FILE)),
        "tls_cert = %s" % _q(tls_cert),
        "tls_key = %s" % _q(tls_key),
        "",
        "[[cloud.labels]]",
        "name = %s" % _q(label),
        "ca_key = %s" % _q(labels["ca"]),
        "ca_cert = %s" % _q(os.path.join(line_dir, config["ca_cert"])),
        "default = true",
        "",
    ])
