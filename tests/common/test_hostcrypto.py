"""CPython primitives for SCP03 (fleetid.common.host.hostcrypto).

AES-CMAC against Project Wycheproof (tests/vectors/wycheproof/aes_cmac_test.json); AES
against FIPS-197 and SP 800-38A known answers.
"""

import pytest

from fleetid.common import scp03
from fleetid.common.host.hostcrypto import CryptographyPrimitives
from tests.conftest import load_vectors

PRIMS = CryptographyPrimitives()
WYCHEPROOF = load_vectors("wycheproof/aes_cmac_test.json")
CASES = [(group, test) for group in WYCHEPROOF["testGroups"] for test in group["tests"]]


def test_wycheproof_file_is_the_expected_one():
    assert WYCHEPROOF["algorithm"] == "AES-CMAC"
    assert len(CASES) == WYCHEPROOF["numberOfTests"]
    # No "acceptable" results in this file: every case is a clear accept or refuse.
    assert {test["result"] for _group, test in CASES} == {"valid", "invalid"}


def _verify(key, msg, tag, tag_bytes):
    """What fleetid does with a received MAC: recompute, truncate, compare in constant time."""
    try:
        computed = PRIMS.cmac(key, msg)
    except ValueError:
        return False  # unusable key (wrong size): refused
    return scp03.ct_equal(computed[:tag_bytes], tag)


@pytest.mark.parametrize("group,test", CASES, ids=["tc%d" % t["tcId"] for _g, t in CASES])
def test_aes_cmac_wycheproof(group, test):
    key = bytes.fromhex(test["key"])
    msg = bytes.fromhex(test["msg"])
    tag = bytes.fromhex(test["tag"])
    accepted = _verify(key, msg, tag, group["tagSize"] // 8)
    assert accepted == (test["result"] == "valid"), test["comment"]


def test_aes_ecb_fips197_known_answer():
    key = bytes(range(16))
    plaintext = bytes.fromhex("00112233445566778899aabbccddeeff")
    assert PRIMS.aes_ecb_encrypt(key, plaintext).hex() == "69c4e0d86a7b0430d8cdb78070b4c55a"
    key256 = bytes(range(32))
    assert PRIMS.aes_ecb_encrypt(key256, plaintext).hex() == "8ea2b7ca516745bfeafc49904b496089"


def test_aes_cbc_sp800_38a_known_answer_and_round_trip():
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    iv = bytes(range(16))
    plaintext = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
    ciphertext = PRIMS.aes_cbc_encrypt(key, iv, plaintext)
    assert ciphertext.hex() == ("7649abac8119b246cee98e9b12e9197d"
                                "5086cb9b507219ee95db113a917678b2")
    assert PRIMS.aes_cbc_decrypt(key, iv, ciphertext) == plaintext


@pytest.mark.parametrize("call", [
    lambda: PRIMS.aes_ecb_encrypt(bytes(16), bytes(15)),
    lambda: PRIMS.aes_ecb_encrypt(bytes(15), bytes(16)),
    lambda: PRIMS.aes_cbc_encrypt(bytes(16), bytes(16), bytes(17)),
    lambda: PRIMS.aes_cbc_decrypt(bytes(16), bytes(8), bytes(16)),
    lambda: PRIMS.cmac(bytes(20), b"x"),
])
def test_bad_sizes_are_refused(call):
    with pytest.raises(ValueError) as info:
        call()
    assert "00" * 8 not in str(info.value)  # no key or data bytes in the message


def test_random_returns_fresh_bytes_of_the_asked_length():
    a, b = PRIMS.random(8), PRIMS.random(8)
    assert len(a) == len(b) == 8 and a != b
    assert PRIMS.random(0) == b""


@pytest.mark.parametrize("key_len", [16, 24, 32])
def test_prepared_key_matches_the_plain_primitives(key_len):
    import os

    key = os.urandom(key_len)
    prepared = PRIMS.prepare_key(key)
    iv = os.urandom(16)
    for nblocks in (0, 1, 2, 3, 6, 7, 20):
        data = os.urandom(16 * nblocks)
        assert prepared.aes_cbc_encrypt(iv, data) == PRIMS.aes_cbc_encrypt(key, iv, data)
        assert prepared.aes_cbc_decrypt(iv, data) == PRIMS.aes_cbc_decrypt(key, iv, data)
    # One CBC context serves every call, chaining on from its last block: calls in a row
    # with other IVs (a session's commands) and the same IV twice give fresh-context CBC.
    for nblocks in (1, 5, 1, 2, 40, 3, 3, 1):
        data = os.urandom(16 * nblocks)
        for call_iv in (os.urandom(16), bytes(16), bytes(16)):
            assert prepared.aes_cbc_encrypt(call_iv, data) == PRIMS.aes_cbc_encrypt(
                key, call_iv, data)
    for n in (0, 1, 15, 16, 17, 64, 100):
        data = os.urandom(n)
        assert prepared.cmac(data) == PRIMS.cmac(key, data)
    block = os.urandom(16)
    assert prepared.aes_ecb_encrypt(block) == PRIMS.aes_ecb_encrypt(key, block)
    assert key.hex() not in repr(prepared)
    with pytest.raises(ValueError):
        prepared.aes_ecb_encrypt(bytes(15))
    with pytest.raises(ValueError):
        prepared.aes_cbc_encrypt(iv, bytes(17))
    prepared.close()
    prepared.close()  # idempotent
    for call in (lambda: prepared.cmac(b"x"), lambda: prepared.aes_ecb_encrypt(block),
                 lambda: prepared.aes_cbc_encrypt(iv, block),
                 lambda: prepared.aes_cbc_decrypt(iv, block)):
        with pytest.raises(ValueError):
            call()


def test_prepare_key_refuses_bad_sizes_without_echoing_the_key():
    with pytest.raises(ValueError) as info:
        PRIMS.prepare_key(b"\xaa" * 17)
    assert "aa" not in str(info.value).lower()
