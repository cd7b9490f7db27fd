"""T=1' block and CIP codec: byte-exact vectors (GP and captured SE050 frames), every PCB
layout, boundaries of LEN, typed FrameError for malformed frames, hypothesis round trips
and fuzzing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetid.common import t1
from fleetid.common.errors import FrameError
from tests.conftest import load_vectors

GP = t1.PROFILE_GP
NXP = t1.PROFILE_SE05X
VEC = load_vectors("t1/frames.json")


def test_gp_vector_frames_byte_exact():
    frames = VEC["gp_t1prime"]["frames"]
    types = VEC["gp_t1prime"]["s_types"]
    assert (GP.s_resynch, GP.s_ifs, GP.s_abort, GP.s_wtx, GP.s_cip, GP.s_release,
            GP.s_swr) == (types["RESYNCH"], types["IFS"], types["ABORT"], types["WTX"],
                          types["CIP"], types["RELEASE"], types["SWR"])
    for name, stype in (("RESYNCH request", GP.s_resynch), ("CIP request", GP.s_cip),
                        ("SWR request", GP.s_swr)):
        frame = bytes.fromhex(frames[name])
        assert t1.encode_block(GP, 0x21, t1.s_pcb(stype)) == frame
        blk = t1.decode_block(GP, frame)
        assert (blk.kind, blk.stype, blk.response, blk.inf) == (t1.BLOCK_S, stype, False, b"")


def test_gp_defaults_match_vector_file():
    d = VEC["gp_t1prime"]["defaults"]
    assert (GP.default_ifsc, GP.default_bwt_ms, GP.default_poll_ms) == (
        d["IFSC"], d["BWT_ms"], d["MPOT_ms"])


def test_se050_captured_frames_byte_exact():
    frames = VEC["nxp_se05x_t1oi2c"]["frames"]
    reset = bytes.fromhex(frames["soft reset request"])
    assert t1.encode_block(NXP, 0x5A, t1.s_pcb(NXP.s_swr)) == reset
    rerr = bytes.fromhex(frames["R-block error response"])
    assert t1.encode_block(NXP, 0xA5, t1.r_pcb(0, t1.R_OTHER_ERROR)) == rerr
    blk = t1.decode_block(NXP, rerr)
    assert (blk.kind, blk.nr, blk.error) == (t1.BLOCK_R, 0, t1.R_OTHER_ERROR)


def test_se050_atr_response_parses_as_nxp_cip():
    atr = bytes.fromhex(VEC["nxp_se05x_t1oi2c"]["frames"]["ATR response"])
    blk = t1.decode_block(NXP, atr)
    assert (blk.kind, blk.stype, blk.response, blk.nad) == (t1.BLOCK_S, NXP.s_swr, True, 0xA5)
    cip = t1.decode_cip(NXP, blk.inf)
    assert cip.iin == bytes.fromhex("A000000396")  # NXP's VID
    assert (cip.bwt_ms, cip.ifsc, cip.plid) == (1000, 254, t1.PLID_I2C)
    assert cip.hb == b"JCOP4 ATPO"
    assert cip.plp[:2] == b"\x03\xe8"  # MCF 1000 kHz
    assert t1.cip_poll_ms(NXP, cip) == 1
    assert t1.encode_cip(NXP, cip) == blk.inf
    assert t1.encode_block(NXP, 0xA5, blk.pcb, blk.inf) == atr


def _fields(cip):
    return (cip.version, cip.iin, cip.plid, cip.plp, cip.bwt_ms, cip.ifsc, cip.hb,
            cip.dllp_extra)


def test_gp_cip_round_trip_and_layout():
    plp = bytes.fromhex("0005" "03e8" "00" "19" "000a")  # I2C PLP, MPOT 25 x 100 us
    cip = t1.Cip(1, b"\x01\x02\x03", t1.PLID_I2C, plp, 300, 0xFF9, b"hb")
    raw = t1.encode_cip(GP, cip)
    # version | IIN len IIN | PLID | PLP len PLP | DLLP len DLLP | HB len HB
    assert raw == bytes.fromhex("01" "03010203" "02" "08" "0005" "03e8" "00" "19" "000a"
                                "04" "012c" "0ff9" "02") + b"hb"
    assert _fields(t1.decode_cip(GP, raw)) == _fields(cip)
    assert t1.cip_poll_ms(GP, cip) == 3  # 2.5 ms rounded up


@pytest.mark.parametrize("raw, why", [
    ("", "empty"),
    ("01 03 0102", "IIN runs past the end"),
    ("01 00 02 00 03 012c00 00", "DLLP shorter than BWT + IFSC"),
    ("01 00 02 00 04 012c0000 00", "IFSC 0"),
    ("01 00 02 00 04 012c0ffa 00", "IFSC above 0xFF9"),
    ("01 00 02 00 04 012c0008 00 ee", "trailing byte"),
])
def test_malformed_cip_is_refused(raw, why):
    with pytest.raises(FrameError) as e:
        t1.decode_cip(GP, bytes.fromhex(raw.replace(" ", "")))
    assert e.value.reason == t1.ERR_CIP, why


def test_pcb_layouts():
    assert [t1.i_pcb(ns, m) for ns in (0, 1) for m in (False, True)] == [0x00, 0x20, 0x40, 0x60]
    assert [t1.r_pcb(nr, e) for nr in (0, 1) for e in (0, 1, 2)] == [
        0x80, 0x81, 0x82, 0x90, 0x91, 0x92]
    assert t1.s_pcb(GP.s_wtx) == 0xC3 and t1.s_pcb(GP.s_wtx, True) == 0xE3
    assert t1.s_pcb(GP.s_swr, True) == 0xEF


@pytest.mark.parametrize("profile", [GP, NXP], ids=["gp", "se05x"])
@pytest.mark.parametrize("n", [0, 1, 0x7F, 0x80, 0xFE])
def test_i_block_round_trip_at_length_boundaries(profile, n):
    inf = bytes(range(256))[:n]
    frame = t1.encode_block(profile, profile.nad_host, t1.i_pcb(1, True), inf)
    assert len(frame) == profile.prologue_len + n + 2
    blk = t1.decode_block(profile, frame)
    assert (blk.kind, blk.ns, blk.more, blk.inf) == (t1.BLOCK_I, 1, True, inf)


@pytest.mark.parametrize("n", [0xFF, 0x100, 0xFF9])
def test_gp_two_byte_len_carries_long_blocks(n):
    inf = bytes(i & 0xFF for i in range(n))
    frame = t1.encode_block(GP, 0x12, t1.i_pcb(0, False), inf)
    assert frame[2:4] == n.to_bytes(2, "big")
    assert t1.decode_block(GP, frame).inf == inf


def test_inf_above_profile_maximum_is_refused_both_ways():
    with pytest.raises(FrameError):
        t1.encode_block(NXP, 0x5A, 0, bytes(255))
    with pytest.raises(FrameError):
        t1.encode_block(GP, 0x21, 0, bytes(0xFFA))
    frame = bytearray(t1.encode_block(GP, 0x21, 0, b""))
    frame[2:4] = b"\x0f\xfa"
    with pytest.raises(FrameError) as e:
        t1.decode_block(GP, bytes(frame) + bytes(0xFFA))
    assert e.value.reason == t1.ERR_LENGTH


def _with_crc(profile, body):
    from fleetid.common.crc16 import crc16

    c = crc16(body)
    if profile.crc_msb_first:
        return body + bytes((c >> 8, c & 0xFF))
    return body + bytes((c & 0xFF, c >> 8))


@pytest.mark.parametrize("frame_hex, reason", [
    ("21c000", t1.ERR_SHORT),
    ("21c0000065ad", t1.ERR_CRC),
    ("21c00001" "65ac", t1.ERR_LENGTH),
])
def test_malformed_frames_raise_typed_frame_error(frame_hex, reason):
    with pytest.raises(FrameError) as e:
        t1.decode_block(GP, bytes.fromhex(frame_hex))
    assert e.value.reason == reason


@pytest.mark.parametrize("body, reason", [
    ("33c00000", t1.ERR_NAD),  # unknown NAD
    ("21010000", t1.ERR_PCB),  # I-block RFU bit
    ("21a00000", t1.ERR_PCB),  # R-block bit 6
    ("21830000", t1.ERR_PCB),  # R-block error code 3
    ("21800001ff", t1.ERR_PCB),  # R-block with INF
    ("21c50000", t1.ERR_PCB),  # unknown S type 5 in the GP profile
    ("21c3000201ff", t1.ERR_PCB),  # WTX with 2 INF bytes
    ("21c1000100", t1.ERR_PCB),  # IFS 0
    ("21c1000300fe00", t1.ERR_PCB),  # IFS with 3 bytes
    ("21c0000101", t1.ERR_PCB),  # RESYNCH request with INF
])
def test_well_framed_but_invalid_blocks_raise_typed_frame_error(body, reason):
    with pytest.raises(FrameError) as e:
        t1.decode_block(GP, _with_crc(GP, bytes.fromhex(body)))
    assert e.value.reason == reason


def test_ifs_inf_encoding():
    assert t1.encode_ifs(254) == b"\xfe"
    assert t1.encode_ifs(255) == b"\x00\xff"
    assert t1.encode_ifs(0xFF9) == b"\x0f\xf9"
    assert t1.decode_ifs(b"\x0f\xf9") == 0xFF9 and t1.decode_ifs(b"\x0f\xfa") == 0
    with pytest.raises(FrameError):
        t1.encode_ifs(0)


def test_prologue_len_lets_the_host_read_in_two_steps():
    frame = t1.encode_block(GP, 0x12, t1.i_pcb(0, False), b"\x90\x00")
    assert t1.prologue_inf_len(GP, frame[:4]) == 2
    frame = t1.encode_block(NXP, 0xA5, t1.i_pcb(0, False), b"\x90\x00")
    assert t1.prologue_inf_len(NXP, frame[:3]) == 2


def test_encode_into_preallocated_buffer_with_memoryview_slice():
    buf = bytearray(64)
    apdu = memoryview(bytes(range(40)))
    n = t1.encode_block_into(GP, buf, 0x21, t1.i_pcb(0, True), apdu, 10, 30)
    assert bytes(buf[:n]) == t1.encode_block(GP, 0x21, 0x20, bytes(range(10, 30)))


_profiles = st.sampled_from([GP, NXP])


@st.composite
def _blocks(draw):
    profile = draw(_profiles)
    nad = draw(st.sampled_from([profile.nad_host, profile.nad_se]))
    kind = draw(st.sampled_from(["I", "R", "S"]))
    if kind == "I":
        pcb = t1.i_pcb(draw(st.integers(0, 1)), draw(st.booleans()))
        inf = draw(st.binary(max_size=300 if profile is GP else profile.max_ifs))
    elif kind == "R":
        pcb = t1.r_pcb(draw(st.integers(0, 1)), draw(st.integers(0, 2)))
        inf = b""
    else:
        stype = draw(st.sampled_from([profile.s_wtx, profile.s_ifs, profile.s_resynch]))
        response = draw(st.booleans())
        pcb = t1.s_pcb(stype, response)
        if stype == profile.s_wtx:
            inf = bytes((draw(st.integers(0, 255)),))
        elif stype == profile.s_ifs:
            inf = t1.encode_ifs(draw(st.integers(1, profile.max_ifs)))
        else:
            inf = b""
    return profile, nad, pcb, inf


@settings(max_examples=300, deadline=None)
@given(_blocks())
def test_encode_decode_round_trip(case):
    profile, nad, pcb, inf = case
    blk = t1.decode_block(profile, t1.encode_block(profile, nad, pcb, inf))
    assert (blk.nad, blk.pcb, blk.inf) == (nad, pcb, inf)


@settings(max_examples=300, deadline=None)
@given(_profiles, st.binary(max_size=64))
def test_fuzz_random_bytes_give_frame_error_or_a_valid_block(profile, data):
    try:
        blk = t1.decode_block(profile, data)
    except FrameError as e:
        assert e.reason in (t1.ERR_SHORT, t1.ERR_LENGTH, t1.ERR_CRC, t1.ERR_NAD, t1.ERR_PCB)
        return
    assert t1.encode_block(profile, blk.nad, blk.pcb, blk.inf) == bytes(data)


@settings(max_examples=300, deadline=None)
@given(_blocks(), st.data())
def test_fuzz_mutated_frames_never_raise_anything_but_frame_error(case, data):
    profile, nad, pcb, inf = case
    frame = bytearray(t1.encode_block(profile, nad, pcb, inf))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    try:
        t1.decode_block(profile, bytes(frame[:cut]))
    except FrameError:
        pass


@settings(max_examples=200, deadline=None)
@given(_profiles, st.binary(max_size=80))
def test_fuzz_cip_parser(profile, data):
    try:
        cip = t1.decode_cip(profile, data)
    except FrameError as e:
        assert e.reason == t1.ERR_CIP
        return
    assert _fields(t1.decode_cip(profile, t1.encode_cip(profile, cip))) == _fields(cip)
