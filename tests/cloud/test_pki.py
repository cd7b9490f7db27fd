"""Fleet PKI: root key ceremony, scoped issuing CAs, HSM-signed certificates and CRLs,
on both HSM backends."""

import base64
import datetime
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from fleetid.cloud.hsm import HsmError, KeyNotFound
from fleetid.cloud.pki import (
    PkiError,
    ca_scope,
    fingerprint,
    init_root,
    new_ca,
    sign_certificate,
    sign_crl,
    verify_ceremony,
)
from fleetid.cloud.pki.ceremony import canonical_json
from fleetid.cloud.pki.profiles import device_builder
from tests.cloud.attestation_support import (
    CRL_URL,
    ROOT_SUBJECT,
    SCOPE,
    T0,
    make_pki,
    new_key,
    open_backend,
)


@pytest.fixture(params=["soft", "pkcs11"])
def hsm(request, tmp_path, monkeypatch):
    backend = open_backend(request.param, tmp_path, monkeypatch)
    yield backend
    backend.close()


@pytest.fixture
def pki(hsm, tmp_path):
    root, ca = make_pki(hsm, tmp_path)
    return hsm, root, ca, tmp_path / "ceremony"


def test_root_is_a_self_signed_ca_whose_key_is_the_hsm_key(pki):
    hsm, root, _ca, _dir = pki
    root.verify_directly_issued_by(root)
    assert root.public_key().public_numbers() == hsm.public_key("fleet-root").public_numbers()
    assert root.subject.rfc4514_string() == ROOT_SUBJECT
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length is None
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert root.signature_algorithm_oid == x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert root.not_valid_after_utc - root.not_valid_before_utc >= datetime.timedelta(days=30 * 365)


def test_ceremony_record_names_who_when_what_and_verifies_offline(pki):
    _hsm, root, _ca, directory = pki
    certificate, record = verify_ceremony(str(directory), expected_fingerprint=fingerprint(root))
    assert certificate == root
    assert record["operators"] == ["alice", "bob"]
    assert record["hsm"]["key_label"] == "fleet-root"
    assert record["started_at"] == "2026-10-24T12:00:00Z"
    assert record["root"]["fingerprint_sha256"] == root.fingerprint(hashes.SHA256()).hex()
    loaded = serialization.load_pem_public_key(record["root"]["public_key_pem"].encode())
    assert loaded.public_numbers() == root.public_key().public_numbers()
    # The signature is the root key's, over the canonical JSON of the record.
    signed = json.loads((directory / "ceremony.json").read_text())
    root.public_key().verify(base64.b64decode(signed["signature"]), canonical_json(record),
                             ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("field,value", [("operators", ["mallory"]),
                                         ("completed_at", "2026-10-25T00:00:00Z")])
def test_ceremony_record_edits_are_detected(pki, field, value):
    _hsm, _root, _ca, directory = pki
    path = directory / "ceremony.json"
    signed = json.loads(path.read_text())
    signed["record"][field] = value
    path.write_text(json.dumps(signed))
    with pytest.raises(PkiError) as info:
        verify_ceremony(str(directory))
    assert info.value.reason == PkiError.CEREMONY


def test_ceremony_with_a_substituted_root_is_detected(pki, tmp_path):
    hsm, root, _ca, directory = pki
    # A self-consistent ceremony under another root: fine alone, refused when pinned.
    other_root, _ = init_root(hsm, "other-root", ROOT_SUBJECT, 5, str(tmp_path / "other"), ["eve"])
    verify_ceremony(str(tmp_path / "other"))
    with pytest.raises(PkiError):
        verify_ceremony(str(tmp_path / "other"), expected_fingerprint=fingerprint(root))
    # Swapping only the certificate breaks the record's binding.
    (directory / "root.pem").write_bytes(other_root.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PkiError):
        verify_ceremony(str(directory))


def test_ceremony_refuses_reuse_missing_operators_and_taken_labels(pki, tmp_path):
    hsm, _root, _ca, directory = pki
    with pytest.raises(PkiError) as info:
        init_root(hsm, "root-2", ROOT_SUBJECT, 10, str(directory), ["alice"])
    assert info.value.reason == PkiError.EXISTS
    with pytest.raises(PkiError) as info:
        init_root(hsm, "root-3", ROOT_SUBJECT, 10, str(tmp_path / "x"), [])
    assert info.value.reason == PkiError.BAD_INPUT
    with pytest.raises(HsmError) as info:
        init_root(hsm, "fleet-root", ROOT_SUBJECT, 10, str(tmp_path / "y"), ["alice"])
    assert info.value.reason == HsmError.EXISTS


def test_issuing_ca_is_scoped_constrained_and_signed_by_the_root(pki):
    hsm, root, ca, _dir = pki
    ca.verify_directly_issued_by(root)
    assert ca_scope(ca) == SCOPE
    assert ca.public_key().public_numbers() == hsm.public_key("ca-widget-b42-eu").public_numbers()
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    aki = ca.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(root.public_key()).digest
    assert ca.not_valid_after_utc <= root.not_valid_after_utc


def test_root_to_issuing_ca_to_device_chain_validates_for_client_auth(pki):
    hsm, root, ca, _dir = pki
    device_key = new_key()
    builder = device_builder("identity", "WX-7", device_key.public_key(), ca, T0, crl_url=CRL_URL)
    device = sign_certificate(hsm, "ca-widget-b42-eu", builder, ca.public_key())
    verifier = (verification.PolicyBuilder().store(verification.Store([root])).time(T0)
                .build_client_verifier())
    verified = verifier.verify(device, [ca])
    assert verified.chain == [device, ca, root]
    assert verified.subjects == [x509.UniformResourceIdentifier("urn:fleetid:device:WX-7")]


def test_batch_revocation_is_one_crl_entry_signed_in_the_hsm(pki):
    hsm, root, ca, _dir = pki
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(root.subject)
               .last_update(T0)
               .next_update(T0 + datetime.timedelta(days=30))
               .add_revoked_certificate(x509.RevokedCertificateBuilder()
                                        .serial_number(ca.serial_number)
                                        .revocation_date(T0).build()))
    crl = sign_crl(hsm, "fleet-root", builder, root.public_key())
    assert crl.is_signature_valid(root.public_key())
    assert crl.get_revoked_certificate_by_serial_number(ca.serial_number) is not None


def test_signing_with_the_wrong_hsm_key_is_refused_before_signing(pki):
    hsm, root, ca, _dir = pki
    builder = device_builder("operational", "WX-8", new_key().public_key(), ca, T0)
    with pytest.raises(PkiError) as info:
        sign_certificate(hsm, "fleet-root", builder, ca.public_key())
    assert info.value.reason == PkiError.KEY_MISMATCH
    with pytest.raises(KeyNotFound):
        sign_certificate(hsm, "no-such-key", builder)


def test_new_ca_refuses_wrong_root_label_bad_scope_and_outliving_the_root(pki):
    hsm, root, ca, _dir = pki
    with pytest.raises(PkiError) as info:
        new_ca(hsm, "ca-widget-b42-eu", root, "ca-2", SCOPE)
    assert info.value.reason == PkiError.KEY_MISMATCH
    with pytest.raises(PkiError) as info:
        new_ca(hsm, "fleet-root", root, "ca-3", {"product": "widget", "batch": "b 42",
                                                 "region": "eu"})
    assert info.value.reason == PkiError.BAD_INPUT
    with pytest.raises(PkiError) as info:
        new_ca(hsm, "fleet-root", root, "ca-4", SCOPE, validity=datetime.timedelta(days=365 * 40))
    assert info.value.reason == PkiError.VALIDITY
    # None of the refusals created a key.
    for label in ("ca-2", "ca-3", "ca-4"):
        with pytest.raises(KeyNotFound):
            hsm.public_key(label)


def test_device_certificate_may_not_outlive_its_issuer(pki):
    _hsm, _root, ca, _dir = pki
    with pytest.raises(PkiError) as info:
        device_builder("identity", "WX-9", new_key().public_key(), ca,
                       ca.not_valid_after_utc - datetime.timedelta(days=1))
    assert info.value.reason == PkiError.VALIDITY


class _CorruptingHsm:
    """An HSM whose signatures go bad after `good` of them (a failing backend)."""

    def __init__(self, hsm, good):
        self._hsm, self.good = hsm, good

    def sign(self, label, data):
        if self.good > 0:
            self.good -= 1
            return self._hsm.sign(label, data)
        # A valid-looking DER signature over other bytes.
        return self._hsm.sign(label, b"not the TBS")

    def __getattr__(self, name):
        return getattr(self._hsm, name)


def test_certificate_signer_checks_every_or_only_the_first_signature(pki):
    from cryptography.exceptions import InvalidSignature

    from fleetid.cloud.pki.signing import CertificateSigner

    hsm, _root, ca, _dir = pki

    def builder():
        return device_builder("operational", "WX-9", new_key().public_key(), ca, T0)

    always = CertificateSigner(_CorruptingHsm(hsm, 1), "ca-widget-b42-eu", ca.public_key())
    always.sign(builder()).verify_directly_issued_by(ca)
    with pytest.raises(PkiError) as info:
        always.sign(builder())
    assert info.value.reason == PkiError.BAD_SIGNATURE
    # "first": a backend broken from the start is caught on the first certificate ...
    first = CertificateSigner(_CorruptingHsm(hsm, 0), "ca-widget-b42-eu", ca.public_key(),
                              verify="first")
    with pytest.raises(PkiError):
        first.sign(builder())
    # ... and after one good signature later ones are not re-verified (the verifier's
    # chain check refuses such a certificate at its first use).
    first = CertificateSigner(_CorruptingHsm(hsm, 1), "ca-widget-b42-eu", ca.public_key(),
                              verify="first")
    first.sign(builder()).verify_directly_issued_by(ca)
    with pytest.raises(InvalidSignature):
        first.sign(builder()).verify_directly_issued_by(ca)
    with pytest.raises(PkiError) as info:
        CertificateSigner(hsm, "fleet-root", ca.public_key())
    assert info.value.reason == PkiError.KEY_MISMATCH
    with pytest.raises(PkiError):
        CertificateSigner(hsm, "ca-widget-b42-eu", ca.public_key(), verify="never")


def test_native_signing_gives_the_tbs_route_certificate_and_is_counted(pki):
    """A backend that signs builders itself (the software keystore) gives a certificate
    of the same structure as the TBS route, checked the same way; a forwarding wrapper
    keeps the TBS route, and the counting wrapper counts either kind of signature."""
    from fleetid.cloud.pki.signing import CertificateSigner
    from tests.cloud.attestation_support import CountingHsm

    hsm, _root, ca, _dir = pki
    native = callable(getattr(type(hsm), "sign_certificate", None))
    assert native == (type(hsm).__name__ == "SoftBackend")
    key = new_key().public_key()
    signer = CertificateSigner(hsm, "ca-widget-b42-eu", ca.public_key())
    assert signer._native == native
    cert = signer.sign(device_builder("operational", "WX-9", key, ca, T0))
    cert.verify_directly_issued_by(ca)
    via_tbs = CertificateSigner(_CorruptingHsm(hsm, 1), "ca-widget-b42-eu", ca.public_key())
    assert not via_tbs._native
    other = via_tbs.sign(device_builder("operational", "WX-9", key, ca, T0))
    other.verify_directly_issued_by(ca)
    assert cert.signature_algorithm_oid == other.signature_algorithm_oid
    assert cert.signature_hash_algorithm.name == other.signature_hash_algorithm.name
    assert list(cert.extensions) == list(other.extensions) and cert.subject == other.subject
    counting = CountingHsm(hsm)
    counted = CertificateSigner(counting, "ca-widget-b42-eu", ca.public_key())
    assert counted._native == native
    counted.sign(device_builder("operational", "WX-9", key, ca, T0))
    assert counting.signatures == 1
