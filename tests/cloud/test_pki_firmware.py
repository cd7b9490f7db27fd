"""`fleetid pki new-fw-key`: a firmware-signing key generated in the HSM and certified by
the fleet root (codeSigning), and the profile of that certificate."""

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.cloud.test_pki_cli import _run, _soft_uri


def test_new_fw_key_is_a_code_signing_certificate_under_the_root(tmp_path):
    uri = _soft_uri(tmp_path)
    ceremony = tmp_path / "ceremony"
    assert _run(["pki", "init-root", "--hsm", uri, "--label", "fleet-root",
                 "--subject", "CN=Acme Fleet Root,O=Acme", "--ceremony-dir", str(ceremony),
                 "--operator", "Alice Ng", "--operator", "Bob Roy"]).exit_code == 0
    out = tmp_path / "fw.pem"
    result = _run(["pki", "new-fw-key", "--hsm", uri, "--root-label", "fleet-root",
                   "--root-cert", str(ceremony / "root.pem"), "--label", "firmware-2027",
                   "--name", "Acme firmware 2027", "--out", str(out)])
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    root = x509.load_pem_x509_certificate((ceremony / "root.pem").read_bytes())
    cert.verify_directly_issued_by(root)
    assert "%x" % cert.serial_number in result.output
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CODE_SIGNING]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The key is in the HSM under its label: a second run with the label is refused,
    # --existing certifies it again.
    again = _run(["pki", "new-fw-key", "--hsm", uri, "--root-label", "fleet-root",
                  "--root-cert", str(ceremony / "root.pem"), "--label", "firmware-2027",
                  "--name", "x", "--out", str(tmp_path / "fw2.pem")])
    assert again.exit_code == 1 and "Traceback" not in again.output
    existing = _run(["pki", "new-fw-key", "--hsm", uri, "--root-label", "fleet-root",
                     "--root-cert", str(ceremony / "root.pem"), "--label", "firmware-2027",
                     "--existing", "--name", "again", "--out", str(tmp_path / "fw3.pem")])
    assert existing.exit_code == 0, existing.output
    second = x509.load_pem_x509_certificate((tmp_path / "fw3.pem").read_bytes())
    assert second.public_key() == cert.public_key()
