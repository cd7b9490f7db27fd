"""The files a fleet broker and the cloud's MQTT client need, made on the fleet PKI:
the CA bundle (device listener trust), the broker's server certificate (signed by the
fleet root inside the HSM), the service CA (service listener trust; its key in the HSM),
the cloud client's certificate (signed by the service CA), and the CRL files.

    files = make_broker_files(hsm, "fleet-root", root_cert, [ca_cert], publisher, folder)
    broker = Broker(files.config, folder)
    cloud = CloudMqtt(host, broker.service_port, files.cafile, files.cloud_cert,
                      files.cloud_key)

The service CA is self-signed, a trust anchor of its own (why: cloud/mqtt/broker.py): its
key is made once in the HSM under SERVICE_CA_LABEL and its certificate kept in the folder
(service-ca.pem), reused while it matches that key.  It certifies service identities only
(the cloud's, operators'); the device listener does not trust it and the service listener
trusts nothing else.

The server and cloud keys are ordinary TLS keys of the cloud's own hosts (written 0600);
device keys never appear here: devices prove theirs from their SE.
"""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetid.cloud.hsm.errors import KeyNotFound
from fleetid.cloud.mqtt.broker import BrokerConfig, write_crl_file
from fleetid.cloud.pki.profiles import root_builder, tls_certificate_builder
from fleetid.cloud.pki.signing import sign_certificate, sign_crl

PEM = serialization.Encoding.PEM
DEFAULT_IDENTITY = "fleet-cloud"
SERVICE_CA_LABEL = "fleet-service-ca"
SERVICE_CA_NAME = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetid"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "fleet service CA")])
SERVICE_CA_YEARS = 10
SERVICE_CRL_DAYS = 30  # the service CA's own CRL when no publisher is given (empty)


def _write(path, data, private=False):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    os.fchmod(fd, 0o600 if private else 0o644)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


class BrokerFiles:
    """Paths: cafile, server_cert, server_key, service_cafile, cloud_cert, cloud_key,
    crlfile, service_crlfile; `config` (BrokerConfig); `crl_labels` (what write_crl() puts
    in the device listener's CRL file); `service_ca_cert`; `service_publisher` (a
    CrlPublisher with label "service" for the service CA, set by a caller that has the
    registry's revocations; without one the service CRL is an empty one signed here)."""

    def __init__(self, folder, publisher, crl_labels, cloud_identity):
        self.folder = folder
        self.publisher = publisher
        self.crl_labels = crl_labels
        self.cloud_identity = cloud_identity
        self.cafile = self.server_cert = self.server_key = None
        self.service_cafile = self.service_publisher = self.service_ca_cert = None
        self.hsm = self.service_ca_label = None
        self.cloud_cert = self.cloud_key = None
        self.crlfile = os.path.join(folder, "crl.pem")
        self.service_crlfile = os.path.join(folder, "service-crl.pem")
        self.config = None

    def write_crl(self):
        """Rewrite the CRL files from the publishers (then Broker.reload())."""
        write_crl_file(self.crlfile, self.publisher, self.crl_labels)
        if self.service_publisher is not None:
            write_crl_file(self.service_crlfile, self.service_publisher, ["service"])
        elif self.service_ca_cert is not None:
            now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
            ski = self.service_ca_cert.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier).value
            builder = (x509.CertificateRevocationListBuilder()
                       .issuer_name(self.service_ca_cert.subject)
                       .last_update(now)
                       .next_update(now + datetime.timedelta(days=SERVICE_CRL_DAYS))
                       .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), False)
                       .add_extension(x509.AuthorityKeyIdentifier
                                      .from_issuer_subject_key_identifier(ski), False))
            crl = sign_crl(self.hsm, self.service_ca_label, builder,
                           self.service_ca_cert.public_key())
            temporary = self.service_crlfile + ".tmp"
            _write(temporary, crl.public_bytes(PEM))
            os.replace(temporary, self.service_crlfile)


def service_ca(hsm, folder, label=SERVICE_CA_LABEL, now=None):
    """The service CA of `folder`: its key made in the HSM under `label` if absent, its
    self-signed certificate (folder/service-ca.pem) made if absent or not of that key.
    Returns: x509.Certificate.  Raises: HsmError, PkiError, OSError."""
    path = os.path.join(folder, "service-ca.pem")
    try:
        public_key = hsm.public_key(label)
    except KeyNotFound:
        public_key = hsm.generate_signing_key(label)
    spki = public_key.public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if os.path.exists(path):
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        if cert.public_key().public_bytes(
                PEM, serialization.PublicFormat.SubjectPublicKeyInfo) == spki:
            return cert
    now = now or datetime.datetime.now(datetime.timezone.utc)
    builder = root_builder(SERVICE_CA_NAME, public_key, now - datetime.timedelta(minutes=5),
                           now + datetime.timedelta(days=365 * SERVICE_CA_YEARS))
    cert = sign_certificate(hsm, label, builder, public_key)
    _write(path, cert.public_bytes(PEM))
    return cert


def make_broker_files(hsm, root_label, root_cert, ca_certs, publisher, folder,
                      crl_labels=None, cloud_identity=DEFAULT_IDENTITY,
                      server_hosts=("localhost", "127.0.0.1"), now=None,
                      service_ca_label=SERVICE_CA_LABEL):
    """Write the broker's and the cloud client's files into `folder`.

    Params: hsm, root_label, root_cert: the fleet root (signs inside the HSM).  ca_certs:
        the issuing CAs of device certificates.  publisher: CrlPublisher with a label for
        every CA that issues device-listener client certificates.  service_ca_label: the
        service CA's key in the HSM (made on first use).
    Returns: BrokerFiles.  Raises: PkiError, HsmError, OSError.
    """
    os.makedirs(folder, exist_ok=True)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    files = BrokerFiles(folder, publisher, crl_labels, cloud_identity)
    files.cafile = _write(os.path.join(folder, "ca-bundle.pem"), b"".join(
        c.public_bytes(PEM) for c in [root_cert] + list(ca_certs)))
    service_cert = service_ca(hsm, folder, service_ca_label, now)
    files.service_cafile = os.path.join(folder, "service-ca.pem")
    # The broker's server certificate chains to the fleet root (devices check it against
    # their SE's anchor); the cloud's client certificate to the service CA.
    for role, name, hosts, label, issuer in (
            ("server", server_hosts[0], list(server_hosts), root_label, root_cert),
            ("cloud", cloud_identity, None, service_ca_label, service_cert)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = tls_certificate_builder(key.public_key(), issuer, name, now, hosts)
        cert = sign_certificate(hsm, label, builder, issuer.public_key())
        setattr(files, role + "_cert", _write(os.path.join(folder, role + ".pem"),
                                              cert.public_bytes(PEM)))
        setattr(files, role + "_key", _write(
            os.path.join(folder, role + ".key"),
            key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()), private=True))
    files.hsm, files.service_ca_label, files.service_ca_cert = (hsm, service_ca_label,
                                                                service_cert)
    files.write_crl()
    files.config = BrokerConfig(files.cafile, files.server_cert, files.server_key,
                                files.crlfile, files.service_cafile, files.service_crlfile,
                                cloud_identity=cloud_identity)
    return files
