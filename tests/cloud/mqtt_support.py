"""A fleet with a real mosquitto broker (no tests in this module).

`MqttFleet(tmp_path, devices=n)`: a factory line on the embedded defaults personalises n
emulated chips (identity key in the SE, certificate CN = device serial, fleet root trust
anchor), then a broker starts on a free loopback port with TLS (server certificate signed
by the fleet root through the line's HSM), `require_certificate true`,
`use_identity_as_username true`, the CRLs of the issuing CA and of the root as its
`crlfile`, and the ACL of fleetid.cloud.mqtt.broker; a second listener (`service_port`)
trusts only the service CA, which signs the cloud's own client certificate (CN
"fleet-cloud").  `close()` stops the broker and the line.
"""

import os
import pathlib

from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives import serialization

from fleetid.cloud.line import runner
from fleetid.cloud.mqtt.broker import Broker, find_mosquitto
from fleetid.cloud.mqtt.fleet_files import make_broker_files
from fleetid.cloud.mqtt.service import CloudMqtt, registry_refusal
from fleetid.cloud.revocation import CrlIssuer, CrlPublisher
from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.device.se import SeSession
from fleetid.sim import lot as lot_mod
from fleetid.sim.metering import EmulatedBuses
from tests.cloud.hsm_support import KEYSTORE_PASS, TEST_SCRYPT_N
from tests.cloud.line_support import init_demo_line
from tests.conftest import require

ROOT_DIR = pathlib.Path(__file__).resolve().parents[2]
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
CLOUD_IDENTITY = "fleet-cloud"


def require_mosquitto():
    require(find_mosquitto() is not None, "mosquitto (Debian package mosquitto)")


class MqttFleet:
    """Line + chips + PKI files + a running broker.  Attributes: line, chips, broker,
    publisher (CrlPublisher: labels "ca" and "root"), files (dict of PEM paths).
    Pass `line` and `chips` to put the broker on a line made elsewhere (e.g. the agent
    tests' LineAndCloud)."""

    def __init__(self, directory, devices=2, start=True, line=None, chips=None):
        require_mosquitto()
        self.dir = str(directory)
        if line is None:
            line = init_demo_line(os.path.join(self.dir, "line"), scrypt_n=TEST_SCRYPT_N,
                                  environ=dict(os.environ,
                                               FLEETID_KEYSTORE_PASS=KEYSTORE_PASS))
            lot = lot_mod.make_lot(line, devices)
            summary = runner.run_line(line.resources_for(lot.batch), lot.chips,
                                      EmulatedBuses(), stations=1)
            if summary.yield_pct != 100.0:
                raise RuntimeError("the line failed: %r" % (summary.failures(),))
            chips = lot.chips
            self._own_line = True
        else:
            self._own_line = False  # a line (and chips) someone else made and closes
        self.line = line
        self.chips = chips
        self.publisher = CrlPublisher(line.registry, [
            CrlIssuer("ca", line.hsm, line.labels["ca"], line.ca_cert),
            CrlIssuer("root", line.hsm, line.labels["root"], line.root_cert),
        ], poll_interval=0.0)
        self.broker_files = make_broker_files(line.hsm, line.labels["root"], line.root_cert,
                                              [line.ca_cert], self.publisher,
                                              os.path.join(self.dir, "mqtt-pki"),
                                              crl_labels=("ca", "root"),
                                              cloud_identity=CLOUD_IDENTITY)
        bf = self.broker_files
        self.files = {"cafile": bf.cafile, "service_cafile": bf.service_cafile,
                      "server_cert": bf.server_cert,
                      "server_key": bf.server_key, "cloud_cert": bf.cloud_cert,
                      "cloud_key": bf.cloud_key, "crlfile": bf.crlfile}
        self.config = bf.config
        self.broker = Broker(self.config, os.path.join(self.dir, "broker"))
        if start:
            self.broker.start()

    def write_crlfile(self):
        """(Re)write the broker's crlfile from the current CRLs of both CAs."""
        self.broker_files.write_crl()

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
        return CloudMqtt(self.broker.host, self.broker.service_port, self.files["cafile"],
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
