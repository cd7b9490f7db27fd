"""Bus URIs: every documented form parses to the right fields; malformed ones are refused
with a BusUriError (a FleetidError) naming the problem, never a crash."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetid.common.errors import BusError, FleetidError
from fleetid.device import bus
from fleetid.device.bus import BusUriError, open_bus, parse_bus_uri


def test_sim_unix_uri_keeps_the_whole_path():
    u = parse_bus_uri("sim:unix:/tmp/a:b/se.sock")
    assert (u.backend, u.transport, u.path) == ("sim", "unix", "/tmp/a:b/se.sock")


def test_sim_tcp_uri_with_ipv4_and_ipv6_hosts():
    u = parse_bus_uri("sim:tcp:127.0.0.1:7050")
    assert (u.host, u.port) == ("127.0.0.1", 7050)
    u = parse_bus_uri("sim:tcp:[::1]:7050")
    assert (u.host, u.port) == ("::1", 7050)


def test_linux_i2c_uri_accepts_hex_and_decimal_addresses():
    u = parse_bus_uri("linux:i2c:/dev/i2c-1:0x48")
    assert (u.path, u.address) == ("/dev/i2c-1", 0x48)
    assert parse_bus_uri("linux:i2c:/dev/i2c-1:72").address == 0x48


def test_linux_spi_and_machine_uris_with_options():
    u = parse_bus_uri("linux:spi:/dev/spidev0.0?hz=2000000&mode=3")
    assert u.path == "/dev/spidev0.0"
    assert u.option_int("hz", 1) == 2000000 and u.option_int("mode", 0) == 3
    u = parse_bus_uri("machine:i2c:0:0x48?freq=1000000")
    assert (u.bus_id, u.address, u.option_int("freq", 0)) == (0, 0x48, 1000000)
    u = parse_bus_uri("machine:spi:1:17")
    assert (u.bus_id, u.cs_pin) == (1, 17)


@pytest.mark.parametrize(
    "uri,detail",
    [
        ("", "empty"),
        ("sim", "expected"),
        ("sim:unix:", "expected"),
        ("sim:tcp:localhost", "expected"),
        ("sim:tcp:localhost:0", "port"),
        ("sim:tcp:localhost:70000", "port"),
        ("sim:tcp::7050", "expected"),
        ("linux:i2c:/dev/i2c-1:0x07", "address"),  # reserved 7-bit address
        ("linux:i2c:/dev/i2c-1:0x78", "address"),
        ("linux:i2c:/dev/i2c-1:zz", "address"),
        ("linux:i2c:/dev/i2c-1", "expected"),
        ("usb:hid:0", "unknown backend"),
        ("linux:spi:/dev/spidev0.0?hz", "key=value"),
    ],
)
def test_malformed_uris_are_refused_with_a_reason(uri, detail):
    with pytest.raises(BusUriError) as info:
        parse_bus_uri(uri)
    assert detail in info.value.detail
    assert isinstance(info.value, FleetidError)


def test_bad_option_value_is_a_uri_error():
    u = parse_bus_uri("linux:spi:/dev/spidev0.0?hz=fast")
    with pytest.raises(BusUriError):
        u.option_int("hz", 0)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parser_either_parses_or_raises_bus_uri_error(text):
    try:
        parsed = parse_bus_uri(text)
    except BusUriError:
        return
    assert parsed.backend in ("sim", "linux", "machine")


@settings(max_examples=100, deadline=None)
@given(st.integers(0x08, 0x77), st.integers(0, 9))
def test_i2c_addresses_round_trip(address, n):
    u = parse_bus_uri("linux:i2c:/dev/i2c-%d:0x%02x" % (n, address))
    assert u.address == address and u.path == "/dev/i2c-%d" % n


def test_open_bus_to_a_missing_socket_is_a_bus_error(tmp_path):
    with pytest.raises(BusError):
        open_bus("sim:unix:%s?timeout_ms=200" % (tmp_path / "none.sock"))


def test_open_bus_to_a_missing_i2c_node_is_a_bus_error(tmp_path):
    with pytest.raises(BusError) as info:
        open_bus("linux:i2c:%s:0x48" % (tmp_path / "i2c-9"))
    assert "cannot open" in str(info.value)


def test_machine_backend_needs_micropython():
    with pytest.raises(BusError):
        open_bus("machine:i2c:0:0x48")
    assert bus.BusUri  # the parsed type is public for callers that validate early


def test_one_scheme_table_names_every_backend_and_its_module():
    # One row per backend:transport; the grammar's error message is built from it.
    import importlib

    pairs = [(row[0], row[1]) for row in bus.SCHEMES]
    assert pairs == [("sim", "unix"), ("sim", "tcp"), ("linux", "i2c"), ("linux", "spi"),
                     ("machine", "i2c"), ("machine", "spi")]
    with pytest.raises(BusUriError) as info:
        parse_bus_uri("usb:hid:0")
    assert info.value.detail.endswith("(%s)" % ", ".join("%s:%s" % p for p in pairs))
    for backend, transport, module, _target, _open in bus.SCHEMES:
        assert importlib.import_module(module).__name__ == module
    # The CPython-only backend lives with the other CPython-only adapters, never frozen.
    modules = {row[0]: row[2] for row in bus.SCHEMES}
    assert modules["linux"] == "fleetid.device.host.bus_linux"
    assert modules["sim"].startswith("fleetid.device.bus_")
    assert modules["machine"].startswith("fleetid.device.bus_")


def test_open_bus_reaches_the_linux_backend_through_the_table(tmp_path, monkeypatch):
    from fleetid.device.host import bus_linux

    opened = []

    class Recorder:
        def __init__(self, path, address=None, speed_hz=None, mode=None):
            opened.append((path, address, speed_hz, mode))

    monkeypatch.setattr(bus_linux, "LinuxI2cBus", Recorder)
    monkeypatch.setattr(bus_linux, "LinuxSpiBus", Recorder)
    open_bus("linux:i2c:/dev/i2c-3:0x48")
    open_bus(parse_bus_uri("linux:spi:/dev/spidev1.0?hz=2000000&mode=3"))
    open_bus("linux:spi:/dev/spidev1.1")
    assert opened == [("/dev/i2c-3", 0x48, None, None),
                      ("/dev/spidev1.0", None, 2000000, 3),
                      ("/dev/spidev1.1", None, bus_linux.SPI_DEFAULT_HZ, 0)]
