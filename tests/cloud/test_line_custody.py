"""Key custody of the line (issue 10): `fleetid line init` adopts an existing fleet root and
issuing CAs (as `fleetid pki init-root` / `fleetid pki new-ca` made them) and creates them
only on the embedded demo path; one issuing CA per product/batch/region, the line choosing
by batch; the audit witness key in a keystore of its own, never the line's."""

import os

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetid.cli.main import cli
from fleetid.cloud.hsm import open_hsm
from fleetid.cloud.hsm.errors import KeyNotFound
from fleetid.cloud.line import workdir
from fleetid.sim import fab
from tests.cloud.hsm_support import KEYSTORE_PASS
from tests.cloud.line_support import make_line


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
