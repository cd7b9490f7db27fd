"""The kernel's half of a CUSE session, for hosts where /dev/cuse cannot be opened.

`FuseKernel` plays fs/fuse/cuse.c and fs/fuse/ioctl.c against sim/cuse.py's CuseProtocol:
it writes each request as the bytes the kernel would put on /dev/cuse and reads the
reply bytes back.  It knows nothing about I2C: like fuse_do_ioctl it sends an ioctl with
no data, and while the server answers FUSE_IOCTL_RETRY it copies the requested areas of
the caller's memory (real memory of this process, through ctypes, as copy_from_user
does) and asks again; the final answer's data is scattered over the out areas
(copy_to_user).  Its open/close/ioctl make it a `sysops` for device/host/bus_linux.py, which
runs unmodified on top: bus_linux packs real struct i2c_msg / i2c_rdwr_ioctl_data with
ctypes and passes their addresses, and the server has to find the frames by following
those pointers itself.

The checks the kernel makes are here too: the CUSE_INIT reply's version and DEVNAME
(cuse_process_init_reply), iovec count and size (fuse_copy_ioctl_iovec), out data no
longer than the out areas, ENOSYS -> ENOTTY (fuse_send_ioctl).  The kernel retries without
limit; this harness stops after MAX_ROUNDS so a looping server fails the test.
"""

import ctypes
import errno
import os

from fleetid.sim import cuse

KERNEL_MINOR = 41  # what a 6.x kernel announces in cuse_init_in
MAX_ROUNDS = 8


class ProcessMemory:
    """The caller's address space: this process's memory (copy_from_user/copy_to_user)."""

    def read(self, address, length):
        return ctypes.string_at(address, length) if length else b""

    def write(self, address, data):
        if data:
            ctypes.memmove(address, data, len(data))


class FuseKernel:
    """The kernel side of one CUSE connection (see the module header).

    Params: protocol: a sim/cuse.py CuseProtocol.  compat: the caller is a 32-bit process
        (FUSE_IOCTL_COMPAT | FUSE_IOCTL_32BIT).  memory: the caller's address space.
        transport: callable(request bytes) -> reply bytes (default: protocol.handle; a
        test of sim/cuse.py serve() passes one that goes through a message socket).
    Attributes: devname (from CUSE_INIT), unrestricted, rounds (FUSE_IOCTL requests sent
        for each ioctl() call, in order), requests (opcodes sent).
    """

    def __init__(self, protocol, compat=False, memory=None, transport=None):
        self.protocol = protocol
        self.transport = transport or protocol.handle
        self.compat = compat
        self.memory = memory or ProcessMemory()
        self._unique = 0
        self.rounds = []
        self.requests = []
        self.fds = {}
        self._next_fd = 20
        reply = self._send(cuse.CUSE_INIT, 0, cuse.CUSE_INIT_IN.pack(7, KERNEL_MINOR, 0,
                                                                      cuse.CUSE_UNRESTRICTED_IOCTL))
        init = cuse.CUSE_INIT_OUT.unpack_from(reply)
        major, minor, _unused, flags, max_read, max_write = init[:6]
        if major != 7 or minor < 11:
            raise AssertionError("the kernel would abort: version %d.%d" % (major, minor))
        info = reply[cuse.CUSE_INIT_OUT.size:]
        if not info.endswith(b"\x00") or not info.startswith(b"DEVNAME="):
            raise AssertionError("the kernel would abort: device info %r" % info)
        self.devname = info[len(b"DEVNAME="):-1].decode()
        self.unrestricted = bool(flags & cuse.CUSE_UNRESTRICTED_IOCTL)
        self.max_read, self.max_write = max(max_read, 4096), max(max_write, 4096)

    def _send(self, opcode, nodeid, body):
        """Write one request, return the reply's payload; OSError for an error reply."""
        self._unique += 2
        self.requests.append(opcode)
        head = cuse.IN_HEADER.pack(cuse.IN_HEADER.size + len(body), opcode, self._unique,
                                   nodeid, 0, 0, os.getpid(), 0, 0)
        reply = self.transport(head + body)
        length, error, unique = cuse.OUT_HEADER.unpack_from(reply)
        if length != len(reply) or unique != self._unique:
            raise AssertionError("malformed reply header %r" % (reply[:16],))
        if error:
            raise OSError(-error, os.strerror(-error))
        return reply[cuse.OUT_HEADER.size:]

    # -- the sysops interface of device/host/bus_linux.py ---------------------------------------

    def open(self, path, flags):
        if path != "/dev/" + self.devname:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        out = self._send(cuse.FUSE_OPEN, 0, cuse.OPEN_IN.pack(flags & 0xFFFFFFFF, 0))
        fh = cuse.OPEN_OUT.unpack_from(out)[0]
        fd = self._next_fd
        self._next_fd += 1
        self.fds[fd] = fh
        return fd

    def close(self, fd):
        fh = self.fds.pop(fd)
        self._send(cuse.FUSE_RELEASE, 0, cuse.RELEASE_IN.pack(fh, os.O_RDWR, 0, 0))

    def read(self, fd, size):
        out = self._send(cuse.FUSE_READ, 0, cuse.READ_IN.pack(self.fds[fd], 0, size, 0, 0, 0, 0))
        if len(out) > size:
            raise AssertionError("read reply longer than asked")
        return out

    def write(self, fd, data):
        body = cuse.WRITE_IN.pack(self.fds[fd], 0, len(data), 0, 0, 0, 0) + bytes(data)
        return cuse.WRITE_OUT.unpack_from(self._send(cuse.FUSE_WRITE, 0, body))[0]

    def ioctl(self, fd, request, arg):
        """fcntl.ioctl semantics: an int arg is passed as is; a bytes arg is copied into a
        buffer whose address is passed, and the buffer's contents are returned."""
        if isinstance(arg, int):
            return self.do_ioctl(self.fds[fd], request, arg)
        buf = ctypes.create_string_buffer(bytes(arg), len(arg))
        self.do_ioctl(self.fds[fd], request, ctypes.addressof(buf))
        return buf.raw

    # -- fs/fuse/ioctl.c fuse_do_ioctl, unrestricted ----------------------------------------

    def do_ioctl(self, fh, cmd, arg):
        flags = cuse.FUSE_IOCTL_UNRESTRICTED if self.unrestricted else 0
        if self.compat:
            flags |= cuse.FUSE_IOCTL_COMPAT | cuse.FUSE_IOCTL_32BIT
        in_iovs, out_iovs = [], []
        if not self.unrestricted:
            raise AssertionError("i2c-dev's ioctls need CUSE_UNRESTRICTED_IOCTL")
        for round_no in range(1, MAX_ROUNDS + 1):
            in_data = b"".join(self.memory.read(base, n) for base, n in in_iovs)
            out_size = sum(n for _, n in out_iovs)
            body = cuse.IOCTL_IN.pack(fh, flags, cmd, arg, len(in_data), out_size) + in_data
            try:
                out = self._send(cuse.FUSE_IOCTL, 0, body)
            except OSError as exc:
                self.rounds.append(round_no)
                if exc.errno == errno.ENOSYS:
                    raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY)) from None
                raise
            result, oflags, n_in, n_out = cuse.IOCTL_OUT.unpack_from(out)
            data = out[cuse.IOCTL_OUT.size:]
            if oflags & cuse.FUSE_IOCTL_RETRY:
                if n_in > cuse.FUSE_IOCTL_MAX_IOV or n_out > cuse.FUSE_IOCTL_MAX_IOV \
                        or n_in + n_out > cuse.FUSE_IOCTL_MAX_IOV:
                    raise OSError(errno.ENOMEM, "too many iovecs")
                if len(data) != (n_in + n_out) * cuse.IOCTL_IOVEC.size:
                    raise OSError(errno.EIO, "iovec array size")
                iovs = [cuse.IOCTL_IOVEC.unpack_from(data, k * cuse.IOCTL_IOVEC.size)
                        for k in range(n_in + n_out)]
                in_iovs, out_iovs = iovs[:n_in], iovs[n_in:]
                continue
            self.rounds.append(round_no)
            if len(data) > out_size:
                raise OSError(errno.EIO, "more out data than out areas")
            pos = 0
            for base, n in out_iovs:
                self.memory.write(base, data[pos:pos + n])
                pos += n
            if result < 0:
                raise OSError(-result, os.strerror(-result))
            return result
        raise AssertionError("the server kept asking for retries")


def pointer_bits():
    return ctypes.sizeof(ctypes.c_void_p) * 8

