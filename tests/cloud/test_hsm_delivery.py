"""Transport keys delivered wrapped for the line's HSM (issue 16 item 20), on both backends:
the chip vendor (sim.ship) wraps a shipment KEK for the HSM's RSA wrapping key and each
chip's SCP03 transport keys under the KEK (RFC 3394); the HSM unwraps them inside and
uses them for SCP03 and PUT KEY.  The expected bytes come from the reference crypto in
hsm_support, computed from the plaintext keys the test gave the vendor."""

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fleetid.cloud.hsm import HsmError, KeyNotFound
from fleetid.sim import fab, ship
from tests.cloud.hsm_support import (
    MASTER_KEY,
    TRANSPORT_DEK,
    TRANSPORT_ENC,
    TRANSPORT_MAC,
    UID_A,
    UID_B,
    decode_put_key,
    files_bytes,
    kcv,
    reference_device_keys,
    reference_session_keys,
)
from tests.cloud.test_hsm_contract import CARD_CHALLENGE, HOST_CHALLENGE, BackendEnv

KEYS_A = (TRANSPORT_ENC, TRANSPORT_MAC, TRANSPORT_DEK)
KEYS_B = tuple(bytes(b ^ 0x5A for b in k) for k in KEYS_A)


@pytest.fixture(params=["soft", "pkcs11"])
def env(request, tmp_path, monkeypatch):
    backend_env = BackendEnv(request.param, tmp_path, monkeypatch)
    yield backend_env
    backend_env.close_all()


@pytest.fixture(scope="module")
def vendor(tmp_path_factory):
    return fab.load_or_create_vendor_ca(str(tmp_path_factory.mktemp("se-vendor")))


def _shipment(hsm, vendor, lot="lot-1"):
    public = hsm.create_transport_wrapping_key("transport-wrap")
    return ship.ship_keys(vendor, lot, [(UID_A, KEYS_A), (UID_B, KEYS_B)], public)


def _chip(doc, uid):
    (entry,) = [c for c in doc["chips"] if c["uid"] == uid.hex()]
    return ([bytes.fromhex(entry[n]) for n in ("enc", "mac", "dek")],
            [bytes.fromhex(k) for k in entry["kcv"]])


def test_wrapped_transport_keys_unwrap_inside_and_open_scp03_and_put_key(env, vendor):
    hsm = env.open()
    doc = _shipment(hsm, vendor)
    assert isinstance(hsm.transport_wrapping_public_key("transport-wrap"), rsa.RSAPublicKey)
    hsm.import_transport_kek("transport-kek:lot-1", "transport-wrap",
                             bytes.fromhex(doc["kek"]["wrapped"]))
    hsm.import_master_key("scp03-master", bytearray(MASTER_KEY))
    for uid, keys in ((UID_A, KEYS_A), (UID_B, KEYS_B)):
        wrapped, kcvs = _chip(doc, uid)
        with hsm.unwrap_transport_keys("transport-kek:lot-1", uid, wrapped, kcvs) as transport:
            assert transport.kind == "chip-transport" and transport.kvn == 0x30
            assert transport.kcvs == tuple(kcv(k) for k in keys)
            # SCP03 with the unwrapped keys = SCP03 with the vendor's plaintext keys.
            assert tuple(hsm.scp03_session_keys(transport, HOST_CHALLENGE, CARD_CHALLENGE)) \
                == reference_session_keys(keys[0], keys[1], HOST_CHALLENGE, CARD_CHALLENGE)
            with hsm.diversify("scp03-master", uid) as device_keys:
                payload = hsm.put_key_payload(device_keys, transport, 0x31)
            _kvn, decoded = decode_put_key(payload, keys[2])  # wrapped under the chip's DEK
            assert [k for k, _ in decoded] == list(reference_device_keys(MASTER_KEY, uid))
        assert hsm.pool_stats()["device_key_sets"] == 0
        with pytest.raises(HsmError, match="released"):
            hsm.scp03_session_keys(transport, HOST_CHALLENGE, CARD_CHALLENGE)
    # The KEK and the wrapping key persist; the chips' transport keys are never stored.
    hsm.close()
    again = env.open()
    wrapped, kcvs = _chip(doc, UID_A)
    with again.unwrap_transport_keys("transport-kek:lot-1", UID_A, wrapped, kcvs) as transport:
        assert transport.kcvs == tuple(kcv(k) for k in KEYS_A)
    stored = files_bytes(str(env.store_path))
    for key in KEYS_A + KEYS_B + (MASTER_KEY,):
        assert key not in stored and key.hex().encode() not in stored


def test_a_tampered_or_misdirected_delivery_is_refused_with_a_typed_error(env, vendor):
    hsm = env.open()
    doc = _shipment(hsm, vendor)
    kek = bytearray.fromhex(doc["kek"]["wrapped"])
    kek[40] ^= 0x01
    with pytest.raises(HsmError) as refused:
        hsm.import_transport_kek("transport-kek:lot-1", "transport-wrap", bytes(kek))
    assert refused.value.reason == HsmError.WRAPPED_KEY_INVALID
    other = rsa.generate_private_key(65537, 3072).public_key()  # wrapped for another line
    misdirected = ship.ship_keys(vendor, "lot-1", [(UID_A, KEYS_A)], other)
    with pytest.raises(HsmError) as refused:
        hsm.import_transport_kek("transport-kek:lot-1", "transport-wrap",
                                 bytes.fromhex(misdirected["kek"]["wrapped"]))
    assert refused.value.reason == HsmError.WRAPPED_KEY_INVALID
    with pytest.raises(KeyNotFound):
        hsm.unwrap_transport_keys("transport-kek:lot-1", UID_A, *_chip(doc, UID_A))

    hsm.import_transport_kek("transport-kek:lot-1", "transport-wrap",
                             bytes.fromhex(doc["kek"]["wrapped"]))
    wrapped, kcvs = _chip(doc, UID_A)
    for index in range(3):
        for bit in (0, 7 * 8 + 3, 23 * 8 + 7):  # in the integrity block and in the key
            bad = list(wrapped)
            flipped = bytearray(bad[index])
            flipped[bit // 8] ^= 1 << (bit % 8)
            bad[index] = bytes(flipped)
            with pytest.raises(HsmError) as refused:
                hsm.unwrap_transport_keys("transport-kek:lot-1", UID_A, bad, kcvs)
            assert refused.value.reason == HsmError.WRAPPED_KEY_INVALID
    # Valid blobs in the wrong places (ENC <-> MAC, or chip B's keys for chip A): the KCVs.
    for bad in ([wrapped[1], wrapped[0], wrapped[2]], _chip(doc, UID_B)[0]):
        with pytest.raises(HsmError) as refused:
            hsm.unwrap_transport_keys("transport-kek:lot-1", UID_A, bad, kcvs)
        assert refused.value.reason == HsmError.KCV_MISMATCH
    with pytest.raises(HsmError) as refused:
        hsm.unwrap_transport_keys("transport-kek:lot-1", UID_A, [w[:16] for w in wrapped], kcvs)
    assert refused.value.reason == HsmError.BAD_INPUT
    assert hsm.pool_stats()["device_key_sets"] == 0  # nothing kept from a refused delivery
    with pytest.raises(HsmError) as refused:
        hsm.import_transport_kek("transport-kek:lot-1", "transport-wrap",
                                 bytes.fromhex(doc["kek"]["wrapped"]))
    assert refused.value.reason == HsmError.EXISTS


def test_on_pkcs11_the_delivered_keys_exist_only_as_sensitive_non_extractable_objects(
        tmp_path, monkeypatch, vendor):
    """The KEK, the wrapping key and a chip's unwrapped transport keys are token or session
    objects the host cannot read or export: CKA_SENSITIVE, not CKA_EXTRACTABLE, each with
    only the usage it needs (the transport keys lose CKA_ENCRYPT after the KCV)."""
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11 import exceptions as p11e

    backend_env = BackendEnv("pkcs11", tmp_path, monkeypatch)
    hsm = backend_env.open()
    try:
        doc = _shipment(hsm, vendor)
        hsm.import_transport_kek("transport-kek:lot-1", "transport-wrap",
                                 bytes.fromhex(doc["kek"]["wrapped"]))
        with hsm.session(), hsm.unwrap_transport_keys("transport-kek:lot-1", UID_A,
                                                      *_chip(doc, UID_A)) as transport:
            def inspect(session):
                found = {}
                for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
                    found[obj.label] = obj
                private = session.get_key(object_class=ObjectClass.PRIVATE_KEY,
                                          key_type=KeyType.RSA, label="transport-wrap")
                found["transport-wrap"] = private
                out = {label: (obj[Attribute.SENSITIVE], obj[Attribute.EXTRACTABLE],
                               obj[Attribute.UNWRAP], obj[Attribute.DECRYPT])
                       for label, obj in found.items()}
                chip = {label: (obj[Attribute.SIGN], obj[Attribute.WRAP], obj[Attribute.ENCRYPT])
                        for label, obj in found.items() if "chip-transport" in label}
                dek = found["scp03-chip-transport:%s:dek" % UID_A.hex()]
                enc = found["scp03-chip-transport:%s:enc" % UID_A.hex()]
                try:
                    dek.wrap_key(enc)
                    exported = True
                except p11e.PKCS11Error:
                    exported = False
                return out, chip, exported

            attrs, chip, exported = hsm._run(inspect)
            assert transport.kind == "chip-transport"
        assert exported is False
        for label in ("transport-kek:lot-1", "transport-wrap"):
            assert attrs[label] == (True, False, True, False), label
        names = {"scp03-chip-transport:%s:%s" % (UID_A.hex(), n): n for n in ("enc", "mac", "dek")}
        for label, name in names.items():
            assert attrs[label][:2] == (True, False), label
            assert chip[label] == ((False, True, False) if name == "dek" else (True, False, False))
    finally:
        backend_env.close_all()
