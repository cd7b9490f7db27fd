"""Over-the-air SE administration: SCP03 key rotation and trust anchors from HSM-held keys,
relayed by the device verbatim over the real broker; replays refused; power cut at every
NVM commit of a relayed rotation leaves a working key set."""

import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.mqtt.ota import KeySet, OtaError, install_trust_anchor, open_admin, \
    rotate_scp03_keys
from fleetid.cloud.mqtt.service import MqttError
from fleetid.common import mqttmsg
from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.common.apdu_wire import split_response
from fleetid.common.host.hostcrypto import CryptographyPrimitives
from fleetid.device.host.mqtt_paho import PahoSeTransport
from fleetid.device.mqtt import DeviceChannel
from fleetid.device.se import SeSession
from fleetid.sim.chip import Chip
from fleetid.sim.nvm import Nvm, PowerLoss
from tests.cloud.hsm_support import reference_device_keys
from tests.cloud.mqtt_support import MqttFleet

pytestmark = pytest.mark.timeout(300)

NEW_MASTER = bytes(range(0x40, 0x60))  # imported, so the test can look for its keys
NEW = KeySet("scp03-master-ota", 0x32)
CUT = KeySet("scp03-master-ota-cut", 0x33)


def _point(key):
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


class Recorder:
    """transceive wrapper keeping every (command, response) that crossed the relay."""

    def __init__(self, transceive):
        self.inner = transceive
        self.log = []

    def __call__(self, apdu):
        response = self.inner(apdu)
        self.log.append((bytes(apdu), bytes(response)))
        return response


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    made = MqttFleet(tmp_path_factory.mktemp("ota"), devices=2)
    made.line.hsm.import_master_key(NEW.master_label, bytearray(NEW_MASTER))
    made.line.hsm.create_master_key(CUT.master_label)
    yield made
    made.close()


def current(fleet):
    return KeySet(fleet.line.labels["master"], C.SCP03_KVN_DEVICE)


class RelayingDevice:
    """A device on the broker whose channel relays OTA APDUs to its SE, pumped by a thread."""

    def __init__(self, fleet, index):
        self.se = fleet.session(index)
        self.name, _cert = fleet.device_name(self.se)
        self.protocol = ApduProtocol(fleet.chips[index].chip.process)
        self.transport = PahoSeTransport(self.se, C.SLOT_IDENTITY, fleet.chain_der(self.se),
                                         [fleet.root_der()], fleet.broker.host,
                                         fleet.broker.port)
        self.relayed = []
        self.channel = DeviceChannel(self.transport, self.name, relay=self._relay)
        self.channel.start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _relay(self, apdu):
        self.relayed.append(bytes(apdu))
        return self.protocol.transceive_raw(apdu)

    def _pump(self):
        while not self._stop.is_set():
            self.channel.step(0.05)

    def close(self):
        self._stop.set()
        self._thread.join(10)
        self.channel.close()


def test_ota_rotates_scp03_keys_and_firmware_key_through_the_relay(fleet):
    hsm = fleet.line.hsm
    prims = CryptographyPrimitives()
    cloud = fleet.cloud()
    cloud.connect()
    device = RelayingDevice(fleet, 0)
    try:
        se_uid = device.se.uid()
        assert device.se.life_cycle() == C.LC_SECURED
        transceive = Recorder(cloud.apdu_channel(device.name))

        assert rotate_scp03_keys(hsm, transceive, prims, se_uid, current(fleet), NEW) == "rotated"
        assert device.se.get_data(C.DATA_SCP_INFO) == bytes((NEW.kvn,))
        # The old keys stop working, over the relay as anywhere.
        with pytest.raises(OtaError):
            open_admin(hsm, transceive, prims, se_uid, [current(fleet)]).close()

        # The firmware-signing key, installed over the relay with the new keys.
        new_firmware = ec.generate_private_key(ec.SECP256R1())
        install_trust_anchor(hsm, transceive, prims, se_uid, NEW, C.DGI_FIRMWARE_KEY,
                             _point(new_firmware))
        assert device.se.get_data(C.DATA_TRUST_FIRMWARE_KEY) == _point(new_firmware)

        # What the relay saw: no key, no trust anchor in clear (C-DEC / R-ENC at 0x33).
        secrets = list(reference_device_keys(NEW_MASTER, se_uid)) + [_point(new_firmware)]
        traffic = b"".join(device.relayed) + b"".join(r for _c, r in transceive.log)
        assert device.relayed == [c for c, _r in transceive.log]
        for secret in secrets:
            assert secret not in traffic and secret[:8] not in traffic
        assert all(c[0] in (0x80, 0x84) for c in device.relayed)
        assert all(c[0] == 0x84 for c in device.relayed if c[1] != C.INS_INITIALIZE_UPDATE)
    finally:
        device.close()
        cloud.close()


def test_a_captured_relay_replayed_later_is_refused(fleet):
    hsm = fleet.line.hsm
    prims = CryptographyPrimitives()
    cloud = fleet.cloud()
    cloud.connect()
    device = RelayingDevice(fleet, 1)
    try:
        se_uid = device.se.uid()
        transceive = Recorder(cloud.apdu_channel(device.name))
        firmware = _point(ec.generate_private_key(ec.SECP256R1()))
        install_trust_anchor(hsm, transceive, prims, se_uid, current(fleet),
                             C.DGI_FIRMWARE_KEY, firmware)
        captured = [c for c, _r in transceive.log]
        assert [c[1] for c in captured] == [C.INS_INITIALIZE_UPDATE,
                                            C.INS_EXTERNAL_AUTHENTICATE, C.INS_STORE_DATA]
        other = _point(ec.generate_private_key(ec.SECP256R1()))
        install_trust_anchor(hsm, transceive, prims, se_uid, current(fleet),
                             C.DGI_FIRMWARE_KEY, other)
        # Replayed verbatim through the relay (as by whoever could publish commands):
        # a fresh card challenge, so the old host cryptogram and the old C-MAC fail.
        answers = [split_response(cloud.apdu_channel(device.name)(c))[1] for c in captured]
        assert answers[0] == C.SW_OK  # INITIALIZE UPDATE itself is harmless
        assert answers[1] == C.SW_SECURITY_STATUS  # host cryptogram refused
        assert answers[2] == C.SW_SECURITY_STATUS  # no session: STORE DATA refused
        # Reordered: the STORE DATA alone, straight after a fresh session opened: refused.
        session = open_admin(hsm, transceive, prims, se_uid, [current(fleet)])
        assert split_response(cloud.apdu_channel(device.name)(captured[2]))[1] in (
            C.SW_SECURITY_STATUS,)
        session.close()
        assert device.se.get_data(C.DATA_TRUST_FIRMWARE_KEY) == other
        # A plain command is never relayed: the device refuses it before its SE sees it.
        with pytest.raises(MqttError) as refused:
            cloud.request(device.name, mqttmsg.KIND_APDU,
                          apdu=bytes((0x80, C.INS_DELETE_KEY, 1, 0)).hex())
        assert refused.value.reply["error"] == "not_scp03"
        assert device.se.public_key(C.SLOT_IDENTITY)
    finally:
        device.close()
        cloud.close()


def _copy_chip(made):
    """A fresh chip over a copy of `made`'s NVM (each cut run starts from the same state)."""
    nvm = Nvm()
    nvm.commit(made.chip.nvm.snapshot())
    return Chip(nvm)


def _relay_of(chip):
    """The device's relay, as DeviceChannel uses it: bytes in, the SE's bytes out."""
    protocol = ApduProtocol(chip.process)
    SeSession(protocol).select()

    def relay(apdu):
        data, sw = protocol.transceive_raw(apdu)
        return data + bytes((sw >> 8, sw & 0xFF))

    return relay


def _rotation(hsm, prims, chip, se_uid, old, new, firmware):
    relay = _relay_of(chip)
    assert rotate_scp03_keys(hsm, relay, prims, se_uid, old, new) in ("rotated", "already")
    install_trust_anchor(hsm, relay, prims, se_uid, new, C.DGI_FIRMWARE_KEY, firmware)


@pytest.mark.parametrize("after_atomic", [False, True], ids=["before", "after"])
def test_relayed_rotation_survives_power_cut_at_every_nvm_commit(fleet, after_atomic):
    hsm = fleet.line.hsm
    prims = CryptographyPrimitives()
    made = fleet.chips[1]
    se_uid = made.chip.nvm.get("uid")
    old = current(fleet)
    firmware = _point(ec.generate_private_key(ec.SECP256R1()))
    # A clean run counts the commits.
    clean = _copy_chip(made)
    before = clean.nvm.write_count
    _rotation(hsm, prims, clean, se_uid, old, CUT, firmware)
    commits = clean.nvm.write_count - before
    # INITIALIZE UPDATE persists the sequence counter (3 sessions), PUT KEY, STORE DATA.
    assert commits == 5
    for k in range(1, commits + 1):
        chip = _copy_chip(made)
        chip.nvm.cut_power_at(k, after_atomic=after_atomic)
        with pytest.raises(PowerLoss):
            _rotation(hsm, prims, chip, se_uid, old, CUT, firmware)
        # Power-up: the old set or the new one opens a session, never neither ...
        relay = _relay_of(chip)
        with open_admin(hsm, relay, prims, se_uid, [old, CUT]) as session:
            assert session.key_set in (old, CUT), "cut at commit %d" % k
        # ... and running the same OTA again finishes it; then only the new set works.
        _rotation(hsm, prims, chip, se_uid, old, CUT, firmware)
        relay = _relay_of(chip)
        open_admin(hsm, relay, prims, se_uid, [CUT]).close()
        with pytest.raises(OtaError):
            open_admin(hsm, relay, prims, se_uid, [old]).close()
        assert chip.nvm.get("ta/%04x" % C.DGI_FIRMWARE_KEY) == firmware
