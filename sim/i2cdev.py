"""An i2c-dev adapter node whose one chip is the emulator: the device behind the CUSE node.

`I2cDevBridge` answers the system calls a program makes on /dev/i2c-N (open, read, write,
ioctl, close) as drivers/i2c/i2c-dev.c does for an adapter with plain-I2C transfers
(I2C_FUNC_I2C), and carries every I2C message addressed to the emulated SE to the
emulator as one bus transaction (write a frame / read n bytes; a busy SE's NACK comes
back as ENXIO, Documentation/i2c/fault-codes.rst).  It is the `device` of a
sim/cuse.py CuseProtocol, so `--bus linux:i2c:/dev/i2c-fleetid:0x48`
(device/host/bus_linux.py, unmodified) talks to `fleetid sim serve`.

Kernel ABI (include/uapi/linux/i2c-dev.h, i2c.h; drivers/i2c/i2c-dev.c):

    I2C_RETRIES 0x0701  I2C_TIMEOUT 0x0702  I2C_SLAVE 0x0703  I2C_TENBIT 0x0704
    I2C_FUNCS 0x0705 (arg: unsigned long *)  I2C_SLAVE_FORCE 0x0706
    I2C_RDWR 0x0707 (arg: struct i2c_rdwr_ioctl_data *)  I2C_PEC 0x0708  I2C_SMBUS 0x0720

    struct i2c_msg { __u16 addr; __u16 flags; __u16 len; __u8 *buf; }
        LP64:  addr | flags | len | pad(2) | buf(8)      16 bytes   "=HHH2xQ"
        ILP32: addr | flags | len | pad(2) | buf(4)      12 bytes   "=HHH2xI"
    struct i2c_rdwr_ioctl_data { struct i2c_msg *msgs; __u32 nmsgs; }
        LP64:  msgs(8) | nmsgs(4) | pad(4)               16 bytes   "=QI4x"
        ILP32: msgs(4) | nmsgs(4)                         8 bytes   "=II"
    (ILP32 is also the compat layout a 32-bit program has on a 64-bit kernel:
    i2c-dev.c struct i2c_msg32 / i2c_rdwr_ioctl_data32.)

I2C_RDWR limits as i2c-dev.c enforces them: 1..I2C_RDWR_IOCTL_MAX_MSGS (42) messages, a
message at most 8192 bytes, else EINVAL; the result is the number of messages.  The
bridge's limits: 7-bit addresses only (I2C_TENBIT on and I2C_M_TEN are EOPNOTSUPP), no
SMBus (I2C_SMBUS is EOPNOTSUPP, I2C_FUNCS says I2C_FUNC_I2C only), no I2C_M_RECV_LEN.
A zero-length message (an address probe) is acknowledged when it names the SE's address
without reaching the emulator.

The emulator connection is opened on the node's first open and closed on its last
release; a bus error drops it (that call fails with EIO) and the next transfer reconnects.
"""

import errno
import logging
import struct

from fleetid.common.errors import BusError, BusNack
from fleetid.sim.cuse import IoctlRetry

log = logging.getLogger("fleetid.sim.i2cdev")

I2C_RETRIES = 0x0701
I2C_TIMEOUT = 0x0702
I2C_SLAVE = 0x0703
I2C_TENBIT = 0x0704
I2C_FUNCS = 0x0705
I2C_SLAVE_FORCE = 0x0706
I2C_RDWR = 0x0707
I2C_PEC = 0x0708
I2C_SMBUS = 0x0720

I2C_M_RD = 0x0001
I2C_M_TEN = 0x0010
I2C_M_RECV_LEN = 0x0400
I2C_FUNC_I2C = 0x00000001
I2C_RDWR_IOCTL_MAX_MSGS = 42
I2C_MAX_MESSAGE = 8192  # i2c-dev.c: msgs[i].len > 8192 is EINVAL; read()/write() clamp to it

# The two ABIs' layouts (module header), keyed by the caller's pointer width.
I2C_MSG = {64: struct.Struct("=HHH2xQ"), 32: struct.Struct("=HHH2xI")}
I2C_RDWR_DATA = {64: struct.Struct("=QI4x"), 32: struct.Struct("=II")}
UNSIGNED_LONG = {64: struct.Struct("=Q"), 32: struct.Struct("=I")}


class _Open:
    """Per-open state (i2c-dev's struct i2c_client of the file): the bound address."""

    def __init__(self):
        self.address = 0


class I2cDevBridge:
    """i2c-dev semantics in front of the emulator.

    Params: bus_factory: callable returning a connected Bus (write/read/close raising
        BusNack/BusError), e.g. lambda: open_bus("sim:unix:/tmp/se.sock").
        address: the emulated SE's 7-bit address (others NACK).
    Attributes: transfers (I2C messages carried to the emulator), connects.
    """

    def __init__(self, bus_factory, address=0x48):
        if not 0x03 <= address <= 0x77:
            raise ValueError("7-bit address 0x03..0x77 expected, got 0x%x" % address)
        self._bus_factory = bus_factory
        self.address = address
        self._bus = None
        self._files = {}
        self._next_fh = 1
        self.transfers = 0
        self.connects = 0

    # -- file operations ------------------------------------------------------------------

    def open(self, flags):
        """A process opened the node.  Returns the file handle."""
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = _Open()
        return fh

    def release(self, fh):
        """The last descriptor of `fh` was closed; the connection goes with the last file."""
        self._files.pop(fh, None)
        if not self._files:
            self._disconnect()

    def read(self, fh, size):
        """read(2): one I2C read of `size` bytes (at most 8192) at the bound address."""
        state = self._file(fh)
        size = min(size, I2C_MAX_MESSAGE)
        if size == 0:
            return b""
        return self._message(state.address, I2C_M_RD, b"", size)

    def write(self, fh, data):
        """write(2): one I2C write of `data` (at most 8192 bytes) to the bound address."""
        state = self._file(fh)
        data = bytes(data[:I2C_MAX_MESSAGE])
        self._message(state.address, 0, data, 0)
        return len(data)

    def ioctl(self, request):
        """One ioctl round (sim/cuse.py IoctlRequest).

        Returns: (result, out_bytes).  Raises: IoctlRetry (needs the caller's memory),
            OSError(errno) as i2c-dev.c would fail the call.
        """
        state = self._file(request.fh)
        cmd = request.cmd
        if cmd in (I2C_SLAVE, I2C_SLAVE_FORCE):
            # i2c-dev.c: arg > 0x7f without I2C_M_TEN is EINVAL.  EBUSY (a kernel driver
            # owns the address) cannot happen here: no driver sits on this adapter.
            if request.arg > 0x7F:
                raise OSError(errno.EINVAL, "address out of range")
            state.address = request.arg
            return 0, b""
        if cmd == I2C_FUNCS:
            layout = UNSIGNED_LONG[request.pointer_bits]
            if request.out_size < layout.size:
                raise IoctlRetry([], [(request.arg, layout.size)])
            return 0, layout.pack(I2C_FUNC_I2C)
        if cmd == I2C_RDWR:
            return self._rdwr(request)
        if cmd == I2C_TENBIT:
            if request.arg:
                raise OSError(errno.EOPNOTSUPP, "10-bit addresses not supported")
            return 0, b""
        if cmd in (I2C_RETRIES, I2C_TIMEOUT, I2C_PEC):
            return 0, b""  # adapter settings with no meaning on the emulator's socket
        if cmd == I2C_SMBUS:
            raise OSError(errno.EOPNOTSUPP, "SMBus not supported")
        raise OSError(errno.ENOTTY, "unknown ioctl")

    # -- I2C_RDWR -------------------------------------------------------------------------

    def _rdwr(self, request):
        """I2C_RDWR in the rounds of the retry protocol (sim/cuse.py header).

        Round 1 asks for the i2c_rdwr_ioctl_data, round 2 for the message array, round 3
        for every write buffer (in) and every read buffer (out); the last round runs the
        transfer.  Each round decodes afresh from the bytes the kernel copied in, so a
        caller that changed its structures between rounds is simply asked again.
        """
        rdwr = I2C_RDWR_DATA[request.pointer_bits]
        msg_layout = I2C_MSG[request.pointer_bits]
        data = request.in_data
        head_iov = (request.arg, rdwr.size)
        if len(data) < rdwr.size:
            raise IoctlRetry([head_iov])
        msgs_ptr, nmsgs = rdwr.unpack_from(data)
        if not msgs_ptr or nmsgs == 0 or nmsgs > I2C_RDWR_IOCTL_MAX_MSGS:
            raise OSError(errno.EINVAL, "bad i2c_rdwr_ioctl_data")
        msgs_iov = (msgs_ptr, nmsgs * msg_layout.size)
        if len(data) < rdwr.size + msgs_iov[1]:
            raise IoctlRetry([head_iov, msgs_iov])
        msgs = [msg_layout.unpack_from(data, rdwr.size + k * msg_layout.size)
                for k in range(nmsgs)]
        in_iovs = [head_iov, msgs_iov]
        out_iovs = []
        for addr, flags, length, buf in msgs:
            if length > I2C_MAX_MESSAGE:
                raise OSError(errno.EINVAL, "i2c_msg longer than 8192")
            if flags & (I2C_M_TEN | I2C_M_RECV_LEN):
                raise OSError(errno.EOPNOTSUPP, "10-bit / RECV_LEN messages not supported")
            if length:
                (out_iovs if flags & I2C_M_RD else in_iovs).append((buf, length))
        need_in = sum(n for _, n in in_iovs)
        need_out = sum(n for _, n in out_iovs)
        if len(data) != need_in or request.out_size != need_out:
            raise IoctlRetry(in_iovs, out_iovs)
        # Everything is here: the write buffers follow the array, in message order.
        pos = rdwr.size + msgs_iov[1]
        out = []
        for addr, flags, length, _buf in msgs:
            if flags & I2C_M_RD:
                out.append(self._message(addr, flags, b"", length))
            else:
                self._message(addr, flags, data[pos:pos + length], 0)
                pos += length
        return nmsgs, b"".join(out)

    # -- the emulator ---------------------------------------------------------------------

    def _file(self, fh):
        state = self._files.get(fh)
        if state is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return state

    def _message(self, addr, flags, payload, read_len):
        """One I2C message to the emulator.  Returns the bytes read (b"" for a write).

        Raises: OSError ENXIO (no device at addr, or the SE NACKed: busy), EIO.
        """
        if addr != self.address:
            raise OSError(errno.ENXIO, "no device at 0x%02x" % addr)
        if not payload and not read_len:
            return b""  # address probe: the SE is there
        bus = self._connect()
        try:
            if flags & I2C_M_RD:
                data = bytes(bus.read(read_len))
            else:
                bus.write(payload)
                data = b""
        except BusNack:
            raise OSError(errno.ENXIO, "NACK") from None
        except BusError as exc:
            log.warning("emulator bus failed (%s); reconnecting on the next transfer", exc)
            self._disconnect()
            raise OSError(errno.EIO, "emulator bus failed") from None
        self.transfers += 1
        return data

    def _connect(self):
        if self._bus is None:
            try:
                self._bus = self._bus_factory()
            except BusError as exc:
                log.warning("cannot reach the emulator: %s", exc)
                raise OSError(errno.EIO, "emulator unreachable") from None
            self.connects += 1
        return self._bus

    def _disconnect(self):
        bus = self._bus
        self._bus = None
        if bus is not None:
            bus.close()
