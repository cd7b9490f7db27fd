"""device/host/bus_linux.py through a real i2c-dev ABI to the emulator: the CUSE bridge.

`fleetid sim i2c-dev` (sim/cuse.py + sim/i2cdev.py) makes a CUSE character device that
answers i2c-dev's system calls and carries each I2C message to `fleetid sim serve`.

* Where /dev/cuse can be opened, test_cli_bridge_serves_fleetid_se_info_on_a_cuse_node
  runs the real thing: `sim serve`, `sim i2c-dev`, then `fleetid se --bus
  linux:i2c:/dev/<node>:0x48 info` as separate processes through the kernel.  It skips
  with the precise reason otherwise; under CI=true it fails, unless the kernel itself has
  no CUSE (opening char device 10:203 gives ENODEV: not built in, no module to load),
  which no setting of the test host can change.
* Everywhere, the other tests run bus_linux.LinuxI2cBus unmodified over the bridge, with
  only the kernel's generic FUSE forwarding played by tests/device/fuse_kernel_support.py
  (request and reply bytes as on /dev/cuse, the unrestricted-ioctl retry dance, user
  memory copied with ctypes from the addresses bus_linux really packs): the structures
  are decoded by the bridge, and real T=1' frames go to the emulator and back.
* Where /dev/fuse can be mounted (not CUSE, but the same kernel FUSE code),
  test_real_kernel_fuse_... serves the bridge as a file of a FUSE mount: bus_linux opens
  it and binds 0x48 with its real system calls, T=1' frames cross the kernel through
  read(2)/write(2), and I2C_RDWR shows the restricted-ioctl limit that makes CUSE necessary.
"""

import ctypes
import errno
import os
import select
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetid.common.errors import BusError, BusNack
from fleetid.device.host import bus_linux
from fleetid.device.host.bus_linux import LinuxI2cBus
from fleetid.device.bus_sim import connect_unix
from fleetid.device.stack import open_se
from fleetid.sim import cuse, i2cdev
from fleetid.sim.i2cdev import I2cDevBridge

from ..conftest import require
from .fuse_kernel_support import FuseKernel, pointer_bits
from .fuse_mount_support import FuseMount, MountUnavailable

NODE = "/dev/i2c-fleetid"


class I2cMsg(ctypes.Structure):
    """struct i2c_msg as a C compiler lays it out (include/uapi/linux/i2c.h)."""

    _fields_ = [("addr", ctypes.c_uint16), ("flags", ctypes.c_uint16),
                ("len", ctypes.c_uint16), ("buf", ctypes.c_void_p)]


class I2cRdwrIoctlData(ctypes.Structure):
    """struct i2c_rdwr_ioctl_data (include/uapi/linux/i2c-dev.h)."""

    _fields_ = [("msgs", ctypes.POINTER(I2cMsg)), ("nmsgs", ctypes.c_uint32)]


class RecordingBus:
    """The emulator's side seen from the bridge, recorded: frames written, reads served."""

    def __init__(self, replies=(), nacks=0, fail=False):
        self.written = []
        self.replies = list(replies)
        self.nacks = nacks
        self.fail = fail
        self.closed = False

    def write(self, frame):
        self._check()
        self.written.append(bytes(frame))

    def read(self, n):
        self._check()
        return self.replies.pop(0)[:n]

    def _check(self):
        if self.fail:
            raise BusError("connection lost")
        if self.nacks:
            self.nacks -= 1
            raise BusNack()

    def reset(self):
        pass

    def close(self):
        self.closed = True


def _kernel(bus_factory, **kw):
    return FuseKernel(cuse.CuseProtocol(I2cDevBridge(bus_factory), "i2c-fleetid"), **kw)


@pytest.fixture
def served(fabbed, tmp_path):
    from fleetid.sim import profiles
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.server import serve_in_thread

    record, chip = fabbed
    sock = str(tmp_path / "se.sock")
    server = serve_in_thread(BusEndpoint(chip, latency=profiles.get("none")), "unix:" + sock)
    yield record, sock
    server.stop()


# -- layouts -------------------------------------------------------------------------------


def test_bridge_layouts_are_the_c_layouts_and_decode_what_bus_linux_packs():
    bits = pointer_bits()
    assert i2cdev.I2C_MSG[bits].size == ctypes.sizeof(I2cMsg)
    assert i2cdev.I2C_RDWR_DATA[bits].size == ctypes.sizeof(I2cRdwrIoctlData)
    assert struct.calcsize(bus_linux.I2C_MSG_FORMAT) == ctypes.sizeof(I2cMsg)
    assert (i2cdev.I2C_MSG[64].size, i2cdev.I2C_RDWR_DATA[64].size) == (16, 16)
    assert (i2cdev.I2C_MSG[32].size, i2cdev.I2C_RDWR_DATA[32].size) == (12, 8)
    packed = struct.pack(bus_linux.I2C_MSG_FORMAT, 0x48, bus_linux.I2C_M_RD, 300, 0x7F001234)
    assert i2cdev.I2C_MSG[bits].unpack(packed) == (0x48, 1, 300, 0x7F001234)
    c_msg = I2cMsg(0x48, 0, 7, 0x1000)
    assert i2cdev.I2C_MSG[bits].unpack(bytes(c_msg)) == (0x48, 0, 7, 0x1000)
    assert (i2cdev.I2C_SLAVE, i2cdev.I2C_RDWR) == (bus_linux.I2C_SLAVE, bus_linux.I2C_RDWR)
    assert cuse.IN_HEADER.size == 40 and cuse.OUT_HEADER.size == 16
    assert cuse.IOCTL_IN.size == 32 and cuse.IOCTL_OUT.size == 16
    assert cuse.CUSE_INIT_OUT.size == 72 and cuse.READ_IN.size == cuse.WRITE_IN.size == 40


# -- bus_linux, unmodified, through the bridge to the emulator -------------------------------


def test_bus_linux_runs_the_se_stack_through_the_bridge_to_the_emulator(served):
    record, sock = served
    bridge = I2cDevBridge(lambda: connect_unix(sock, 2000))
    kernel = FuseKernel(cuse.CuseProtocol(bridge, "i2c-fleetid"))
    bus = LinuxI2cBus(NODE, 0x48, sysops=kernel)
    with open_se(bus, timeout_ms=2000) as stack:
        assert stack.se.uid() == record.se_uid
        info = stack.se.info()
    assert info.attestation_chain[0] == record.chain_der[0]  # > 254 bytes: chained blocks
    # I2C_SLAVE takes its value in one round; every transfer after it was one I2C_RDWR
    # in four: nothing, the i2c_rdwr_ioctl_data, + the i2c_msg array, + the frame (in)
    # or the read buffer (out).  No NACKs at zero latency: each reached the emulator.
    assert kernel.rounds[0] == 1 and set(kernel.rounds[1:]) == {4}
    assert bridge.transfers == len(kernel.rounds) - 1 > 10 and bridge.connects == 1
    # Closing the node's last descriptor hung up on the emulator.
    assert bridge._bus is None and kernel.fds == {}


def test_i2c_rdwr_carries_a_combined_write_read_built_with_ctypes_structs():
    bus = RecordingBus(replies=[b"\xa5\xe1\x00\x01"])
    kernel = _kernel(lambda: bus)
    fd = kernel.open(NODE, os.O_RDWR)
    frame = ctypes.create_string_buffer(b"\x5a\xc1\x00\x00\xce\x3f", 6)
    answer = ctypes.create_string_buffer(4)
    msgs = (I2cMsg * 2)(I2cMsg(0x48, 0, 6, ctypes.addressof(frame)),
                        I2cMsg(0x48, i2cdev.I2C_M_RD, 4, ctypes.addressof(answer)))
    rdwr = I2cRdwrIoctlData(ctypes.cast(msgs, ctypes.POINTER(I2cMsg)), 2)
    assert kernel.do_ioctl(kernel.fds[fd], i2cdev.I2C_RDWR, ctypes.addressof(rdwr)) == 2
    assert bus.written == [frame.raw]
    assert answer.raw == b"\xa5\xe1\x00\x01"  # scattered into the caller's read buffer
    assert kernel.rounds == [4]


@pytest.mark.parametrize("nmsgs, length, want", [
    (0, 1, errno.EINVAL),  # i2c-dev.c: no messages
    (43, 1, errno.EINVAL),  # > I2C_RDWR_IOCTL_MAX_MSGS
    (1, 8193, errno.EINVAL),  # a message longer than 8192
])
def test_i2c_rdwr_limits_are_i2c_devs(nmsgs, length, want):
    bus = RecordingBus()
    kernel = _kernel(lambda: bus)
    fd = kernel.open(NODE, os.O_RDWR)
    buf = ctypes.create_string_buffer(length)
    count = max(nmsgs, 1)
    msgs = (I2cMsg * count)(*[I2cMsg(0x48, 0, length, ctypes.addressof(buf))] * count)
    rdwr = I2cRdwrIoctlData(ctypes.cast(msgs, ctypes.POINTER(I2cMsg)), nmsgs)
    with pytest.raises(OSError) as info:
        kernel.do_ioctl(kernel.fds[fd], i2cdev.I2C_RDWR, ctypes.addressof(rdwr))
    assert info.value.errno == want and bus.written == []


def test_nack_other_address_and_a_lost_emulator_map_to_the_kernels_errnos():
    buses = [RecordingBus(nacks=1), RecordingBus(replies=[b"\x01"])]
    made = []

    def factory():
        made.append(buses[len(made)])
        return made[-1]

    kernel = _kernel(factory)
    bus = LinuxI2cBus(NODE, 0x48, sysops=kernel)
    with pytest.raises(BusNack):  # the SE is busy: ENXIO, as an address NACK
        bus.write(b"\x5a")
    buses[0].fail = True
    with pytest.raises(BusError):  # the emulator went away: EIO, and the link is dropped
        bus.write(b"\x5a")
    assert buses[0].closed
    assert bus.read(1) == b"\x01"  # reconnected
    other = LinuxI2cBus(NODE, 0x49, sysops=kernel)
    with pytest.raises(BusNack):  # nobody at 0x49
        other.write(b"\x00")
    bus.close()
    other.close()
    assert buses[1].closed and len(made) == 2


def test_i2c_funcs_slave_and_unsupported_ioctls_answer_like_i2c_dev():
    kernel = _kernel(RecordingBus)
    fd = kernel.open(NODE, os.O_RDWR)
    funcs = kernel.ioctl(fd, i2cdev.I2C_FUNCS, bytes(8))
    assert struct.unpack("=Q", funcs)[0] == i2cdev.I2C_FUNC_I2C
    assert kernel.rounds[-1] == 2  # nothing, then the unsigned long as an out area
    for cmd, arg, want in [(i2cdev.I2C_SLAVE, 0x80, errno.EINVAL),
                           (i2cdev.I2C_TENBIT, 1, errno.EOPNOTSUPP),
                           (i2cdev.I2C_SMBUS, 0, errno.EOPNOTSUPP),
                           (0x0799, 0, errno.ENOTTY)]:
        with pytest.raises(OSError) as info:
            kernel.ioctl(fd, cmd, arg)
        assert info.value.errno == want, hex(cmd)
    assert kernel.ioctl(fd, i2cdev.I2C_SLAVE_FORCE, 0x48) == 0


def test_read_and_write_on_the_node_are_plain_i2c_transfers_at_the_bound_address():
    bus = RecordingBus(replies=[b"\xa5\xe1\x00"])
    kernel = _kernel(lambda: bus)
    fd = kernel.open(NODE, os.O_RDWR)
    with pytest.raises(OSError) as info:  # not bound yet: address 0, nobody there
        kernel.write(fd, b"\x01")
    assert info.value.errno == errno.ENXIO
    kernel.ioctl(fd, i2cdev.I2C_SLAVE, 0x48)
    assert kernel.write(fd, b"\x5a\xc1\x00") == 3
    assert kernel.read(fd, 3) == b"\xa5\xe1\x00"
    assert bus.written == [b"\x5a\xc1\x00"]


class Memory32:
    """A 32-bit process's memory: a few areas at low addresses."""

    def __init__(self):
        self.areas = {}

    def put(self, address, data):
        self.areas[address] = bytearray(data)
        return address

    def read(self, address, length):
        return bytes(self.areas[address][:length])

    def write(self, address, data):
        self.areas[address][:len(data)] = data


def test_a_32_bit_callers_compat_layout_is_decoded_with_4_byte_pointers():
    bus = RecordingBus(replies=[b"\xa5\xe1"])
    memory = Memory32()
    kernel = _kernel(lambda: bus, compat=True, memory=memory)
    fd = kernel.open(NODE, os.O_RDWR)
    frame = memory.put(0x1000, b"\x5a\xc1\x00")
    answer = memory.put(0x2000, bytes(2))
    msgs = memory.put(0x3000, struct.pack("=HHH2xI", 0x48, 0, 3, frame)
                      + struct.pack("=HHH2xI", 0x48, i2cdev.I2C_M_RD, 2, answer))
    rdwr = memory.put(0x4000, struct.pack("=II", msgs, 2))
    assert kernel.do_ioctl(kernel.fds[fd], i2cdev.I2C_RDWR, rdwr) == 2
    assert bus.written == [b"\x5a\xc1\x00"] and memory.read(0x2000, 2) == b"\xa5\xe1"
    funcs_at = memory.put(0x5000, bytes(4))
    kernel.do_ioctl(kernel.fds[fd], i2cdev.I2C_FUNCS, funcs_at)
    assert memory.read(0x5000, 4) == struct.pack("=I", 1)  # unsigned long is 4 bytes


# -- the CUSE protocol itself ----------------------------------------------------------------


def _request(opcode, body, unique=2, length=None):
    size = cuse.IN_HEADER.size + len(body) if length is None else length
    return cuse.IN_HEADER.pack(size, opcode, unique, 0, 0, 0, 1, 0, 0) + body


def test_cuse_init_reply_names_the_device_and_asks_for_unrestricted_ioctls():
    protocol = cuse.CuseProtocol(I2cDevBridge(RecordingBus), "i2c-fleetid")
    reply = protocol.handle(_request(cuse.CUSE_INIT, cuse.CUSE_INIT_IN.pack(7, 41, 0, 1)))
    length, error, unique = cuse.OUT_HEADER.unpack_from(reply)
    assert (length, error, unique) == (len(reply), 0, 2)
    major, minor, _, flags, max_read, max_write, dev_major, dev_minor = \
        cuse.CUSE_INIT_OUT.unpack_from(reply, 16)
    assert (major, minor, flags) == (7, 31, cuse.CUSE_UNRESTRICTED_IOCTL)
    assert (dev_major, dev_minor) == (0, 0)  # the kernel picks the numbers
    assert reply[16 + 72:] == b"DEVNAME=i2c-fleetid\x00"
    assert cuse.OUT_HEADER.unpack_from(protocol.handle(_request(99, b"")))[1] == -errno.ENOSYS
    assert protocol.handle(_request(cuse.FUSE_INTERRUPT, struct.pack("=Q", 2))) is None


@pytest.mark.parametrize("message, why", [
    (_request(cuse.CUSE_INIT, cuse.CUSE_INIT_IN.pack(7, 15, 0, 0)), "7.16"),
    (_request(cuse.CUSE_INIT, cuse.CUSE_INIT_IN.pack(8, 1, 0, 0)), "7.16"),
    (_request(cuse.FUSE_OPEN, cuse.OPEN_IN.pack(2, 0)), "before CUSE_INIT"),
    (_request(cuse.CUSE_INIT, b"", length=99), "length"),
    (_request(cuse.CUSE_INIT, b"\x07\x00"), "short CUSE_INIT"),
    (b"\x00" * 10, "short"),
])
def test_cuse_protocol_refuses_malformed_sessions(message, why):
    protocol = cuse.CuseProtocol(I2cDevBridge(RecordingBus), "i2c-fleetid")
    with pytest.raises(cuse.CuseError) as info:
        protocol.handle(message)
    assert why in info.value.reason


def test_cuse_device_names_that_the_kernel_would_misparse_are_refused():
    for name in ("", "/dev/x", "a=b", "a\x00b"):
        with pytest.raises(ValueError):
            cuse.CuseProtocol(I2cDevBridge(RecordingBus), name)


def test_serve_answers_each_message_of_the_channel_and_stops_on_request():
    # A SOCK_SEQPACKET pair keeps message boundaries as /dev/cuse does (one request per
    # read, one reply per write): serve() runs its real read/select/write loop on it.
    channel, kernel_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel_end.settimeout(5)
    bus = RecordingBus(replies=[b"\xa5\xe1\x00\x01"])
    protocol = cuse.CuseProtocol(I2cDevBridge(lambda: bus), "i2c-fleetid")
    stop, ready = threading.Event(), []
    server = threading.Thread(target=cuse.serve, daemon=True,
                              args=(channel.fileno(), protocol, stop, lambda: ready.append(1)))
    server.start()

    def over_the_channel(request):
        kernel_end.send(request)
        return kernel_end.recv(cuse.READ_BUFFER)

    try:
        kernel = FuseKernel(protocol, transport=over_the_channel)
        i2c = LinuxI2cBus(NODE, 0x48, sysops=kernel)
        i2c.write(b"\x5a\xc1\x00\x00\xce\x3f")
        assert i2c.read(4) == b"\xa5\xe1\x00\x01"
        i2c.close()
        assert bus.written == [b"\x5a\xc1\x00\x00\xce\x3f"] and bus.closed
        assert ready == [1]  # once, after the CUSE_INIT reply went out
    finally:
        stop.set()
        server.join(timeout=5)
    assert not server.is_alive()
    channel.close()
    kernel_end.close()


class ReadWriteI2cBus:
    """i2c-dev's other interface (Documentation/i2c/dev-interface.rst): after I2C_SLAVE,
    write(2) is one I2C write and read(2) one I2C read at the bound address."""

    def __init__(self, linux_bus):
        self.linux_bus = linux_bus
        self.fd = linux_bus._fd

    def write(self, frame):
        self._call(os.write, frame)

    def read(self, n):
        data = self._call(os.read, n)
        if len(data) != n:
            raise BusError("short read")
        return data

    def _call(self, op, arg):
        try:
            return op(self.fd, arg)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise BusNack() from None
            raise BusError(str(exc)) from None

    def reset(self):
        pass

    def close(self):
        self.linux_bus.close()


def test_real_kernel_fuse_carries_i2c_slave_and_t1_frames_and_refuses_a_restricted_rdwr(
        served, tmp_path):
    # Not CUSE: a FUSE mount (tests/device/fuse_mount_support.py), so the kernel's own
    # requests reach CuseProtocol and bus_linux runs with its real system calls.
    record, sock = served
    bridge = I2cDevBridge(lambda: connect_unix(sock, 2000))
    (tmp_path / "mnt").mkdir()
    mount = FuseMount(cuse.CuseProtocol(bridge, "i2c-fleetid"), tmp_path / "mnt")
    try:
        mount.__enter__()
    except MountUnavailable as exc:
        pytest.skip("no FUSE mount here (%s); the CUSE test below is the one CI requires"
                    % exc.reason)
    try:
        bus = LinuxI2cBus(mount.path, 0x48)  # os.open + fcntl.ioctl(I2C_SLAVE, 0x48)
        assert mount.ioctls == [(i2cdev.I2C_SLAVE, 0, 0)]
        with pytest.raises(BusError) as info:
            bus.write(b"\x5a\xc1\x00\x00\xce\x3f")
        # The bridge answered FUSE_IOCTL_RETRY; a restricted (file-system) ioctl may not
        # retry, so the kernel failed the call with EIO after one round, nothing sent.
        # (Only CUSE's unrestricted ioctls can follow the pointers: the CUSE test below.)
        assert "Input/output error" in str(info.value)
        assert mount.ioctls[1:] == [(i2cdev.I2C_RDWR, 0, 0)] and bridge.transfers == 0
        with open_se(ReadWriteI2cBus(bus), timeout_ms=2000) as stack:
            assert stack.se.uid() == record.se_uid
        assert bridge.transfers > 10
    finally:
        mount.__exit__(None, None, None)
    assert mount.error is None


# -- the real thing, where the kernel offers CUSE -----------------------------------------------


def _cuse_channel(tmp_path):
    """(path of an openable CUSE channel or None, reason, kernel_lacks_cuse)."""
    path = "/dev/cuse"
    if not os.path.exists(path) and os.geteuid() == 0:
        # No node (no udev, or a container's /dev): make one where we may, to ask the
        # kernel itself whether char device 10:203 has a driver.
        path = str(tmp_path / "cuse")
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(10, 203))
        except OSError as exc:
            return None, "no /dev/cuse and mknod c 10 203 failed: %s" % exc, False
    try:
        fd = cuse.open_cuse(path)
    except cuse.CuseError as exc:
        note = _kernel_config_note()
        # ENODEV from 10:203 is the kernel's own answer (the open already tried to load
        # the module); without root to ask it, the kernel's config may still say so.
        lacks = exc.errno in (errno.ENODEV, errno.ENXIO) or "CONFIG_CUSE is not set" in note
        return None, exc.reason + note, lacks
    os.close(fd)  # the probe's channel: the kernel drops it unanswered
    return path, "", False


def _kernel_config_note():
    try:
        import gzip

        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith(("CONFIG_CUSE=", "# CONFIG_CUSE is not set")):
                    return " [/proc/config.gz: %s]" % line.strip()
    except OSError:
        pass
    return ""


def _wait_for_line(proc, needle, timeout_s):
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.2)
        if ready:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return seen
    raise AssertionError("no %r within %ss; got %r" % (needle, timeout_s, seen))


def test_cli_bridge_serves_fleetid_se_info_on_a_cuse_node(fabbed, tmp_path):
    channel, reason, kernel_lacks = _cuse_channel(tmp_path)
    if channel is None and kernel_lacks:
        pytest.skip("the kernel has no CUSE, so no host setting can enable it: " + reason)
    require(channel is not None, "an openable /dev/cuse: " + reason)
    record, _chip = fabbed
    fleetid = shutil.which("fleetid", path=os.path.dirname(sys.executable))
    sock = str(tmp_path / "se.sock")
    node = "/dev/i2c-fleetid-%d" % os.getpid()
    procs = []
    try:
        serve = subprocess.Popen([fleetid, "sim", "serve", "--nvm", str(tmp_path / "chip.nvm"),
                                  "--listen", "unix:" + sock], stderr=subprocess.PIPE, text=True)
        procs.append(serve)
        _wait_for_line(serve, "serving", 30)
        bridge = subprocess.Popen([fleetid, "sim", "i2c-dev", "--listen", node, "--se",
                                   "unix:" + sock, "--cuse-device", channel],
                                  stderr=subprocess.PIPE, text=True)
        procs.append(bridge)
        _wait_for_line(bridge, "serving " + node, 30)
        out = subprocess.run([fleetid, "se", "--bus", "linux:i2c:%s:0x48" % node, "info"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "UID:          %s" % record.se_uid.hex() in out.stdout
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
    assert not os.path.exists(node)  # gone with the device (devtmpfs, or the bridge's own node)


def test_cli_names_the_cause_when_cuse_cannot_start_and_refuses_bad_options(tmp_path):
    from click.testing import CliRunner

    from fleetid.cli.main import cli

    def run(*argv):
        return CliRunner().invoke(cli, ["sim", "i2c-dev", *argv])

    base = ["--listen", "/dev/i2c-fleetid", "--se", "unix:" + str(tmp_path / "se.sock")]
    missing = run(*base, "--cuse-device", str(tmp_path / "cuse"))
    assert missing.exit_code == 1 and "modprobe cuse" in missing.output
    assert "mknod %s c 10 203" % (tmp_path / "cuse") in missing.output
    if _cuse_channel(tmp_path)[2] and os.geteuid() == 0:
        # (Only where the kernel lacks CUSE: elsewhere the command would start serving.)
        node = tmp_path / "cuse-node"
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(10, 203))
        opened = run(*base, "--cuse-device", str(node))
        assert opened.exit_code == 1
        assert "the kernel has no CUSE driver" in opened.output
    for bad, where in [(["--listen", "/tmp/i2c-x"], "--listen"),
                       (["--se", "tcp:nohost"], "--se"),
                       (["--address", "0x80"], "--address")]:
        argv = dict(zip(base[::2], base[1::2]))
        argv.update(dict(zip(bad[::2], bad[1::2])))
        result = run(*[w for kv in argv.items() for w in kv])
        assert result.exit_code == 2 and where in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


@given(opcode=st.sampled_from([cuse.FUSE_OPEN, cuse.FUSE_READ, cuse.FUSE_WRITE,
                               cuse.FUSE_RELEASE, cuse.FUSE_IOCTL, cuse.FUSE_POLL, 7, 4097]),
       body=st.binary(max_size=200), unique=st.integers(0, 2**64 - 1))
@settings(max_examples=300, deadline=None)
def test_any_request_after_init_gets_a_well_formed_reply_or_a_typed_error(opcode, body, unique):
    protocol = cuse.CuseProtocol(I2cDevBridge(RecordingBus), "i2c-fleetid")
    protocol.handle(_request(cuse.CUSE_INIT, cuse.CUSE_INIT_IN.pack(7, 41, 0, 1)))
    try:
        reply = protocol.handle(_request(opcode, body, unique=unique))
    except cuse.CuseError:
        return
    length, error, echoed = cuse.OUT_HEADER.unpack_from(reply)
    assert length == len(reply) and echoed == unique and error <= 0


@given(in_data=st.binary(max_size=120), out_size=st.integers(0, 9000),
       cmd=st.sampled_from([i2cdev.I2C_RDWR, i2cdev.I2C_FUNCS]), bits=st.sampled_from([32, 64]))
@settings(max_examples=300, deadline=None)
def test_ioctl_decoding_of_arbitrary_caller_memory_retries_or_fails_typed(in_data, out_size,
                                                                          cmd, bits):
    bridge = I2cDevBridge(lambda: RecordingBus(replies=[bytes(9000)] * 50))
    fh = bridge.open(os.O_RDWR)
    flags = cuse.FUSE_IOCTL_UNRESTRICTED | (cuse.FUSE_IOCTL_32BIT if bits == 32 else 0)
    try:
        result, out = bridge.ioctl(cuse.IoctlRequest(fh, cmd, 0x1000, flags, in_data, out_size))
    except cuse.IoctlRetry as retry:
        assert len(retry.in_iovs) + len(retry.out_iovs) <= 2 + i2cdev.I2C_RDWR_IOCTL_MAX_MSGS
        assert all(0 < n <= i2cdev.I2C_MAX_MESSAGE or (base, n) == retry.in_iovs[1]
                   for base, n in retry.in_iovs[1:] + retry.out_iovs)
        return
    except OSError as exc:
        assert exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENXIO)
        return
    assert len(out) <= out_size
