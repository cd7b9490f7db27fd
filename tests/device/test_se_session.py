"""SeSession against the emulated applet: every domain verb does what the command table
says, its results check out with `cryptography` on the host, and refusals arrive as the
typed ApduError subclasses.  Most tests talk to the chip directly (ApduProtocol over
chip.process); the link tests run the same session over T=1' through the bus endpoint."""

import hashlib

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from fleetid.common import attestation, der
from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.common.errors import (
    AlreadyExists,
    ApduError,
    ApduFormatError,
    ConditionsNotSatisfied,
    ReferenceNotFound,
    VerificationFailed,
    WrongData,
)
from fleetid.device.se import SeSession, split_der_sequence

DIGEST = hashlib.sha256(b"fleetid session test").digest()


def _session(chip):
    se = SeSession(ApduProtocol(chip.process))
    assert se.select() == C.APPLET_VERSION
    return se


def _point_of(private_key):
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _public_key(point):
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def test_info_matches_the_fab_record(fabbed):
    record, chip = fabbed
    info = _session(chip).info()
    assert info.uid == record.se_uid
    assert info.firmware_version == record.firmware_version
    assert info.firmware_string() == "1.0.0"
    assert info.life_cycle == C.LC_OP_READY and info.life_cycle_name() == "OP_READY"
    assert info.free_slots == C.SLOT_COUNT - 1  # slot 0 holds the MAK
    assert info.attestation_chain == record.chain_der
    x509.load_der_x509_certificate(info.attestation_chain[0])


def test_generated_key_signs_digests_that_verify_on_the_host_and_in_the_se(fabbed):
    _, chip = fabbed
    se = _session(chip)
    point = se.generate_key(C.SLOT_OPERATIONAL_A, C.POLICY_SIGN)
    policy, same = se.public_key(C.SLOT_OPERATIONAL_A)
    assert same == point
    assert policy & C.POLICY_SIGN and policy & C.POLICY_NON_EXPORTABLE
    assert policy & C.POLICY_GENERATED_ON_CHIP
    sig = se.sign(C.SLOT_OPERATIONAL_A, DIGEST)
    _public_key(point).verify(sig, DIGEST, ec.ECDSA(Prehashed(hashes.SHA256())))
    # The SE verifies it too, by slot and by point, DER and raw.
    se.verify(DIGEST, sig, slot=C.SLOT_OPERATIONAL_A)
    se.verify(DIGEST, sig, point=point)
    se.verify(DIGEST, der.ecdsa_der_to_raw(sig), point=point, raw=True)
    with pytest.raises(VerificationFailed) as info:
        se.verify(hashlib.sha256(b"other").digest(), sig, slot=C.SLOT_OPERATIONAL_A)
    assert info.value.sw == C.SW_VERIFY_FAILED
    with pytest.raises(AlreadyExists):
        se.generate_key(C.SLOT_OPERATIONAL_A, C.POLICY_SIGN)


def test_ecdh_matches_the_host_computation(fabbed):
    _, chip = fabbed
    se = _session(chip)
    point = se.generate_key(2, C.POLICY_ECDH)
    peer = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import serialization

    peer_point = peer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    shared = se.ecdh(2, peer_point)
    assert shared == peer.exchange(ec.ECDH(), _public_key(point))
    with pytest.raises(ConditionsNotSatisfied):
        se.sign(2, DIGEST)  # ECDH-only key


def test_attestation_is_signed_by_the_mak_and_binds_key_and_nonce(fabbed):
    record, chip = fabbed
    se = _session(chip)
    point = se.generate_key(1, C.POLICY_SIGN)
    nonce = bytes(range(32))
    signed = attestation.decode_signed_attestation(se.attest(1, nonce))
    st = signed.statement
    assert (st.se_uid, st.slot, st.public_point, st.nonce) == (record.se_uid, 1, point, nonce)
    mak = x509.load_der_x509_certificate(record.chain_der[0]).public_key()
    mak.verify(signed.signature_der, st.statement_der, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        mak.verify(signed.signature_der, st.statement_der + b"x", ec.ECDSA(hashes.SHA256()))


def test_delete_then_lookup_is_reference_not_found(fabbed):
    _, chip = fabbed
    se = _session(chip)
    se.generate_key(3, C.POLICY_SIGN)
    free = se.free_slots()
    se.delete_key(3)
    assert se.free_slots() == free + 1
    with pytest.raises(ReferenceNotFound):
        se.public_key(3)
    with pytest.raises(ReferenceNotFound):
        se.delete_key(3)


def test_certificates_counters_data_objects_and_random(fabbed):
    record, chip = fabbed
    se = _session(chip)
    se.generate_key(1, C.POLICY_SIGN)
    cert = record.chain_der[0]  # any DER certificate will do (> 256 bytes: extended APDUs)
    se.put_cert(1, cert)
    assert se.get_cert(1) == cert
    assert se.counter_read(0) == 0
    assert se.counter_increment(0) == 1
    assert se.counter_advance(0, 10) == 10
    assert se.counter_advance(0, 10) == 10
    with pytest.raises(WrongData):
        se.counter_advance(0, 9)  # monotonic: never decreases
    with pytest.raises(ReferenceNotFound):
        se.read_object(1)
    se.write_object(1, b"journal" * 100)
    assert se.read_object(1) == b"journal" * 100
    assert len(se.get_random(32)) == 32
    assert len(se.get_random(600)) == 600
    assert list(se.get_data(C.DATA_SCP_INFO)) == [C.SCP03_KVN_TRANSPORT]
    assert se.get_data(C.DATA_SCP_FAILURES, 2) == b"\x00\x00"


def test_personalisation_outside_scp03_is_refused(fabbed):
    _, chip = fabbed
    se = _session(chip)
    with pytest.raises(ApduError):
        se.store_data(C.DGI_FIRMWARE_KEY, b"\x04" + bytes(64))
    with pytest.raises(ApduError):
        se.set_status(C.LC_SECURED)
    assert se.life_cycle() == C.LC_OP_READY


def test_personalisation_inside_scp03_sets_trust_anchors_and_locks(fabbed):
    from fleetid.common.host.hostcrypto import CryptographyPrimitives
    from fleetid.common.scp03 import Scp03Host, static_session_keys_fn

    record, chip = fabbed
    _session(chip)
    prims = CryptographyPrimitives()
    host = Scp03Host(chip.process, prims, static_session_keys_fn(prims, record.static_keys()))
    host.open()
    secure = SeSession(ApduProtocol(host.transceive))
    assert secure.uid() == record.se_uid
    anchor = _point_of(ec.derive_private_key(7, ec.SECP256R1()))
    secure.store_data(C.DGI_FIRMWARE_KEY, anchor)
    secure.set_status(C.LC_SECURED)
    assert secure.get_data(C.DATA_TRUST_FIRMWARE_KEY) == anchor
    assert secure.life_cycle() == C.LC_SECURED


class Recorder:
    """A send_apdu that records its arguments and replays canned answers."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.sent = []

    def __call__(self, cla, ins, p1, p2, data=b"", le=None, extended=None):
        self.sent.append((cla, ins, p1, p2, bytes(data), le))
        return self.answers.pop(0)


def test_commands_are_built_as_the_table_says():
    rec = Recorder(b"\x30\x06\x02\x01\x01\x02\x01\x01", b"\x00\x00\x00\x07", b"")
    se = SeSession(rec)
    se.sign(2, DIGEST)
    se.counter_advance(1, 7)
    se.store_data(C.DGI_FLEET_ROOT, b"\x30" * 300)
    assert rec.sent[0] == (0x80, C.INS_SIGN, 2, 0, DIGEST, 256)
    assert rec.sent[1] == (0x80, C.INS_COUNTER, 1, C.COUNTER_ADVANCE, b"\x00\x00\x00\x07", 256)
    # DGI 7F01, length FF 01 2C (>= 255 bytes), last block.
    assert rec.sent[2][:4] == (0x80, C.INS_STORE_DATA, 0x88, 0)  # last block, DGI format
    assert rec.sent[2][4][:5] == b"\x7f\x01\xff\x01\x2c"


def test_wrong_shaped_answers_are_format_errors():
    with pytest.raises(ApduFormatError):
        SeSession(Recorder(b"\x04" + bytes(63))).generate_key(1, C.POLICY_SIGN)
    with pytest.raises(ApduFormatError):
        SeSession(Recorder(bytes(15))).uid()
    with pytest.raises(ApduFormatError):
        SeSession(Recorder(b"\x6f\x03\x84\x01\x00")).select()
    with pytest.raises(ApduFormatError):
        SeSession(Recorder(b"\x00\x01")).counter_read(0)


@pytest.mark.parametrize(
    "call",
    [
        lambda se: se.sign(16, DIGEST),
        lambda se: se.sign(1, DIGEST[:31]),
        lambda se: se.generate_key(0, C.POLICY_SIGN),  # the MAK slot
        lambda se: se.attest(1, b""),
        lambda se: se.attest(1, bytes(65)),
        lambda se: se.verify(DIGEST, b"\x30" * 8),  # neither slot nor point
        lambda se: se.write_object(16, b"x"),
        lambda se: se.get_random(0),
        lambda se: se.counter_advance(0, -1),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_sent(call):
    rec = Recorder()
    with pytest.raises(ValueError):
        call(SeSession(rec))
    assert rec.sent == []


def test_chain_splitter_handles_long_form_lengths_and_refuses_junk():
    a = b"\x30\x03abc"
    b = b"\x30\x81\x80" + bytes(128)
    c = b"\x30\x82\x01\x00" + bytes(256)
    assert split_der_sequence(a + b + c) == [a, b, c]
    for bad in (b"\x31\x00", b"\x30\x05ab", b"\x30\x80\x00\x00", b"\x30"):
        with pytest.raises(ApduFormatError):
            split_der_sequence(bad)


def test_private_wire_constants_match_se_consts():
    # se.py keeps const() copies so a device need not load the whole table.
    from fleetid.device import se as se_mod

    checked = 0
    for name in dir(se_mod):
        if name.startswith(("_INS_", "_DATA_", "_TAG_", "_COUNTER_", "_CLA_", "_CURVE_")) and \
                hasattr(C, name[1:]):
            assert getattr(se_mod, name) == getattr(C, name[1:]), name
            checked += 1
    assert checked >= 30
    assert se_mod.AID == C.AID
    assert se_mod._SLOT_LAST == C.SLOT_COUNT - 1
    assert se_mod._COUNTER_LAST == C.COUNTER_COUNT - 1
    assert se_mod._OBJECT_LAST == C.DATA_OBJECT_COUNT - 1
    assert (se_mod._DATA_OBJECT_MAX, se_mod._ATTEST_NONCE_MAX, se_mod._CERT_MAX,
            se_mod._GET_RANDOM_MAX, se_mod._VERIFY_WITH_POINT) == (
        C.DATA_OBJECT_MAX, C.ATTEST_NONCE_MAX, C.CERT_MAX, C.GET_RANDOM_MAX,
        C.VERIFY_WITH_POINT)
    for lc, name in C.LC_NAMES.items():
        assert se_mod.SeInfo(b"", b"", lc, 0, []).life_cycle_name() == name


def test_store_data_sends_several_dgis_in_one_command():
    rec = Recorder(b"")
    se = SeSession(rec)
    point = b"\x04" + bytes(range(64))
    se.store_data(C.DGI_FLEET_ROOT, b"\x30" * 300, more=[(C.DGI_FIRMWARE_KEY, point)])
    assert len(rec.sent) == 1
    cla, ins, p1, p2, data, le = rec.sent[0]
    assert (cla, ins, p1, p2, le) == (0x80, C.INS_STORE_DATA, 0x88, 0, None)
    # DGI 7F01 with a long length (FF 01 2C), then the firmware key DGI, short length.
    assert data == (b"\x7f\x01\xff\x01\x2c" + b"\x30" * 300 + bytes(
        (C.DGI_FIRMWARE_KEY >> 8, C.DGI_FIRMWARE_KEY & 0xFF, 65)) + point)
    with pytest.raises(ValueError):
        se.store_data(C.DGI_FLEET_ROOT, b"\x30", more=[(C.DGI_FIRMWARE_KEY, None)])
    assert len(rec.sent) == 1  # refused before sending


def test_store_data_of_several_dgis_inside_scp03_is_all_or_nothing(fabbed):
    from fleetid.common.host.hostcrypto import CryptographyPrimitives
    from fleetid.common.scp03 import Scp03Host, static_session_keys_fn

    record, chip = fabbed
    _session(chip)
    prims = CryptographyPrimitives()
    host = Scp03Host(chip.process, prims, static_session_keys_fn(prims, record.static_keys()))
    host.open()
    secure = SeSession(ApduProtocol(host.transceive))
    anchor = _point_of(ec.derive_private_key(7, ec.SECP256R1()))
    with pytest.raises(ApduError):  # one bad DGI: nothing of the command is stored
        secure.store_data(C.DGI_FIRMWARE_KEY, anchor, more=[(C.DGI_FLEET_ROOT, b"\x01\x00")])
    with pytest.raises(ApduError):
        secure.get_data(C.DATA_TRUST_FIRMWARE_KEY)  # the good DGI was not stored either
    host.open()
    secure.store_data(C.DGI_FIRMWARE_KEY, anchor)
    assert secure.get_data(C.DATA_TRUST_FIRMWARE_KEY) == anchor
