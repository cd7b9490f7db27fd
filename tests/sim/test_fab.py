"""sim/fab.py: the SE vendor root CA, per-chip fab (UID, MAK, MAK certificate, transport
keys), the JSON fab record and batches."""

import json
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetid.common import se_consts as C
from fleetid.sim.chip import Chip
from fleetid.sim.fab import (
    VENDOR_KEY_FILE,
    fab_batch,
    fab_chip,
    load_fab_record,
    load_or_create_vendor_ca,
    record_path_for,
)
from fleetid.sim.nvm import Nvm, PowerLoss
from tests.sim.chip_support import open_scp, select_applet, send


def test_vendor_ca_is_created_once_with_a_private_key_file(tmp_path):
    vendor = tmp_path / "vendor"
    ca = load_or_create_vendor_ca(vendor)
    assert os.stat(vendor / VENDOR_KEY_FILE).st_mode & 0o777 == 0o600
    again = load_or_create_vendor_ca(vendor)
    assert again.cert_der == ca.cert_der
    cert, key = again
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    cert.verify_directly_issued_by(cert)


def test_vendor_ca_refuses_mismatched_files(tmp_path):
    vendor = tmp_path / "vendor"
    load_or_create_vendor_ca(vendor)
    other = tmp_path / "other"
    load_or_create_vendor_ca(other)
    os.replace(other / VENDOR_KEY_FILE, vendor / VENDOR_KEY_FILE)
    with pytest.raises(ValueError):
        load_or_create_vendor_ca(vendor)


def test_fab_chip_writes_nvm_and_a_private_record(tmp_path):
    nvm_path = tmp_path / "chips" / "a.nvm"
    nvm_path.parent.mkdir()
    record = fab_chip(tmp_path / "vendor", nvm_path, firmware_version=(2, 5, 1))
    assert record.record_path == str(tmp_path / "chips" / "a.json")
    assert os.stat(record.record_path).st_mode & 0o777 == 0o600
    assert os.stat(nvm_path).st_mode & 0o777 == 0o600
    data = json.loads(open(record.record_path).read())
    assert data["uid"] == record.se_uid.hex() and len(record.se_uid) == 16
    assert data["transport_key_set"]["kvn"] == C.SCP03_KVN_TRANSPORT
    assert data["firmware_version"] == "2.5.1" and data["life_cycle"] == "OP_READY"
    # The record never holds a private key; the NVM does, and only the NVM.
    mak_scalar = Nvm(nvm_path).get("key/0")[1:33].hex()
    assert mak_scalar not in open(record.record_path).read()
    assert "PRIVATE" not in open(record.record_path).read()
    assert load_fab_record(record.record_path).to_json() == record.to_json()
    assert record.transport_keys["enc"].hex() not in repr(record)


def test_the_fab_record_carries_no_transport_key_they_stay_with_the_vendor(tmp_path):
    """Issue 9, defect 4: the record that travels with the chip holds no SCP03 key."""
    vendor = tmp_path / "vendor"
    record = fab_chip(vendor, tmp_path / "chips" / "c.nvm")
    with open(record.record_path) as f:
        text = f.read()
    for name in ("enc", "mac", "dek"):
        key = record.transport_keys[name]
        assert key.hex() not in text.lower() and key.hex().upper() not in text
    assert "enc" not in json.loads(text)["transport_key_set"]
    # The vendor keeps them, private to it.
    key_file = vendor / "transport-keys" / ("%s.json" % record.uid_hex)
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    assert os.stat(key_file.parent).st_mode & 0o777 == 0o700
    loaded = load_fab_record(record.record_path)
    assert loaded.transport_keys is None and loaded.kvn == C.SCP03_KVN_TRANSPORT
    with pytest.raises(ValueError, match="stay with the SE vendor"):
        loaded.static_keys()
    with_keys = load_fab_record(record.record_path, vendor_dir=vendor)
    assert with_keys.transport_keys == record.transport_keys
    # Another vendor folder (or none of its keys) is refused, not guessed at.
    with pytest.raises(OSError):
        load_fab_record(record.record_path, vendor_dir=tmp_path / "other-vendor")


def test_a_killed_fab_leaves_no_key_material_behind_after_recovery(tmp_path):
    """Issue 9, defect 4: temp files of unfinished commits are removed on recovery."""
    vendor = tmp_path / "vendor"
    out = tmp_path / "out"
    records = fab_batch(vendor, out, 1)
    # What a kill during the next chip's first NVM commit leaves: a torn temp file.
    torn = Nvm(out / "se-00ff.nvm")
    torn.cut_power_at(1)
    with pytest.raises(PowerLoss):
        torn.commit({"key/0": b"\x01" + b"\x42" * 32})
    stale = out / "se-00ff.nvm.tmp"
    assert stale.exists()
    (out / "se-00ee.json.tmp").write_bytes(b"{partial")
    fab_batch(vendor, out, 1)  # the next fab run recovers first
    assert not stale.exists() and not (out / "se-00ee.json.tmp").exists()
    # The chip's own NVM drops a stale temp file at power-up.
    own = records[0].nvm_path + ".tmp"
    with open(own, "wb") as f:
        f.write(b"torn image with key bytes")
    Nvm(records[0].nvm_path)
    assert not os.path.exists(own)


def test_mak_certificate_names_the_uid_and_chains_to_the_vendor_root(tmp_path):
    vendor = tmp_path / "vendor"
    record = fab_chip(vendor, tmp_path / "c.nvm")
    root = load_or_create_vendor_ca(vendor).cert
    mak = x509.load_der_x509_certificate(record.mak_cert_der)
    mak.verify_directly_issued_by(root)
    assert mak.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == record.uid_hex
    assert record.uid_hex in mak.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert not mak.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(mak.public_key(), ec.EllipticCurvePublicKey)
    assert record.chain_der[1] == load_or_create_vendor_ca(vendor).cert_der


def test_fabbed_chip_answers_with_its_record(tmp_path):
    record = fab_chip(tmp_path / "vendor", tmp_path / "c.nvm", life_cycle=C.LC_INITIALIZED)
    chip = Chip(Nvm(record.nvm_path))
    select_applet(chip)
    assert send(chip, C.INS_GET_DATA, 0x01, 0x01, le=16) == (record.se_uid, C.SW_OK)
    assert send(chip, C.INS_GET_DATA, 0x01, 0x03, le=1) == (b"\x07", C.SW_OK)
    chain, sw = send(chip, C.INS_GET_DATA, 0x01, 0x04, le=65536, extended=True)
    assert chain == b"".join(record.chain_der)
    point = send(chip, C.INS_GET_PUBLIC_KEY, 0, 0, le=66)[0][1:]
    mak = x509.load_der_x509_certificate(record.mak_cert_der).public_key()
    assert mak.public_numbers() == ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), point).public_numbers()
    assert open_scp(chip, load_fab_record(record.record_path,
                                          tmp_path / "vendor").static_keys()).is_open


def test_fab_refuses_an_existing_nvm(tmp_path):
    fab_chip(tmp_path / "vendor", tmp_path / "c.nvm")
    with pytest.raises(FileExistsError):
        fab_chip(tmp_path / "vendor", tmp_path / "c.nvm")


def test_fab_batch_makes_distinct_chips_and_reports_progress(tmp_path):
    seen = []
    records = fab_batch(tmp_path / "vendor", tmp_path / "out", 4,
                        progress=lambda done, total, rec: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len({r.se_uid for r in records}) == 4
    assert len({r.transport_keys["enc"] for r in records}) == 4
    for r in records:
        assert os.path.exists(r.nvm_path) and os.path.exists(record_path_for(r.nvm_path))
        assert os.path.basename(r.nvm_path) == "se-%s.nvm" % r.uid_hex


def test_load_fab_record_refuses_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"uid": "00"}))
    with pytest.raises(ValueError):
        load_fab_record(str(path))
