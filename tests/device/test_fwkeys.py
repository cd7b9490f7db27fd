"""Firmware-signing key rotation through the PKI: signed boot (device/boot.py) accepts the
keys of firmware certificates under the fleet root that the SE holds (device/fwkeys.py),
installed over the air inside SCP03 at 0x33 (cloud/mqtt/ota.py); images from a new key
boot after the rotation, images from the old key are refused once its certificate is on
the root's CRL (verified through the SE by the CRL cache); a certificate the root did not
sign is ignored.  Images are signed by MCUboot's imgtool."""

import datetime
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.mqtt.ota import KeySet, install_trust_anchor
from fleetid.cloud.pki.firmware import certify_public_key
from fleetid.cloud.pki.signing import sign_crl
from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.common.host.hostcrypto import CryptographyPrimitives
from fleetid.device import boot, crl_cache
from fleetid.device.fwkeys import FirmwareKeys
from tests.cloud.mqtt_support import MqttFleet
from tests.device.boot_support import ImgtoolKeys, sign_image

DER = serialization.Encoding.DER


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fwkeys")
    fleet = MqttFleet(folder / "fleet", devices=1, start=False)
    keys = ImgtoolKeys(folder)
    images = {name: sign_image(folder, getattr(keys, name), b"app-" + name.encode() * 100,
                               "image-" + name, security_counter=1) for name in ("a", "b")}
    yield fleet, keys, images
    fleet.close()


def _public(point):
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def _relay(chip):
    protocol = ApduProtocol(chip.process)

    def relay(apdu):
        data, sw = protocol.transceive_raw(apdu)
        return data + bytes((sw >> 8, sw & 0xFF))

    return relay


class MemoryStore:
    def __init__(self):
        self.data = None

    def load(self):
        return self.data

    def store(self, data):
        self.data = bytes(data)


def _boots(se, image, keys):
    try:
        report = boot.check_image(se, image, firmware_keys=keys)
    except boot.BootError as exc:
        return exc.reason
    return report.key_serial


def test_firmware_key_rotation_and_revocation_through_the_pki(setting):
    fleet, keys, images = setting
    line = fleet.line
    hsm = line.hsm
    made = fleet.chips[0]
    se = fleet.session(0)
    se_uid = se.uid()
    key_set = KeySet(line.labels["master"], C.SCP03_KVN_DEVICE)
    prims = CryptographyPrimitives()
    cert_a = certify_public_key(hsm, line.labels["root"], line.root_cert,
                                _public(keys.a_point), "firmware A")
    cert_b = certify_public_key(hsm, line.labels["root"], line.root_cert,
                                _public(keys.b_point), "firmware B")

    # Before: the line's bare point; neither imgtool key is it.
    assert [k.source for k in FirmwareKeys(se).points()] == ["bare"]
    assert _boots(se, images["a"], FirmwareKeys(se)) == boot.REASON_KEY

    # `fleetid pki new-fw-key` + the OTA command: certificate A installed in SCP03 at 0x33.
    install_trust_anchor(hsm, _relay(made.chip), prims, se_uid, key_set,
                         C.DGI_FIRMWARE_CERT_A, cert_a.public_bytes(DER))
    se = fleet.session(0)
    assert _boots(se, images["a"], FirmwareKeys(se)) == cert_a.serial_number
    assert _boots(se, images["b"], FirmwareKeys(se)) == boot.REASON_KEY

    # Rotation: B beside A; both boot during the overlap.
    install_trust_anchor(hsm, _relay(made.chip), prims, se_uid, key_set,
                         C.DGI_FIRMWARE_CERT_B, cert_b.public_bytes(DER))
    se = fleet.session(0)
    assert _boots(se, images["a"], FirmwareKeys(se)) == cert_a.serial_number
    assert _boots(se, images["b"], FirmwareKeys(se)) == cert_b.serial_number

    # Revocation: the root's CRL lists A; the device's CRL cache verifies it in the SE.
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(line.root_cert.subject)
               .last_update(now).next_update(now + datetime.timedelta(days=1))
               .add_extension(x509.CRLNumber(int(time.time() * 1000)), critical=False)
               .add_revoked_certificate(x509.RevokedCertificateBuilder()
                                        .serial_number(cert_a.serial_number)
                                        .revocation_date(now).build()))
    crl = sign_crl(hsm, line.labels["root"], builder, line.root_cert.public_key())
    cache = crl_cache.CrlCache(se, MemoryStore(), _point(line.root_cert),
                               line.root_cert.subject.public_bytes())
    epoch = int(now.timestamp())
    assert cache.refresh(lambda: crl.public_bytes(DER), epoch) == "updated"

    def revoked(serial):
        try:
            cache.check_serial(serial, epoch)
        except crl_cache.RevokedError:
            return True
        return False

    fw = FirmwareKeys(se, revoked=revoked, now=epoch)
    assert _boots(se, images["a"], fw) == boot.REASON_KEY
    assert fw.refused == [(cert_a.serial_number, "revoked")]
    assert _boots(se, images["b"], fw) == cert_b.serial_number


def _point(cert):
    return cert.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint)


def test_a_firmware_certificate_the_root_did_not_sign_is_ignored(setting):
    fleet, keys, images = setting
    line = fleet.line
    hsm = line.hsm
    made = fleet.chips[0]
    se = fleet.session(0)
    # Signed by the issuing CA, not the root: right key, wrong issuer.
    from fleetid.cloud.pki.firmware import firmware_certificate_builder
    from fleetid.cloud.pki.signing import sign_certificate

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = firmware_certificate_builder(_public(keys.a_point), line.ca_cert, "rogue",
                                           now - datetime.timedelta(minutes=5),
                                           now + datetime.timedelta(days=1))
    rogue = sign_certificate(hsm, line.labels["ca"], builder, line.ca_cert.public_key())
    install_trust_anchor(hsm, _relay(made.chip), CryptographyPrimitives(), se.uid(),
                         KeySet(line.labels["master"], C.SCP03_KVN_DEVICE),
                         C.DGI_FIRMWARE_CERT_A, rogue.public_bytes(DER))
    se = fleet.session(0)
    fw = FirmwareKeys(se)
    accepted = fw.points()
    assert (rogue.serial_number, "not signed by the fleet root") in fw.refused
    assert all(k.serial != rogue.serial_number for k in accepted)
    assert _boots(se, images["a"], FirmwareKeys(se)) in (boot.REASON_KEY,)


def test_installing_a_firmware_certificate_outside_scp03_level_0x33_is_refused(setting):
    fleet, keys, _images = setting
    se = fleet.session(0)
    from fleetid.common.errors import SecurityStatusNotSatisfied

    with pytest.raises(SecurityStatusNotSatisfied):
        se.store_data(C.DGI_FIRMWARE_CERT_B, fleet.line.root_cert.public_bytes(DER))
