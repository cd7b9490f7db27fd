"""Attestation statements: the portable codec against the normative asn1crypto classes."""

import datetime
import hashlib

import pytest
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetid.common import attestation, csr, der
from fleetid.common.der import REASON_ALGORITHM, REASON_RANGE
from fleetid.common.errors import DerError
from fleetid.common.host import asn1
from fleetid.common.oids import OID_ATTR_EVIDENCE

# A few fixed keys: deterministic, so hypothesis examples replay.
KEYS = [ec.derive_private_key(k, ec.SECP256R1()) for k in (3, 0xC0FFEE, 2**200 + 7)]
MAK = ec.derive_private_key(0x5E0A77E57, ec.SECP256R1())


def _point(key):
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _spki(key):
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _sign(data):
    return MAK.sign(data, ec.ECDSA(hashes.SHA256()))


@pytest.fixture(scope="module")
def mak_certificate():
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SE vendor MAK test")])
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(MAK.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(MAK, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


FIELDS = dict(
    se_uid=bytes(range(16)),
    slot=1,
    key_index=0,
    key_policy=0xC1,
    life_cycle=0x0F,
    firmware_version=b"\x01\x02\x03",
    nonce=b"\xa5" * 32,
)

statement_fields = st.fixed_dictionaries(
    dict(
        se_uid=st.binary(min_size=16, max_size=16),
        slot=st.integers(0, 255),
        key_index=st.integers(0, len(KEYS) - 1),
        key_policy=st.integers(0, 255),
        life_cycle=st.integers(0, 255),
        firmware_version=st.binary(min_size=3, max_size=3),
        nonce=st.binary(min_size=1, max_size=64),
    )
)


def _portable_statement(f):
    return attestation.encode_statement(
        f["se_uid"],
        f["slot"],
        _point(KEYS[f["key_index"]]),
        f["key_policy"],
        f["life_cycle"],
        f["firmware_version"],
        f["nonce"],
    )


def _asn1crypto_statement(f):
    return asn1.AttestationStatement(
        {
            "version": 0,
            "se_uid": f["se_uid"],
            "slot": f["slot"],
            "subject_public_key": asn1_keys.PublicKeyInfo.load(_spki(KEYS[f["key_index"]])),
            "key_policy": f["key_policy"],
            "life_cycle": f["life_cycle"],
            "firmware_version": f["firmware_version"],
            "nonce": f["nonce"],
        }
    )


def _assert_fields(statement, f):
    assert statement.version == 0
    assert statement.se_uid == f["se_uid"]
    assert statement.slot == f["slot"]
    assert statement.public_point == _point(KEYS[f["key_index"]])
    assert statement.spki_der == _spki(KEYS[f["key_index"]])
    assert statement.key_policy == f["key_policy"]
    assert statement.life_cycle == f["life_cycle"]
    assert statement.firmware_version == f["firmware_version"]
    assert statement.nonce == f["nonce"]


@settings(max_examples=60, deadline=None)
@given(statement_fields)
def test_portable_statement_decodes_in_asn1crypto_to_the_same_fields_and_bytes(f):
    encoded = _portable_statement(f)
    parsed = asn1.AttestationStatement.load(encoded)
    native = parsed.native
    assert native["version"] == 0
    assert native["se_uid"] == f["se_uid"]
    assert native["slot"] == f["slot"]
    assert parsed["subject_public_key"].dump() == _spki(KEYS[f["key_index"]])
    assert native["key_policy"] == f["key_policy"]
    assert native["life_cycle"] == f["life_cycle"]
    assert native["firmware_version"] == f["firmware_version"]
    assert native["nonce"] == f["nonce"]
    assert parsed.dump(force=True) == encoded
    assert encoded == _asn1crypto_statement(f).dump()


@settings(max_examples=60, deadline=None)
@given(statement_fields)
def test_asn1crypto_statement_decodes_portably_to_the_same_fields_and_bytes(f):
    encoded = _asn1crypto_statement(f).dump()
    statement = attestation.decode_statement(encoded)
    _assert_fields(statement, f)
    assert statement.statement_der == encoded
    assert _portable_statement(f) == encoded
    assert statement.as_dict()["nonce"] == f["nonce"]


def test_signed_attestation_round_trips_both_ways_and_verifies():
    statement_der = _portable_statement(FIELDS)
    signature = _sign(statement_der)
    portable = attestation.encode_signed_attestation(statement_der, signature)
    reference = asn1.SignedAttestation(
        {
            "statement": asn1.AttestationStatement.load(statement_der),
            "signature_algorithm": {"algorithm": "sha256_ecdsa"},
            "signature": signature,
        }
    ).dump()
    assert portable == reference
    parsed = asn1.SignedAttestation.load(portable)
    assert parsed["signature"].native == signature
    assert parsed["signature_algorithm"]["algorithm"].native == "sha256_ecdsa"
    assert parsed.dump(force=True) == portable

    decoded = attestation.decode_signed_attestation(reference)
    _assert_fields(decoded.statement, FIELDS)
    assert decoded.statement_der == statement_der
    assert decoded.signature_der == signature
    assert decoded.der == reference
    assert len(decoded.signature_raw) == 64
    # The kept bytes are exactly what the MAK signed.
    MAK.public_key().verify(decoded.signature_der, decoded.statement_der, ec.ECDSA(hashes.SHA256()))
    assert hashlib.sha256(decoded.statement_der).digest() == hashlib.sha256(statement_der).digest()


def test_evidence_bundle_round_trips_both_ways(mak_certificate):
    statements = []
    for slot in (1, 2):
        f = dict(FIELDS, slot=slot, key_index=slot)
        statement_der = _portable_statement(f)
        signed = attestation.encode_signed_attestation(statement_der, _sign(statement_der))
        statements.append(signed)
    portable = attestation.encode_evidence_bundle(statements, [mak_certificate, mak_certificate])
    reference = asn1.EvidenceBundle(
        {
            "statements": [asn1.SignedAttestation.load(s) for s in statements],
            "certificates": [asn1_x509.Certificate.load(mak_certificate)] * 2,
        }
    ).dump()
    assert portable == reference
    parsed = asn1.EvidenceBundle.load(portable)
    assert parsed.dump(force=True) == portable
    assert [s["statement"]["slot"].native for s in parsed["statements"]] == [1, 2]

    bundle = attestation.decode_evidence_bundle(reference)
    assert [s.der for s in bundle.statements] == statements
    assert [s.statement.slot for s in bundle.statements] == [1, 2]
    assert bundle.certificates == [mak_certificate, mak_certificate]
    assert bundle.der == reference
    x509.load_der_x509_certificate(bundle.certificates[0])


def test_evidence_bundle_with_no_certificates_is_allowed():
    statement_der = _portable_statement(FIELDS)
    signed = attestation.encode_signed_attestation(statement_der, _sign(statement_der))
    bundle_der = attestation.encode_evidence_bundle([signed], [])
    assert asn1.EvidenceBundle.load(bundle_der).dump(force=True) == bundle_der
    assert attestation.decode_evidence_bundle(bundle_der).certificates == []


def test_evidence_attribute_survives_in_a_csr(mak_certificate):
    device_key = KEYS[1]
    f = dict(FIELDS, key_index=1)
    statement_der = _portable_statement(f)
    signed = attestation.encode_signed_attestation(statement_der, _sign(statement_der))
    bundle_der = attestation.encode_evidence_bundle([signed], [mak_certificate])
    attribute = attestation.build_evidence_attribute(bundle_der)
    assert attribute == (OID_ATTR_EVIDENCE, [bundle_der])
    info = csr.info_parts("dev-1", "SN1", _spki(device_key), [attribute])
    csr_der = csr.finish(info, device_key.sign(b"".join(info), ec.ECDSA(hashes.SHA256())))
    request = x509.load_der_x509_csr(csr_der)
    assert request.is_signature_valid
    value = request.attributes.get_attribute_for_oid(x509.ObjectIdentifier(OID_ATTR_EVIDENCE))
    # cryptography returns the value's contents; re-wrap them as the SEQUENCE they were.
    carried = der.encode_sequence([value.value])
    assert carried == bundle_der
    bundle = attestation.decode_evidence_bundle(carried)
    assert bundle.statements[0].statement.public_point == _point(device_key)


# ----------------------------------------------------------------------------------------
# Strictness


def _statement_with(**override):
    f = dict(FIELDS)
    f.update(override)
    d = asn1.AttestationStatement(
        {
            "version": f.get("version", 0),
            "se_uid": f["se_uid"],
            "slot": f["slot"],
            "subject_public_key": asn1_keys.PublicKeyInfo.load(
                f.get("spki", _spki(KEYS[f["key_index"]]))
            ),
            "key_policy": f["key_policy"],
            "life_cycle": f["life_cycle"],
            "firmware_version": f["firmware_version"],
            "nonce": f["nonce"],
        }
    )
    return d.dump()


P384_SPKI = (
    ec.derive_private_key(5, ec.SECP384R1())
    .public_key()
    .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
)


@pytest.mark.parametrize(
    "override,reason",
    [
        (dict(version=1), REASON_RANGE),
        (dict(se_uid=b"\x00" * 15), REASON_RANGE),
        (dict(se_uid=b"\x00" * 17), REASON_RANGE),
        (dict(slot=256), REASON_RANGE),
        (dict(slot=-1), REASON_RANGE),
        (dict(key_policy=256), REASON_RANGE),
        (dict(life_cycle=-1), REASON_RANGE),
        (dict(firmware_version=b"\x01\x02"), REASON_RANGE),
        (dict(nonce=b""), REASON_RANGE),
        (dict(nonce=b"\x00" * 65), REASON_RANGE),
        (dict(spki=P384_SPKI), REASON_ALGORITHM),
    ],
)
def test_decoder_refuses_out_of_range_statements(override, reason):
    with pytest.raises(DerError) as info:
        attestation.decode_statement(_statement_with(**override))
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "override",
    [
        dict(se_uid=b"\x00" * 15),
        dict(slot=256),
        dict(slot=True),
        dict(key_policy=-1),
        dict(life_cycle=300),
        dict(firmware_version=b"\x01"),
        dict(nonce=b""),
        dict(nonce=b"\x00" * 65),
        dict(nonce="text"),
    ],
)
def test_encoder_refuses_out_of_range_fields(override):
    f = dict(FIELDS)
    f.update(override)
    with pytest.raises(DerError):
        _portable_statement(f)


def test_encoder_refuses_bad_point_and_version():
    with pytest.raises(DerError):
        attestation.encode_statement(bytes(16), 1, b"\x04" + bytes(64), 0, 0, b"abc", b"n")
    with pytest.raises(DerError):
        attestation.encode_statement(bytes(16), 1, _point(KEYS[0]), 0, 0, b"abc", b"n", version=1)


def test_decoder_refuses_trailing_bytes():
    with pytest.raises(DerError):
        attestation.decode_statement(_portable_statement(FIELDS) + b"\x00")
    statement_der = _portable_statement(FIELDS)
    signed = attestation.encode_signed_attestation(statement_der, _sign(statement_der))
    with pytest.raises(DerError):
        attestation.decode_signed_attestation(signed + b"\x00")


def _signed_with(signature=None, algorithm=None):
    statement_der = _portable_statement(FIELDS)
    if signature is None:
        signature = _sign(statement_der)
    algorithm = algorithm or der.ecdsa_with_sha256_algorithm()
    return der.encode_sequence([statement_der, algorithm, der.encode_bit_string(signature)])


def test_signed_attestation_refuses_ber_or_out_of_range_signature():
    good = _sign(_portable_statement(FIELDS))
    ber = b"\x30\x81" + good[1:]  # long-form length for a short length
    with pytest.raises(DerError):
        attestation.decode_signed_attestation(_signed_with(signature=ber))
    zero = der.encode_sequence([der.encode_integer(0), der.encode_integer(1)])
    with pytest.raises(DerError):
        attestation.decode_signed_attestation(_signed_with(signature=zero))
    with pytest.raises(DerError):
        attestation.encode_signed_attestation(_portable_statement(FIELDS), zero)


def test_signed_attestation_refuses_other_algorithms():
    with_null = der.encode_sequence([der.encode_oid("1.2.840.10045.4.3.2"), der.encode_null()])
    sha384 = der.encode_sequence([der.encode_oid("1.2.840.10045.4.3.3")])
    for algorithm in (with_null, sha384):
        with pytest.raises(DerError) as info:
            attestation.decode_signed_attestation(_signed_with(algorithm=algorithm))
        assert info.value.reason == REASON_ALGORITHM


def test_evidence_bundle_refuses_empty_statements_and_bad_certificates(mak_certificate):
    with pytest.raises(DerError):
        attestation.encode_evidence_bundle([], [mak_certificate])
    empty = der.encode_sequence([der.encode_sequence([]), der.encode_sequence([])])
    with pytest.raises(DerError):
        attestation.decode_evidence_bundle(empty)
    statement_der = _portable_statement(FIELDS)
    signed = attestation.encode_signed_attestation(statement_der, _sign(statement_der))
    with pytest.raises(DerError):
        attestation.encode_evidence_bundle([signed], [b"\x04\x00"])
    with pytest.raises(DerError):
        attestation.encode_evidence_bundle([signed], [mak_certificate + b"\x00"])
    with pytest.raises(DerError):
        attestation.build_evidence_attribute(b"\x30\x00")


# One fixed bundle (ECDSA signatures are randomised; hypothesis needs a stable seed).
_STATEMENT = _portable_statement(FIELDS)
SEED_BUNDLE = attestation.encode_evidence_bundle(
    [attestation.encode_signed_attestation(_STATEMENT, _sign(_STATEMENT))], []
)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_evidence_bundles_raise_only_der_error(data):
    bundle = bytearray(SEED_BUNDLE)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(bundle) - 1))
        op = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if op == "flip":
            bundle[i] ^= data.draw(st.integers(1, 255))
        elif op == "delete":
            del bundle[i]
        else:
            bundle[i:i] = bytes((data.draw(st.integers(0, 255)),))
    for decode in (
        attestation.decode_evidence_bundle,
        attestation.decode_signed_attestation,
        attestation.decode_statement,
    ):
        try:
            decode(bytes(bundle))
        except DerError:
            pass
