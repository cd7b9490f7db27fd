"""ISO/IEC 7816-4 APDU codec (fleetid.common.apdu_wire, .command_apdu) and ApduProtocol (.apdu)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetid.common import errors
from fleetid.common.apdu import ApduProtocol
from fleetid.common.apdu_wire import (
    CASE_1,
    CASE_2E,
    CASE_2S,
    CASE_3E,
    CASE_3S,
    CASE_4E,
    CASE_4S,
    encode_command,
    split_response,
)
from fleetid.common.command_apdu import CommandApdu, decode_command
from fleetid.common.errors import ApduError, ApduFormatError, LinkError

HEADER = "80CA0102"


def _data(n):
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


# (nc, le, extended argument, expected Lc field hex, expected Le field hex, case)
# Boundaries: Lc/Le 0x7F/0x80/0xFF/0x100, 255/256/257 bytes, 65535/65536.
ENCODING_TABLE = [
    (0, None, None, "", "", CASE_1),
    (0, 1, None, "", "01", CASE_2S),
    (0, 0x7F, None, "", "7F", CASE_2S),
    (0, 0x80, None, "", "80", CASE_2S),
    (0, 0xFF, None, "", "FF", CASE_2S),
    (0, 0x100, None, "", "00", CASE_2S),
    (0, 257, None, "", "000101", CASE_2E),
    (0, 0x100, True, "", "000100", CASE_2E),
    (0, 1, True, "", "000001", CASE_2E),
    (0, 65535, None, "", "00FFFF", CASE_2E),
    (0, 65536, None, "", "000000", CASE_2E),
    (1, None, None, "01", "", CASE_3S),
    (0x7F, None, None, "7F", "", CASE_3S),
    (0x80, None, None, "80", "", CASE_3S),
    (0xFF, None, None, "FF", "", CASE_3S),
    (0x100, None, None, "000100", "", CASE_3E),
    (257, None, None, "000101", "", CASE_3E),
    (1, None, True, "000001", "", CASE_3E),
    (65535, None, None, "00FFFF", "", CASE_3E),
    (1, 1, None, "01", "01", CASE_4S),
    (0x7F, 0x80, None, "7F", "80", CASE_4S),
    (0xFF, 0xFF, None, "FF", "FF", CASE_4S),
    (0xFF, 0x100, None, "FF", "00", CASE_4S),
    (0x100, 0x100, None, "000100", "0100", CASE_4E),
    (0xFF, 257, None, "0000FF", "0101", CASE_4E),
    (1, 1, True, "000001", "0001", CASE_4E),
    (257, 0xFF, None, "000101", "00FF", CASE_4E),
    (65535, 65536, None, "00FFFF", "0000", CASE_4E),
    (65535, 65535, None, "00FFFF", "FFFF", CASE_4E),
]


@pytest.mark.parametrize("nc,le,extended,lc_hex,le_hex,case", ENCODING_TABLE)
def test_encode_and_decode_match_the_iso_case_table(nc, le, extended, lc_hex, le_hex, case):
    data = _data(nc)
    expected = bytes.fromhex(HEADER + lc_hex) + data + bytes.fromhex(le_hex)
    encoded = encode_command(0x80, 0xCA, 0x01, 0x02, data, le, extended)
    assert encoded == expected
    cmd = decode_command(encoded)
    assert (cmd.cla, cmd.ins, cmd.p1, cmd.p2) == (0x80, 0xCA, 0x01, 0x02)
    assert cmd.data == data
    assert cmd.le == le
    assert cmd.case == case
    assert cmd.extended == case.endswith("E")
    assert cmd.encode() == encoded


MALFORMED = [
    ("", "empty"),
    ("80", "one byte"),
    ("80CA01", "three-byte header"),
    ("FFCA0102", "CLA FF is invalid (7816-4 5.1.1)"),
    ("80600102", "INS 6X is invalid (7816-4 5.1.2)"),
    ("806F010201", "INS 6F is invalid"),
    ("80900102", "INS 9X is invalid"),
    ("809F0102", "INS 9F is invalid"),
    (HEADER + "0000", "body of 2 starting 00: neither short nor extended"),
    (HEADER + "02AA", "short Lc 2 with 1 data byte"),
    (HEADER + "01AAAAAA", "short Lc 1 with 2 extra bytes"),
    (HEADER + "01AA0001", "short Lc with a 2-byte Le"),
    (HEADER + "000000AA", "extended Lc 0000"),
    (HEADER + "00000000", "extended Lc 0000 with a 1-byte tail"),
    (HEADER + "00000000" + "0000", "extended Lc 0000 with a 2-byte Le"),
    (HEADER + "000002AA", "extended Lc 2 with 1 data byte"),
    (HEADER + "000001AA01", "extended Lc with a 1-byte Le"),
    (HEADER + "000001AA010203", "extended Lc 1 with 3 extra bytes"),
    (HEADER + "00010000", "case 2E Le followed by a stray byte"),
    (HEADER + "FF" + "AA" * 254, "short Lc 255 with 254 bytes"),
    (HEADER + "0100" + "AA" * 2, "short Lc 1 where the data is longer"),
]


@pytest.mark.parametrize("hexstr,why", MALFORMED)
def test_decode_refuses_malformed_command(hexstr, why):
    with pytest.raises(ApduFormatError):
        decode_command(bytes.fromhex(hexstr))


def test_decode_refuses_non_bytes():
    with pytest.raises(ApduFormatError):
        decode_command("80CA0102")


ENCODE_ERRORS = [
    dict(cla=0xFF),
    dict(cla=256),
    dict(cla=-1),
    dict(cla=True),
    dict(ins=0x61),
    dict(ins=0x95),
    dict(p1=0x100),
    dict(p2=-1),
    dict(le=0),
    dict(le=65537),
    dict(le=-5),
    dict(le=True),
    dict(data=b"\x00" * 65536),
    dict(data="text"),
    dict(data=b"\x00" * 256, extended=False),
    dict(le=257, extended=False),
    dict(extended=True),  # case 1 has nothing to extend
    dict(extended=1),
]


@pytest.mark.parametrize("override", ENCODE_ERRORS)
def test_encode_refuses_out_of_range_arguments(override):
    args = dict(cla=0x80, ins=0xCA, p1=0, p2=0, data=b"", le=None, extended=None)
    args.update(override)
    with pytest.raises(ApduFormatError):
        encode_command(**args)


def test_encode_accepts_256_byte_data_only_extended():
    encoded = encode_command(0x80, 0xDA, 1, 0, b"\x11" * 256)
    assert encoded[4:7] == b"\x00\x01\x00"
    assert len(encoded) == 4 + 3 + 256


def test_split_response_separates_status_word():
    assert split_response(bytes.fromhex("9000")) == (b"", 0x9000)
    assert split_response(bytes.fromhex("0102036A88")) == (b"\x01\x02\x03", 0x6A88)
    assert split_response(bytearray(b"\xaa\x90\x00")) == (b"\xaa", 0x9000)


@pytest.mark.parametrize("resp", [b"", b"\x90"])
def test_split_response_refuses_less_than_two_bytes(resp):
    with pytest.raises(ApduFormatError):
        split_response(resp)


def test_command_apdu_equality_and_repr():
    a = CommandApdu(0x80, 0xCA, 1, 2, b"\x01", 5)
    assert a == decode_command(a.encode())
    assert a != CommandApdu(0x80, 0xCA, 1, 2, b"\x01", 6)
    assert "4S" in repr(a)


# ----------------------------------------------------------------------------------------
# Status words -> typed errors

SW_TABLE = [
    (0x6300, errors.VerificationFailed),
    (0x6700, errors.WrongLength),
    (0x6982, errors.SecurityStatusNotSatisfied),
    (0x6983, errors.AuthenticationBlocked),
    (0x6985, errors.ConditionsNotSatisfied),
    (0x6A80, errors.WrongData),
    (0x6A84, errors.NotEnoughMemory),
    (0x6A86, errors.IncorrectP1P2),
    (0x6A88, errors.ReferenceNotFound),
    (0x6A89, errors.AlreadyExists),
    (0x6D00, errors.InsNotSupported),
    (0x6E00, errors.ClaNotSupported),
    (0x6F00, ApduError),
    (0x6A82, ApduError),
    (0x6281, ApduError),
    (0x63C2, ApduError),
]


class FakeCard:
    """A scripted transceive: answers from a list of hex responses, records commands."""

    def __init__(self, *responses):
        self.responses = [bytes.fromhex(r) for r in responses]
        self.sent = []

    def transceive(self, apdu):
        self.sent.append(apdu)
        if not self.responses:
            raise AssertionError("unexpected extra command " + apdu.hex())
        return self.responses.pop(0)


@pytest.mark.parametrize("sw,cls", SW_TABLE)
def test_send_apdu_raises_the_class_named_by_the_status_word(sw, cls):
    card = FakeCard("%04X" % sw)
    proto = ApduProtocol(card.transceive)
    with pytest.raises(ApduError) as info:
        proto.send_apdu(0x80, 0x2C, 0, 0, b"\x01")
    assert type(info.value) is cls
    assert info.value.sw == sw


def test_transmit_returns_status_word_without_raising():
    card = FakeCard("0102" + "6A88")
    assert ApduProtocol(card).transmit(0x80, 0xB0, 1, 0, le=256) == (b"\x01\x02", 0x6A88)


def test_send_apdu_returns_data_on_9000():
    card = FakeCard("AABB9000")
    assert ApduProtocol(card).send_apdu(0x80, 0xCA, 1, 1, le=16) == b"\xaa\xbb"
    assert card.sent == [bytes.fromhex("80CA010110")]


# ----------------------------------------------------------------------------------------
# ApduProtocol: 61XX, 6CXX


def test_61xx_chains_get_response_until_9000():
    card = FakeCard("AA" * 256 + "6100", "BB" * 256 + "610A", "CC" * 10 + "9000")
    data = ApduProtocol(card).send_apdu(0x80, 0xCA, 0x01, 0x04, le=256)
    assert data == b"\xaa" * 256 + b"\xbb" * 256 + b"\xcc" * 10
    assert card.sent == [
        bytes.fromhex("80CA010400"),
        bytes.fromhex("00C0000000"),  # 61 00: 256 bytes (or more) remaining
        bytes.fromhex("00C000000A"),
    ]


def test_61xx_final_status_word_is_the_last_one():
    card = FakeCard("01" + "6105", "6A80")
    assert ApduProtocol(card).transmit(0x80, 0xCA, 0, 0, le=1) == (b"\x01", 0x6A80)


@pytest.mark.parametrize("cla,gr_cla", [(0x80, 0x00), (0x84, 0x00), (0x00, 0x00), (0x03, 0x03)])
def test_get_response_uses_interindustry_class_on_the_same_channel(cla, gr_cla):
    card = FakeCard("6102", "01029000")
    ApduProtocol(card).send_apdu(cla, 0xCA, 0, 0, le=2)
    assert card.sent[1][0] == gr_cla
    assert card.sent[1][1:] == bytes.fromhex("C0000002")


def test_61xx_loop_is_bounded():
    card = FakeCard(*(["016101"] * 10))
    proto = ApduProtocol(card, max_get_response=5)
    with pytest.raises(ApduFormatError):
        proto.transmit(0x80, 0xCA, 0, 0, le=1)
    assert len(card.sent) == 6  # the command, then exactly max_get_response rounds


def test_6cxx_resends_once_with_the_exact_le():
    card = FakeCard("6C10", "11" * 16 + "9000")
    data = ApduProtocol(card).send_apdu(0x80, 0x84, 0, 0, le=32)
    assert data == b"\x11" * 16
    assert card.sent == [bytes.fromhex("8084000020"), bytes.fromhex("8084000010")]


def test_6c00_means_256():
    card = FakeCard("6C00", "22" * 256 + "9000")
    ApduProtocol(card).send_apdu(0x80, 0x84, 0, 0, le=1)
    assert card.sent[1] == bytes.fromhex("8084000000")


def test_6cxx_keeps_data_and_extended_encoding():
    card = FakeCard("6C05", "0102030405" + "9000")
    ApduProtocol(card).send_apdu(0x80, 0x2A, 1, 0, b"\x99" * 300, le=1000)
    assert card.sent[1] == bytes.fromhex("802A0100" + "00012C") + b"\x99" * 300 + b"\x00\x05"


def test_6cxx_twice_is_not_followed_again():
    card = FakeCard("6C10", "6C08")
    proto = ApduProtocol(card)
    with pytest.raises(ApduError) as info:
        proto.send_apdu(0x80, 0x84, 0, 0, le=32)
    assert info.value.sw == 0x6C08
    assert len(card.sent) == 2


def test_6cxx_during_get_response_is_corrected():
    card = FakeCard("AA6110", "6C08", "BB" * 8 + "9000")
    assert ApduProtocol(card).send_apdu(0x80, 0xCA, 0, 0, le=1) == b"\xaa" + b"\xbb" * 8
    assert card.sent[1:] == [bytes.fromhex("00C0000010"), bytes.fromhex("00C0000008")]


def test_transceive_raw_does_not_follow_61xx():
    card = FakeCard("AA6110")
    proto = ApduProtocol(card)
    assert proto.transceive_raw(bytes.fromhex("84CA000000")) == (b"\xaa", 0x6110)
    assert len(card.sent) == 1


def test_transceive_raw_refuses_malformed_before_sending():
    card = FakeCard("9000")
    proto = ApduProtocol(card)
    with pytest.raises(ApduFormatError):
        proto.transceive_raw(bytes.fromhex("80CA0000030102"))
    assert card.sent == []
    assert proto.transceive_raw(b"\x80\xca", check=False) == (b"", 0x9000)


def test_short_response_is_a_format_error():
    with pytest.raises(ApduFormatError):
        ApduProtocol(FakeCard("90")).transmit(0x80, 0xCA, 0, 0)


def test_link_errors_pass_through_unchanged():
    def broken(apdu):
        raise LinkError(LinkError.TIMEOUT)

    with pytest.raises(LinkError) as info:
        ApduProtocol(broken).send_apdu(0x80, 0xCA, 0, 0)
    assert info.value.reason == LinkError.TIMEOUT


# ----------------------------------------------------------------------------------------
# Properties

valid_cla = st.integers(0, 0xFE)
valid_ins = st.integers(0, 0xFF).filter(lambda i: i & 0xF0 not in (0x60, 0x90))
byte = st.integers(0, 0xFF)
data_st = st.one_of(
    st.binary(max_size=300),
    st.integers(0, 65535).map(lambda n: b"\x5a" * n),
)
le_st = st.one_of(st.none(), st.integers(1, 300), st.integers(1, 65536))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_cla, valid_ins, byte, byte, data_st, le_st, st.sampled_from([None, True]))
def test_encode_decode_round_trip(cla, ins, p1, p2, data, le, extended):
    if extended and not data and le is None:
        extended = None  # case 1 cannot be extended
    encoded = encode_command(cla, ins, p1, p2, data, le, extended)
    cmd = decode_command(encoded)
    assert (cmd.cla, cmd.ins, cmd.p1, cmd.p2, cmd.data, cmd.le) == (cla, ins, p1, p2, data, le)
    assert cmd.extended == (
        bool(extended) or len(data) > 255 or (le is not None and le > 256)
    )
    assert cmd.encode() == encoded


def _check_decode(raw):
    try:
        cmd = decode_command(raw)
    except ApduFormatError:
        return
    # Whatever decodes is canonical: re-encoding gives the same bytes.
    assert cmd.encode() == raw


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_decode_never_raises_anything_but_apdu_format_error(raw):
    _check_decode(raw)


@st.composite
def near_valid_apdus(draw):
    # Headers followed by length fields that almost match: exercises every branch.
    header = bytes(draw(st.lists(byte, min_size=4, max_size=4)))
    form = draw(st.sampled_from(["short", "ext"]))
    nc = draw(st.integers(0, 300))
    delta = draw(st.integers(-3, 3))
    body = bytearray()
    if form == "short":
        body.append(nc & 0xFF)
    else:
        body += bytes((0, nc >> 8, nc & 0xFF))
    body += b"\x01" * max(0, nc + delta)
    return header + bytes(body)


@settings(max_examples=500, deadline=None)
@given(near_valid_apdus())
def test_decode_of_near_valid_apdus_is_strict(raw):
    _check_decode(raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 0xFFFF))
def test_split_response_round_trip(data, sw):
    assert split_response(data + bytes((sw >> 8, sw & 0xFF))) == (data, sw)
