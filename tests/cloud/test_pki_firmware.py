"""`fleetid pki new-fw-key`: a firmware-signing key generated in the HSM and certified by
the fleet root (codeSigning), and the profile of that certificate.  MCUboot images signed
in the HSM (cloud/pki/firmware.sign_firmware_image) checked by imgtool's own `verify`, and
external imgtool public keys read in each encoding `imgtool getpub` writes."""

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from fleetid.cloud.hsm.soft_backend import SoftBackend
from fleetid.cloud.pki.errors import PkiError
from fleetid.cloud.pki.firmware import (ImageError, load_firmware_public_key, parse_version,
                                        sign_firmware_image)
from tests.cloud.hsm_support import KEYSTORE_PASS, TEST_SCRYPT_N
from tests.cloud.test_pki_cli import _run, _soft_uri
from tests.device.boot_support import imgtool


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


def test_an_image_signed_in_the_hsm_passes_imgtool_verify_and_a_tampered_one_fails(tmp_path):
    hsm = SoftBackend(tmp_path / "ks.json", KEYSTORE_PASS, scrypt_n=TEST_SCRYPT_N)
    try:
        hsm.generate_signing_key("fw")
        hsm.generate_signing_key("other")
        image = sign_firmware_image(hsm, "fw", b"\x11" * 5000, "3.1.4+15", 9)
        public = hsm.public_key("fw")
        (tmp_path / "fw.pub.pem").write_bytes(public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (tmp_path / "image.bin").write_bytes(image)
        out = imgtool("verify", "-k", tmp_path / "fw.pub.pem", tmp_path / "image.bin")
        assert "Image was correctly validated" in out and "3.1.4+15" in out
        tampered = bytearray(image)
        tampered[0x200 + 100] ^= 1
        (tmp_path / "tampered.bin").write_bytes(bytes(tampered))
        with pytest.raises(AssertionError, match="verify failed"):
            imgtool("verify", "-k", tmp_path / "fw.pub.pem", tmp_path / "tampered.bin")
        # Refusals before anything is signed.
        with pytest.raises(ImageError, match="oversized: image"):
            sign_firmware_image(hsm, "fw", b"\x11" * 5000, "1.0.0", 1, max_size=4096)
        with pytest.raises(ImageError, match="security_counter"):
            sign_firmware_image(hsm, "fw", b"", "1.0.0", 2 ** 32)
    finally:
        hsm.close()


@pytest.mark.parametrize("load_addr", [0, 0x20008000])
def test_an_hsm_signed_image_is_byte_for_byte_what_imgtool_sign_fix_sig_writes(tmp_path,
                                                                               load_addr):
    """The image equals `imgtool sign --fix-sig` given the HSM's signature and public key:
    header (with imgtool's RAM_LOAD flag for a load address), pad, payload, SEC_CNT, hash,
    KEYHASH and the signature TLV, all in imgtool's order."""
    import base64

    from tests.device.boot_support import split_image
    hsm = SoftBackend(tmp_path / "ks.json", KEYSTORE_PASS, scrypt_n=TEST_SCRYPT_N)
    try:
        hsm.generate_signing_key("fw")
        payload = bytes(range(256)) * 7 + b"\x5a"
        image = sign_firmware_image(hsm, "fw", payload, "2.7.1+3", 11, load_addr=load_addr)
        (tmp_path / "fw.pub.pem").write_bytes(hsm.public_key("fw").public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    finally:
        hsm.close()
    signature = dict(split_image(image)[1])[0x22]  # ECDSASIG
    (tmp_path / "sig.b64").write_bytes(base64.b64encode(signature))
    (tmp_path / "app.bin").write_bytes(payload)
    imgtool("sign", "--pad-header", "-H", 0x200, "-S", 0x100000, "-v", "2.7.1+3", "-s", 11,
            "--load-addr", load_addr, "--fix-sig", tmp_path / "sig.b64", "--fix-sig-pubkey",
            tmp_path / "fw.pub.pem", tmp_path / "app.bin", tmp_path / "theirs.bin")
    assert image == (tmp_path / "theirs.bin").read_bytes()


@pytest.mark.parametrize("text, expected", [
    ("1", (1, 0, 0, 0)), ("1.2.3+4", (1, 2, 3, 4)), ("255.255.65535+4294967295",
                                                   (255, 255, 65535, 4294967295))])
def test_image_versions_as_imgtool_writes_them(text, expected):
    assert parse_version(text) == expected


@pytest.mark.parametrize("text", ["", "1.2.3.4", "256", "1.2.65536", "1+", "1+4294967296",
                                  "a.b", "1.\u00b2", "-1"])
def test_malformed_image_versions_are_refused(text):
    with pytest.raises(ImageError, match="version"):
        parse_version(text)


@pytest.mark.parametrize("encoding", ["lang-c", "lang-rust", "pem", "raw"])
def test_an_imgtool_public_key_is_read_in_every_getpub_encoding(tmp_path, encoding):
    key = tmp_path / "k.pem"
    imgtool("keygen", "-k", key, "-t", "ecdsa-p256")
    imgtool("getpub", "-k", key, "-e", encoding, "-o", tmp_path / "k.pub")
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    loaded = load_firmware_public_key((tmp_path / "k.pub").read_bytes())
    assert loaded.public_numbers() == private.public_key().public_numbers()
    with pytest.raises(PkiError, match="is a private key"):
        load_firmware_public_key(key.read_bytes(), "k.pem")
    with pytest.raises(PkiError, match="k.pub: not a PEM or DER"):
        load_firmware_public_key(b"garbage", "k.pub")
