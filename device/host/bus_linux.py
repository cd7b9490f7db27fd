# The `linux` bus backends: i2c-dev and spidev through ioctl.  CPython only (fcntl, ctypes).
#
# The system calls go through a small `sysops` object (open/close/ioctl), so tests inject
# a fake kernel that decodes the structures exactly as the kernel would.
#
# i2c-dev (Linux include/uapi/linux/i2c-dev.h, i2c.h; Documentation/i2c/dev-interface.rst):
#     I2C_SLAVE 0x0703   bind the file to a 7-bit address (EBUSY if a kernel driver owns it)
#     I2C_RDWR  0x0707   combined transfer: arg -> struct i2c_rdwr_ioctl_data
#         struct i2c_rdwr_ioctl_data { struct i2c_msg *msgs; __u32 nmsgs; };
#         struct i2c_msg { __u16 addr; __u16 flags; __u16 len; __u8 *buf; };
#             flags: I2C_M_RD 0x0001 (read); len is at most 8192 per message (I2C_RDWR
#             limit in drivers/i2c/i2c-dev.c is the u16 len; we keep frames far below).
#     Native layout: on LP64 i2c_msg is 16 bytes (3 x u16, 2 padding, 8-byte pointer) and
#     i2c_rdwr_ioctl_data 16 bytes (pointer, u32, 4 padding); on 32-bit ARM 12 and 8.
#     An address NACK is ENXIO (Documentation/i2c/fault-codes.rst); several adapters
#     (bcm2835, designware) report a NACK as EREMOTEIO: both mean "busy, poll again".
#
# spidev (include/uapi/linux/spi/spidev.h):
#     struct spi_ioc_transfer { __u64 tx_buf; __u64 rx_buf; __u32 len; __u32 speed_hz;
#         __u16 delay_usecs; __u8 bits_per_word; __u8 cs_change; __u8 tx_nbits;
#         __u8 rx_nbits; __u8 word_delay_usecs; __u8 pad; }          (32 bytes)
#     SPI_IOC_MESSAGE(N) = _IOW('k', 0, char[N * 32]);  SPI_IOC_WR_MODE = _IOW('k', 1, u8);
#     SPI_IOC_WR_BITS_PER_WORD = _IOW('k', 3, u8);  SPI_IOC_WR_MAX_SPEED_HZ = _IOW('k', 4, u32)
#     _IOW(type, nr, size) = (1 << 30) | (size << 16) | (type << 8) | nr  (asm-generic/ioctl.h)
#   SPI has no NACK: while the SE has no frame ready it clocks out filler bytes.  The first
#   read after a write (the prologue of the SE's answer) therefore polls: a first byte that
#   is a filler (0x00 or 0xFF, never a valid NAD of either T=1' profile) is reported as
#   BusNack, like an I2C address NACK.  Reads after it (the rest of that frame) are not
#   checked, since INF may start with any byte.

import ctypes
import errno
import os
import struct

from fleetid.common.errors import BusError, BusNack

I2C_SLAVE = 0x0703
I2C_RDWR = 0x0707
I2C_M_RD = 0x0001
I2C_MSG_FORMAT = "@HHHP"  # addr, flags, len, buf pointer (native alignment)
I2C_RDWR_FORMAT = "@PI0P"  # msgs pointer, nmsgs; "0P" pads to the struct's alignment
I2C_MAX_TRANSFER = 8192

_IOC_WRITE = 1
_SPI_IOC_MAGIC = ord("k")
SPI_TRANSFER_FORMAT = "=QQIIHBBBBBB"  # struct spi_ioc_transfer, 32 bytes
SPI_TRANSFER_SIZE = struct.calcsize(SPI_TRANSFER_FORMAT)
SPI_DEFAULT_HZ = 1000000
SPI_FILLER_BYTES = (0x00, 0xFF)


def _iow(type_, nr, size):
    return (_IOC_WRITE << 30) | (size << 16) | (type_ << 8) | nr


def spi_ioc_message(n):
    """SPI_IOC_MESSAGE(n): the ioctl request number for n transfers."""
    return _iow(_SPI_IOC_MAGIC, 0, n * SPI_TRANSFER_SIZE)


SPI_IOC_WR_MODE = _iow(_SPI_IOC_MAGIC, 1, 1)
SPI_IOC_WR_BITS_PER_WORD = _iow(_SPI_IOC_MAGIC, 3, 1)
SPI_IOC_WR_MAX_SPEED_HZ = _iow(_SPI_IOC_MAGIC, 4, 4)

# errno values an adapter uses for "the device did not acknowledge".
I2C_NACK_ERRNOS = (errno.ENXIO, errno.EREMOTEIO)


class OsSysops:
    """The real system calls (os.open/os.close and fcntl.ioctl)."""

    def open(self, path, flags):
        return os.open(path, flags)

    def close(self, fd):
        os.close(fd)

    def ioctl(self, fd, request, arg):
        import fcntl

        return fcntl.ioctl(fd, request, arg)


def _open(sysops, path, kind):
    try:
        return sysops.open(path, os.O_RDWR)
    except OSError as exc:
        raise BusError("cannot open %s device %s: %s" % (kind, path, exc.strerror or exc))


class LinuxI2cBus:
    """A Bus on a Linux i2c-dev node.

    Params: path: "/dev/i2c-N".  address: 7-bit SE address (0x48 for SE050-class parts).
        sysops: system-call layer (OsSysops by default; tests inject a fake).
        nack_errnos: errno values that mean NACK (see the module header).
        reset_fn: optional callable that pulses the SE's reset pin (e.g. through gpiod).
    Raises: BusError when the node cannot be opened or the address cannot be bound.
    """

    def __init__(self, path, address, sysops=None, nack_errnos=I2C_NACK_ERRNOS, reset_fn=None):
        self.path = path
        self._reset_fn = reset_fn
        self.address = address
        self._ops = sysops if sysops is not None else OsSysops()
        self._nack = tuple(nack_errnos)
        self._fd = _open(self._ops, path, "i2c")
        try:
            # Binding the address up front reports EBUSY (a kernel driver owns the chip)
            # at open time rather than on the first transfer.
            self._ops.ioctl(self._fd, I2C_SLAVE, address)
        except OSError as exc:
            self._ops.close(self._fd)
            self._fd = None
            raise BusError("cannot bind i2c address 0x%02x on %s: %s" % (address, path, exc))

    def _transfer(self, flags, buf, length):
        if self._fd is None:
            raise BusError("bus closed")
        msg = struct.pack(I2C_MSG_FORMAT, self.address, flags, length, ctypes.addressof(buf))
        msgs = ctypes.create_string_buffer(msg, len(msg))
        arg = struct.pack(I2C_RDWR_FORMAT, ctypes.addressof(msgs), 1)
        try:
            self._ops.ioctl(self._fd, I2C_RDWR, arg)
        except OSError as exc:
            if exc.errno in self._nack:
                raise BusNack()
            raise BusError("i2c transfer failed on %s: %s" % (self.path, exc))

    def write(self, frame):
        """One I2C write transaction (START, address+W, frame, STOP).

        Raises: BusNack (the SE did not acknowledge: busy), BusError.
        """
        n = len(frame)
        if n < 1 or n > I2C_MAX_TRANSFER:
            raise BusError("i2c write length out of range")
        buf = ctypes.create_string_buffer(bytes(frame), n)
        self._transfer(0, buf, n)

    def read(self, n):
        """One I2C read transaction of exactly n bytes.

        Raises: BusNack (busy / nothing to send), BusError.
        """
        if n < 1 or n > I2C_MAX_TRANSFER:
            raise BusError("i2c read length out of range")
        buf = ctypes.create_string_buffer(n)
        self._transfer(I2C_M_RD, buf, n)
        return buf.raw[:n]

    def reset(self):
        """Pulse the SE's reset line through `reset_fn` when one was given; otherwise a
        no-op (i2c-dev has no reset line; the T=1' link's S(SWR) is the soft reset)."""
        if self._reset_fn is not None:
            self._reset_fn()

    def close(self):
        """Close the device node (idempotent)."""
        fd = self._fd
        self._fd = None
        if fd is not None:
            self._ops.close(fd)


class LinuxSpiBus:
    """A Bus on a Linux spidev node (full-duplex transfers, chip select per transaction).

    Params: path: "/dev/spidevB.C".  speed_hz: clock.  mode: SPI mode 0..3.
        sysops: system-call layer (OsSysops by default).  reset_fn: as LinuxI2cBus.
    Raises: BusError when the node cannot be opened or configured.
    """

    def __init__(self, path, speed_hz=SPI_DEFAULT_HZ, mode=0, sysops=None, reset_fn=None):
        if mode not in (0, 1, 2, 3):
            raise BusError("SPI mode must be 0..3")
        self.path = path
        self.speed_hz = speed_hz
        self._reset_fn = reset_fn
        self._expect_start = True
        self._ops = sysops if sysops is not None else OsSysops()
        self._fd = _open(self._ops, path, "spi")
        try:
            self._ops.ioctl(self._fd, SPI_IOC_WR_MODE, struct.pack("=B", mode))
            self._ops.ioctl(self._fd, SPI_IOC_WR_BITS_PER_WORD, struct.pack("=B", 8))
            self._ops.ioctl(self._fd, SPI_IOC_WR_MAX_SPEED_HZ, struct.pack("=I", speed_hz))
        except OSError as exc:
            self._ops.close(self._fd)
            self._fd = None
            raise BusError("cannot configure %s: %s" % (path, exc))

    def _transfer(self, tx, n):
        if self._fd is None:
            raise BusError("bus closed")
        txbuf = ctypes.create_string_buffer(bytes(tx), n)
        rxbuf = ctypes.create_string_buffer(n)
        xfer = struct.pack(
            SPI_TRANSFER_FORMAT,
            ctypes.addressof(txbuf),
            ctypes.addressof(rxbuf),
            n,
            self.speed_hz,
            0,  # delay_usecs
            8,  # bits_per_word
            0,  # cs_change: release CS after the transfer
            0,
            0,
            0,
            0,
        )
        try:
            self._ops.ioctl(self._fd, spi_ioc_message(1), xfer)
        except OSError as exc:
            raise BusError("spi transfer failed on %s: %s" % (self.path, exc))
        return rxbuf.raw[:n]

    def write(self, frame):
        """One SPI transaction clocking the frame out (MISO ignored).  Raises BusError."""
        n = len(frame)
        if n < 1 or n > I2C_MAX_TRANSFER:
            raise BusError("spi write length out of range")
        self._transfer(frame, n)
        self._expect_start = True

    def read(self, n):
        """One SPI transaction of n bytes clocked with 0xFF.

        Raises: BusNack when this is the first read after a write and its first byte is a
            filler (no frame ready yet); BusError.
        """
        if n < 1 or n > I2C_MAX_TRANSFER:
            raise BusError("spi read length out of range")
        data = self._transfer(b"\xff" * n, n)
        if self._expect_start:
            if data[0] in SPI_FILLER_BYTES:
                raise BusNack()
            self._expect_start = False
        return data

    def reset(self):
        """Pulse the SE's reset line through `reset_fn` when one was given; otherwise a
        no-op (spidev has no reset line)."""
        self._expect_start = True
        if self._reset_fn is not None:
            self._reset_fn()

    def close(self):
        """Close the device node (idempotent)."""
        fd = self._fd
        self._fd = None
        if fd is not None:
            self._ops.close(fd)
