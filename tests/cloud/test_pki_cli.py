"""`fleetid pki ...`: ceremony, issuing CA and record check from the command line."""

import json

from click.testing import CliRunner
from cryptography import x509

from fleetid.cli.main import cli
from fleetid.cloud.hsm.soft_backend import SoftBackend
from tests.cloud.hsm_support import KEYSTORE_PASS, TEST_SCRYPT_N


def _soft_uri(tmp_path):
    # Create the keystore with the fast test KDF cost; the CLI then opens it as-is.
    path = tmp_path / "keystore.json"
    SoftBackend(path, KEYSTORE_PASS, scrypt_n=TEST_SCRYPT_N).close()
    return "soft:%s;pass-env=FLEETID_TEST_PASS" % path


def _run(args):
    return CliRunner().invoke(cli, args, env={"FLEETID_TEST_PASS": KEYSTORE_PASS},
                              catch_exceptions=False)


def test_init_root_new_ca_and_show_ceremony(tmp_path):
    uri = _soft_uri(tmp_path)
    ceremony = tmp_path / "ceremony"
    result = _run(["pki", "init-root", "--hsm", uri, "--label", "fleet-root",
                   "--subject", "CN=Acme Fleet Root,O=Acme", "--ceremony-dir", str(ceremony),
                   "--operator", "Alice Ng", "--operator", "Bob Roy"])
    assert result.exit_code == 0, result.output
    record = json.loads((ceremony / "ceremony.json").read_text())["record"]
    assert record["operators"] == ["Alice Ng", "Bob Roy"]
    fp = record["root"]["fingerprint_sha256"]
    assert fp in result.output

    out = tmp_path / "ca.pem"
    result = _run(["pki", "new-ca", "--hsm", uri, "--root-label", "fleet-root",
                   "--root-cert", str(ceremony / "root.pem"), "--label", "ca-w-b1-eu",
                   "--product", "w", "--batch", "b1", "--region", "eu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    ca = x509.load_pem_x509_certificate(out.read_bytes())
    root = x509.load_pem_x509_certificate((ceremony / "root.pem").read_bytes())
    ca.verify_directly_issued_by(root)

    result = _run(["pki", "show-ceremony", str(ceremony), "--fingerprint", fp])
    assert result.exit_code == 0, result.output
    assert "Alice Ng, Bob Roy" in result.output

    result = _run(["pki", "show-ceremony", str(ceremony), "--fingerprint", "00" * 32])
    assert result.exit_code == 1
    assert "fingerprint differs" in result.output


def test_cli_errors_are_short_messages_not_tracebacks(tmp_path):
    uri = _soft_uri(tmp_path)
    result = _run(["pki", "new-ca", "--hsm", uri, "--root-label", "nope",
                   "--root-cert", __file__, "--label", "x", "--product", "p", "--batch", "b",
                   "--region", "r", "--out", str(tmp_path / "o.pem")])
    assert result.exit_code == 1
    assert "not a PEM certificate" in result.output
    result = _run(["pki", "init-root", "--hsm", "soft:%s;pass-env=UNSET_VAR" % tmp_path,
                   "--label", "r", "--subject", "CN=x", "--ceremony-dir", str(tmp_path / "c"),
                   "--operator", "a"])
    assert result.exit_code == 1
    assert "Error:" in result.output and "Traceback" not in result.output


def test_help_shows_examples():
    for command in ("init-root", "new-ca", "show-ceremony"):
        result = _run(["pki", command, "--help"])
        assert result.exit_code == 0
        assert "Example" in result.output
