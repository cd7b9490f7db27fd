"""Project Wycheproof through the chip: ECDSA P-256/SHA-256 (DER and IEEE P1363) via
VERIFY-with-point, and ECDH P-256 (uncompressed-point encoding) via ECDH on a planted key.

Result handling:
- ECDSA: every `valid` case must answer 9000; every `invalid` case must be refused, 6300
  (well-formed, does not verify) or 6A80 (malformed).  These two files have no
  `acceptable` cases; if an update adds some, they are refused too (the SE's DER parsing is
  strict, so BER-flagged "acceptable" encodings are refused by design) and counted.
- ECDH: `valid` cases must give Wycheproof's shared secret; `invalid` ones are refused
  (6700 wrong length or 6A80).  The single `acceptable` case (flags CompressedPublic,
  CompressedPoint) is a 33-byte compressed point: ECDH takes only the 65-byte uncompressed
  form, so it is refused with 6700, which we record as our choice for it.
"""

import hashlib

import pytest

from fleetid.common import se_consts as C
from fleetid.common.der import P256_N
from fleetid.sim.chip import Chip
from fleetid.sim.nvm import Nvm
from tests.conftest import load_vectors
from tests.sim.chip_support import plant_key, select_applet, send

ECDSA_FILES = [
    ("wycheproof/ecdsa_secp256r1_sha256_test.json", C.TAG_SIG_DER),
    ("wycheproof/ecdsa_secp256r1_sha256_p1363_test.json", C.TAG_SIG_RAW),
]


@pytest.fixture(scope="module")
def chip():
    chip = Chip(Nvm(None))
    select_applet(chip)
    return chip


def _tlv(tag, value):
    return bytes((tag, len(value))) + value


@pytest.mark.parametrize("relpath, sig_tag", ECDSA_FILES)
def test_wycheproof_ecdsa_through_verify_with_point(chip, relpath, sig_tag):
    suite = load_vectors(relpath)
    counts = {"valid": 0, "invalid": 0, "acceptable": 0, "too_long_for_tlv": 0}
    for group in suite["testGroups"]:
        point = bytes.fromhex(group["publicKey"]["uncompressed"])
        for case in group["tests"]:
            result = case["result"]
            counts[result] += 1
            sig = bytes.fromhex(case["sig"])
            digest = hashlib.sha256(bytes.fromhex(case["msg"])).digest()
            if len(sig) > 255:
                # Cannot be carried in a 1-byte TLV length: such a signature never reaches
                # the SE.  Only invalid cases are this long.
                assert result == "invalid", case["tcId"]
                counts["too_long_for_tlv"] += 1
                continue
            data = _tlv(C.TAG_POINT, point) + _tlv(C.TAG_DIGEST, digest) + _tlv(sig_tag, sig)
            _, sw = send(chip, C.INS_VERIFY, C.VERIFY_WITH_POINT, 0, data)
            if result == "valid":
                assert sw == C.SW_OK, "tcId %d %s: %04X" % (case["tcId"], case["comment"], sw)
            else:
                assert sw in (C.SW_VERIFY_FAILED, C.SW_WRONG_DATA), (
                    "tcId %d %s: %04X" % (case["tcId"], case["comment"], sw)
                )
    assert counts["valid"] > 150 and counts["invalid"] > 80
    assert counts["acceptable"] == 0


def test_wycheproof_ecdh_through_ecdh_with_a_planted_key():
    suite = load_vectors("wycheproof/ecdh_secp256r1_ecpoint_test.json")
    chip = Chip(Nvm(None))
    select_applet(chip)
    slot = 2
    seen = {"valid": 0, "invalid": 0, "acceptable": 0}
    for group in suite["testGroups"]:
        for case in group["tests"]:
            scalar = int(case["private"], 16)
            assert 1 <= scalar < P256_N
            # Test-only back door: the key goes into the slot through the Nvm API.
            plant_key(chip.nvm, slot, scalar, C.POLICY_ECDH)
            shared, sw = send(chip, C.INS_ECDH, slot, 0, bytes.fromhex(case["public"]), 256)
            seen[case["result"]] += 1
            label = "tcId %d %s: %04X" % (case["tcId"], case["comment"], sw)
            if case["result"] == "valid":
                assert sw == C.SW_OK, label
                assert shared.hex() == case["shared"], label
            else:
                assert sw in (C.SW_WRONG_LENGTH, C.SW_WRONG_DATA), label
                assert shared == b""
    assert seen["valid"] > 300 and seen["invalid"] > 20 and seen["acceptable"] == 1
