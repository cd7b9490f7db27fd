"""The Linux i2c-dev / spidev backends against a fake kernel.

The fake decodes the ioctl arguments the way the kernel does (struct layouts from
include/uapi/linux/i2c.h, i2c-dev.h and spi/spidev.h), follows the user-space pointers
with ctypes, and plays an SE on the other side, so the request numbers, the struct
packing and the pointer plumbing are all checked, not just the call sequence.
"""

import ctypes
import errno
import os
import struct

import pytest

from fleetid.common.errors import BusError, BusNack
from fleetid.device.host import bus_linux
from fleetid.device.host.bus_linux import LinuxI2cBus, LinuxSpiBus

POINTER = ctypes.sizeof(ctypes.c_void_p)


def test_request_numbers_match_the_kernel_headers():
    # i2c-dev.h
    assert bus_linux.I2C_SLAVE == 0x0703
    assert bus_linux.I2C_RDWR == 0x0707
    # spidev.h: _IOW('k', 0, char[32]) etc. (values as printed by a C program on Linux)
    assert bus_linux.SPI_TRANSFER_SIZE == 32
    assert bus_linux.spi_ioc_message(1) == 0x40206B00
    assert bus_linux.spi_ioc_message(2) == 0x40406B00
    assert bus_linux.SPI_IOC_WR_MODE == 0x40016B01
    assert bus_linux.SPI_IOC_WR_BITS_PER_WORD == 0x40016B03
    assert bus_linux.SPI_IOC_WR_MAX_SPEED_HZ == 0x40046B04


def test_i2c_struct_sizes_match_the_c_layout():
    class I2cMsg(ctypes.Structure):
        _fields_ = [
            ("addr", ctypes.c_uint16),
            ("flags", ctypes.c_uint16),
            ("len", ctypes.c_uint16),
            ("buf", ctypes.c_void_p),
        ]

    class RdwrData(ctypes.Structure):
        _fields_ = [("msgs", ctypes.c_void_p), ("nmsgs", ctypes.c_uint32)]

    assert struct.calcsize(bus_linux.I2C_MSG_FORMAT) == ctypes.sizeof(I2cMsg)
    assert struct.calcsize(bus_linux.I2C_RDWR_FORMAT) == ctypes.sizeof(RdwrData)
    if POINTER == 8:
        assert ctypes.sizeof(I2cMsg) == 16 and ctypes.sizeof(RdwrData) == 16


class FakeI2cKernel:
    """i2c-dev semantics over a fake SE: answers queued frames, NACKs while 'busy'."""

    def __init__(self):
        self.fds = {}
        self.next_fd = 10
        self.bound = {}
        self.written = []
        self.pending = bytearray()
        self.busy_reads = 0
        self.fail_errno = None
        self.owned_by_driver = False
        self.requests = []

    def open(self, path, flags):
        assert flags & os.O_RDWR
        if not path.startswith("/dev/i2c-"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        fd = self.next_fd
        self.next_fd += 1
        self.fds[fd] = path
        return fd

    def close(self, fd):
        del self.fds[fd]

    def ioctl(self, fd, request, arg):
        assert fd in self.fds
        self.requests.append(request)
        if request == bus_linux.I2C_SLAVE:
            if self.owned_by_driver:
                raise OSError(errno.EBUSY, "Device or resource busy")
            self.bound[fd] = arg
            return 0
        if request != bus_linux.I2C_RDWR:
            raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
        # Decode struct i2c_rdwr_ioctl_data and follow the msgs pointer.
        msgs_ptr, nmsgs = struct.unpack(bus_linux.I2C_RDWR_FORMAT, bytes(arg))
        msg_size = struct.calcsize(bus_linux.I2C_MSG_FORMAT)
        raw = ctypes.string_at(msgs_ptr, msg_size * nmsgs)
        for k in range(nmsgs):
            addr, flags, length, buf = struct.unpack_from(
                bus_linux.I2C_MSG_FORMAT, raw, k * msg_size
            )
            assert addr == self.bound[fd]
            if self.fail_errno is not None:
                raise OSError(self.fail_errno, os.strerror(self.fail_errno))
            if flags & bus_linux.I2C_M_RD:
                if self.busy_reads:
                    self.busy_reads -= 1
                    raise OSError(errno.ENXIO, "No such device or address")
                out = bytes(self.pending[:length])
                del self.pending[:length]
                ctypes.memmove(buf, out, len(out))
            else:
                self.written.append(ctypes.string_at(buf, length))
        return 0


def test_i2c_write_then_read_goes_through_i2c_rdwr_with_the_bound_address():
    kernel = FakeI2cKernel()
    bus = LinuxI2cBus("/dev/i2c-1", 0x48, sysops=kernel)
    assert kernel.requests == [bus_linux.I2C_SLAVE]
    frame = bytes.fromhex("5a c1 00 00 ce 3f".replace(" ", ""))
    bus.write(frame)
    assert kernel.written == [frame]
    kernel.pending.extend(bytes.fromhex("a5e1000102") + b"\xab\xcd")
    assert bus.read(4) == bytes.fromhex("a5e10001")
    assert bus.read(3) == b"\x02\xab\xcd"
    assert kernel.requests[1:] == [bus_linux.I2C_RDWR] * 3
    bus.close()
    assert kernel.fds == {}
    bus.close()  # idempotent


def test_i2c_address_nack_is_bus_nack_and_other_errors_are_bus_error():
    kernel = FakeI2cKernel()
    bus = LinuxI2cBus("/dev/i2c-1", 0x48, sysops=kernel)
    kernel.busy_reads = 2
    kernel.pending.extend(b"\x01\x02")
    with pytest.raises(BusNack):
        bus.read(2)
    with pytest.raises(BusNack):
        bus.read(2)
    assert bus.read(2) == b"\x01\x02"
    kernel.fail_errno = errno.EREMOTEIO  # bcm2835 / designware NACK
    with pytest.raises(BusNack):
        bus.write(b"\x00")
    kernel.fail_errno = errno.ETIMEDOUT
    with pytest.raises(BusError):
        bus.write(b"\x00")


def test_i2c_open_errors_are_bus_errors_and_release_the_fd():
    kernel = FakeI2cKernel()
    with pytest.raises(BusError) as info:
        LinuxI2cBus("/nope/i2c-1", 0x48, sysops=kernel)
    assert "cannot open" in str(info.value)
    kernel.owned_by_driver = True
    with pytest.raises(BusError) as info:
        LinuxI2cBus("/dev/i2c-1", 0x48, sysops=kernel)
    assert "0x48" in str(info.value)
    assert kernel.fds == {}


def test_i2c_lengths_out_of_range_and_use_after_close_are_refused():
    kernel = FakeI2cKernel()
    bus = LinuxI2cBus("/dev/i2c-1", 0x48, sysops=kernel)
    with pytest.raises(BusError):
        bus.read(0)
    with pytest.raises(BusError):
        bus.write(b"")
    bus.close()
    with pytest.raises(BusError):
        bus.write(b"\x01")


def test_i2c_reset_calls_the_reset_hook_or_does_nothing():
    pulses = []
    bus = LinuxI2cBus("/dev/i2c-1", 0x48, sysops=FakeI2cKernel(), reset_fn=lambda: pulses.append(1))
    bus.reset()
    assert pulses == [1]
    LinuxI2cBus("/dev/i2c-1", 0x48, sysops=FakeI2cKernel()).reset()


class FakeSpiKernel:
    """spidev semantics: decodes spi_ioc_transfer, full duplex against a fake SE."""

    def __init__(self):
        self.config = {}
        self.transfers = []
        self.miso = []  # queued MISO byte strings, one per transfer; default filler

    def open(self, path, flags):
        return 3

    def close(self, fd):
        self.config["closed"] = True

    def ioctl(self, fd, request, arg):
        if request == bus_linux.SPI_IOC_WR_MODE:
            self.config["mode"] = struct.unpack("=B", arg)[0]
        elif request == bus_linux.SPI_IOC_WR_BITS_PER_WORD:
            self.config["bits"] = struct.unpack("=B", arg)[0]
        elif request == bus_linux.SPI_IOC_WR_MAX_SPEED_HZ:
            self.config["hz"] = struct.unpack("=I", arg)[0]
        elif request == bus_linux.spi_ioc_message(1):
            assert len(arg) == 32
            tx, rx, length, hz, delay, bits, cs_change, _, _, _, _ = struct.unpack(
                bus_linux.SPI_TRANSFER_FORMAT, arg
            )
            mosi = ctypes.string_at(tx, length)
            self.transfers.append((mosi, hz, bits, cs_change))
            out = self.miso.pop(0) if self.miso else b"\x00" * length
            ctypes.memmove(rx, out[:length].ljust(length, b"\xff"), length)
        else:
            raise OSError(errno.ENOTTY, "bad ioctl")
        return 0


def test_spi_configures_mode_bits_and_speed_then_transfers():
    kernel = FakeSpiKernel()
    bus = LinuxSpiBus("/dev/spidev0.0", speed_hz=2000000, mode=3, sysops=kernel)
    assert kernel.config == {"mode": 3, "bits": 8, "hz": 2000000}
    bus.write(b"\x5a\xc1\x00")
    assert kernel.transfers[0] == (b"\x5a\xc1\x00", 2000000, 8, 0)
    # Not ready: filler on the prologue read is a NACK; then the frame arrives.
    kernel.miso = [b"\x00\x00\x00", b"\xa5\xe1\x02", b"\x00\xff"]
    with pytest.raises(BusNack):
        bus.read(3)
    assert bus.read(3) == b"\xa5\xe1\x02"
    # The rest of the frame may start with a filler value: it is data, not a NACK.
    assert bus.read(2) == b"\x00\xff"
    assert kernel.transfers[-1][0] == b"\xff\xff"  # reads clock out 0xFF
    bus.close()
    assert kernel.config["closed"]


def test_spi_bad_mode_is_refused():
    with pytest.raises(BusError):
        LinuxSpiBus("/dev/spidev0.0", mode=4, sysops=FakeSpiKernel())
