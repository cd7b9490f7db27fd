"""Key custody of the line (issue 10): `fleetid line init` adopts an existing fleet root and
issuing CAs (as `fleetid pki init-root` / `fleetid pki new-ca` made them) and creates them
only on the embedded demo path; one issuing CA per product/batch/region, the line choosing
by batch; the audit witness key in a keystore of its own, never the line's.

Issue 16 item 20: the SE vendor's CA key and the chips' transport keys stay in the
vendor's folder; the line receives the vendor's root certificate and a shipment of
transport keys wrapped for its HSM, which unwraps them inside; a tampered delivery is
refused with a typed cause and the chip is not personalised."""

import json
import os

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cli.main import cli
from fleetid.cloud.hsm import open_hsm
from fleetid.cloud.hsm.errors import KeyNotFound
from fleetid.cloud.line import runner, workdir
from fleetid.common import se_consts as C
from fleetid.sim import fab, ship
from fleetid.sim import lot as lot_mod
from fleetid.sim.metering import EmulatedBuses
from tests.cloud.hsm_support import KEYSTORE_PASS
from tests.cloud.line_support import check_invariants, files_under, make_line, scan


def _env():
    return {"FLEETID_KEYSTORE_PASS": KEYSTORE_PASS}


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _soft(path):
    return "soft:%s;pass-env=FLEETID_KEYSTORE_PASS" % path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A root and two issuing CAs (batches b1, b2) in a keystore, made by `fleetid pki`."""
    base = tmp_path_factory.mktemp("pki")
    hsm = _soft(base / "hsm.json")
    _ok(CliRunner().invoke(cli, [
        "pki", "init-root", "--hsm", hsm, "--label", "acme-root",
        "--subject", "CN=Acme Fleet Root,O=Acme", "--ceremony-dir", str(base / "ceremony"),
        "--operator", "alice", "--operator", "bob"], env=_env()))
    for batch in ("b1", "b2"):
        _ok(CliRunner().invoke(cli, [
            "pki", "new-ca", "--hsm", hsm, "--root-label", "acme-root",
            "--root-cert", str(base / "ceremony" / "root.pem"), "--label", "ca-" + batch,
            "--product", "widget", "--batch", batch, "--region", "eu",
            "--out", str(base / ("ca-%s.pem" % batch))], env=_env()))
    return {"base": base, "hsm": hsm, "root": str(base / "ceremony" / "root.pem"),
            "cas": [("ca-b1", str(base / "ca-b1.pem")), ("ca-b2", str(base / "ca-b2.pem"))]}


def _line_dir(tmp_path, pki):
    """A line folder holding the (simulated) SE vendor's root, on a copy of the keystore."""
    out = tmp_path / "line"
    fab.publish_vendor_root(str(out) + ".se-vendor", str(out / "vendor"))
    copy = tmp_path / "hsm.json"
    copy.write_bytes((pki["base"] / "hsm.json").read_bytes())
    os.chmod(copy, 0o600)
    return str(out), _soft(copy)


def test_line_init_adopts_the_root_and_cas_and_run_chooses_the_ca_by_batch(tmp_path, pki):
    out, hsm = _line_dir(tmp_path, pki)
    witness = _soft(tmp_path / "witness.json")
    result = _ok(CliRunner().invoke(cli, [
        "line", "init", out, "--hsm", hsm, "--root-cert", pki["root"],
        "--root-label", "acme-root", "--ca", "ca-b1=" + pki["cas"][0][1],
        "--ca", "ca-b2=" + pki["cas"][1][1], "--witness-hsm", witness], env=_env()))
    assert "(batch b2)" in result.output
    # Adopted, not created: no ceremony of the line's own, the root copied unchanged.
    assert not os.path.exists(os.path.join(out, "pki", "ceremony"))
    with open(pki["root"], "rb") as f, open(os.path.join(out, "pki", "root.pem"), "rb") as g:
        assert f.read() == g.read()
    _ok(CliRunner().invoke(cli, ["line", "run", "--devices", "2", "--stations", "1",
                                 "--ca-batch", "b2", "--out", out], env=_env()))
    with open(pki["cas"][1][1], "rb") as f:
        ca_b2 = x509.load_pem_x509_certificate(f.read())
    line = workdir.open_line(out, environ=dict(os.environ, **_env()))
    try:
        assert line.root_cert.subject.rfc4514_string() == "CN=Acme Fleet Root,O=Acme"
        assert sorted(line.issuing_cas) == ["b1", "b2"]
        assert line.ca_cert.subject != ca_b2.subject  # the default is the first (b1)
        for serial in (1, 2):
            (identity,) = line.registry.certificates(serial)
            x509.load_der_x509_certificate(identity.der).verify_directly_issued_by(ca_b2)
    finally:
        line.close()
    refused = CliRunner().invoke(cli, ["line", "run", "--devices", "1", "--ca-batch", "b9",
                                       "--out", out], env=_env())
    assert refused.exit_code == 1 and "no issuing CA for batch 'b9'" in refused.output


def test_line_init_refuses_what_it_cannot_adopt(tmp_path, pki):
    out, hsm = _line_dir(tmp_path, pki)
    env = dict(os.environ, **_env())
    witness = _soft(tmp_path / "witness.json")
    root = ("acme-root", pki["root"])
    cases = [
        ({}, "adopts its fleet root"),  # an HSM line never makes its own root
        ({"root": root}, "needs its issuing CAs"),
        ({"root": root, "cas": pki["cas"][:1], "witness_hsm_uri": hsm}, "its own keystore"),
        ({"root": root, "cas": [("ca-b2", pki["cas"][0][1])], "witness_hsm_uri": witness},
         "not this certificate's key"),
        ({"root": ("acme-root", pki["cas"][0][1]), "cas": pki["cas"][:1],
          "witness_hsm_uri": witness}, "not this certificate's key"),
        ({"root": root, "cas": [("acme-root", pki["root"])], "witness_hsm_uri": witness},
         "no product/batch/region scope"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(workdir.LineConfigError, match=reason):
            workdir.init_line(out, hsm_uri=hsm, environ=env, **kwargs)
        assert not os.path.exists(os.path.join(out, workdir.CONFIG_FILE))
    with pytest.raises(workdir.LineConfigError, match="adopts its fleet root"):
        workdir.init_line(out, environ=env, cas=pki["cas"])  # CAs without their root
    assert not os.path.exists(os.path.join(out, "keystore.json"))


def test_the_audit_witness_key_lives_in_its_own_keystore(tmp_path):
    line = make_line(tmp_path)
    try:
        assert line.witness_hsm is not line.hsm
        with pytest.raises(KeyNotFound):
            line.hsm.public_key(workdir.WITNESS_LABEL)
        line_key, witness_key = line.public_keys()
        assert line_key.public_numbers() != witness_key.public_numbers()
        keystore = os.path.join(line.workdir, "witness", "keystore.json")
        assert line.config["witness"]["hsm"].startswith("soft:" + keystore + ";")
        other = open_hsm(line.config["witness"]["hsm"], dict(os.environ, **_env()))
        try:
            assert other.public_key(workdir.WITNESS_LABEL).public_numbers() == \
                witness_key.public_numbers()
        finally:
            other.close()
        with open(os.path.join(line.workdir, "pki", "audit-witness.pub.pem"), "rb") as f:
            assert serialization.load_pem_public_key(f.read()).public_numbers() == \
                witness_key.public_numbers()
    finally:
        line.close()


def test_cloud_serve_keeps_the_witness_key_in_its_own_keystore(tmp_path):
    """The embedded cloud makes its witness key in <state_dir>/witness/keystore.json, not
    in its own keystore; configured audit keys need the witness's own HSM URI."""
    from fleetid.cloud.config import ConfigError, load_config
    from fleetid.cloud.server import build_context

    state = str(tmp_path / "cloud")
    config = load_config(None, environ={"FLEETID_CLOUD_STATE_DIR": state})
    context = build_context(config, dict(os.environ, **_env()))
    try:
        assert context.witness_hsm is not None and context.witness_hsm is not context.hsm
        with pytest.raises(KeyNotFound):
            context.hsm.public_key("audit-witness")
        witness_key = context.witness_hsm.public_key("audit-witness")
        with open(os.path.join(state, "audit", "audit-witness.pub.pem"), "rb") as f:
            assert serialization.load_pem_public_key(f.read()).public_numbers() == \
                witness_key.public_numbers()
        assert os.path.exists(os.path.join(state, "witness", "keystore.json"))
    finally:
        context.close()
    keys = {"FLEETID_CLOUD_STATE_DIR": state, "FLEETID_CLOUD_AUDIT_LINE_KEY": "audit-line",
            "FLEETID_CLOUD_AUDIT_WITNESS_KEY": "audit-witness"}
    with pytest.raises(ConfigError, match="audit_witness_hsm"):
        load_config(None, environ=keys)
    same = dict(keys, FLEETID_CLOUD_HSM=_soft(tmp_path / "k.json"),
                FLEETID_CLOUD_AUDIT_WITNESS_HSM=_soft(tmp_path / "k.json"))
    with pytest.raises(ConfigError, match="must not be the cloud's hsm"):
        load_config(None, environ=same)


def test_cloud_serve_adopts_the_root_and_cas_and_makes_them_only_on_its_embedded_keystore(
        tmp_path, pki):
    from fleetid.cloud.config import load_config
    from fleetid.cloud.server import build_context

    _out, hsm = _line_dir(tmp_path, pki)
    state = tmp_path / "cloud"
    env = dict(os.environ, **_env())

    def config(**attrs):
        made = load_config(None, environ={"FLEETID_CLOUD_STATE_DIR": str(state),
                                          "FLEETID_CLOUD_HSM": hsm,
                                          "FLEETID_CLOUD_TLS_CERT": str(tmp_path / "t.pem"),
                                          "FLEETID_CLOUD_TLS_KEY": str(tmp_path / "t.key")})
        for key, value in attrs.items():
            setattr(made, key, value)
        return made

    labels = [{"name": label, "ca_key": label, "ca_cert": path, "default": i == 0}
              for i, (label, path) in enumerate(pki["cas"])]
    context = build_context(config(roots=[pki["root"]], labels=labels), env)
    try:
        assert sorted(label.name for label in context.labels) == ["ca-b1", "ca-b2"]
        assert context.default_label == "ca-b1"
        assert [r.subject.rfc4514_string() for r in context.trust.roots] == \
            ["CN=Acme Fleet Root,O=Acme"]
    finally:
        context.close()
    assert not (state / "ceremony").exists() and not (state / "pki").exists()
    with pytest.raises(ValueError, match="adopts its root and issuing CAs"):
        build_context(config(), env)  # an HSM that is not the embedded keystore
    assert not (state / "ceremony").exists()
    with pytest.raises(ValueError, match="not issued by a configured root"):
        build_context(config(roots=[pki["cas"][1][1]], labels=labels[:1]), env)


# -- issue 16 item 20: vendor secrets stay with the vendor; transport keys arrive wrapped ------


def _transport_keys_on(chips):
    """Each chip's SCP03 transport keys (ENC, MAC, DEK), read from its NVM before the line
    replaces them: what the vendor shipped, the plaintext the line must never write."""
    keys = []
    for made in chips:
        stored = bytes(made.nvm.get("scp/%02x" % C.SCP03_KVN_TRANSPORT))
        keys.extend(stored[i:i + 16] for i in (0, 16, 32))
    return keys


def _vendor_private_values(vendor):
    """The vendor CA's private scalar and its PEM body (what a leaked key file holds)."""
    scalar = vendor.key.private_numbers().private_value.to_bytes(32, "big")
    pem = vendor.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    body = b"".join(pem.splitlines()[1:-1])
    return [scalar, body[:40]]


@pytest.mark.parametrize("kind", ["soft", "pkcs11"])
def test_wrapped_delivery_personalises_the_lot_and_leaves_no_vendor_secret_in_the_line(
        kind, tmp_path, monkeypatch):
    line = make_line(tmp_path, kind, monkeypatch)
    try:
        chip_dir = os.path.join(line.workdir, "chips", "lot-w1")
        lot = lot_mod.make_lot(line, 4, batch="lot-w1", chip_dir=chip_dir)
        transport = _transport_keys_on(lot.chips)
        assert len(set(transport)) == 12  # a key set per chip
        shipped = os.path.join(line.workdir, "shipments", "lot-w1.json")
        with open(shipped) as f:
            doc = json.load(f)
        assert sorted(c["uid"] for c in doc["chips"]) == sorted(m.uid.hex() for m in lot.chips)
        resources = line.resources_for("lot-w1")
        assert resources.shipment is not None
        summary = runner.run_line(resources, lot.chips, EmulatedBuses(), stations=2)
        assert summary.yield_pct == 100.0, summary.failures()
        assert check_invariants(line, lot.chips) == (4, 0)
        assert line.hsm.pool_stats()["device_key_sets"] == 0  # unwrapped sets released
        with pytest.raises(KeyNotFound):  # never imported as a batch set
            line.hsm.transport_keys("lot-w1")
        vendor = lot_mod.vendor_for(line)
        assert os.path.dirname(vendor.key_path) == line.workdir + ".se-vendor"
        assert os.listdir(os.path.join(line.workdir, "vendor")) == [fab.VENDOR_CERT_FILE]
        hits = scan(files_under(line.workdir), transport + _vendor_private_values(vendor))
        assert hits == []
    finally:
        line.close()


def test_line_init_and_run_keep_the_vendor_key_in_the_vendor_folder(tmp_path):
    out = str(tmp_path / "line")
    _ok(CliRunner().invoke(cli, ["line", "init", out], env=_env()))
    _ok(CliRunner().invoke(cli, ["line", "run", "--devices", "2", "--stations", "1",
                                 "--keep-chips", "--out", out], env=_env()))
    vendor = fab.load_or_create_vendor_ca(out + ".se-vendor")
    assert os.stat(vendor.key_path).st_mode & 0o777 == 0o600
    assert os.listdir(os.path.join(out, "vendor")) == [fab.VENDOR_CERT_FILE]
    names = files_under(out)
    assert not any(n.endswith((".key", ".key.pem")) or "transport-keys" in n for n in names)
    assert scan(names, _vendor_private_values(vendor)) == []
    (shipment,) = os.listdir(os.path.join(out, "shipments"))
    assert shipment.startswith("lot-")
    refused = CliRunner().invoke(cli, ["line", "init", str(tmp_path / "other"), "--vendor-dir",
                                       str(tmp_path / "other" / "vendor")], env=_env())
    assert refused.exit_code == 2 and "keys stay with the vendor" in refused.output
    assert not os.path.exists(str(tmp_path / "other" / "vendor" / fab.VENDOR_KEY_FILE))


def test_fab_ship_and_line_run_personalise_fabbed_chips_from_a_wrapped_shipment(tmp_path):
    """`fleetid sim fab` -> `fleetid line init --vendor-dir` -> `fleetid sim ship` ->
    `fleetid line run --chips --shipment`: the vendor's plaintext transport keys stay in
    its transport-keys/ folder; the line gets them wrapped only."""
    vendor_dir, chips, out = (str(tmp_path / n) for n in ("vendor", "chips", "line"))
    shipment = str(tmp_path / "shipment.json")
    _ok(CliRunner().invoke(cli, ["sim", "fab", "--vendor-dir", vendor_dir, "--out", chips,
                                 "--count", "3"]))
    records = [fab.load_fab_record(os.path.join(chips, n), vendor_dir)
               for n in sorted(os.listdir(chips)) if n.endswith(".json")]
    plaintext = [k for r in records for k in (r.transport_keys["enc"], r.transport_keys["mac"],
                                              r.transport_keys["dek"])]
    _ok(CliRunner().invoke(cli, ["line", "init", out, "--vendor-dir", vendor_dir], env=_env()))
    not_rsa = CliRunner().invoke(cli, ["sim", "ship", "--vendor-dir", vendor_dir, "--chips",
                                       chips, "--line-key",
                                       os.path.join(out, "pki", "audit-line.pub.pem"),
                                       "--out", shipment])
    assert not_rsa.exit_code == 1 and "must be an RSA public key" in not_rsa.output
    assert not os.path.exists(shipment)
    _ok(CliRunner().invoke(cli, ["sim", "ship", "--vendor-dir", vendor_dir, "--chips", chips,
                                 "--line-key", os.path.join(out, "pki", "transport-wrap.pub.pem"),
                                 "--lot", "lot-fab", "--out", shipment]))
    assert scan([shipment], plaintext) == []
    result = _ok(CliRunner().invoke(cli, ["line", "run", "--chips", chips, "--shipment",
                                          shipment, "--stations", "2", "--out", out], env=_env()))
    assert "100.00" in result.output
    line = workdir.open_line(out, environ=dict(os.environ, **_env()))
    try:
        for record in records:
            (device,) = line.registry.find_by_se_uid(record.se_uid)
            assert device.status == "committed"
    finally:
        line.close()
    assert scan(files_under(out), plaintext) == []
    again = CliRunner().invoke(cli, ["line", "run", "--chips", chips, "--shipment", shipment,
                                     "--out", out], env=_env())
    assert again.exit_code == 1 and "received already" in again.output


def _tamper(doc, uid, component, vendor=None):
    """Flip one bit of a chip's wrapped key; re-sign the entry when `vendor` is given (a
    shipment corrupted before the vendor signed it)."""
    (entry,) = [c for c in doc["chips"] if c["uid"] == uid.hex()]
    blob = bytearray.fromhex(entry[component])
    blob[10] ^= 0x04
    entry[component] = blob.hex()
    if vendor is not None:
        entry["signature"] = vendor.key.sign(ship.signed_bytes(doc, entry),
                                             ec.ECDSA(hashes.SHA256())).hex()


@pytest.mark.parametrize("kind", ["soft", "pkcs11"])
def test_a_tampered_wrapped_transport_key_is_refused_and_the_chip_not_personalised(
        kind, tmp_path, monkeypatch):
    line = make_line(tmp_path, kind, monkeypatch)
    try:
        lot = lot_mod.make_lot(line, 4, batch="lot-t1")
        vendor = lot_mod.vendor_for(line)
        path = os.path.join(line.workdir, "shipments", "lot-t1.json")
        with open(path) as f:
            doc = json.load(f)
        chips = lot.chips
        _tamper(doc, chips[0].uid, "enc")  # the vendor's signature no longer verifies
        _tamper(doc, chips[1].uid, "mac", vendor)  # signed, but fails RFC 3394's check
        (entry,) = [c for c in doc["chips"] if c["uid"] == chips[2].uid.hex()]
        entry["enc"], entry["dek"] = entry["dek"], entry["enc"]  # valid blobs, wrong places
        entry["signature"] = vendor.key.sign(ship.signed_bytes(doc, entry),
                                             ec.ECDSA(hashes.SHA256())).hex()
        with open(path, "w") as f:
            json.dump(doc, f)
        summary = runner.run_line(line.resources_for("lot-t1"), chips, EmulatedBuses(),
                                  stations=2)
        causes = {r.result.se_uid: r.result for r in summary.runs}
        expected = ["transport_keys:signature", "transport_keys:wrapped_key_invalid",
                    "transport_keys:kcv_mismatch"]
        for made, cause in zip(chips, expected):
            result = causes[made.uid]
            assert (result.ok, result.cause, result.step) == (False, cause, "identify")
            assert result.serial is None  # refused before anything was written
            assert line.registry.find_by_se_uid(made.uid) == []
            assert made.nvm.get("lc") == bytes((C.LC_OP_READY,))
            assert made.nvm.get("scp/%02x" % C.SCP03_KVN_DEVICE) is None
        assert causes[chips[3].uid].ok
        assert check_invariants(line, chips) == (1, 0)
        assert line.hsm.pool_stats()["device_key_sets"] == 0
    finally:
        line.close()


def test_a_shipment_for_another_line_or_from_an_unknown_vendor_is_refused(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import rsa

    from fleetid.cloud.line.shipment import ShipmentError

    line = make_line(tmp_path)
    try:
        vendor = lot_mod.vendor_for(line)
        stranger = fab.load_or_create_vendor_ca(str(tmp_path / "stranger"))
        keys = (os.urandom(16), os.urandom(16), os.urandom(16))
        other_line = rsa.generate_private_key(65537, 3072).public_key()
        cases = [
            (ship.ship_keys(vendor, "lot-x", [(os.urandom(16), keys)], other_line), "recipient"),
            (ship.ship_keys(stranger, "lot-x", [(os.urandom(16), keys)],
                            line.transport_wrapping_key()), "vendor"),
            ({"format": "fleetid-transport-shipment/1", "lot": "lot-x"}, "malformed"),
        ]
        for doc, reason in cases:
            with pytest.raises(ShipmentError) as refused:
                line.receive_shipment(doc)
            assert refused.value.reason == reason
            assert not os.path.exists(os.path.join(line.workdir, "shipments", "lot-x.json"))
        # The KEK was never imported: a good shipment for lot-x is still accepted.
        good = ship.ship_keys(vendor, "lot-x", [(os.urandom(16), keys)],
                              line.transport_wrapping_key())
        assert line.receive_shipment(good) == "lot-x"
    finally:
        line.close()
