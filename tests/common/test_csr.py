"""common/csr.py: the CSR written in pieces gives the bytes of common/der.py's nested
builders (build_csr_info, finish_csr) and common/attestation.py's evidence bundle."""

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.common import attestation, csr, der
from fleetid.common.errors import DerError
from fleetid.common.oids import OID_ATTR_EVIDENCE

KEY = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1())
MAK = ec.derive_private_key(0x5E0A77E57, ec.SECP256R1())
SPKI = KEY.public_key().public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)
POINT = KEY.public_key().public_bytes(serialization.Encoding.X962,
                                      serialization.PublicFormat.UncompressedPoint)


def _signed():
    statement = attestation.encode_statement(bytes(16), 4, POINT, 1, 2, b"\x01\x02\x03",
                                             bytes(20))
    return attestation.decode_signed_attestation(attestation.encode_signed_attestation(
        statement, MAK.sign(statement, ec.ECDSA(hashes.SHA256()))))


def _cert(n):
    return der.encode_sequence([der.encode_octet_string(bytes(range(256)) * n)])


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


def test_a_csr_written_in_parts_has_the_same_bytes_as_the_nested_builders():
    signed = _signed()
    chain = [_cert(2)]
    bundle = attestation.encode_evidence_bundle([signed], chain)
    small = der.encode_sequence([der.encode_null()])
    rest = [der.uri_san_extension_request("urn:a"),
            ("1.2.3.4", [small, der.encode_integer(5)]),  # two values: SET OF order
            ("1.2.3.4", [der.encode_integer(7)]),  # same OID: whole encodings sort
            ("1.2.3", [small])]
    info = der.build_csr_info("dev", "1", SPKI, [(OID_ATTR_EVIDENCE, [bundle])] + rest)
    parts = csr.info_parts("dev", "1", SPKI,
                           [(OID_ATTR_EVIDENCE, [csr.evidence_bundle_parts([signed], chain)])]
                           + rest)
    assert all(isinstance(part, bytes) for part in parts)
    assert any(part is chain[0] for part in parts)  # referenced, not copied
    assert b"".join(parts) == info
    assert csr.signing_digest(parts) == der.csr_signing_digest(info)
    signature = KEY.sign(info, ec.ECDSA(hashes.SHA256()))
    whole = der.finish_csr(info, signature)
    assert csr.finish(parts, signature) == whole
    written = csr.finish(parts, signature, csr.buffer_for(parts))
    assert type(written) is bytes and written == whole
    assert x509.load_der_x509_csr(written).is_signature_valid
    # The buffer holds the longest signature: a shorter one is trimmed away in place.
    short = der.ecdsa_raw_to_der(bytes(31) + b"\x01" + bytes(31) + b"\x01")
    out = csr.buffer_for(parts)
    assert csr.finish(parts, short, out) == der.finish_csr(info, short)
    assert len(out) == len(der.finish_csr(info, short))
    # Too small a buffer: joined into new bytes instead, the buffer untouched.
    tiny = bytearray(10)
    assert csr.finish(parts, short, tiny) == der.finish_csr(info, short) and tiny == bytearray(10)
    assert b"".join(csr.info_parts("d", None, SPKI, None)) == der.build_csr_info("d", None, SPKI)


def test_parts_that_are_not_one_element_and_bad_signatures_are_refused():
    element = der.encode_sequence([der.encode_null()])
    for bad in ([element[:1], element[1:] + b"\x00"], [element[:1]], [], [element, element]):
        with pytest.raises(DerError):
            csr.info_parts("d", None, SPKI, [(OID_ATTR_EVIDENCE, [bad])])
    for bad in ([(OID_ATTR_EVIDENCE, [])], [(OID_ATTR_EVIDENCE, [b"\x04\x05ab"])]):
        with pytest.raises(DerError):
            csr.info_parts("d", None, SPKI, bad)
    with pytest.raises(DerError):
        csr.info_parts("d", None, b"\x30\x00", None)
    parts = csr.info_parts("d", None, SPKI, None)
    with pytest.raises(DerError):
        csr.finish(parts + [b"\x00"], der.ecdsa_raw_to_der(bytes(31) + b"\x01" + bytes(31) + b"\x01"))
    with pytest.raises(DerError):
        csr.finish(parts, bytes.fromhex("308106020101020101"))
