"""A fleet with a real mosquitto broker (no tests in this module).

`MqttFleet(tmp_path, devices=n)`: a factory line on the embedded defaults personalises n
emulated chips (identity key in the SE, certificate CN = device serial, fleet root trust
anchor), then a broker starts on a free loopback port with TLS (server certificate signed
by the fleet root through the line's HSM), `require_certificate true`,
`use_identity_as_username true`, the CRLs of the issuing CA and of the root as its
`crlfile`, and the ACL of fleetid.cloud.mqtt.broker.  The cloud's own client certificate
(CN "fleet-cloud") is signed by the root.  `close()` stops the broker and the line.
"""

import datetime
import os
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetid.cloud.line import runner
from fleetid.cloud.mqtt.broker import Broker, BrokerConfig, find_mosquitto, write_crl_file
from fleetid.cloud.mqtt.service import CloudMqtt, registry_refusal
from fleetid.cloud.pki.signing import sign_certificate
from fleetid.cloud.revocation import CrlIssuer, CrlPublisher
from fleetid.cloud.verifier.server import server_certificate_builder
from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.device.se import SeSession
from tests.cloud.hsm_support import KEYSTORE_PASS, TEST_SCRYPT_N
from tests.conftest import require

ROOT_DIR = pathlib.Path(__file__).resolve().parents[2]
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
CLOUD_IDENTITY = "fleet-cloud"


def require_mosquitto():
    require(find_mosquitto() is not None, "mosquitto (Debian package mosquitto)")


def _write(path, data, private=False):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _key_pem(key):
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def client_certificate_builder(public_key, issuer_cert, common_name, now, days=30):
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                     False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
    )


class MqttFleet:
    """Line + chips + PKI files + a running broker.  Attributes: line, chips, broker,
    publisher (CrlPublisher: labels "ca" and "root"), files (dict of PEM paths).
    Pass `line` and `chips` to put the broker on a line made elsewhere (e.g. the agent
    tests' LineAndCloud)."""

    def __init__(self, directory, devices=2, start=True, line=None, chips=None):
        require_mosquitto()
        self.dir = str(directory)
        if line is None:
            line = runner.init_line(os.path.join(self.dir, "line"), scrypt_n=TEST_SCRYPT_N,
                                    environ=dict(os.environ,
                                                 FLEETID_KEYSTORE_PASS=KEYSTORE_PASS))
            lot = runner.make_lot(line, devices)
            summary = runner.run_line(line.resources_for(lot.batch), lot.chips, stations=1)
            if summary.yield_pct != 100.0:
                raise RuntimeError("the line failed: %r" % (summary.failures(),))
            chips = lot.chips
            self._own_line = True
        else:
            self._own_line = False  # a line (and chips) someone else made and closes
        self.line = line
        self.chips = chips
        now = datetime.datetime.now(datetime.timezone.utc)
        pki = os.path.join(self.dir, "mqtt-pki")
        os.makedirs(pki, exist_ok=True)
        self.files = {}
        self.files["cafile"] = _write(os.path.join(pki, "ca-bundle.pem"),
                                      line.root_cert.public_bytes(PEM)
                                      + line.ca_cert.public_bytes(PEM))
        self.files["root"] = _write(os.path.join(pki, "root.pem"),
                                    line.root_cert.public_bytes(PEM))
        for role, hosts_or_cn in (("server", ["localhost", "127.0.0.1"]),
                                  ("cloud", CLOUD_IDENTITY)):
            key = ec.generate_private_key(ec.SECP256R1())
            if role == "server":
                builder = server_certificate_builder(key.public_key(), line.root_cert,
                                                     hosts_or_cn, now)
            else:
                builder = client_certificate_builder(key.public_key(), line.root_cert,
                                                     hosts_or_cn, now)
            cert = sign_certificate(line.hsm, line.labels["root"], builder,
                                    line.root_cert.public_key())
            self.files[role + "_cert"] = _write(os.path.join(pki, role + ".pem"),
                                                cert.public_bytes(PEM))
            self.files[role + "_key"] = _write(os.path.join(pki, role + ".key"),
                                               _key_pem(key), private=True)
        self.publisher = CrlPublisher(line.registry, [
            CrlIssuer("ca", line.hsm, line.labels["ca"], line.ca_cert),
            CrlIssuer("root", line.hsm, line.labels["root"], line.root_cert),
        ], poll_interval=0.0)
        self.files["crlfile"] = os.path.join(pki, "crl.pem")
        self.write_crlfile()
        self.config = BrokerConfig(self.files["cafile"], self.files["server_cert"],
                                   self.files["server_key"], self.files["crlfile"],
                                   cloud_identity=CLOUD_IDENTITY)
        self.broker = Broker(self.config, os.path.join(self.dir, "broker"))
        if start:
            self.broker.start()

    def write_crlfile(self):
        """(Re)write the broker's crlfile from the current CRLs of both CAs."""
        write_crl_file(self.files["crlfile"], self.publisher, ("ca", "root"))

    def crl_der(self, label="ca"):
        return self.publisher.current_der(label)

    def session(self, index=0):
        """A selected SeSession on chip `index` (APDUs straight into the applet)."""
        made = self.chips[index]
        made.chip.power_loss()
        se = SeSession(ApduProtocol(made.chip.process))
        se.select()
        return se

    def protocol(self, index=0):
        made = self.chips[index]
        return ApduProtocol(made.chip.process)

    def device_name(self, se):
        cert = x509.load_der_x509_certificate(bytes(se.get_cert(C.SLOT_IDENTITY)))
        return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, cert

    def chain_der(self, se):
        return [bytes(se.get_cert(C.SLOT_IDENTITY)), self.line.ca_cert.public_bytes(DER)]

    def root_der(self):
        return self.line.root_cert.public_bytes(DER)

    def parse_serial(self, name):
        prefix, _, number = name.rpartition("-")
        if prefix != self.line.config.get("serial_prefix", "FID"):
            raise ValueError(name)
        return int(number, 10)

    def cloud(self, **kwargs):
        """A CloudMqtt (not connected) with the fleet cloud's certificate, refusing
        devices the registry does not hold as committed."""
        kwargs.setdefault("device_refusal", registry_refusal(self.line.registry,
                                                             self.parse_serial))
        return CloudMqtt(self.broker.host, self.broker.port, self.files["cafile"],
                         self.files["cloud_cert"], self.files["cloud_key"], **kwargs)

    def revoke(self, cert, reason="keyCompromise"):
        """Revoke a device certificate in the registry and hand the broker the new CRL."""
        self.line.registry.mark_revoked(cert.serial_number, reason,
                                        issuer=cert.issuer.rfc4514_string())
        self.publisher.invalidate()
        self.write_crlfile()
        self.broker.reload()

    def close(self):
        self.broker.stop()
        if self._own_line:
            self.line.close()
