"""sim/profiles.py: the named latency profiles and their figures."""

import pytest

from fleetid.common import se_consts as C
from fleetid.sim import profiles


def test_names():
    assert set(profiles.NAMES) == {"none", "atecc608", "optiga", "se050"}
    with pytest.raises(ValueError) as err:
        profiles.get("nope")
    assert "atecc608" in str(err.value)


def test_none_is_free():
    none = profiles.get("none")
    for name in C.INS_NAMES.values():
        assert none.op_ms(name) == 0.0
    assert none.nvm_write_ms(1000) == 0.0 and none.bus_ms(1000) == 0.0


def test_published_figures():
    atecc = profiles.get("atecc608")
    assert (atecc.op_ms("sign"), atecc.op_ms("verify"), atecc.op_ms("generate_key"),
            atecc.op_ms("ecdh")) == (115.0, 105.0, 115.0, 75.0)
    assert atecc.bus_hz == 1_000_000
    optiga = profiles.get("optiga")
    assert (optiga.op_ms("sign"), optiga.op_ms("verify"), optiga.op_ms("generate_key")) == (
        60.0, 85.0, 75.0)
    assert optiga.bus_hz == 400_000
    assert optiga.nvm_write_ms(100) == 18.0 and optiga.nvm_write_ms(101) == 36.0
    se050 = profiles.get("se050")
    assert 0 < se050.op_ms("sign") < atecc.op_ms("sign")


def test_every_command_has_a_figure_and_small_ops_are_small():
    for name in ("atecc608", "optiga", "se050"):
        profile = profiles.get(name)
        for op in C.INS_NAMES.values():
            assert profile.op_ms(op) > 0.0, (name, op)
        for op in ("get_data", "select", "counter", "get_random"):
            assert profile.op_ms(op) <= 25.0
        assert profile.op_ms("unknown-op") == 0.0
        assert profile.nvm_write_ms(0) == 0.0


def test_bus_time_is_nine_clocks_per_byte():
    assert profiles.get("optiga").bus_ms(100) == pytest.approx(100 * 9 * 1000 / 400_000)
