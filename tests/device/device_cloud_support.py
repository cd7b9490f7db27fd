"""A personalised emulated device and the fleet cloud it talks to, in one process (no
tests in this module).

The factory line (fleetid.cloud.line.workdir + runner) initialises a line on the embedded defaults
(soft keystore, SQLite), fabs chips and personalises them on a station: the chips hold
their identity key, certificate and the fleet root trust anchor, exactly as shipped.  The
cloud (EST + verifier, fleetid.cloud.server.CloudServer) runs on 127.0.0.1 in a
background event loop on the line's PKI and registry, with a TLS server certificate the
fleet root signs through the line's HSM.
"""

import asyncio
import datetime
import os
import threading

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.ca import IssuingCa
from fleetid.cloud.est.service import EstLabel, EstService
from fleetid.cloud.line import runner
from fleetid.cloud.pki.profiles import server_certificate_builder
from fleetid.cloud.pki.signing import sign_certificate
from fleetid.cloud.server import CloudServer
from fleetid.cloud.revocation.service import RevocationService
from fleetid.cloud.verifier.revoked_cas import RevokedCaFile
from fleetid.cloud.verifier.service import FleetTrust, FleetVerifier
from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.device.se import SeSession
from fleetid.sim import lot as lot_mod
from fleetid.sim.metering import EmulatedBuses
from tests.cloud.hsm_support import KEYSTORE_PASS, TEST_SCRYPT_N
from tests.cloud.line_support import init_demo_line

PEM = serialization.Encoding.PEM
LABEL = "widget"


class LineAndCloud:
    """A line with `devices` personalised chips and the cloud on the same PKI.

    Attributes: line (workdir.Line), chips (list of EmulatedChip), server (CloudServer),
    ports ({"verifier": int, "est": int}), verifier (FleetVerifier), est (EstService).
    """

    def __init__(self, directory, devices=2, labels_extra=()):
        self.dir = str(directory)
        self.line = init_demo_line(os.path.join(self.dir, "line"), scrypt_n=TEST_SCRYPT_N,
                                     environ=dict(os.environ,
                                                  FLEETID_KEYSTORE_PASS=KEYSTORE_PASS))
        lot = lot_mod.make_lot(self.line, devices)
        summary = runner.run_line(self.line.resources_for(lot.batch), lot.chips,
                                  EmulatedBuses(), stations=1)
        if summary.yield_pct != 100.0:
            raise RuntimeError("the line failed: %r" % (summary.failures(),))
        self.chips = lot.chips
        line = self.line
        self.revoked_cas_path = os.path.join(self.dir, "revoked-cas.jsonl")
        self.trust = FleetTrust([line.root_cert], [line.ca_cert], line.vendor_roots,
                                revoked_ca_file=RevokedCaFile(self.revoked_cas_path))
        ca = IssuingCa(line.hsm, line.labels["ca"], line.ca_cert, line.vendor_roots)
        chain = [line.ca_cert, line.root_cert]
        labels = [EstLabel(LABEL, ca, chain)]
        labels += [EstLabel(name, ca, chain, require_approval=True, retry_after=retry)
                   for name, retry in labels_extra]
        self.est = EstService(labels, line.registry, self.trust, default_label=LABEL)
        self.verifier = FleetVerifier(self.trust, line.registry)
        self.revocation = RevocationService(
            line.registry, [line.ca_cert], self.revoked_cas_path,
            os.path.join(self.dir, "revocation.events"), listeners=[self.verifier.invalidate])
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = server_certificate_builder(key.public_key(), line.root_cert,
                                             ["localhost", "127.0.0.1"], now)
        cert = sign_certificate(line.hsm, line.labels["root"], builder,
                                line.root_cert.public_key())
        self.server_cert = os.path.join(self.dir, "server.pem")
        self.server_key = os.path.join(self.dir, "server.key")
        with open(self.server_cert, "wb") as f:
            f.write(cert.public_bytes(PEM))
        fd = os.open(self.server_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        self.server = CloudServer(self.verifier, self.est, self.server_cert, self.server_key,
                                  self.trust.ca_bundle_pem(), verifier_port=0, est_port=0)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        self.ports = self.server.ports

    def revoke_certificate(self, certificate, reason, operator=""):
        """Revoke `certificate` through the one writer (RevocationService), as `fleetid
        revoke --cert` does.  Returns its CertificateRecord."""
        return self.revocation.revoke_certificate(
            certificate.serial_number, reason, operator=operator,
            issuer=certificate.issuer.rfc4514_string())

    def session(self, index=0):
        """A selected SeSession on chip `index` (APDUs straight into the applet)."""
        made = self.chips[index]
        made.chip.power_loss()  # a fresh boot: no SCP03 session, applet deselected
        se = SeSession(ApduProtocol(made.chip.process))
        se.select()
        return se

    def device(self, se):
        """(registry DeviceRecord, identity certificate) of the chip behind `se`."""
        cert = x509.load_der_x509_certificate(bytes(se.get_cert(C.SLOT_IDENTITY)))
        return self.line.registry.find_by_se_uid(se.uid())[0], cert

    def root_der(self):
        return self.line.root_cert.public_bytes(serialization.Encoding.DER)

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.line.close()
