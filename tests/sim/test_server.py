"""The emulator's socket server with the device-side sim bus as its client.

A scripted endpoint stands in for the T=1' BusEndpoint here (the real one is exercised in
tests/device/test_se_session.py and tests/micropython/): it echoes each written frame back
after a number of NACKed reads, so the wire protocol, NACK, error and reset paths are all
visible.
"""

import os
import socket
import stat
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetid.common.errors import BusError, BusNack
from fleetid.device import bus_sim
from fleetid.sim import server as server_mod
from fleetid.device.bus import open_bus
from fleetid.sim.server import ListenAddressError, SimServer, parse_listen, serve_in_thread


class EchoEndpoint:
    """Answers a write with the same bytes, after `busy_reads` NACKed reads."""

    def __init__(self, busy_reads=0):
        self.busy_reads = busy_reads
        self.pending = bytearray()
        self.nacks_left = 0
        self.resets = 0
        self.writes = []
        self.raise_on_read = None

    def write(self, frame):
        self.writes.append(bytes(frame))
        self.pending = bytearray(frame)
        self.nacks_left = self.busy_reads

    def read(self, n):
        if self.raise_on_read is not None:
            raise self.raise_on_read
        if self.nacks_left or not self.pending:
            self.nacks_left = max(0, self.nacks_left - 1)
            raise BusNack()
        out = bytes(self.pending[:n])
        del self.pending[:n]
        return out

    def reset(self):
        self.resets += 1
        self.pending = bytearray()


@pytest.fixture
def unix_server(tmp_path):
    endpoint = EchoEndpoint(busy_reads=2)
    thread = serve_in_thread(endpoint, "unix:%s" % (tmp_path / "se.sock"), idle_timeout_s=5)
    try:
        yield endpoint, thread
    finally:
        thread.stop()


def _poll_read(bus, n, limit=10):
    for _ in range(limit):
        try:
            return bus.read(n)
        except BusNack:
            continue
    raise AssertionError("still NACKing")


def test_write_then_nacked_reads_then_data_over_a_unix_socket(unix_server, tmp_path):
    endpoint, thread = unix_server
    assert thread.bus_uri == "sim:unix:%s" % (tmp_path / "se.sock")
    # Only the owner may drive the emulated SE.
    assert stat.S_IMODE(os.stat(tmp_path / "se.sock").st_mode) == 0o600
    bus = open_bus(thread.bus_uri)
    try:
        bus.write(b"\x5a\x00\x03abc\x12\x34")
        with pytest.raises(BusNack):
            bus.read(3)
        with pytest.raises(BusNack):
            bus.read(3)
        assert bus.read(3) == b"\x5a\x00\x03"
        assert bus.read(5) == b"abc\x12\x34"
        with pytest.raises(BusNack):  # nothing pending
            bus.read(1)
        bus.reset()
        assert endpoint.resets == 1
    finally:
        bus.close()


def test_many_sequential_clients_are_served_in_turn(unix_server):
    endpoint, thread = unix_server
    for i in range(5):
        bus = open_bus(thread.bus_uri)
        bus.write(bytes([i]) * 4)
        assert _poll_read(bus, 4) == bytes([i]) * 4
        bus.close()
    assert endpoint.writes == [bytes([i]) * 4 for i in range(5)]
    assert thread.server.clients_served == 5


def test_large_frames_round_trip():
    endpoint = EchoEndpoint()
    with serve_in_thread(endpoint, "tcp:127.0.0.1:0") as thread:
        bus = open_bus(thread.bus_uri)
        frame = bytes(range(256)) * 16
        bus.write(frame)
        assert bus.read(len(frame)) == frame
        bus.close()


def test_tcp_loopback_with_an_ephemeral_port():
    endpoint = EchoEndpoint(busy_reads=1)
    with serve_in_thread(endpoint, "tcp:127.0.0.1:0") as thread:
        assert thread.bus_uri.startswith("sim:tcp:127.0.0.1:")
        assert not thread.bus_uri.endswith(":0")
        bus = open_bus(thread.bus_uri)
        bus.write(b"\x01\x02")
        assert _poll_read(bus, 2) == b"\x01\x02"
        bus.close()


def test_endpoint_failures_are_error_status_and_the_connection_survives(unix_server):
    endpoint, thread = unix_server
    bus = open_bus(thread.bus_uri)
    try:
        endpoint.raise_on_read = BusError("model failed")
        with pytest.raises(BusError):
            bus.read(2)
        endpoint.raise_on_read = RuntimeError("emulator bug")
        with pytest.raises(BusError):
            bus.read(2)
        endpoint.raise_on_read = None
        endpoint.busy_reads = 0
        bus.write(b"\x07")
        assert bus.read(1) == b"\x07"
    finally:
        bus.close()


def test_an_unknown_op_gets_an_error_and_the_client_is_dropped(unix_server):
    _, thread = unix_server
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(5)
    raw.connect(thread.server.listen[1])
    raw.sendall(b"Q\x00\x00")
    assert raw.recv(1) == bytes([server_mod.STATUS_ERROR])
    assert raw.recv(1) == b""  # closed by the server
    raw.close()
    # The next client is served normally.
    bus = open_bus(thread.bus_uri)
    bus.write(b"\x09")
    assert _poll_read(bus, 1) == b"\x09"
    bus.close()


def test_a_server_that_went_away_is_a_bus_error_not_a_hang(tmp_path):
    endpoint = EchoEndpoint()
    thread = serve_in_thread(endpoint, "unix:%s" % (tmp_path / "se.sock"))
    bus = open_bus(thread.bus_uri + "?timeout_ms=2000")
    bus.write(b"\x01")
    thread.stop()
    with pytest.raises(BusError):
        bus.read(1)
        bus.read(1)
    bus.close()
    assert not (tmp_path / "se.sock").exists()  # clean shutdown removes the socket file


def test_idle_client_is_dropped_so_the_next_one_gets_the_bus(tmp_path):
    endpoint = EchoEndpoint()
    with serve_in_thread(endpoint, "unix:%s" % (tmp_path / "s"), idle_timeout_s=0.2) as thread:
        idle = open_bus(thread.bus_uri)
        idle.write(b"\x01")  # served, then the client goes quiet
        nxt = open_bus(thread.bus_uri + "?timeout_ms=3000")
        nxt.write(b"\x02")  # waits in the backlog until the idle one is dropped
        assert nxt.read(1) == b"\x02"
        nxt.close()
        idle.close()


def test_stale_socket_file_is_replaced_but_a_live_server_is_not(tmp_path):
    path = tmp_path / "se.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # file left behind, nobody listening
    with serve_in_thread(EchoEndpoint(), "unix:%s" % path) as thread:
        with pytest.raises(OSError):
            SimServer(EchoEndpoint(), "unix:%s" % path).bind()
        bus = open_bus(thread.bus_uri)  # the live server kept its socket
        bus.write(b"\x03")
        assert bus.read(1) == b"\x03"
        bus.close()


@pytest.mark.parametrize(
    "listen",
    ["unix:", "tcp:127.0.0.1", "tcp:127.0.0.1:port", "udp:1", "tcp:0.0.0.0:7050",
     "tcp:192.168.1.2:7050"],
)
def test_bad_or_non_loopback_listen_addresses_are_refused(listen):
    with pytest.raises(ListenAddressError):
        parse_listen(listen)


def test_non_loopback_needs_the_dangerous_flag():
    assert parse_listen("tcp:0.0.0.0:7050", dangerous_allow_non_loopback=True) == (
        "tcp",
        "0.0.0.0",
        7050,
    )
    assert parse_listen("tcp:[::1]:7050") == ("tcp", "::1", 7050)


def test_shutdown_is_prompt_while_a_client_is_connected(unix_server):
    _, thread = unix_server
    bus = open_bus(thread.bus_uri)
    bus.write(b"\x01")
    done = threading.Event()

    def stop():
        thread.stop(timeout_s=5)
        done.set()

    t = threading.Thread(target=stop)
    t.start()
    t.join(6)
    assert done.is_set()
    bus.close()


def test_client_and_server_agree_on_the_wire_numbers():
    # bus_sim keeps private copies (const() on MicroPython, plain names on CPython).
    assert (bus_sim._OP_WRITE, bus_sim._OP_READ, bus_sim._OP_RESET) == (
        server_mod.OP_WRITE, server_mod.OP_READ, server_mod.OP_RESET) == (0x57, 0x52, 0x58)
    assert (bus_sim._STATUS_ACK, bus_sim._STATUS_NACK) == (
        server_mod.STATUS_ACK, server_mod.STATUS_NACK)


# -- property tests: the request parser never wedges the server -------------------------


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    endpoint = EchoEndpoint()
    path = tmp_path_factory.mktemp("srv") / "se.sock"
    thread = serve_in_thread(endpoint, "unix:%s" % path, idle_timeout_s=2)
    try:
        yield endpoint, thread
    finally:
        thread.stop()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=64))
def test_garbage_requests_never_wedge_the_server(echo_server, garbage):
    _, thread = echo_server
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(5)
    raw.connect(thread.server.listen[1])
    raw.sendall(garbage)
    raw.close()  # whatever it made of that, the next client must be served
    bus = open_bus(thread.bus_uri)
    try:
        bus.write(b"\x42\x43")
        assert bus.read(2) == b"\x42\x43"
    finally:
        bus.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(min_size=1, max_size=1200), min_size=1, max_size=4),
       st.integers(1, 300))
def test_frames_round_trip_in_any_read_sizes(echo_server, frames, chunk):
    endpoint, thread = echo_server
    endpoint.busy_reads = 0
    bus = open_bus(thread.bus_uri)
    try:
        for frame in frames:
            bus.write(frame)
            got = b""
            while len(got) < len(frame):
                got += bus.read(min(chunk, len(frame) - len(got)))
            assert got == frame
    finally:
        bus.close()
