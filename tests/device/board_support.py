"""A board's world for device/board.run (no tests in this module): an emulated SE served on
a Unix socket, holding the firmware-signing key (provisioned as the line does, inside
SCP03), an identity credential and an operational credential in slot 2 with the rotation
journal at BASE(2), as a device has them after its first enrolment; an MCUboot image
signed by imgtool, a CRL of the issuing CA, and a fake `board_net` module source that
serves whoami / ack / fetch_revocation (the CRL file) and refuses enrolment, with a clock
that advances on sleep.  The throwaway CA plays the cloud; the agent's side is under test
(the real cloud's in tests/device/test_agent.py).

    world = BoardWorld(folder, revoke_slot2=False)
    world.board_net_source()     # the module text; stage it as `board_net`
    world.bus_uri                # sim:unix:<socket>
    world.se()                   # CPython's view of the same SE afterwards
"""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetid.common import se_consts as C
from fleetid.common import t1
from fleetid.common.apdu import ApduProtocol
from fleetid.device import rotation_journal as rj
from fleetid.device.se import SeSession
from tests.device.boot_support import ImgtoolKeys, provisioned_se, sign_image

DER = serialization.Encoding.DER
CN = "FID-000000001"
IMAGE_MAX_SIZE = 0x40000
IMAGE_COUNTER = 5

BOARD_NET = r'''
from fleetid.device.agent import NetError

NOW = %(now)d
CRL = %(crl)r


class Net:
    def whoami(self, slot):
        print("net whoami", slot)
        return {"commands": []}

    def cacerts(self, slot):
        print("net cacerts", slot)
        raise NetError(NetError.REFUSED, "no enrolment in this test", 403)

    def nonce(self, slot):
        print("net nonce", slot)
        raise NetError(NetError.REFUSED, "no enrolment in this test", 403)

    def enroll(self, slot, csr_der, reenroll):
        print("net enroll", slot)
        raise NetError(NetError.REFUSED, "no enrolment in this test", 403)

    def ack(self, slot):
        print("net ack", slot)

    def fetch_revocation(self, slot):
        print("net fetch_revocation", slot)
        with open(CRL, "rb") as f:
            return f.read()


class Clock:
    def __init__(self):
        self.t = NOW

    def now(self):
        return self.t

    def sleep(self, seconds):
        print("sleep", int(seconds))
        self.t += int(seconds)


def make_net(se):
    return Net()


def make_clock():
    return Clock()
'''


class _Ca:
    """A self-signed P-256 issuing CA."""

    def __init__(self, now):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "board test CA")])
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=3650))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, point, days, now):
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(point))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CN),
                             x509.NameAttribute(NameOID.SERIAL_NUMBER, CN)])
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
                .public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=1))
                .not_valid_after(now + datetime.timedelta(days=days))
                .sign(self.key, hashes.SHA256()))

    def crl(self, number, now, revoked=()):
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.name)
                   .last_update(now - datetime.timedelta(minutes=5))
                   .next_update(now + datetime.timedelta(hours=24))
                   .add_extension(x509.CRLNumber(number), critical=False))
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - datetime.timedelta(minutes=10)).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(DER)


class BoardWorld:
    """Everything above, in `folder`.  Attributes: bus_uri, now (int), image / foreign
    (image paths: signed by the provisioned key / by another key), issuer (CA certificate
    DER path), crl (CRL path), cache (the CRL cache path, absent at first), serial (of the
    slot-2 certificate), t0 / t1 (its validity), chip, server."""

    def __init__(self, folder, revoke_slot2=False):
        from fleetid.sim import profiles
        from fleetid.sim.endpoint import BusEndpoint
        from fleetid.sim.server import serve_in_thread

        folder = str(folder)
        os.makedirs(folder, exist_ok=True)
        when = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        self.now = int(when.timestamp())
        keys = ImgtoolKeys(folder)
        payload = os.urandom(4096)
        self.image = os.path.join(folder, "good.img")
        self.foreign = os.path.join(folder, "foreign.img")
        with open(self.image, "wb") as f:
            f.write(sign_image(folder, keys.a, payload, "good", "1.2.3", IMAGE_COUNTER))
        with open(self.foreign, "wb") as f:
            f.write(sign_image(folder, keys.b, payload, "foreign", "1.2.3", IMAGE_COUNTER))
        se, self.chip, _record = provisioned_se(os.path.join(folder, "vendor"), folder,
                                                keys.a_point)
        ca = _Ca(when)
        identity = ca.issue(se.generate_key(C.SLOT_IDENTITY, C.POLICY_SIGN), 3650, when)
        se.put_cert(C.SLOT_IDENTITY, identity.public_bytes(DER))
        operational = ca.issue(se.generate_key(C.SLOT_OPERATIONAL_A, C.POLICY_SIGN), 30,
                               when)
        se.put_cert(C.SLOT_OPERATIONAL_A, operational.public_bytes(DER))
        self.serial = operational.serial_number
        self.t0 = int(operational.not_valid_before_utc.timestamp())
        self.t1 = int(operational.not_valid_after_utc.timestamp())
        rj.RotationJournal(se).append(rj.Record(rj.BASE, C.SLOT_OPERATIONAL_A, 0,
                                                rj.CAUSE_ENROL, self.t0, self.t1))
        self.issuer = os.path.join(folder, "issuer.der")
        with open(self.issuer, "wb") as f:
            f.write(ca.cert.public_bytes(DER))
        self.crl_der = ca.crl(7, when, revoked=(self.serial,) if revoke_slot2 else ())
        self.crl = os.path.join(folder, "ca.crl")
        with open(self.crl, "wb") as f:
            f.write(self.crl_der)
        self.cache = os.path.join(folder, "crl.cache")
        self.chip.power_loss()
        self.server = serve_in_thread(BusEndpoint(self.chip, profile=t1.PROFILE_GP,
                                                  latency=profiles.get("none")),
                                      "unix:" + os.path.join(folder, "se.sock"),
                                      idle_timeout_s=30)
        self.bus_uri = self.server.bus_uri

    def board_net_source(self):
        return BOARD_NET % {"now": self.now, "crl": self.crl}

    def se(self):
        """CPython's session on the same chip (call after the board's run has closed)."""
        self.chip.power_loss()
        se = SeSession(ApduProtocol(self.chip.process))
        se.select()
        return se

    def close(self):
        self.server.stop()
