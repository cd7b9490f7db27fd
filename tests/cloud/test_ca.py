"""The attestation-gated issuing CA: honest issuance, the attack set, nonce rules, fuzz."""

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetid.cloud.ca import (
    REASONS,
    AttestationError,
    EvidenceVerifier,
    IssuanceRefused,
    IssuingCa,
    verify_attestation_extension,
)
from fleetid.cloud.ca.evidence import ATTESTATION_EXTENSION_OID, attestation_extension
from fleetid.cloud.pki import PkiError, sign_certificate
from fleetid.cloud.pki.profiles import device_builder
from fleetid.common import attestation, csr, der, se_consts
from fleetid.common.errors import DerError
from fleetid.common.oids import OID_ATTR_EVIDENCE
from tests.cloud.attestation_support import (
    CRL_URL,
    DEFAULT_POLICY,
    T0,
    CountingHsm,
    SoftVendor,
    enrolment,
    make_csr,
    make_pki,
    new_key,
    open_backend,
)

SERIAL = "WX-000042"


@pytest.fixture(scope="module")
def vendor():
    return SoftVendor(intermediate=True)


@pytest.fixture(scope="module")
def soft_pki(tmp_path_factory):
    """One soft-HSM root + issuing CA for the whole module (the keystore open is the slow
    part); every test gets its own IssuingCa and nonce store on top."""
    directory = tmp_path_factory.mktemp("pki")
    hsm = open_backend("soft", directory, None)
    root, ca_cert = make_pki(hsm, directory)
    yield hsm, root, ca_cert
    hsm.close()


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, **delta):
        self.now += datetime.timedelta(**delta)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def chip(vendor):
    return vendor.make_chip()


@pytest.fixture
def ca(soft_pki, vendor, clock):
    hsm, _root, ca_cert = soft_pki
    return IssuingCa(CountingHsm(hsm), "ca-widget-b42-eu", ca_cert, [vendor.root], clock=clock,
                     crl_url=CRL_URL)


def refused(ca, csr, se_uid, reason, serial=SERIAL):
    """Assert issue() refuses with `reason` and signs nothing."""
    before = ca.hsm.signatures
    with pytest.raises(IssuanceRefused) as info:
        ca.issue(csr, se_uid, serial, "identity")
    assert info.value.reason == reason, info.value
    assert ca.hsm.signatures == before
    return info.value


def client_verify(root, ca_cert, cert, at=T0):
    verifier = (verification.PolicyBuilder().store(verification.Store([root])).time(at)
                .build_client_verifier())
    return verifier.verify(cert, [ca_cert])


# -- honest issuance -----------------------------------------------------------------------


def test_attested_csr_gets_a_device_certificate_that_chains_to_the_root(ca, chip, soft_pki):
    _hsm, root, ca_cert = soft_pki
    key, csr = enrolment(chip, ca.issue_nonce(), SERIAL)
    cert = ca.issue(csr, chip.se_uid, SERIAL, "identity")

    verified = client_verify(root, ca_cert, cert)
    assert [c.subject for c in verified.chain] == [cert.subject, ca_cert.subject, root.subject]
    assert verified.subjects == [x509.UniformResourceIdentifier("urn:fleetid:device:" + SERIAL)]
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    extension = cert.extensions.get_extension_for_oid(ATTESTATION_EXTENSION_OID)
    assert extension.critical is False
    statement = verify_attestation_extension(cert, [chip.vendor.root], chip.se_uid)
    assert statement.se_uid == chip.se_uid
    assert statement.key_policy == DEFAULT_POLICY
    # The SE stores the certificate in one slot: it must fit.
    assert len(cert.public_bytes(serialization.Encoding.DER)) <= se_consts.CERT_MAX


def test_device_certificate_follows_the_identity_and_operational_profiles(ca, chip):
    cert = ca.issue(enrolment(chip, ca.issue_nonce(), SERIAL)[1], chip.se_uid, SERIAL, "identity")
    ext = cert.extensions
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == SERIAL
    assert cert.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value == SERIAL
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        x509.ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    )
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == (
        ca.ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        .value.digest
    )
    dp = ext.get_extension_for_class(x509.CRLDistributionPoints).value[0]
    assert dp.full_name == [x509.UniformResourceIdentifier(CRL_URL)]
    identity_life = cert.not_valid_after_utc - T0
    assert identity_life > datetime.timedelta(days=5 * 365)

    op = ca.issue(enrolment(chip, ca.issue_nonce(), SERIAL, slot=2)[1], chip.se_uid, SERIAL,
                  "operational")
    assert op.not_valid_after_utc - T0 == datetime.timedelta(days=30)
    assert op.serial_number != cert.serial_number


def test_issuance_through_softhsm2_chains_and_rechecks(vendor, tmp_path, monkeypatch):
    hsm = open_backend("pkcs11", tmp_path, monkeypatch)
    try:
        root, ca_cert = make_pki(hsm, tmp_path)
        ca = IssuingCa(hsm, "ca-widget-b42-eu", ca_cert, [vendor.root], clock=lambda: T0)
        chip = vendor.make_chip()
        cert = ca.issue(enrolment(chip, ca.issue_nonce(), SERIAL)[1], chip.se_uid, SERIAL,
                        "identity")
        client_verify(root, ca_cert, cert)
        cert.verify_directly_issued_by(ca_cert)
        assert verify_attestation_extension(cert, [vendor.root], chip.se_uid).se_uid == chip.se_uid
    finally:
        hsm.close()


def test_nonce_is_consumed_and_bound_to_the_csr_key(ca, chip):
    nonce = ca.issue_nonce()
    key, csr = enrolment(chip, nonce, SERIAL)
    ca.issue(csr, chip.se_uid, SERIAL, "identity")
    consumed_at, bound_key = ca.nonce_store.binding(nonce)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    assert consumed_at == T0
    assert bound_key == hashes_sha256(spki)


def hashes_sha256(data):
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


# -- the attack set: each refused with its reason, nothing signed --------------------------


def test_counterfeit_chip_from_an_unknown_vendor_is_refused(ca):
    counterfeit = SoftVendor("Cloned Chips Ltd").make_chip()
    nonce = ca.issue_nonce()
    refused(ca, enrolment(counterfeit, nonce, SERIAL)[1], counterfeit.se_uid, "unknown_vendor")
    # Unauthenticated evidence does not burn the nonce (no DoS by quoting nonces).
    assert ca.nonce_store.binding(nonce) is None


def test_counterfeit_chain_that_reuses_the_genuine_vendor_names_is_refused(ca, vendor):
    # Same subject names as the genuine vendor, different keys: only the keys count.
    fake_vendor = SoftVendor(vendor.name, intermediate=True)
    fake = fake_vendor.make_chip()
    refused(ca, enrolment(fake, ca.issue_nonce(), SERIAL)[1], fake.se_uid, "unknown_vendor")


def test_genuine_mak_chain_missing_its_intermediate_is_refused(ca, chip):
    nonce = ca.issue_nonce()
    key = new_key()
    bundle = chip.evidence(key.public_key(), nonce, chain=chip.chain[:1])
    refused(ca, make_csr(key, SERIAL, bundle), chip.se_uid, "unknown_vendor")


def test_expired_mak_certificate_is_refused(ca, vendor):
    chip = vendor.make_chip(not_after=T0 - datetime.timedelta(days=1))
    refused(ca, enrolment(chip, ca.issue_nonce(), SERIAL)[1], chip.se_uid, "unknown_vendor")


def test_mak_certificate_flagged_as_ca_is_refused(ca, vendor):
    chip = vendor.make_chip(ca=True)
    refused(ca, enrolment(chip, ca.issue_nonce(), SERIAL)[1], chip.se_uid, "bad_evidence")


def test_attested_key_differs_from_csr_key_is_refused_and_burns_the_nonce(ca, chip):
    nonce = ca.issue_nonce()
    attested, other = new_key(), new_key()
    csr = make_csr(other, SERIAL, chip.evidence(attested.public_key(), nonce))
    refused(ca, csr, chip.se_uid, "key_mismatch")
    # Authentic evidence was used up: the honest retry with that nonce is a replay.
    refused(ca, enrolment(chip, nonce, SERIAL)[1], chip.se_uid, "nonce_replayed")


def test_replayed_nonce_is_refused(ca, chip):
    nonce = ca.issue_nonce()
    ca.issue(enrolment(chip, nonce, SERIAL)[1], chip.se_uid, SERIAL, "identity")
    refused(ca, enrolment(chip, nonce, SERIAL)[1], chip.se_uid, "nonce_replayed")


def test_replaying_the_same_csr_is_refused(ca, chip):
    _key, csr = enrolment(chip, ca.issue_nonce(), SERIAL)
    ca.issue(csr, chip.se_uid, SERIAL, "identity")
    refused(ca, csr, chip.se_uid, "nonce_replayed")


def test_expired_nonce_is_refused(ca, chip, clock):
    nonce = ca.issue_nonce()
    clock.advance(seconds=ca.nonce_ttl.total_seconds())
    refused(ca, enrolment(chip, nonce, SERIAL)[1], chip.se_uid, "nonce_expired")


def test_nonce_is_usable_until_just_before_its_ttl(ca, chip, clock):
    nonce = ca.issue_nonce()
    clock.advance(seconds=ca.nonce_ttl.total_seconds() - 1)
    ca.issue(enrolment(chip, nonce, SERIAL)[1], chip.se_uid, SERIAL, "identity")


def test_nonce_not_issued_by_this_ca_is_refused(ca, chip, soft_pki, vendor):
    hsm, _root, ca_cert = soft_pki
    other_ca = IssuingCa(hsm, "ca-widget-b42-eu", ca_cert, [vendor.root], clock=lambda: T0)
    refused(ca, enrolment(chip, other_ca.issue_nonce(), SERIAL)[1], chip.se_uid, "nonce_unknown")


def test_wrong_se_uid_is_refused_and_burns_the_nonce(ca, chip, vendor):
    nonce = ca.issue_nonce()
    _key, csr = enrolment(chip, nonce, SERIAL)
    refused(ca, csr, vendor.make_chip().se_uid, "se_uid_mismatch")
    refused(ca, csr, chip.se_uid, "nonce_replayed")


def test_csr_without_evidence_is_refused(ca, chip):
    ca.issue_nonce()
    refused(ca, make_csr(new_key(), SERIAL), chip.se_uid, "no_evidence")


def test_tampered_statement_is_refused(ca, chip):
    nonce = ca.issue_nonce()
    key = new_key()
    signed = attestation.decode_signed_attestation(chip.attest(key.public_key(), nonce))
    # Claim a different UID in the statement but keep the MAK's signature over the original.
    forged_statement = chip.statement(key.public_key(), nonce, se_uid=bytes(16))
    forged = attestation.encode_signed_attestation(forged_statement, signed.signature_der)
    bundle = attestation.encode_evidence_bundle([forged], chip.chain)
    refused(ca, make_csr(key, SERIAL, bundle), bytes(16), "bad_statement_signature")
    assert ca.nonce_store.binding(nonce) is None


def test_statement_signed_by_another_chips_mak_is_refused(ca, chip, vendor):
    nonce = ca.issue_nonce()
    key = new_key()
    other = vendor.make_chip()
    signed = chip.sign_statement(chip.statement(key.public_key(), nonce), mak_key=other.mak_key)
    bundle = attestation.encode_evidence_bundle([signed], chip.chain)
    refused(ca, make_csr(key, SERIAL, bundle), chip.se_uid, "bad_statement_signature")


def test_bad_csr_signature_is_refused_as_no_proof_of_possession(ca, chip):
    nonce = ca.issue_nonce()
    key = new_key()
    # Genuine evidence for `key`, but the CSR is signed by someone without it.
    csr = make_csr(new_key(), SERIAL, chip.evidence(key.public_key(), nonce),
                   public_key=key.public_key())
    refused(ca, csr, chip.se_uid, "bad_pop")
    assert ca.nonce_store.binding(nonce) is None


@pytest.mark.parametrize(
    "policy",
    [
        se_consts.POLICY_SIGN | se_consts.POLICY_NON_EXPORTABLE,  # imported, not generated
        se_consts.POLICY_SIGN | se_consts.POLICY_GENERATED_ON_CHIP,  # exportable
        se_consts.POLICY_ECDH | se_consts.POLICY_NON_EXPORTABLE
        | se_consts.POLICY_GENERATED_ON_CHIP,  # ECDH only
        DEFAULT_POLICY | se_consts.POLICY_ATTEST,  # the MAK itself
    ],
)
def test_key_without_the_required_policy_is_refused(ca, chip, policy):
    refused(ca, enrolment(chip, ca.issue_nonce(), SERIAL, policy=policy)[1], chip.se_uid,
            "policy")


def test_terminated_chip_is_refused(ca, chip):
    csr = enrolment(chip, ca.issue_nonce(), SERIAL, life_cycle=se_consts.LC_TERMINATED)[1]
    refused(ca, csr, chip.se_uid, "policy")


def test_two_evidence_attributes_are_refused(ca, chip):
    nonce = ca.issue_nonce()
    key = new_key()
    bundle = chip.evidence(key.public_key(), nonce)
    extra = attestation.build_evidence_attribute(bundle)
    refused(ca, make_csr(key, SERIAL, bundle, extra_attributes=[extra]), chip.se_uid,
            "bad_evidence")


def test_malformed_evidence_bundle_is_refused(ca, chip):
    key = new_key()
    info = csr.info_parts(
        SERIAL, SERIAL, der.encode_p256_spki(chip_point(key)),
        [(OID_ATTR_EVIDENCE, [der.encode_sequence([])])],
    )
    csr_der = csr.finish(info, key.sign(b"".join(info), ec.ECDSA(hashes.SHA256())))
    refused(ca, csr_der, chip.se_uid, "bad_evidence")


def chip_point(key):
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


def test_non_p256_csr_is_refused_as_bad_csr(ca, chip):
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, SERIAL)]))
           .sign(key, hashes.SHA256()))
    refused(ca, csr.public_bytes(serialization.Encoding.DER), chip.se_uid, "bad_csr")


def test_caller_mistakes_raise_before_any_state_changes(ca, chip):
    nonce = ca.issue_nonce()
    _key, csr = enrolment(chip, nonce, SERIAL)
    with pytest.raises(PkiError) as info:
        ca.issue(csr, chip.se_uid, "bad serial!", "identity")
    assert info.value.reason == PkiError.BAD_INPUT
    with pytest.raises(PkiError):
        ca.issue(csr, chip.se_uid, SERIAL, "lifetime")
    assert ca.nonce_store.binding(nonce) is None
    ca.issue(csr, chip.se_uid, SERIAL, "identity")  # still usable


def test_every_reason_code_is_in_the_fixed_set():
    with pytest.raises(ValueError):
        IssuanceRefused("because")
    assert len(set(REASONS)) == 12


# -- offline re-check of the extension -------------------------------------------------------


def test_extension_recheck_refuses_wrong_uid_unknown_vendor_and_missing_extension(ca, chip):
    cert = ca.issue(enrolment(chip, ca.issue_nonce(), SERIAL)[1], chip.se_uid, SERIAL, "identity")
    with pytest.raises(AttestationError) as info:
        verify_attestation_extension(cert, [chip.vendor.root], expected_se_uid=bytes(16))
    assert info.value.reason == "se_uid_mismatch"
    with pytest.raises(AttestationError) as info:
        verify_attestation_extension(cert, [SoftVendor("Other").root])
    assert info.value.reason == "unknown_vendor"
    with pytest.raises(AttestationError) as info:
        verify_attestation_extension(ca.ca_certificate, [chip.vendor.root])
    assert info.value.reason == "no_evidence"


def test_extension_recheck_uses_issuance_time_not_today(ca, vendor):
    chip = vendor.make_chip(not_after=T0 + datetime.timedelta(days=2))
    cert = ca.issue(enrolment(chip, ca.issue_nonce(), SERIAL)[1], chip.se_uid, SERIAL, "identity")
    later = T0 + datetime.timedelta(days=400)
    verifier = EvidenceVerifier([vendor.root])
    assert verifier.verify_certificate(cert).se_uid == chip.se_uid
    with pytest.raises(AttestationError) as info:
        verifier.verify_certificate(cert, at=later)
    assert info.value.reason == "unknown_vendor"


def test_extension_copied_onto_a_certificate_for_another_key_is_refused(ca, chip, soft_pki):
    hsm, _root, ca_cert = soft_pki
    genuine = ca.issue(enrolment(chip, ca.issue_nonce(), SERIAL)[1], chip.se_uid, SERIAL,
                       "identity")
    copied = genuine.extensions.get_extension_for_oid(ATTESTATION_EXTENSION_OID).value.value
    # An insider with CA credentials certifies a software key, pasting genuine evidence.
    builder = device_builder("identity", SERIAL, new_key().public_key(), ca_cert, T0,
                             extra_extensions=[(attestation_extension(copied), False)])
    forged = sign_certificate(hsm, "ca-widget-b42-eu", builder)
    with pytest.raises(AttestationError) as info:
        verify_attestation_extension(forged, [chip.vendor.root], chip.se_uid)
    assert info.value.reason == "key_mismatch"


# -- fuzz: whatever bytes arrive, only IssuanceRefused ---------------------------------------


@pytest.fixture(scope="module")
def fuzz_target(soft_pki, vendor):
    hsm, _root, ca_cert = soft_pki
    ca = IssuingCa(CountingHsm(hsm), "ca-widget-b42-eu", ca_cert, [vendor.root],
                   clock=lambda: T0)
    chip = vendor.make_chip()
    _key, csr = enrolment(chip, ca.issue_nonce(), SERIAL)
    # Fixed per module: hypothesis needs the same inputs on every replay.
    evidence_key = new_key()
    evidence = chip.evidence(evidence_key.public_key(), b"\x01" * 32)
    return ca, chip, csr, evidence_key, evidence


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes_are_only_ever_refused(fuzz_target, data):
    ca, chip, _csr, _key, _evidence = fuzz_target
    before = ca.hsm.signatures
    with pytest.raises(IssuanceRefused):
        ca.issue(data, chip.se_uid, SERIAL, "identity")
    assert ca.hsm.signatures == before


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_csrs_are_only_ever_refused(fuzz_target, data):
    ca, chip, csr, _key, _evidence = fuzz_target
    mutated = bytearray(csr)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(mutated) - 1))
        if kind == "flip":
            mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set":
            mutated[pos] = data.draw(st.sampled_from([0x00, 0x7F, 0x80, 0x81, 0xFF]))
        elif kind == "cut":
            del mutated[pos:]
            if not mutated:
                mutated.append(0x30)
        else:
            mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    before = ca.hsm.signatures
    if bytes(mutated) == csr:
        return
    with pytest.raises(IssuanceRefused) as info:
        ca.issue(bytes(mutated), chip.se_uid, SERIAL, "identity")
    assert info.value.reason in REASONS
    assert ca.hsm.signatures == before


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_evidence_in_a_validly_signed_csr_is_only_ever_refused(fuzz_target, data):
    ca, chip, _csr, evidence_key, evidence = fuzz_target
    key, bundle = evidence_key, bytearray(evidence)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(bundle) - 1))
        if data.draw(st.booleans()):
            bundle[pos] ^= 1 << data.draw(st.integers(0, 7))
        else:
            bundle[pos] = data.draw(st.sampled_from([0x00, 0x30, 0x7F, 0x80, 0x82, 0xFF]))
    # Any well-formed DER element may ride in the attribute; the CA must judge it.
    try:
        der.check_single(bytes(bundle))
    except DerError:
        bundle = der.encode_octet_string(bytes(bundle))
    info = csr.info_parts(SERIAL, SERIAL, der.encode_p256_spki(chip_point(key)),
                          [(OID_ATTR_EVIDENCE, [bytes(bundle)])])
    csr_der = csr.finish(info, key.sign(b"".join(info), ec.ECDSA(hashes.SHA256())))
    before = ca.hsm.signatures
    with pytest.raises(IssuanceRefused) as info:
        ca.issue(csr_der, chip.se_uid, SERIAL, "identity")
    assert info.value.reason in REASONS
    assert ca.hsm.signatures == before


# -- nonce store ----------------------------------------------------------------------------


def test_parallel_requests_with_one_nonce_issue_exactly_one_certificate(ca, chip):
    import threading

    _key, csr = enrolment(chip, ca.issue_nonce(), SERIAL)
    outcomes = []

    def station():
        try:
            ca.issue(csr, chip.se_uid, SERIAL, "identity")
            outcomes.append("issued")
        except IssuanceRefused as exc:
            outcomes.append(exc.reason)

    threads = [threading.Thread(target=station) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["issued"] + ["nonce_replayed"] * 7


def test_nonce_store_expiry_purge_and_bound():
    from fleetid.cloud.ca import InMemoryNonceStore, NonceRefused

    store = InMemoryNonceStore(max_outstanding=2)
    ttl = datetime.timedelta(minutes=5)
    store.add(b"a", T0, T0 + ttl)
    with pytest.raises(ValueError):
        store.add(b"a", T0, T0 + ttl)
    store.add(b"b", T0 + datetime.timedelta(minutes=1), T0 + datetime.timedelta(minutes=6))
    # Full: at T0+5 min "a" has expired and is purged to make room.
    store.add(b"c", T0 + ttl, T0 + 2 * ttl)
    with pytest.raises(NonceRefused) as info:
        store.consume(b"a", T0 + ttl, b"k")
    assert info.value.reason == "nonce_unknown"
    # Full with nothing expired: the oldest outstanding nonce ("b") is dropped.
    store.add(b"d", T0 + ttl, T0 + 2 * ttl)
    with pytest.raises(NonceRefused) as info:
        store.consume(b"b", T0 + ttl, b"k")
    assert info.value.reason == "nonce_unknown"
    store.consume(b"c", T0 + ttl, b"key-1")
    assert store.binding(b"c") == (T0 + ttl, b"key-1")
    with pytest.raises(NonceRefused) as info:
        store.consume(b"c", T0 + ttl, b"key-1")
    assert info.value.reason == "nonce_replayed"
    with pytest.raises(NonceRefused) as info:
        store.consume(b"d", T0 + 2 * ttl, b"k")
    assert info.value.reason == "nonce_expired"
    assert store.purge(T0 + 2 * ttl) == 1  # "d"; the consumed "c" is kept
    assert len(store) == 1


def test_mak_chain_verdict_is_cached_per_exact_chain_and_only_inside_its_validity(vendor):
    from fleetid.cloud.ca.evidence import EvidenceVerifier

    verifier = EvidenceVerifier([vendor.root])
    chip = vendor.make_chip(not_after=T0 + datetime.timedelta(days=1))
    bundles = [chip.evidence(new_key().public_key(), b"n" * 32) for _ in range(3)]
    for bundle in bundles:
        verifier.authenticate(bundle, T0)
    assert verifier.chain_cache_hits == 2
    # Outside the MAK certificate's validity the cached verdict does not apply.
    with pytest.raises(AttestationError) as info:
        verifier.authenticate(bundles[0], T0 + datetime.timedelta(days=2))
    assert info.value.reason == "unknown_vendor"
    assert verifier.chain_cache_hits == 2
    # Another chip's chain is another key: validated on its own.
    other = vendor.make_chip()
    verifier.authenticate(other.evidence(new_key().public_key(), b"m" * 32), T0)
    assert verifier.chain_cache_hits == 2
    # A statement's signature is still checked on a cache hit: another chip's statement
    # under this chip's (cached) chain is refused.
    hits = verifier.chain_cache_hits
    mixed = attestation.encode_evidence_bundle(
        [other.attest(new_key().public_key(), b"m" * 32)], chip.chain)
    with pytest.raises(AttestationError) as info:
        verifier.authenticate(mixed, T0)
    assert info.value.reason == "bad_statement_signature"
    assert verifier.chain_cache_hits == hits + 1
