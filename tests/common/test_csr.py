"""PKCS#10 (fleetid.common.csr), the one CSR builder: checked against cryptography's
parser and signature check, asn1crypto, and the bytes fleetid's builders gave for fixed
inputs before they were folded into this one (the vectors below)."""

import hashlib

import pytest
from asn1crypto import csr as asn1_csr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

from fleetid.common import attestation, csr, der
from fleetid.common.errors import DerError
from fleetid.common.oids import OID_ATTR_EVIDENCE, OID_EXTENSION_REQUEST

KEY = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1())
MAK = ec.derive_private_key(0x5E0A77E57, ec.SECP256R1())
SPKI = KEY.public_key().public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)
POINT = KEY.public_key().public_bytes(serialization.Encoding.X962,
                                      serialization.PublicFormat.UncompressedPoint)


def _signed(signature=None):
    statement = attestation.encode_statement(bytes(16), 4, POINT, 1, 2, b"\x01\x02\x03",
                                             bytes(20))
    if signature is None:
        signature = MAK.sign(statement, ec.ECDSA(hashes.SHA256()))
    return attestation.decode_signed_attestation(
        attestation.encode_signed_attestation(statement, signature))


def _cert(n):
    return der.encode_sequence([der.encode_octet_string(bytes(range(256)) * n)])


def _sign(parts):
    # Stands in for SE SIGN: cryptography hashes the joined info itself.
    return KEY.sign(b"".join(parts), ec.ECDSA(hashes.SHA256()))


def _reference_csr(info, signature_der):
    # CertificationRequest ::= SEQUENCE { info, signatureAlgorithm, signature BIT STRING },
    # with der.py's generic writer, not the builder under test.
    return der.encode_sequence([info, der.ecdsa_with_sha256_algorithm(),
                                der.encode_bit_string(signature_der)])


def _short_signature():
    return der.ecdsa_raw_to_der(bytes(31) + b"\x01" + bytes(31) + b"\x01")


# ----------------------------------------------------------------------------------------
# The evidence bundle in parts


def test_the_evidence_bundle_in_parts_has_the_same_bytes_and_copies_nothing():
    signed = _signed()
    chain = [_cert(2), _cert(1)]
    parts = csr.evidence_bundle_parts([signed], chain)
    assert all(isinstance(part, bytes) for part in parts)
    assert b"".join(parts) == attestation.encode_evidence_bundle([signed], chain)
    assert any(part is chain[0] for part in parts) and any(part is signed.der for part in parts)
    assert b"".join(csr.evidence_bundle_parts([signed], [])) == \
        attestation.encode_evidence_bundle([signed], [])
    with pytest.raises(DerError):
        csr.evidence_bundle_parts([], chain)
    with pytest.raises(DerError):
        csr.evidence_bundle_parts([signed], [chain[0] + b"\x00"])


# ----------------------------------------------------------------------------------------
# Vectors: the bytes of common/der.py's build_csr_info() + finish_csr() (and of the parts
# builder, which agreed with them byte for byte) for fixed inputs, captured before the two
# builders were folded into this one.  The signatures are RFC 6979 (deterministic) ones
# made then, so the whole CSR is fixed.

STATEMENT_SIG = bytes.fromhex(
    "3046022100da800afc62e7741fdc1970414277ba3fd401d091b51091c33f4fbaa5c106f65d022100cd30"
    "5c1e33ba0c85a03da6a548c92b7df06807b0c6eddf3223a76eacddd32fcd")


def _vector_attributes(name):
    # (OID_ATTR_EVIDENCE, the bundle whole) and (..., the bundle's parts): the same bytes.
    chain = [_cert(2), _cert(1)]
    signed = _signed(STATEMENT_SIG)
    whole = (OID_ATTR_EVIDENCE, [attestation.encode_evidence_bundle([signed], chain)])
    parts = (OID_ATTR_EVIDENCE, [csr.evidence_bundle_parts([signed], chain)])
    small = der.encode_sequence([der.encode_null()])
    if name == "attested":
        uri = csr.uri_san_extension_request("urn:fleetid:device:FID-000000042")
        return [whole, uri], [parts, uri]
    if name == "sorted":  # several values (SET OF order), one OID twice, the bundle last
        rest = [csr.uri_san_extension_request("urn:a"),
                ("1.2.3.4", [small, der.encode_integer(5)]),
                ("1.2.3.4", [der.encode_integer(7)]),
                ("1.2.3", [small])]
        return rest + [whole], rest + [parts]
    return None, None


VECTORS = [
    # name, cn, serial, signature, CSR length, SHA-256 of the CSR
    ("attested", "FID-000000042", "FID-000000042",
     "304402203f6518869fe1bb39186f129f1d98c4a1829e4ad570b8e5a023d1ee73b6a0b947"
     "02201e516e1809912343fd126dbf9158469002249a124352ee95c9f2999ce56139eb",
     1370, "dac3f0bdf7592fd80069d89466cb91ba4e28dc85b3dfac8b27b3d3d2843bbf80"),
    ("bare", "d", None,
     "30450220019b267700da1e2c201e260e732e208607fef90371a376fa1c857a9c48520373"
     "022100f3f19c5a72fa05a30db2a3067a9a6ea98ee4a0f6689b4fd691c2e559fa9f2038",
     201, "b24e6ac0b29998ce7e58e5ee345112695c031e1cb266a8ac1cbc01fe8d30f9e1"),
    ("sorted", "dev", "1",
     "3046022100fc8f1d9116d6b6ee21d87c7887999f2cbb9c1f66ab135ba91efd380ef758f853"
     "022100f809f50637089c99dda6b35612a601eb30d2e1cb489ed507a58c2f9af6fc3f32",
     1363, "fa6e4a584d6fbdbe8abb7d52f81afbc5e2f6dd7316d32a0f9d02fea4b93f2937"),
]

BARE_CSR = bytes.fromhex(
    "3081c6306e020100300c310a300806035504030c01643059301306072a8648ce3d020106082a8648ce3d"
    "030107034200049fad84aeae08bbef7f010014d82cef6a09de2b0cf871b5ce0c4f1d13a59a593407cb45"
    "769f1070e2c2470fe5b1bfe63133c0b0cdc64ea4bf3791a8ec2a07fd4fa000300a06082a8648ce3d0403"
    "0203480030450220019b267700da1e2c201e260e732e208607fef90371a376fa1c857a9c48520373022100"
    "f3f19c5a72fa05a30db2a3067a9a6ea98ee4a0f6689b4fd691c2e559fa9f2038")


@pytest.mark.parametrize("name, cn, serial, signature_hex, length, digest", VECTORS,
                         ids=[v[0] for v in VECTORS])
def test_the_builder_gives_the_bytes_of_before_the_fold(name, cn, serial, signature_hex,
                                                          length, digest):
    signature = bytes.fromhex(signature_hex)
    for attributes in _vector_attributes(name):
        parts = csr.info_parts(cn, serial, SPKI, attributes)
        for out in (None, csr.buffer_for(parts)):
            encoded = csr.finish(parts, signature, out)
            assert type(encoded) is bytes
            assert (len(encoded), hashlib.sha256(encoded).hexdigest()) == (length, digest)
        request = x509.load_der_x509_csr(encoded)
        assert request.is_signature_valid
        assert request.tbs_certrequest_bytes == b"".join(parts)
        assert request.signature == signature
    if name == "bare":
        assert encoded == BARE_CSR


# ----------------------------------------------------------------------------------------
# Against cryptography and asn1crypto


def test_csr_loads_in_cryptography_with_a_valid_signature():
    evidence = der.encode_sequence([der.encode_octet_string(b"evidence bytes")])
    uri = "urn:fleetid:device:000042"
    attributes = [(OID_ATTR_EVIDENCE, [evidence]), csr.uri_san_extension_request(uri)]
    parts = csr.info_parts("fleetid-dev-000042", "FID000042", SPKI, attributes)
    encoded = csr.finish(parts, _sign(parts))
    request = x509.load_der_x509_csr(encoded)
    assert request.is_signature_valid
    assert request.signature_algorithm_oid.dotted_string == "1.2.840.10045.4.3.2"
    assert request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "fleetid-dev-000042"
    )
    assert request.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == \
        "FID000042"
    assert request.public_key().public_numbers() == KEY.public_key().public_numbers()
    assert request.tbs_certrequest_bytes == b"".join(parts)
    evidence_attr = request.attributes.get_attribute_for_oid(
        x509.ObjectIdentifier(OID_ATTR_EVIDENCE))
    # cryptography hands back the value's contents and tag separately.
    assert evidence_attr.value == evidence[2:]
    assert evidence_attr._type == 0x30
    san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    # Cross-check with asn1crypto: the attributes SET OF is in DER order, and the evidence
    # value is carried byte for byte.  (asn1crypto cannot force-re-encode an attribute of
    # an OID it does not know, so the evidence value is compared as stored.)
    parsed = asn1_csr.CertificationRequest.load(encoded)
    attrs = parsed["certification_request_info"]["attributes"]
    encodings = [attr.dump() for attr in attrs]
    assert encodings == sorted(encodings)
    by_oid = {attr["type"].dotted: attr["values"] for attr in attrs}
    assert by_oid[OID_ATTR_EVIDENCE].dump() == der.encode_set([evidence])
    assert by_oid[OID_EXTENSION_REQUEST].dump(force=True) == der.encode_set(
        csr.uri_san_extension_request(uri)[1]
    )


def test_csr_without_serial_and_attributes():
    parts = csr.info_parts("fleetid-dev-000042", None, SPKI, None)
    encoded = csr.finish(parts, _sign(parts))
    request = x509.load_der_x509_csr(encoded)
    assert request.is_signature_valid
    assert len(request.subject) == 1
    assert len(request.attributes) == 0
    assert asn1_csr.CertificationRequest.load(encoded).dump(force=True) == encoded


def test_csr_signing_digest_is_sha256_of_the_info():
    parts = csr.info_parts("d", "1", SPKI, None)
    digest = csr.signing_digest(parts)
    assert digest == hashlib.sha256(b"".join(parts)).digest()
    signature = KEY.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert x509.load_der_x509_csr(csr.finish(parts, signature)).is_signature_valid


def test_csr_with_tampered_info_does_not_verify():
    parts = csr.info_parts("fleetid-dev-000042", "FID000042", SPKI, None)
    encoded = csr.finish(parts, _sign(parts))
    tampered = encoded.replace(b"FID000042", b"FID000043")
    assert not x509.load_der_x509_csr(tampered).is_signature_valid


def test_a_csr_written_in_parts_references_its_values_and_fills_the_buffer():
    signed = _signed()
    chain = [_cert(2)]
    parts = csr.info_parts("dev", "1", SPKI,
                           [(OID_ATTR_EVIDENCE, [csr.evidence_bundle_parts([signed], chain)]),
                            csr.uri_san_extension_request("urn:a")])
    assert all(isinstance(part, bytes) for part in parts)
    assert any(part is chain[0] for part in parts)  # referenced, not copied
    info = b"".join(parts)
    signature = _sign(parts)
    whole = csr.finish(parts, signature)
    assert whole == _reference_csr(info, signature)
    assert csr.finish([info], signature) == whole  # the info whole: one part
    written = csr.finish(parts, signature, csr.buffer_for(parts))
    assert type(written) is bytes and written == whole
    assert x509.load_der_x509_csr(written).is_signature_valid
    # The buffer holds the longest signature: a shorter one is trimmed away in place.
    short = _short_signature()
    out = csr.buffer_for(parts)
    assert csr.finish(parts, short, out) == _reference_csr(info, short)
    assert len(out) == len(_reference_csr(info, short))
    assert x509.load_der_x509_csr(bytes(out)).signature == short
    # Too small a buffer: joined into new bytes instead, the buffer untouched.
    tiny = bytearray(10)
    assert csr.finish(parts, short, tiny) == _reference_csr(info, short)
    assert tiny == bytearray(10)


# ----------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(subject_cn=""),
        dict(subject_cn="x" * 65),
        dict(subject_serial="SN@1"),
        dict(subject_serial=""),
        dict(spki_der=b"\x30\x00"),
        dict(attributes=[(OID_ATTR_EVIDENCE, [])]),
        dict(attributes=[(OID_ATTR_EVIDENCE, [b"\x04\x05ab"])]),
        dict(attributes=[("1.2.x", [b"\x05\x00"])]),
    ],
)
def test_csr_builder_refuses_bad_input(kwargs):
    args = dict(subject_cn="dev", subject_serial="1", spki_der=SPKI, attributes=None)
    args.update(kwargs)
    with pytest.raises(DerError):
        csr.info_parts(**args)


def test_parts_that_are_not_one_element_and_bad_signatures_are_refused():
    element = der.encode_sequence([der.encode_null()])
    for bad in ([element[:1], element[1:] + b"\x00"], [element[:1]], [], [element, element]):
        with pytest.raises(DerError):
            csr.info_parts("d", None, SPKI, [(OID_ATTR_EVIDENCE, [bad])])
    parts = csr.info_parts("d", None, SPKI, None)
    with pytest.raises(DerError):
        csr.finish(parts + [b"\x00"], _short_signature())
    with pytest.raises(DerError):
        csr.finish([b"".join(parts) + b"\x00"], _short_signature())
    with pytest.raises(DerError):  # BER length in the signature
        csr.finish(parts, bytes.fromhex("308106020101020101"))
    with pytest.raises(DerError):  # not a SEQUENCE
        csr.finish([der.encode_octet_string(b"info")], _short_signature())


def test_extension_request_attribute_shape():
    oid, values = csr.uri_san_extension_request("urn:a")
    assert oid == OID_EXTENSION_REQUEST
    assert values == [bytes.fromhex("30123010" "0603551d11" "0409" "30078605" "75726e3a61")]
    for bad in ("urn:\u00e9", "", None):
        with pytest.raises(DerError):
            csr.uri_san_extension_request(bad)
