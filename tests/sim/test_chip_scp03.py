"""SCP03 on the chip (GP Amd D) and the GP life cycle: sessions at every level, PUT KEY,
STORE DATA, SET STATUS, failure counting and blocking, sequence counter persistence."""

import os
import struct

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fleetid.common import scp03
from fleetid.common import se_consts as C
from fleetid.common.apdu_wire import split_response
from fleetid.common.errors import ApduError, SecureChannelError
from fleetid.sim.chip import Chip
from fleetid.sim.nvm import Nvm
from tests.sim.chip_support import (
    counting_rng,
    fab_test_chip,
    open_scp,
    select_applet,
    send,
    send_secure,
)

DEVICE_KEYS = (bytes(range(16)), bytes(range(16, 32)), bytes(range(32, 48)))


@pytest.fixture
def fabbed(tmp_path):
    return fab_test_chip(tmp_path, rng=counting_rng(7))


def _aes_ecb(key, block):
    e = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return e.update(block) + e.finalize()


def put_key_payload(dek, new_kvn, keys, corrupt_kcv=False):
    """PUT KEY data written from GP CS 2.3 11.8.2.3 / Amd D 7.2 (independent of the chip)."""
    out = bytes((new_kvn,))
    for key in keys:
        e = Cipher(algorithms.AES(dek), modes.CBC(bytes(16))).encryptor()
        encrypted = e.update(key) + e.finalize()
        kcv = _aes_ecb(key, b"\x01" * 16)[:3]
        if corrupt_kcv:
            kcv = bytes((kcv[0] ^ 1,)) + kcv[1:]
        out += b"\x88\x11\x10" + encrypted + b"\x03" + kcv
    return out


def expected_kcvs(keys):
    return b"".join(_aes_ecb(k, b"\x01" * 16)[:3] for k in keys)


def secure_refused(host, chip, expected_sw, ins, p1=0, p2=0, data=b"", le=None):
    before = chip.nvm.snapshot()
    out, sw = send_secure(host, ins, p1, p2, data, le)
    assert sw == expected_sw, "SW %04X, expected %04X" % (sw, expected_sw)
    assert out == b""
    assert chip.nvm.snapshot() == before


def _cert_der(record):
    return record.chain_der[1]


def _firmware_point():
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _dgi(dgi, value):
    if len(value) < 0xFF:
        return struct.pack(">HB", dgi, len(value)) + value
    return struct.pack(">HBH", dgi, 0xFF, len(value)) + value


# -- sessions ---------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0x01, 0x03, 0x11, 0x13, 0x33])
def test_session_at_every_level_carries_commands(fabbed, level):
    chip, record = fabbed
    host = open_scp(chip, record.static_keys(), level=level)
    assert host.key_info[0] == C.SCP03_KVN_TRANSPORT
    assert send_secure(host, C.INS_GET_DATA, 0x01, 0x01, le=256) == (record.se_uid, C.SW_OK)
    out, sw = send_secure(host, C.INS_GET_RANDOM, 0, 0, le=40)
    assert sw == C.SW_OK and len(out) == 40
    # Errors come back too (unprotected per Amd D 6.2.5).
    assert send_secure(host, C.INS_GET_CERT, 5, 0, le=256) == (b"", C.SW_REF_NOT_FOUND)


def test_sequence_counter_advances_and_survives_power_loss(fabbed):
    chip, record = fabbed
    for expected in (1, 2, 3):
        host = open_scp(chip, record.static_keys())
        assert host.sequence_counter == expected
    reborn = Chip(Nvm(record.nvm_path))
    select_applet(reborn)
    assert send(reborn, C.INS_GET_DATA, 0x01, 0x08, le=3) == (b"\x00\x00\x03", C.SW_OK)
    assert open_scp(reborn, record.static_keys()).sequence_counter == 4


def test_initialize_update_errors(fabbed):
    chip, record = fabbed
    refused = [
        ((0x42, 0, bytes(8)), C.SW_REF_NOT_FOUND),  # unknown KVN
        ((0, 1, bytes(8)), C.SW_INCORRECT_P1P2),
        ((0, 0, bytes(7)), C.SW_WRONG_LENGTH),
        ((0, 0, b""), C.SW_WRONG_LENGTH),
    ]
    for (p1, p2, data), expected in refused:
        before = chip.nvm.snapshot()
        assert send(chip, C.INS_INITIALIZE_UPDATE, p1, p2, data, 256)[1] == expected
        assert chip.nvm.snapshot() == before


def test_select_and_power_loss_end_the_session(fabbed):
    chip, record = fabbed
    host = open_scp(chip, record.static_keys())
    select_applet(chip)
    assert split_response(host.transceive(b"\x80\xca\x01\x01\x00"))[1] == C.SW_SECURITY_STATUS
    host = open_scp(chip, record.static_keys())
    chip.power_loss()
    select_applet(chip)
    assert split_response(host.transceive(b"\x80\xca\x01\x01\x00"))[1] == C.SW_SECURITY_STATUS


def test_plain_commands_still_work_beside_a_session(fabbed):
    chip, record = fabbed
    host = open_scp(chip, record.static_keys())
    assert send(chip, C.INS_GET_DATA, 0x01, 0x03, le=1) == (b"\x01", C.SW_OK)
    assert send_secure(host, C.INS_GET_DATA, 0x01, 0x03, le=1) == (b"\x01", C.SW_OK)


def test_scp_commands_inside_the_channel_are_refused(fabbed):
    chip, record = fabbed
    host = open_scp(chip, record.static_keys())
    out, sw = send_secure(host, C.INS_INITIALIZE_UPDATE, 0, 0, bytes(8), 256)
    assert sw == C.SW_CONDITIONS


# -- failure counting -----------------------------------------------------------------


def _bad_external_authenticate(chip):
    assert send(chip, C.INS_INITIALIZE_UPDATE, 0, 0, bytes(8), 256)[1] == C.SW_OK
    return split_response(chip.process(b"\x84\x82\x33\x00\x10" + bytes(16)))[1]


def test_refused_cryptograms_are_counted_and_block_at_the_limit(fabbed):
    chip, record = fabbed
    assert _bad_external_authenticate(chip) == C.SW_SECURITY_STATUS
    assert _bad_external_authenticate(chip) == C.SW_SECURITY_STATUS
    assert send(chip, C.INS_GET_DATA, 0x01, 0x07, le=2) == (b"\x00\x02", C.SW_OK)
    # Jump close to the limit through the NVM (test back door), then cross it.
    chip.nvm.commit({"scp/fail": struct.pack(">H", C.SCP03_FAILURE_LIMIT - 1)})
    assert _bad_external_authenticate(chip) == C.SW_SECURITY_STATUS
    assert send(chip, C.INS_INITIALIZE_UPDATE, 0, 0, bytes(8), 256) == (b"", C.SW_AUTH_BLOCKED)
    # Persisted: a power cycle does not unblock it.
    reborn = Chip(Nvm(record.nvm_path))
    select_applet(reborn)
    assert send(reborn, C.INS_INITIALIZE_UPDATE, 0, 0, bytes(8), 256)[1] == C.SW_AUTH_BLOCKED
    with pytest.raises(ApduError) as err:
        open_scp(reborn, record.static_keys())
    assert err.value.sw == C.SW_AUTH_BLOCKED


def test_wrong_cmac_is_counted_and_closes_the_session(fabbed):
    chip, record = fabbed
    host = open_scp(chip, record.static_keys(), level=0x01)
    good = host._sm.wrap_command(b"\x80\xca\x01\x01\x00")
    tampered = good[:-2] + bytes((good[-2] ^ 0x01,)) + good[-1:]
    assert chip.process(tampered) == b"\x69\x82"
    assert send(chip, C.INS_GET_DATA, 0x01, 0x07, le=2) == (b"\x00\x01", C.SW_OK)
    assert split_response(chip.process(good))[1] == C.SW_SECURITY_STATUS  # session gone


def test_external_authenticate_without_initialize_update_is_not_counted(fabbed):
    chip, _ = fabbed
    assert chip.process(b"\x84\x82\x33\x00\x10" + bytes(16)) == b"\x69\x85"
    assert send(chip, C.INS_GET_DATA, 0x01, 0x07, le=2) == (b"\x00\x00", C.SW_OK)


def test_wrong_static_keys_fail_on_the_card_cryptogram(fabbed):
    chip, _ = fabbed
    wrong = scp03.StaticKeys(bytes(16), bytes(16), bytes(16), C.SCP03_KVN_TRANSPORT)
    with pytest.raises(SecureChannelError):
        open_scp(chip, wrong)


# -- PUT KEY --------------------------------------------------------------------------


def test_put_key_replaces_the_transport_keys(fabbed):
    chip, record = fabbed
    transport = record.static_keys()
    host = open_scp(chip, transport)
    payload = put_key_payload(transport.dek, C.SCP03_KVN_DEVICE, DEVICE_KEYS)
    out, sw = send_secure(host, C.INS_PUT_KEY, C.SCP03_KVN_TRANSPORT, 0x81, payload, 256)
    assert sw == C.SW_OK
    assert out == bytes((C.SCP03_KVN_DEVICE,)) + expected_kcvs(DEVICE_KEYS)
    # The running session keeps working on its session keys.
    assert send_secure(host, C.INS_GET_DATA, 0x01, 0x06, le=256) == (b"\x31", C.SW_OK)
    device = scp03.StaticKeys(*DEVICE_KEYS, kvn=C.SCP03_KVN_DEVICE)
    assert open_scp(chip, device).key_info[0] == C.SCP03_KVN_DEVICE
    with pytest.raises(ApduError) as err:
        open_scp(chip, transport, kvn=C.SCP03_KVN_TRANSPORT)
    assert err.value.sw == C.SW_REF_NOT_FOUND
    with pytest.raises(SecureChannelError):
        open_scp(chip, transport)  # KVN 0 now means the device set


def test_put_key_errors(fabbed):
    chip, record = fabbed
    transport = record.static_keys()
    host = open_scp(chip, transport, level=0x03)
    dek = transport.dek
    good = put_key_payload(dek, 0x32, DEVICE_KEYS)
    secure_refused(host, chip, C.SW_WRONG_DATA, C.INS_PUT_KEY, 0, 0x81,
                   put_key_payload(dek, 0x32, DEVICE_KEYS, corrupt_kcv=True))
    secure_refused(host, chip, C.SW_WRONG_DATA, C.INS_PUT_KEY, 0, 0x81,
                   put_key_payload(bytes(16), 0x32, DEVICE_KEYS))  # wrong DEK: KCVs fail
    secure_refused(host, chip, C.SW_WRONG_DATA, C.INS_PUT_KEY, 0, 0x81,
                   put_key_payload(dek, 0x00, DEVICE_KEYS))
    secure_refused(host, chip, C.SW_WRONG_DATA, C.INS_PUT_KEY, 0, 0x81,
                   put_key_payload(dek, 0x80, DEVICE_KEYS))
    secure_refused(host, chip, C.SW_WRONG_DATA, C.INS_PUT_KEY, 0, 0x81,
                   good[:1] + b"\x80" + good[2:])  # not an AES key type
    secure_refused(host, chip, C.SW_WRONG_LENGTH, C.INS_PUT_KEY, 0, 0x81, good[:-1])
    secure_refused(host, chip, C.SW_INCORRECT_P1P2, C.INS_PUT_KEY, 0, 0x01, good)
    secure_refused(host, chip, C.SW_REF_NOT_FOUND, C.INS_PUT_KEY, 0x35, 0x81, good)
    secure_refused(host, chip, C.SW_ALREADY_EXISTS, C.INS_PUT_KEY, 0, 0x81,
                   put_key_payload(dek, C.SCP03_KVN_TRANSPORT, DEVICE_KEYS))
    # Add sets up to the limit (4 sets in all), then 6A84.
    for kvn in (0x32, 0x33, 0x34):
        payload = put_key_payload(dek, kvn, DEVICE_KEYS)
        out, sw = send_secure(host, C.INS_PUT_KEY, 0, 0x81, payload, 256)
        assert sw == C.SW_OK and out[0] == kvn
    secure_refused(host, chip, C.SW_NOT_ENOUGH_MEMORY, C.INS_PUT_KEY, 0, 0x81,
                   put_key_payload(dek, 0x35, DEVICE_KEYS))
    secure_refused(host, chip, C.SW_ALREADY_EXISTS, C.INS_PUT_KEY, 0x32, 0x81,
                   put_key_payload(dek, 0x33, DEVICE_KEYS))
    assert send(chip, C.INS_GET_DATA, 0x01, 0x06, le=256) == (b"\x30\x32\x33\x34", C.SW_OK)


# -- STORE DATA -----------------------------------------------------------------------


def test_store_data_writes_trust_anchors(fabbed):
    chip, record = fabbed
    host = open_scp(chip, record.static_keys())
    root = _cert_der(record)
    assert len(root) > 255  # exercises the FF || u16 DGI length form
    point = _firmware_point()
    # Three blocks, in sequence; the last one has P1 b8 set.
    S = C.INS_STORE_DATA
    assert send_secure(host, S, 0x00, 0, _dgi(C.DGI_FLEET_ROOT, root))[1] == C.SW_OK
    assert send_secure(host, S, 0x00, 1, _dgi(C.DGI_FIRMWARE_KEY, point))[1] == C.SW_OK
    assert send_secure(host, S, 0x80, 2, _dgi(C.DGI_SERVER_ROOT, root))[1] == C.SW_OK
    assert send(chip, C.INS_GET_DATA, 0x01, 0x11, le=65536, extended=True) == (root, C.SW_OK)
    assert send(chip, C.INS_GET_DATA, 0x01, 0x12, le=256) == (point, C.SW_OK)
    assert send(chip, C.INS_GET_DATA, 0x01, 0x13, le=65536, extended=True) == (root, C.SW_OK)
    # After the last block, numbering starts again at 0; two DGIs in one block.
    both = _dgi(C.DGI_FIRMWARE_KEY, point) + _dgi(C.DGI_FLEET_ROOT, root)
    assert send_secure(host, C.INS_STORE_DATA, 0x88, 0, both)[1] == 0x9000


def test_store_data_errors(fabbed):
    chip, record = fabbed
    host = open_scp(chip, record.static_keys())
    point = _firmware_point()
    S = C.INS_STORE_DATA
    secure_refused(host, chip, C.SW_INCORRECT_P1P2, S, 0x80, 1, _dgi(C.DGI_FIRMWARE_KEY, point))
    secure_refused(host, chip, C.SW_INCORRECT_P1P2, S, 0x81, 0, _dgi(C.DGI_FIRMWARE_KEY, point))
    secure_refused(host, chip, C.SW_REF_NOT_FOUND, S, 0x80, 0, _dgi(0x7F09, point))
    # y with its low bit flipped: for the same x the only other curve point has y' = p - y,
    # of the other parity, so this is off the curve (zeroing the last byte was not, when
    # that byte already was zero: 1 run in 256).
    off_curve = _dgi(C.DGI_FIRMWARE_KEY, point[:-1] + bytes((point[-1] ^ 1,)))
    secure_refused(host, chip, C.SW_WRONG_DATA, S, 0x80, 0, off_curve)
    truncated_cert = _dgi(C.DGI_FLEET_ROOT, b"\x30\x03\x02\x01")
    secure_refused(host, chip, C.SW_WRONG_DATA, S, 0x80, 0, truncated_cert)
    secure_refused(host, chip, C.SW_WRONG_DATA, S, 0x80, 0, _dgi(C.DGI_FIRMWARE_KEY, point)[:-1])
    secure_refused(host, chip, C.SW_WRONG_DATA, S, 0x80, 0, b"\x7f\x01")
    secure_refused(host, chip, C.SW_WRONG_DATA, S, 0x80, 0, b"\x7f\x01\xff\x01")
    # A bad DGI after a good one: nothing of the block is stored.
    block = _dgi(C.DGI_FIRMWARE_KEY, point) + _dgi(0x7F09, b"x")
    secure_refused(host, chip, C.SW_REF_NOT_FOUND, S, 0x80, 0, block)


# -- life cycle -----------------------------------------------------------------------


def test_life_cycle_secured_locks_personalisation(fabbed):
    chip, record = fabbed
    host = open_scp(chip, record.static_keys())
    dek = record.static_keys().dek
    assert send_secure(host, C.INS_SET_STATUS, 0x80, C.LC_INITIALIZED) == (b"", C.SW_OK)
    assert send_secure(host, C.INS_SET_STATUS, 0x80, C.LC_SECURED) == (b"", C.SW_OK)
    assert send(chip, C.INS_GET_DATA, 0x01, 0x03, le=1) == (bytes((C.LC_SECURED,)), C.SW_OK)
    # Adding a key set (P1 = 0) is personalisation: refused once SECURED, even at 0x33.
    secure_refused(host, chip, C.SW_CONDITIONS, C.INS_PUT_KEY, 0, 0x81,
                   put_key_payload(dek, 0x32, DEVICE_KEYS))
    secure_refused(host, chip, C.SW_CONDITIONS, C.INS_SET_STATUS, 0x80, C.LC_INITIALIZED)
    secure_refused(host, chip, C.SW_CONDITIONS, C.INS_SET_STATUS, 0x80, C.LC_SECURED)
    # Field use goes on: keys, signatures, SCP03 sessions.
    assert send(chip, C.INS_GENERATE_KEY, 2, C.CURVE_P256, b"\x01", 256)[1] == C.SW_OK
    assert open_scp(chip, record.static_keys()).is_open


@pytest.mark.parametrize("level", [0x01, 0x03, 0x13])
def test_secured_admin_needs_the_full_level(fabbed, level):
    chip, record = fabbed
    host = open_scp(chip, record.static_keys())
    assert send_secure(host, C.INS_SET_STATUS, 0x80, C.LC_SECURED) == (b"", C.SW_OK)
    host = open_scp(chip, record.static_keys(), level=level)
    dek = record.static_keys().dek
    kvn = record.static_keys().kvn
    secure_refused(host, chip, C.SW_SECURITY_STATUS, C.INS_STORE_DATA, 0x80, 0,
                   _dgi(C.DGI_FIRMWARE_KEY, _firmware_point()))
    host = open_scp(chip, record.static_keys(), level=level)
    secure_refused(host, chip, C.SW_SECURITY_STATUS, C.INS_PUT_KEY, kvn, 0x81,
                   put_key_payload(dek, 0x32, DEVICE_KEYS))


def test_secured_admin_at_0x33_replaces_the_session_key_set_in_one_commit(fabbed):
    chip, record = fabbed
    static = record.static_keys()
    host = open_scp(chip, static)
    assert send_secure(host, C.INS_SET_STATUS, 0x80, C.LC_SECURED) == (b"", C.SW_OK)
    host = open_scp(chip, static, level=C.SCP_LEVEL_OTA)
    point = _firmware_point()
    assert send_secure(host, C.INS_STORE_DATA, 0x80, 0,
                       _dgi(C.DGI_FIRMWARE_KEY, point)) == (b"", C.SW_OK)
    assert send(chip, C.INS_GET_DATA, 0x01, 0x12, le=256) == (point, C.SW_OK)
    # PUT KEY that would replace another set than the session's: refused.
    secure_refused(host, chip, C.SW_CONDITIONS, C.INS_PUT_KEY, static.kvn + 1, 0x81,
                   put_key_payload(static.dek, 0x32, DEVICE_KEYS))
    host = open_scp(chip, static, level=C.SCP_LEVEL_OTA)
    assert send_secure(host, C.INS_PUT_KEY, static.kvn, 0x81,
                       put_key_payload(static.dek, 0x32, DEVICE_KEYS)) == (
        b"\x32" + expected_kcvs(DEVICE_KEYS), C.SW_OK)
    assert send(chip, C.INS_GET_DATA, 0x01, 0x06, le=256) == (b"\x32", C.SW_OK)
    with pytest.raises(ApduError):
        open_scp(chip, static, kvn=static.kvn)  # the old set is gone (6A88)
    with pytest.raises(SecureChannelError):
        open_scp(chip, static)  # the default set is the new one: old keys do not fit
    assert open_scp(chip, scp03.StaticKeys(*DEVICE_KEYS, kvn=0x32),
                    level=C.SCP_LEVEL_OTA).is_open


def test_set_status_errors(fabbed):
    chip, record = fabbed
    host = open_scp(chip, record.static_keys())
    secure_refused(host, chip, C.SW_WRONG_DATA, C.INS_SET_STATUS, 0x80, 0x03)
    secure_refused(host, chip, C.SW_INCORRECT_P1P2, C.INS_SET_STATUS, 0x40, C.LC_SECURED)
    secure_refused(host, chip, C.SW_CONDITIONS, C.INS_SET_STATUS, 0x80, C.LC_OP_READY)
    secure_refused(host, chip, C.SW_CONDITIONS, C.INS_SET_STATUS, 0x80, C.LC_CARD_LOCKED)
    secure_refused(host, chip, C.SW_WRONG_LENGTH, C.INS_SET_STATUS, 0x80, C.LC_SECURED, b"\x00")


def test_card_locked_allows_only_management_then_unlocks(fabbed):
    chip, record = fabbed
    host = open_scp(chip, record.static_keys())
    send(chip, C.INS_GENERATE_KEY, 1, C.CURVE_P256, b"\x01", 256)
    assert send_secure(host, C.INS_SET_STATUS, 0x80, C.LC_SECURED)[1] == C.SW_OK
    assert send_secure(host, C.INS_SET_STATUS, 0x80, C.LC_CARD_LOCKED)[1] == C.SW_OK
    assert send(chip, C.INS_SIGN, 1, 0, bytes(32), 256) == (b"", C.SW_CONDITIONS)
    assert send(chip, C.INS_GET_RANDOM, 0, 0, le=8) == (b"", C.SW_CONDITIONS)
    assert send(chip, C.INS_GET_DATA, 0x01, 0x03, le=1) == (b"\x7f", C.SW_OK)
    host = open_scp(chip, record.static_keys())
    assert send_secure(host, C.INS_SET_STATUS, 0x80, C.LC_SECURED)[1] == C.SW_OK
    assert send(chip, C.INS_SIGN, 1, 0, bytes(32), 256)[1] == C.SW_OK


def test_terminated_answers_only_the_life_cycle(fabbed):
    chip, record = fabbed
    host = open_scp(chip, record.static_keys())
    assert send_secure(host, C.INS_SET_STATUS, 0x80, C.LC_TERMINATED)[1] == C.SW_OK
    assert send(chip, C.INS_GET_DATA, 0x01, 0x03, le=1) == (b"\xff", C.SW_OK)
    chip.power_loss()  # not even selected: GET DATA of the life cycle still answers
    assert send(chip, C.INS_GET_DATA, 0x01, 0x03, le=1) == (b"\xff", C.SW_OK)
    for ins, p1, p2, data, cla in [
        (C.INS_SELECT, 4, 0, C.AID, C.CLA_ISO),
        (C.INS_GET_DATA, 0x01, 0x01, b"", C.CLA_PROPRIETARY),
        (C.INS_INITIALIZE_UPDATE, 0, 0, bytes(8), C.CLA_PROPRIETARY),
        (C.INS_GET_RANDOM, 0, 0, b"", C.CLA_PROPRIETARY),
    ]:
        before = chip.nvm.snapshot()
        assert send(chip, ins, p1, p2, data, 8, cla=cla) == (b"", C.SW_CONDITIONS)
        assert chip.nvm.snapshot() == before


def test_fab_life_cycle_initialized_can_be_chosen(tmp_path):
    chip, _ = fab_test_chip(tmp_path, life_cycle=C.LC_INITIALIZED)
    assert send(chip, C.INS_GET_DATA, 0x01, 0x03, le=1) == (b"\x07", C.SW_OK)


def test_random_default_rng_gives_distinct_challenges(tmp_path):
    chip, record = fab_test_chip(tmp_path)
    a = open_scp(chip, record.static_keys()).card_challenge
    b = open_scp(chip, record.static_keys()).card_challenge
    assert a != b
    assert os.stat(record.nvm_path).st_mode & 0o777 == 0o600
