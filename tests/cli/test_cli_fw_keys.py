"""Firmware-key rotation through the real commands, against the emulated SE of a device the
factory line made (its factory firmware key as DATA_TRUST_FIRMWARE_KEY, the fleet root as
trust anchor):

- `fleetid ota sign-image` signs inside the line's HSM; MCUboot's own `imgtool verify`
  accepts the image, and its signed bytes equal what `imgtool sign` writes;
- `fleetid ota certify-fw-key` certifies an imgtool key from its public half only;
- after `fleetid ota install-fw-key` (relayed by a device on the real broker),
  `fleetid agent boot-check` and `fleetid agent run --boot-image` accept the new key's
  images and name the certificate, and refuse the retired factory key's images without
  moving the SE's firmware counter.

Every command runs through click's CliRunner on the `fleetid` group (the installed entry
point's object); images are checked by imgtool as a process.
"""

import json
import os
import threading

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetid.cli.main import cli
from fleetid.common import se_consts as C
from tests.cloud.hsm_support import KEYSTORE_PASS
from tests.cloud.mqtt_support import MqttFleet
from tests.device.boot_support import HEADER_SIZE, imgtool, sign_image

pytestmark = pytest.mark.timeout(300)

PAYLOAD = bytes(range(256)) * 12
ENV = {"FLEETID_KEYSTORE_PASS": KEYSTORE_PASS}
COUNTER = "ctr/%d" % C.COUNTER_FIRMWARE


def _fleetid(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], env=ENV)
    assert "Traceback" not in result.output, result.output
    return result


def _ok(*args):
    result = _fleetid(*args)
    assert result.exit_code == 0, result.output
    return result.output


class _Setting:
    """The line (in a folder the CLI opens), one device on the broker, its chip served on
    a Unix socket for `agent boot-check`."""

    def __init__(self, folder):
        from fleetid.common import t1
        from fleetid.sim import profiles
        from fleetid.sim.endpoint import BusEndpoint
        from fleetid.sim.server import serve_in_thread

        self.folder = folder
        self.fleet = MqttFleet(folder / "fleet", devices=1)
        self.line_dir = os.path.join(self.fleet.dir, "line")
        with open(os.path.join(self.line_dir, "line.json")) as f:
            config = json.load(f)
        self.hsm_uri = config["hsm"]
        self.root_pem = os.path.join(self.line_dir, config["root_cert"])
        self.factory_label = config["labels"]["firmware"]
        self.chip = self.fleet.chips[0].chip
        self.server = serve_in_thread(BusEndpoint(self.chip, profile=t1.PROFILE_GP,
                                                  latency=profiles.get("none")),
                                      "unix:%s" % (folder / "se.sock"))
        self.bus = self.server.bus_uri

    def path(self, name):
        return str(self.folder / name)

    def close(self):
        self.server.stop()
        self.fleet.close()


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    made = _Setting(tmp_path_factory.mktemp("fwcli"))
    yield made
    made.close()


class _RelayingDevice:
    """The device online on the broker, relaying OTA APDUs to its SE (what `fleetid agent
    run --mqtt` does), for the span of one `fleetid ota` command."""

    def __init__(self, fleet):
        from fleetid.common.apdu import ApduProtocol
        from fleetid.device.host.mqtt_paho import PahoSeTransport
        from fleetid.device.mqtt import DeviceChannel

        self.se = fleet.session(0)
        self.name, _cert = fleet.device_name(self.se)
        protocol = ApduProtocol(fleet.chips[0].chip.process)
        transport = PahoSeTransport(self.se, C.SLOT_IDENTITY, fleet.chain_der(self.se),
                                    [fleet.root_der()], fleet.broker.host, fleet.broker.port)
        self.channel = DeviceChannel(transport, self.name,
                                     relay=lambda apdu: protocol.transceive_raw(apdu))
        self.channel.start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self):
        while not self._stop.is_set():
            self.channel.step(0.05)

    def close(self):
        self._stop.set()
        self._thread.join(10)
        self.channel.close()


def _install(setting, fw_cert, place):
    device = _RelayingDevice(setting.fleet)
    try:
        broker = setting.fleet.broker  # the cloud's side: the service listener
        return _ok("ota", "install-fw-key", "--line", setting.line_dir, "--broker",
                   "mqtts://%s:%d" % (broker.host, broker.service_port),
                   "--files", os.path.join(setting.fleet.dir, "mqtt-pki"), "--device",
                   device.name, "--timeout", "20", "--fw-cert", fw_cert, "--slot", place)
    finally:
        device.close()


def _public_pem(cert_path, out_path):
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(out_path, "wb") as f:
        f.write(cert.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return cert


def _sign(setting, label, counter, name, version="2.0.0+1"):
    payload = setting.path(name + ".bin")
    with open(payload, "wb") as f:
        f.write(PAYLOAD)
    out = setting.path(name + ".signed.bin")
    _ok("ota", "sign-image", "--line", setting.line_dir, "--key-label", label, "--version",
        version, "--security-counter", counter, "--header-size", HEADER_SIZE, payload, out)
    return out


def _boot_check(setting, image, *more):
    return _fleetid("agent", "boot-check", image, "--bus", setting.bus, *more)


def _new_fw_key(setting, label, name):
    out = setting.path(label + ".pem")
    _ok("pki", "new-fw-key", "--hsm", setting.hsm_uri, "--root-label", "fleet-root",
        "--root-cert", setting.root_pem, "--label", label, "--name", name, "--out", out)
    return out


def test_sign_image_signs_in_the_hsm_an_image_imgtool_verifies(setting):
    fw_cert = _new_fw_key(setting, "fw-sign-test", "fw sign test")
    image = _sign(setting, "fw-sign-test", 7, "hsm-signed", version="1.2.3+4")
    _public_pem(fw_cert, setting.path("fw-sign-test.pub.pem"))
    verified = imgtool("verify", "-k", setting.path("fw-sign-test.pub.pem"), image)
    assert "Image was correctly validated" in verified and "1.2.3+4" in verified
    # The signed part (header, payload, protected SEC_CNT) is byte for byte imgtool's.
    imgtool("keygen", "-k", setting.path("someone.pem"), "-t", "ecdsa-p256")
    theirs = sign_image(setting.folder, setting.path("someone.pem"), PAYLOAD, "theirs",
                        version="1.2.3+4", security_counter=7)
    with open(image, "rb") as f:
        ours = f.read()
    covered = 0x200 + len(PAYLOAD) + 12  # header, payload, protected TLV area (SEC_CNT)
    assert ours[:covered] == theirs[:covered]
    # The wrong key for the certificate named, a bad version, a payload over the slot:
    # refused, nothing written.
    refused = _fleetid("ota", "sign-image", "--line", setting.line_dir, "--key-label",
                       setting.factory_label, "--fw-cert", fw_cert, "--version", "1.0.0",
                       "--security-counter", "1", setting.path("hsm-signed.bin"),
                       setting.path("wrong.bin"))
    assert refused.exit_code == 1 and "key_mismatch" in refused.output, refused.output
    bad = _fleetid("ota", "sign-image", "--line", setting.line_dir, "--key-label",
                   "fw-sign-test", "--version", "1.256", "--security-counter", "1",
                   setting.path("hsm-signed.bin"), setting.path("wrong.bin"))
    assert bad.exit_code == 2 and "--version" in bad.output and "'256'" in bad.output
    big = _fleetid("ota", "sign-image", "--line", setting.line_dir, "--key-label",
                   "fw-sign-test", "--version", "1.0.0", "--security-counter", "1",
                   "--max-size", "2048", setting.path("hsm-signed.bin"),
                   setting.path("wrong.bin"))
    assert big.exit_code == 1 and "> slot 2048 B" in big.output, big.output
    assert not os.path.exists(setting.path("wrong.bin"))


def test_certify_fw_key_takes_only_a_p256_public_half(setting):
    key = setting.path("ext-refused.pem")
    imgtool("keygen", "-k", key, "-t", "ecdsa-p256")
    refused = _fleetid("ota", "certify-fw-key", "--line", setting.line_dir, "--public-key",
                       key, "--name", "x", "--out", setting.path("x.pem"))
    assert refused.exit_code == 2 and "is a private key" in refused.output, refused.output
    imgtool("keygen", "-k", setting.path("ed.pem"), "-t", "ed25519")
    imgtool("getpub", "-k", setting.path("ed.pem"), "-e", "pem", "-o",
            setting.path("ed.pub.pem"))
    other = _fleetid("ota", "certify-fw-key", "--line", setting.line_dir, "--public-key",
                     setting.path("ed.pub.pem"), "--name", "x", "--out", setting.path("x.pem"))
    assert other.exit_code == 2 and "not an ECDSA P-256 key" in other.output, other.output
    assert not os.path.exists(setting.path("x.pem"))


def test_boot_follows_the_installed_firmware_certificates(setting):
    chip = setting.chip
    factory = _sign(setting, setting.factory_label, 2, "factory")
    fw_cert = _new_fw_key(setting, "fw-2027", "fw 2027")
    cert = _public_pem(fw_cert, setting.path("fw-2027.pub.pem"))
    new = _sign(setting, "fw-2027", 3, "new")
    assert "correctly validated" in imgtool("verify", "-k", setting.path("fw-2027.pub.pem"),
                                            new)

    # Before: the factory key only.
    result = _boot_check(setting, factory)
    assert result.exit_code == 0, result.output
    assert "verified by the factory firmware key" in result.output
    result = _boot_check(setting, new)
    assert result.exit_code == 1 and "refused: key_mismatch" in result.output

    # `fleetid ota install-fw-key`: the new key's certificate in place A.
    out = _install(setting, fw_cert, "a")
    assert "firmware certificate installed (DGI %04X)" % C.DGI_FIRMWARE_CERT_A in out, out
    before = chip.nvm.get(COUNTER)

    # The retired factory key: refused, and --confirm moves nothing.
    result = _boot_check(setting, factory, "--confirm")
    assert result.exit_code == 1 and "key               refused  key_mismatch" in \
        result.output, result.output
    assert "confirmed" not in result.output
    assert chip.nvm.get(COUNTER) == before
    # ... nor does the agent confirm it: it stops before connecting.
    agent = _fleetid("agent", "run", "--bus", setting.bus, "--cloud", "https://127.0.0.1:1",
                     "--once", "--max-attempts", "1", "--boot-image", factory)
    assert agent.exit_code == 1 and "key_mismatch" in agent.output, agent.output
    assert chip.nvm.get(COUNTER) == before

    # The new key's image: accepted, the certificate named, confirmed on request.
    result = _boot_check(setting, new)
    assert result.exit_code == 0, result.output
    assert "verified by firmware certificate serial %x (CN fw 2027)" % cert.serial_number \
        in result.output
    agent = _fleetid("agent", "run", "--bus", setting.bus, "--cloud", "https://127.0.0.1:1",
                     "--once", "--max-attempts", "1", "--boot-image", new)
    assert "signed boot: image 2.0.0+1, security counter 3, verified by firmware " \
        "certificate serial %x" % cert.serial_number in agent.output, agent.output
    result = _boot_check(setting, new, "--confirm")
    assert result.exit_code == 0 and "confirmed: SE firmware counter now 3" in result.output

    # An external imgtool key, certified from its public half (imgtool getpub's C array).
    ext_key = setting.path("build-server.pem")
    imgtool("keygen", "-k", ext_key, "-t", "ecdsa-p256")
    imgtool("getpub", "-k", ext_key, "-o", setting.path("build-server.c"))
    ext_cert_path = setting.path("build-server-cert.pem")
    out = _ok("ota", "certify-fw-key", "--line", setting.line_dir, "--public-key",
              setting.path("build-server.c"), "--name", "build server", "--out",
              ext_cert_path)
    with open(ext_cert_path, "rb") as f:
        ext_cert = x509.load_pem_x509_certificate(f.read())
    assert "serial %x" % ext_cert.serial_number in out
    ext_image = setting.path("ext.signed.bin")
    with open(ext_image, "wb") as f:
        f.write(sign_image(setting.folder, ext_key, PAYLOAD, "ext", version="2.1.0",
                           security_counter=4))
    result = _boot_check(setting, ext_image)
    assert result.exit_code == 1 and "refused: key_mismatch" in result.output
    out = _install(setting, ext_cert_path, "b")
    assert "(DGI %04X)" % C.DGI_FIRMWARE_CERT_B in out, out
    result = _boot_check(setting, ext_image, "--confirm")
    assert result.exit_code == 0, result.output
    assert "verified by firmware certificate serial %x (CN build server)" % \
        ext_cert.serial_number in result.output
    assert "confirmed: SE firmware counter now 4" in result.output
    # Both certificates installed: the fleet's HSM key still boots (counter permitting);
    # the factory key stays retired.
    assert _boot_check(setting, _sign(setting, "fw-2027", 5, "new5")).exit_code == 0
    assert "key_mismatch" in _boot_check(setting, _sign(setting, setting.factory_label, 6,
                                                        "factory6")).output
    assert chip.nvm.get(COUNTER) is not None

    # Retiring fw-2027: the root's CRL lists its certificate; the cache the agent keeps
    # (filled here by `fleetid agent check-peer --refresh-from`) makes boot-check refuse
    # its images, while the build server's key still boots.
    crl_path = setting.path("root-crl.der")
    with open(crl_path, "wb") as f:
        f.write(_root_crl(setting.fleet.line, [cert.serial_number]))
    cache = setting.path("root.crl")
    peer = _fleetid("agent", "check-peer", fw_cert, "--bus", setting.bus, "--crl-issuer",
                    setting.root_pem, "--crl-cache", cache, "--refresh-from",
                    "file://" + crl_path)
    assert "refresh: updated" in peer.output and "REFUSED" in peer.output, peer.output
    revocation = ["--crl-issuer", setting.root_pem, "--crl-cache", cache]
    before = chip.nvm.get(COUNTER)
    result = _boot_check(setting, setting.path("new5.signed.bin"), "--confirm", *revocation)
    assert result.exit_code == 1 and "key_mismatch" in result.output, result.output
    assert "firmware certificate %x not accepted: revoked" % cert.serial_number \
        in result.output
    assert "confirmed" not in result.output and chip.nvm.get(COUNTER) == before
    agent = _fleetid("agent", "run", "--bus", setting.bus, "--cloud", "https://127.0.0.1:1",
                     "--once", "--max-attempts", "1", "--boot-image",
                     setting.path("new5.signed.bin"), *revocation)
    assert agent.exit_code == 1 and "firmware certificate %x not accepted: revoked" % \
        cert.serial_number in agent.output, agent.output
    assert "key_mismatch" in agent.output and chip.nvm.get(COUNTER) == before
    wrong = _boot_check(setting, ext_image, "--crl-issuer",
                        os.path.join(setting.line_dir, "pki", "ca.pem"), "--crl-cache", cache)
    assert wrong.exit_code == 2 and "not the SE's fleet root" in wrong.output, wrong.output
    result = _boot_check(setting, ext_image, *revocation)
    assert result.exit_code == 0 and "CN build server" in result.output, result.output


def _root_crl(line, serials):
    """The fleet root's CRL listing `serials`, signed in the line's HSM (DER)."""
    import datetime
    import time

    from fleetid.cloud.pki.signing import sign_crl

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(line.root_cert.subject)
               .last_update(now - datetime.timedelta(minutes=1))
               .next_update(now + datetime.timedelta(days=1))
               .add_extension(x509.CRLNumber(int(time.time() * 1000)), critical=False))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
            .build())
    crl = sign_crl(line.hsm, line.labels["root"], builder, line.root_cert.public_key())
    return crl.public_bytes(serialization.Encoding.DER)


def test_boot_check_refuses_a_file_longer_than_the_slot(setting):
    image = _sign(setting, setting.factory_label, 9, "padded")
    with open(image, "rb") as f:
        data = f.read()
    slot = len(data) + 16
    padded = setting.path("padded-file.bin")
    with open(padded, "wb") as f:
        f.write(data + b"\xff" * 17)
    result = _boot_check(setting, padded, "--max-size", slot)
    assert result.exit_code == 1, result.output
    assert "refused: oversized: file %d B > slot %d B" % (slot + 1, slot) in result.output
    result = _boot_check(setting, image, "--max-size", slot)
    assert "size              ok" in result.output, result.output
