"""device/enrol.csr_size_max: the CSR buffer taken before the key exists holds the longest
CSR its chain, subject and nonce can give (every other field at its longest)."""

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.common import attestation, der
from fleetid.device import enrol

P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# r and s with the top bit set: 33-byte INTEGERs, the longest (72-byte) signature.
LONGEST_SIG = der.ecdsa_raw_to_der((P256_N - 1).to_bytes(32, "big") * 2)


class _Se:
    def sign(self, slot, digest):
        return LONGEST_SIG


def _cert(size):
    # A DER SEQUENCE of exactly `size` bytes (the bundle checks certificates' headers).
    contents = 1
    while len(der.encode_sequence([der.encode_octet_string(bytes(contents))])) < size:
        contents += 1
    cert = der.encode_sequence([der.encode_octet_string(bytes(contents))])
    assert len(cert) == size
    return cert


@pytest.mark.parametrize("chain_sizes", [(), (40,), (570, 481), (120, 131), (30000, 30000)])
@pytest.mark.parametrize("cn,serial,nonce_len", [("d", None, 1), ("x" * 64, "9" * 64, 64),
                                                 ("FID-000000042", "FID-000000042", 20)])
def test_the_bound_holds_the_longest_csr(chain_sizes, cn, serial, nonce_len):
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    nonce = bytes(range(nonce_len))
    statement = attestation.encode_statement(bytes(16), 255, point, 255, 255, b"\x01\x02\x03",
                                             nonce)
    signed = attestation.decode_signed_attestation(
        attestation.encode_signed_attestation(statement, LONGEST_SIG))
    chain = [_cert(size) for size in chain_sizes]
    bound = enrol.csr_size_max(chain, cn, serial, nonce)
    out = bytearray(bound)
    csr = enrol.attested_csr(_Se(), 1, point, signed, chain, cn, serial, out)
    assert len(csr) <= bound
    assert csr == enrol.attested_csr(_Se(), 1, point, signed, chain, cn, serial)
    if chain_sizes == (570, 481) and nonce_len == 20:
        assert bound - len(csr) <= 24  # tight: the early buffer wastes little heap
