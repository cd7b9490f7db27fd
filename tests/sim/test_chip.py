"""The applet's command set (common/se_consts.py header): each command's happy path and
each of its error status words, with the NVM compared before/after every refusal."""

import hashlib
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from fleetid.common import se_consts as C
from fleetid.common.attestation import decode_signed_attestation
from fleetid.common.der import P256_N, ecdsa_der_to_raw
from fleetid.sim.chip import SW_FILE_NOT_FOUND, Chip
from fleetid.sim.nvm import Nvm
from tests.sim.chip_support import (
    apdu,
    counting_rng,
    fab_test_chip,
    plant_key,
    select_applet,
    send,
)

SIGN_ECDH = C.POLICY_SIGN | C.POLICY_ECDH
DIGEST = hashlib.sha256(b"fleetid").digest()


@pytest.fixture
def fabbed(tmp_path):
    return fab_test_chip(tmp_path, rng=counting_rng(1))


@pytest.fixture
def chip(fabbed):
    return fabbed[0]


def refused(chip, expected_sw, ins, p1=0, p2=0, data=b"", le=None, cla=C.CLA_PROPRIETARY,
            extended=None):
    """Send a command that must be refused with `expected_sw` and change no NVM state."""
    before = chip.nvm.snapshot()
    writes = chip.nvm.write_count
    data_out, sw = send(chip, ins, p1, p2, data, le, cla, extended)
    assert sw == expected_sw, "SW %04X, expected %04X" % (sw, expected_sw)
    assert data_out == b""
    assert chip.nvm.snapshot() == before
    assert chip.nvm.write_count == writes


def ok(chip, ins, p1=0, p2=0, data=b"", le=None, extended=None):
    out, sw = send(chip, ins, p1, p2, data, le, extended=extended)
    assert sw == C.SW_OK, "SW %04X" % sw
    return out


def generate(chip, slot, policy=SIGN_ECDH):
    return ok(chip, C.INS_GENERATE_KEY, slot, C.CURVE_P256, bytes((policy,)), 256)


def public_key(point):
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


# -- header-level errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"", C.SW_WRONG_LENGTH),
        (b"\x80\xca\x01", C.SW_WRONG_LENGTH),
        (b"\xff\xca\x01\x01\x00", C.SW_CLA_NOT_SUPPORTED),
        (b"\x80\x60\x00\x00", C.SW_INS_NOT_SUPPORTED),
        (b"\x80\x9f\x00\x00", C.SW_INS_NOT_SUPPORTED),
        (b"\x80\xca\x01\x01\x02\x00", C.SW_WRONG_LENGTH),  # Lc 2, one data byte
        (b"\x80\xca\x01\x01\x00\x00", C.SW_WRONG_LENGTH),  # truncated extended length
        (b"\x80\xca\x01\x01\x00\x00\x00\x00\x00", C.SW_WRONG_LENGTH),  # extended Lc 0000
        (b"\x80\x00\x00\x00", C.SW_INS_NOT_SUPPORTED),
        (b"\x90\xca\x01\x01\x00", C.SW_CLA_NOT_SUPPORTED),
        (b"\x00\xca\x01\x01\x00", C.SW_CLA_NOT_SUPPORTED),  # proprietary INS, ISO class
        (b"\x80\xa4\x04\x00\x00", C.SW_CLA_NOT_SUPPORTED),  # SELECT is interindustry
        (b"\x81\xca\x01\x01\x00", C.SW_CLA_NOT_SUPPORTED),  # logical channel 1
    ],
)
def test_malformed_apdus_get_iso_status_words_and_change_nothing(chip, raw, expected):
    before = chip.nvm.snapshot()
    assert chip.process(raw) == struct.pack(">H", expected)
    assert chip.nvm.snapshot() == before


def test_non_bytes_input_does_not_raise(chip):
    assert chip.process(None) == b"\x67\x00"
    assert chip.process("80CA0101") == b"\x67\x00"


# -- SELECT ---------------------------------------------------------------------------


def test_select_returns_fci_with_aid_and_version(fabbed):
    chip, _ = fabbed
    fci = select_applet(chip)
    assert fci == bytes((0x6F, 2 + len(C.AID) + 4, 0x84, len(C.AID))) + C.AID + b"\x85\x02\x01\x00"


def test_commands_need_select_first(tmp_path):
    chip, _ = fab_test_chip(tmp_path, select=False)
    refused(chip, C.SW_CONDITIONS, C.INS_GET_DATA, 0x01, 0x01, le=256)
    refused(chip, SW_FILE_NOT_FOUND, C.INS_SELECT, 0x04, 0x00, b"\xf0nope", cla=C.CLA_ISO)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_SELECT, 0x00, 0x00, C.AID, cla=C.CLA_ISO)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_SELECT, 0x04, 0x04, C.AID, cla=C.CLA_ISO)
    assert send(chip, C.INS_SELECT, 0x04, 0x0C, C.AID, cla=C.CLA_ISO) == (b"", C.SW_OK)
    assert send(chip, C.INS_GET_DATA, 0x01, 0x03, le=1) == (b"\x01", C.SW_OK)


def test_failed_select_keeps_the_current_selection(chip):
    refused(chip, SW_FILE_NOT_FOUND, C.INS_SELECT, 0x04, 0x00, C.AID[:-1], cla=C.CLA_ISO)
    assert send(chip, C.INS_GET_DATA, 0x01, 0x03, le=1)[1] == C.SW_OK


def test_power_loss_forgets_selection_and_keeps_nvm(chip):
    generate(chip, 1)
    before = chip.nvm.snapshot()
    chip.power_loss()
    assert chip.nvm.snapshot() == before
    refused(chip, C.SW_CONDITIONS, C.INS_GET_PUBLIC_KEY, 1, 0, le=256)
    select_applet(chip)
    assert len(ok(chip, C.INS_GET_PUBLIC_KEY, 1, 0, le=256)) == 66


# -- GET DATA -------------------------------------------------------------------------


def test_get_data_all_tags(fabbed):
    chip, record = fabbed
    assert ok(chip, C.INS_GET_DATA, 0x01, 0x01, le=256) == record.se_uid
    assert ok(chip, C.INS_GET_DATA, 0x01, 0x02, le=256) == b"\x01\x00\x00"
    assert ok(chip, C.INS_GET_DATA, 0x01, 0x03, le=256) == bytes((C.LC_OP_READY,))
    chain = ok(chip, C.INS_GET_DATA, 0x01, 0x04, le=65536, extended=True)
    assert chain == b"".join(record.chain_der)
    assert ok(chip, C.INS_GET_DATA, 0x01, 0x05, le=256) == bytes((C.SLOT_COUNT - 1,))
    assert ok(chip, C.INS_GET_DATA, 0x01, 0x06, le=256) == bytes((C.SCP03_KVN_TRANSPORT,))
    assert ok(chip, C.INS_GET_DATA, 0x01, 0x07, le=256) == b"\x00\x00"
    assert ok(chip, C.INS_GET_DATA, 0x01, 0x08, le=256) == b"\x00\x00\x00"
    for tag in (C.DATA_TRUST_FLEET_ROOT, C.DATA_TRUST_FIRMWARE_KEY, C.DATA_TRUST_SERVER_ROOT):
        refused(chip, C.SW_REF_NOT_FOUND, C.INS_GET_DATA, tag >> 8, tag & 0xFF, le=256)
    generate(chip, 5)
    assert ok(chip, C.INS_GET_DATA, 0x01, 0x05, le=256) == bytes((C.SLOT_COUNT - 2,))


def test_get_data_errors(chip):
    refused(chip, C.SW_REF_NOT_FOUND, C.INS_GET_DATA, 0x01, 0x99, le=256)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_GET_DATA, 0x01, 0x01, b"\x00", 256)
    # The chain needs an extended Le: a short Le gets 6700 (more than 256 bytes).
    refused(chip, C.SW_WRONG_LENGTH, C.INS_GET_DATA, 0x01, 0x04, le=256)
    # Le shorter than the value: 6Cxx with the exact length (ISO/IEC 7816-4 5.1.3).
    refused(chip, 0x6C10, C.INS_GET_DATA, 0x01, 0x01, le=4)


def test_get_data_without_le_returns_the_value(chip):
    assert len(ok(chip, C.INS_GET_DATA, 0x01, 0x01)) == 16


def test_unfabbed_chip_has_no_identity(tmp_path):
    chip = Chip(Nvm(None))
    select_applet(chip)
    refused(chip, C.SW_REF_NOT_FOUND, C.INS_GET_DATA, 0x01, 0x01, le=256)
    generate(chip, 1)
    refused(chip, C.SW_CONDITIONS, C.INS_ATTEST, 1, 0, b"n", 256)
    refused(chip, C.SW_REF_NOT_FOUND, C.INS_INITIALIZE_UPDATE, 0, 0, bytes(8), 256)


# -- keys -----------------------------------------------------------------------------


def test_generate_key_sets_policy_and_returns_the_point(chip):
    point = generate(chip, C.SLOT_IDENTITY, C.POLICY_SIGN)
    public_key(point)  # on the curve
    out = ok(chip, C.INS_GET_PUBLIC_KEY, C.SLOT_IDENTITY, 0, le=256)
    assert out[0] == C.POLICY_SIGN | C.POLICY_NON_EXPORTABLE | C.POLICY_GENERATED_ON_CHIP
    assert out[1:] == point


def test_generate_key_errors(chip):
    one = bytes((C.POLICY_SIGN,))
    refused(chip, C.SW_CONDITIONS, C.INS_GENERATE_KEY, C.SLOT_MAK, C.CURVE_P256, one)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_GENERATE_KEY, C.SLOT_COUNT, C.CURVE_P256, one)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_GENERATE_KEY, 1, 0x01, one)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_GENERATE_KEY, 1, C.CURVE_P256)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_GENERATE_KEY, 1, C.CURVE_P256, b"\x01\x01")
    refused(chip, C.SW_WRONG_DATA, C.INS_GENERATE_KEY, 1, C.CURVE_P256, b"\x00")  # no usage
    refused(chip, C.SW_WRONG_DATA, C.INS_GENERATE_KEY, 1, C.CURVE_P256, b"\x05")  # ATTEST
    refused(chip, C.SW_WRONG_DATA, C.INS_GENERATE_KEY, 1, C.CURVE_P256, b"\x09")  # unknown
    generate(chip, 1)
    refused(chip, C.SW_ALREADY_EXISTS, C.INS_GENERATE_KEY, 1, C.CURVE_P256, one)


def test_get_public_key_of_the_mak_matches_its_certificate(fabbed):
    chip, record = fabbed
    out = ok(chip, C.INS_GET_PUBLIC_KEY, C.SLOT_MAK, 0, le=256)
    assert out[0] == C.POLICY_ATTEST | C.POLICY_NON_EXPORTABLE | C.POLICY_GENERATED_ON_CHIP
    cert = x509.load_der_x509_certificate(record.mak_cert_der)
    assert cert.public_key().public_numbers() == public_key(out[1:]).public_numbers()


def test_get_public_key_and_delete_key_errors(chip):
    refused(chip, C.SW_REF_NOT_FOUND, C.INS_GET_PUBLIC_KEY, 2, 0, le=256)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_GET_PUBLIC_KEY, 16, 0, le=256)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_GET_PUBLIC_KEY, 1, 1, le=256)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_GET_PUBLIC_KEY, 1, 0, b"\x00", 256)
    refused(chip, C.SW_REF_NOT_FOUND, C.INS_DELETE_KEY, 2, 0)
    refused(chip, C.SW_CONDITIONS, C.INS_DELETE_KEY, C.SLOT_MAK, 0)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_DELETE_KEY, 17, 0)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_DELETE_KEY, 1, 1)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_DELETE_KEY, 1, 0, b"\x01")


def test_delete_key_removes_key_and_its_certificate(chip, fabbed):
    generate(chip, 2)
    ok(chip, C.INS_PUT_CERT, 2, 0, fabbed[1].mak_cert_der)
    ok(chip, C.INS_DELETE_KEY, 2, 0)
    refused(chip, C.SW_REF_NOT_FOUND, C.INS_GET_PUBLIC_KEY, 2, 0, le=256)
    refused(chip, C.SW_REF_NOT_FOUND, C.INS_GET_CERT, 2, 0, le=256)
    generate(chip, 2)  # the slot is free again


def test_no_command_returns_a_private_key(chip):
    point = generate(chip, 1)
    record = chip.nvm.get("key/1")
    scalar = record[1:33]
    for ins, p1, p2, data, le in [
        (C.INS_GET_PUBLIC_KEY, 1, 0, b"", 256),
        (C.INS_GET_CERT, 1, 0, b"", 256),
        (C.INS_ATTEST, 1, 0, b"nonce", 65536),
        (C.INS_SIGN, 1, 0, DIGEST, 256),
    ]:
        out, _ = send(chip, ins, p1, p2, data, le)
        assert scalar not in out
    assert point


# -- SIGN / VERIFY --------------------------------------------------------------------


def test_sign_produces_a_der_signature_that_verifies(chip):
    point = generate(chip, 1, C.POLICY_SIGN)
    sig = ok(chip, C.INS_SIGN, 1, 0, DIGEST, 256)
    ecdsa_der_to_raw(sig)  # strict DER
    public_key(point).verify(sig, DIGEST, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_sign_errors(chip):
    generate(chip, 1, C.POLICY_ECDH)
    refused(chip, C.SW_CONDITIONS, C.INS_SIGN, C.SLOT_MAK, 0, DIGEST, 256)  # MAK: ATTEST only
    refused(chip, C.SW_CONDITIONS, C.INS_SIGN, 1, 0, DIGEST, 256)  # ECDH-only key
    refused(chip, C.SW_REF_NOT_FOUND, C.INS_SIGN, 2, 0, DIGEST, 256)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_SIGN, 1, 0, DIGEST[:31], 256)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_SIGN, 1, 0, DIGEST + b"\x00", 256)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_SIGN, 1, 1, DIGEST, 256)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_SIGN, 0x20, 0, DIGEST, 256)


def _verify_data(digest, sig_der=None, sig_raw=None, point=None):
    out = b""
    if point is not None:
        out += bytes((C.TAG_POINT, len(point))) + point
    out += bytes((C.TAG_DIGEST, len(digest))) + digest
    if sig_der is not None:
        out += bytes((C.TAG_SIG_DER, len(sig_der))) + sig_der
    if sig_raw is not None:
        out += bytes((C.TAG_SIG_RAW, len(sig_raw))) + sig_raw
    return out


def test_verify_by_slot_and_by_point_in_der_and_raw(chip):
    point = generate(chip, 1, C.POLICY_SIGN)
    sig = ok(chip, C.INS_SIGN, 1, 0, DIGEST, 256)
    raw = ecdsa_der_to_raw(sig)
    ok(chip, C.INS_VERIFY, 1, 0, _verify_data(DIGEST, sig_der=sig))
    ok(chip, C.INS_VERIFY, 1, 0, _verify_data(DIGEST, sig_raw=raw))
    ok(chip, C.INS_VERIFY, C.VERIFY_WITH_POINT, 0, _verify_data(DIGEST, sig_der=sig, point=point))
    ok(chip, C.INS_VERIFY, C.VERIFY_WITH_POINT, 0, _verify_data(DIGEST, sig_raw=raw, point=point))
    # TLV order does not matter.
    shuffled = bytes((C.TAG_SIG_RAW, 64)) + raw + bytes((C.TAG_DIGEST, 32)) + DIGEST
    ok(chip, C.INS_VERIFY, 1, 0, shuffled)


def test_verify_errors(chip):
    point = generate(chip, 1, C.POLICY_SIGN)
    sig = ok(chip, C.INS_SIGN, 1, 0, DIGEST, 256)
    raw = ecdsa_der_to_raw(sig)
    other = hashlib.sha256(b"other").digest()
    V = C.INS_VERIFY
    P = C.VERIFY_WITH_POINT
    refused(chip, C.SW_VERIFY_FAILED, V, 1, 0, _verify_data(other, sig_der=sig))
    refused(chip, C.SW_VERIFY_FAILED, V, P, 0, _verify_data(other, sig_raw=raw, point=point))
    refused(chip, C.SW_REF_NOT_FOUND, V, 2, 0, _verify_data(DIGEST, sig_der=sig))
    refused(chip, C.SW_INCORRECT_P1P2, V, 1, 1, _verify_data(DIGEST, sig_der=sig))
    refused(chip, C.SW_INCORRECT_P1P2, V, 0x40, 0, _verify_data(DIGEST, sig_der=sig))
    bad = [
        (1, _verify_data(DIGEST, sig_der=sig, sig_raw=raw)),  # both encodings
        (1, _verify_data(DIGEST)),  # no signature
        (1, _verify_data(DIGEST[:31], sig_der=sig)),  # short digest
        (1, _verify_data(DIGEST, sig_der=sig, point=point)),  # point with a slot
        (P, _verify_data(DIGEST, sig_der=sig)),  # no point with VERIFY_WITH_POINT
        (P, _verify_data(DIGEST, sig_der=sig, point=point[:-1] + b"\x00")),  # off curve
        (P, _verify_data(DIGEST, sig_der=sig, point=b"\x02" + point[1:33])),  # compressed
        (1, _verify_data(DIGEST, sig_der=sig + b"\x00")),  # trailing byte
        (1, _verify_data(DIGEST, sig_der=b"\x30\x80" + sig[2:] + b"\x00\x00")),  # BER
        (1, _verify_data(DIGEST, sig_raw=raw[:63])),  # short raw
        (1, _verify_data(DIGEST, sig_raw=bytes(32) + raw[32:])),  # r = 0
        (1, _verify_data(DIGEST, sig_raw=P256_N.to_bytes(32, "big") + raw[32:])),  # r = n
        (1, _verify_data(DIGEST, sig_der=sig) + b"\x42"),  # truncated TLV
        (1, _verify_data(DIGEST, sig_der=sig) + b"\x42\x00"),  # repeated tag
        (1, b"\x99\x00" + _verify_data(DIGEST, sig_der=sig)),  # unknown tag
    ]
    for p1, data in bad:
        refused(chip, C.SW_WRONG_DATA, V, p1, 0, data)


def test_verify_with_the_mak_slot_checks_attestations(chip):
    generate(chip, 1)
    signed = decode_signed_attestation(ok(chip, C.INS_ATTEST, 1, 0, b"n", 65536, True))
    digest = hashlib.sha256(signed.statement_der).digest()
    ok(chip, C.INS_VERIFY, C.SLOT_MAK, 0, _verify_data(digest, sig_der=signed.signature_der))


# -- ECDH -----------------------------------------------------------------------------


def test_ecdh_agrees_with_the_peer(chip):
    point = generate(chip, 3, C.POLICY_ECDH)
    peer = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import serialization

    peer_point = peer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    shared = ok(chip, C.INS_ECDH, 3, 0, peer_point, 256)
    assert shared == peer.exchange(ec.ECDH(), public_key(point))


def test_ecdh_errors(chip):
    plant_key(chip.nvm, 2, 7, C.POLICY_ECDH)
    generate(chip, 1, C.POLICY_SIGN)
    good = plant_key(chip.nvm, 4, 5, C.POLICY_ECDH)
    refused(chip, C.SW_CONDITIONS, C.INS_ECDH, 1, 0, good, 256)  # sign-only key
    refused(chip, C.SW_CONDITIONS, C.INS_ECDH, C.SLOT_MAK, 0, good, 256)
    refused(chip, C.SW_REF_NOT_FOUND, C.INS_ECDH, 9, 0, good, 256)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_ECDH, 2, 0, good[:33], 256)
    refused(chip, C.SW_WRONG_DATA, C.INS_ECDH, 2, 0, good[:-1] + bytes((good[-1] ^ 1,)), 256)
    refused(chip, C.SW_WRONG_DATA, C.INS_ECDH, 2, 0, b"\x05" + good[1:], 256)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_ECDH, 2, 5, good, 256)


# -- ATTEST ---------------------------------------------------------------------------


def test_attest_statement_is_signed_by_the_mak_certificate(fabbed):
    chip, record = fabbed
    point = generate(chip, C.SLOT_IDENTITY, C.POLICY_SIGN)
    nonce = bytes(range(64))
    signed = decode_signed_attestation(
        ok(chip, C.INS_ATTEST, C.SLOT_IDENTITY, 0, nonce, 65536, True)
    )
    st = signed.statement
    assert (st.se_uid, st.slot, st.public_point) == (record.se_uid, 1, point)
    assert st.key_policy == C.POLICY_SIGN | C.POLICY_NON_EXPORTABLE | C.POLICY_GENERATED_ON_CHIP
    assert (st.life_cycle, st.firmware_version, st.nonce) == (C.LC_OP_READY, b"\x01\x00\x00", nonce)
    mak = x509.load_der_x509_certificate(record.mak_cert_der).public_key()
    mak.verify(signed.signature_der, signed.statement_der, ec.ECDSA(hashes.SHA256()))


def test_attest_errors(chip):
    generate(chip, 1)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_ATTEST, 1, 0, bytes(65), 65536, extended=True)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_ATTEST, 1, 0, le=256)  # no nonce
    refused(chip, C.SW_REF_NOT_FOUND, C.INS_ATTEST, 2, 0, b"n", 256)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_ATTEST, 1, 1, b"n", 256)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_ATTEST, 16, 0, b"n", 256)
    # A short Le below the statement's size: 6Cxx.
    _, sw = send(chip, C.INS_ATTEST, 1, 0, b"n", 16)
    assert sw >> 8 == 0x6C


# -- certificates ---------------------------------------------------------------------


def test_put_and_get_cert(fabbed):
    chip, record = fabbed
    generate(chip, 1)
    cert = record.chain_der[1]
    ok(chip, C.INS_PUT_CERT, 1, 0, cert, extended=True)
    assert ok(chip, C.INS_GET_CERT, 1, 0, le=65536, extended=True) == cert


def test_cert_errors(fabbed):
    chip, record = fabbed
    cert = record.mak_cert_der
    refused(chip, C.SW_REF_NOT_FOUND, C.INS_PUT_CERT, 1, 0, cert)  # no key in the slot
    generate(chip, 1)
    refused(chip, C.SW_CONDITIONS, C.INS_PUT_CERT, C.SLOT_MAK, 0, cert)
    refused(chip, C.SW_WRONG_DATA, C.INS_PUT_CERT, 1, 0, cert[:-1])
    refused(chip, C.SW_WRONG_DATA, C.INS_PUT_CERT, 1, 0, cert + b"\x00")
    refused(chip, C.SW_WRONG_DATA, C.INS_PUT_CERT, 1, 0, b"\x04\x01\x00")
    refused(chip, C.SW_NOT_ENOUGH_MEMORY, C.INS_PUT_CERT, 1, 0, bytes(C.CERT_MAX + 1))
    refused(chip, C.SW_WRONG_LENGTH, C.INS_PUT_CERT, 1, 0)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_PUT_CERT, 1, 2, cert)
    refused(chip, C.SW_REF_NOT_FOUND, C.INS_GET_CERT, 1, 0, le=256)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_GET_CERT, 16, 0, le=256)


# -- counters -------------------------------------------------------------------------


def test_counters_are_monotonic_and_persisted(fabbed):
    chip, record = fabbed
    u32 = struct.Struct(">I")
    assert ok(chip, C.INS_COUNTER, 0, C.COUNTER_READ, le=4) == u32.pack(0)
    assert ok(chip, C.INS_COUNTER, 0, C.COUNTER_INCREMENT, le=4) == u32.pack(1)
    assert ok(chip, C.INS_COUNTER, 0, C.COUNTER_ADVANCE, u32.pack(41), 4) == u32.pack(41)
    assert ok(chip, C.INS_COUNTER, 0, C.COUNTER_ADVANCE, u32.pack(41), 4) == u32.pack(41)
    assert ok(chip, C.INS_COUNTER, 3, C.COUNTER_INCREMENT, le=4) == u32.pack(1)
    refused(chip, C.SW_WRONG_DATA, C.INS_COUNTER, 0, C.COUNTER_ADVANCE, u32.pack(40), 4)
    reborn = Chip(Nvm(record.nvm_path))
    select_applet(reborn)
    assert ok(reborn, C.INS_COUNTER, 0, C.COUNTER_READ, le=4) == u32.pack(41)


def test_counter_errors(chip):
    u32 = struct.Struct(">I")
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_COUNTER, C.COUNTER_COUNT, 0, le=4)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_COUNTER, 0, 3, le=4)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_COUNTER, 0, C.COUNTER_ADVANCE, b"\x01", 4)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_COUNTER, 0, C.COUNTER_INCREMENT, b"\x01", 4)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_COUNTER, 0, C.COUNTER_READ, b"\x01", 4)
    # Le too short for the u32: refused *before* anything is counted.
    refused(chip, 0x6C04, C.INS_COUNTER, 0, C.COUNTER_INCREMENT, le=2)
    ok(chip, C.INS_COUNTER, 1, C.COUNTER_ADVANCE, u32.pack(0xFFFFFFFF), 4)
    refused(chip, C.SW_CONDITIONS, C.INS_COUNTER, 1, C.COUNTER_INCREMENT, le=4)  # never wraps


# -- data objects ---------------------------------------------------------------------


def test_data_objects_write_read_overwrite(chip):
    ok(chip, C.INS_WRITE_DATA_OBJECT, 0, 0, b"journal v1")
    assert ok(chip, C.INS_READ_DATA_OBJECT, 0, 0, le=256) == b"journal v1"
    big = bytes(range(256)) * 4
    ok(chip, C.INS_WRITE_DATA_OBJECT, 15, 0, big, extended=True)
    assert ok(chip, C.INS_READ_DATA_OBJECT, 15, 0, le=65536, extended=True) == big


def test_data_object_errors(chip):
    refused(chip, C.SW_REF_NOT_FOUND, C.INS_READ_DATA_OBJECT, 1, 0, le=256)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_READ_DATA_OBJECT, 16, 0, le=256)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_WRITE_DATA_OBJECT, 0, 1, b"x")
    refused(chip, C.SW_WRONG_LENGTH, C.INS_WRITE_DATA_OBJECT, 0, 0, bytes(C.DATA_OBJECT_MAX + 1))
    refused(chip, C.SW_WRONG_LENGTH, C.INS_WRITE_DATA_OBJECT, 0, 0)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_READ_DATA_OBJECT, 0, 0, b"x", 256)


# -- GET RANDOM -----------------------------------------------------------------------


def test_get_random_lengths(chip):
    assert len(ok(chip, C.INS_GET_RANDOM, 0, 0, le=1)) == 1
    assert len(ok(chip, C.INS_GET_RANDOM, 0, 0, le=256)) == 256
    assert len(ok(chip, C.INS_GET_RANDOM, 0, 0, le=1024, extended=True)) == 1024
    a = ok(chip, C.INS_GET_RANDOM, 0, 0, le=32)
    assert a != ok(chip, C.INS_GET_RANDOM, 0, 0, le=32)


def test_get_random_errors(chip):
    refused(chip, C.SW_WRONG_LENGTH, C.INS_GET_RANDOM, 0, 0, le=1025, extended=True)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_GET_RANDOM, 0, 0, le=65536, extended=True)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_GET_RANDOM, 0, 0)
    refused(chip, C.SW_WRONG_LENGTH, C.INS_GET_RANDOM, 0, 0, b"x", 8)
    refused(chip, C.SW_INCORRECT_P1P2, C.INS_GET_RANDOM, 1, 0, le=8)


# -- personalisation outside SCP03 --------------------------------------------------


@pytest.mark.parametrize("ins", [C.INS_PUT_KEY, C.INS_STORE_DATA, C.INS_SET_STATUS])
def test_personalisation_refused_without_scp03(chip, ins):
    refused(chip, C.SW_SECURITY_STATUS, ins, 0x80, 0x0F, b"\x01")
    refused(chip, C.SW_SECURITY_STATUS, ins, 0x80, 0x0F)


def test_wrapped_command_without_session_is_refused(chip):
    refused(chip, C.SW_SECURITY_STATUS, C.INS_GET_DATA, 0x01, 0x01, bytes(8), 256, cla=0x84)


def test_unknown_proprietary_ins(chip):
    refused(chip, C.SW_INS_NOT_SUPPORTED, 0x10)
    refused(chip, C.SW_INS_NOT_SUPPORTED, 0x12, 0, 0, b"\x01")


def test_apdu_helper_encodes_extended_when_needed():
    assert apdu(C.INS_GET_RANDOM, le=1024)[4] == 0


def test_last_nvm_write_bytes_reports_the_changed_records(chip):
    ok(chip, C.INS_WRITE_DATA_OBJECT, 3, 0, bytes(100))
    assert chip.last_nvm_write_bytes == 100
    ok(chip, C.INS_READ_DATA_OBJECT, 3, 0, le=100)
    assert chip.last_nvm_write_bytes == 0


def test_an_internal_fault_answers_6f00_instead_of_raising(chip, monkeypatch):
    def broken(cmd, tx):
        raise KeyError("bug")

    monkeypatch.setattr(chip, "_get_random", broken)
    before = chip.nvm.snapshot()
    assert chip.process(apdu(C.INS_GET_RANDOM, le=8)) == b"\x6f\x00"
    assert chip.nvm.snapshot() == before
