"""Property tests: random command APDUs never crash process(), never hit the 6F00 catch-all
(which would mean an unhandled bug), and every refused command leaves the NVM unchanged
(the one remembered refusal: a refused SCP03 cryptogram/C-MAC increments the failure
counter)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetid.common import se_consts as C
from fleetid.common.apdu_wire import encode_command
from fleetid.sim.chip import Chip
from fleetid.sim.nvm import Nvm
from tests.sim.chip_support import counting_rng, fab_test_chip, select_applet

KNOWN_INS = sorted(C.INS_NAMES)
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def fabbed_state(tmp_path_factory):
    chip, record = fab_test_chip(tmp_path_factory.mktemp("fuzz"), rng=counting_rng(11))
    # A key in slot 1 and a data object, so commands find something to work on.
    chip.process(encode_command(0x80, C.INS_GENERATE_KEY, 1, C.CURVE_P256, b"\x03", 256))
    chip.process(encode_command(0x80, C.INS_WRITE_DATA_OBJECT, 0, 0, b"journal"))
    return chip.nvm.snapshot()


def _fresh_chip(state, select):
    nvm = Nvm(None)
    nvm.commit(state)
    chip = Chip(nvm, rng=counting_rng(12))
    if select:
        select_applet(chip)
    return chip


def _check(chip, raw):
    before = chip.nvm.snapshot()
    response = chip.process(raw)
    assert isinstance(response, bytes) and len(response) >= 2
    sw = response[-2] << 8 | response[-1]
    assert sw != C.SW_UNKNOWN, "catch-all reached for %s" % raw.hex()
    after = chip.nvm.snapshot()
    if sw != C.SW_OK:
        if sw in (C.SW_SECURITY_STATUS, C.SW_VERIFY_FAILED):
            before.pop("scp/fail", None)
            after.pop("scp/fail", None)
        assert after == before, "refused %04X but NVM changed for %s" % (sw, raw.hex())
        assert response == response[-2:]  # no data with an error status
    return sw


@given(raw=st.binary(max_size=300), select=st.booleans())
@FUZZ
def test_random_bytes_never_crash_and_refusals_change_nothing(fabbed_state, raw, select):
    _check(_fresh_chip(fabbed_state, select), raw)


command = st.tuples(
    st.sampled_from([0x00, 0x80, 0x84, 0x80, 0x80, 0x04, 0xC0]),
    st.sampled_from(KNOWN_INS),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=80),
    st.one_of(st.none(), st.integers(1, 300), st.just(65536)),
)


@given(commands=st.lists(command, min_size=1, max_size=6))
@FUZZ
def test_random_command_sequences_never_crash(fabbed_state, commands):
    chip = _fresh_chip(fabbed_state, True)
    for cla, ins, p1, p2, data, le in commands:
        raw = encode_command(cla, ins, p1, p2, data, le, True if le and le > 256 else None)
        _check(chip, raw)
    # Whatever happened, the MAK is never lost and slot 0 never changes.
    assert chip.nvm.get("key/0") == fabbed_state["key/0"]


@given(
    ins=st.sampled_from(KNOWN_INS),
    p1=st.integers(0, 255),
    p2=st.integers(0, 255),
    body=st.binary(min_size=1, max_size=40),
)
@FUZZ
def test_length_field_mismatches_are_6700_and_change_nothing(fabbed_state, ins, p1, p2, body):
    chip = _fresh_chip(fabbed_state, True)
    raw = bytes((0x80, ins, p1, p2, len(body) + 2)) + body  # Lc claims 2 more bytes
    assert _check(chip, raw) == C.SW_WRONG_LENGTH
