"""CRC-16/X-25 (the T=1' epilogue): catalogue check value, bit-by-bit reference."""

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetid.common import crc16
from tests.conftest import load_vectors


def _bitwise_x25(data):
    # Straight from the catalogue parameters: poly 0x1021 reflected, init/xorout 0xFFFF.
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc ^ 0xFFFF


def test_check_value_matches_catalogue_and_vector_file():
    vec = load_vectors("t1/frames.json")["crc16_x25_check"]
    assert crc16.crc16(vec["input_ascii"].encode()) == int(vec["value"], 16) == 0x906E
    assert crc16.CHECK_VALUE == 0x906E


def test_empty_input_is_zero():
    assert crc16.crc16(b"") == 0x0000


def test_slice_bounds_checksum_part_of_a_buffer():
    buf = bytearray(b"xx123456789yy")
    assert crc16.crc16(buf, 2, 11) == 0x906E
    assert crc16.crc16(memoryview(buf)[2:11]) == 0x906E


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_table_driven_equals_bitwise_reference(data):
    assert crc16.crc16(data) == _bitwise_x25(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=500), st.data())
def test_every_single_and_double_bit_error_is_detected(data, draw):
    nbits = len(data) * 8
    i = draw.draw(st.integers(0, nbits - 1))
    j = draw.draw(st.integers(0, nbits - 1))
    bad = bytearray(data)
    bad[i >> 3] ^= 1 << (i & 7)
    assert crc16.crc16(bad) != crc16.crc16(data)
    if j != i:
        bad[j >> 3] ^= 1 << (j & 7)
        assert crc16.crc16(bad) != crc16.crc16(data)


def test_cpython_picks_the_crc_hqx_fast_path():
    # MicroPython has no binascii.crc_hqx and keeps the table (tests/micropython runs it).
    assert crc16.crc16 is not crc16.crc16_table
    assert crc16.crc16_table(b"123456789") == 0x906E


def test_fast_path_matches_the_frame_vectors():
    from fleetid.common import t1

    vectors = load_vectors("t1/frames.json")
    checked = 0
    for section, profile in (("gp_t1prime", t1.PROFILE_GP),
                             ("nxp_se05x_t1oi2c", t1.PROFILE_SE05X)):
        for raw in vectors[section]["frames"].values():
            if not isinstance(raw, str):
                continue
            frame = bytes.fromhex(raw)
            body, epilogue = frame[:-2], frame[-2:]
            want = epilogue if profile.crc_msb_first else epilogue[::-1]
            assert crc16.crc16(body) == int.from_bytes(want, "big") == \
                crc16.crc16_table(body)
            checked += 1
    assert checked > 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 20), st.integers(0, 20))
def test_fast_path_equals_table_path_on_slices_and_views(data, lead, trail):
    buf = bytearray(bytes(lead) + data + bytes(trail))
    end = lead + len(data)
    want = crc16.crc16_table(data)
    assert crc16.crc16(data) == want
    assert crc16.crc16(buf, lead, end) == want
    assert crc16.crc16(memoryview(buf), lead, end) == want
    assert crc16.crc16(memoryview(buf)[lead:end]) == want
