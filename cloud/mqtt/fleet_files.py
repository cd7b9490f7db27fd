"""The files a fleet broker and the cloud's MQTT client need, made on the fleet PKI:
the CA bundle, the broker's server certificate (signed by the fleet root inside the HSM),
the cloud client's certificate (CN = the cloud identity the ACL names), and the CRL file.

    files = make_broker_files(hsm, "fleet-root", root_cert, [ca_cert], publisher, folder)
    broker = Broker(files.config, folder)
    cloud = CloudMqtt(host, port, files.cafile, files.cloud_cert, files.cloud_key)

The server and cloud keys are ordinary TLS keys of the cloud's own hosts (written 0600);
device keys never appear here: devices prove theirs from their SE.
"""

import datetime
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.mqtt.broker import BrokerConfig, write_crl_file
from fleetid.cloud.pki.profiles import tls_certificate_builder
from fleetid.cloud.pki.signing import sign_certificate

PEM = serialization.Encoding.PEM
DEFAULT_IDENTITY = "fleet-cloud"


def _write(path, data, private=False):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    os.fchmod(fd, 0o600 if private else 0o644)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


class BrokerFiles:
    """Paths: cafile, server_cert, server_key, cloud_cert, cloud_key, crlfile; `config`
    (BrokerConfig); `crl_labels` (what write_crl() puts in the CRL file)."""

    def __init__(self, folder, publisher, crl_labels, cloud_identity):
        self.folder = folder
        self.publisher = publisher
        self.crl_labels = crl_labels
        self.cloud_identity = cloud_identity
        self.cafile = self.server_cert = self.server_key = None
        self.cloud_cert = self.cloud_key = None
        self.crlfile = os.path.join(folder, "crl.pem")
        self.config = None

    def write_crl(self):
        """Rewrite the CRL file from the publisher (then Broker.reload())."""
        write_crl_file(self.crlfile, self.publisher, self.crl_labels)


def make_broker_files(hsm, root_label, root_cert, ca_certs, publisher, folder,
                      crl_labels=None, cloud_identity=DEFAULT_IDENTITY,
                      server_hosts=("localhost", "127.0.0.1"), now=None):
    """Write the broker's and the cloud client's files into `folder`.

    Params: hsm, root_label, root_cert: the fleet root (signs inside the HSM).  ca_certs:
        the issuing CAs of device certificates.  publisher: CrlPublisher with a label for
        every CA that issues client certificates (the root's too: it signs the cloud's).
    Returns: BrokerFiles.  Raises: PkiError, HsmError, OSError.
    """
    os.makedirs(folder, exist_ok=True)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    files = BrokerFiles(folder, publisher, crl_labels, cloud_identity)
    files.cafile = _write(os.path.join(folder, "ca-bundle.pem"), b"".join(
        c.public_bytes(PEM) for c in [root_cert] + list(ca_certs)))
    for role, name, hosts in (("server", server_hosts[0], list(server_hosts)),
                              ("cloud", cloud_identity, None)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = tls_certificate_builder(key.public_key(), root_cert, name, now, hosts)
        cert = sign_certificate(hsm, root_label, builder, root_cert.public_key())
        setattr(files, role + "_cert", _write(os.path.join(folder, role + ".pem"),
                                              cert.public_bytes(PEM)))
        setattr(files, role + "_key", _write(
            os.path.join(folder, role + ".key"),
            key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()), private=True))
    files.write_crl()
    files.config = BrokerConfig(files.cafile, files.server_cert, files.server_key,
                                files.crlfile, cloud_identity=cloud_identity)
    return files
