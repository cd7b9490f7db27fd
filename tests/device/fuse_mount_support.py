"""A real kernel FUSE mount serving one file through sim/cuse.py's CuseProtocol.

Where /dev/cuse cannot be opened but /dev/fuse can be mounted, this still puts the real
kernel between a program and the bridge: open, read, write, ioctl and close on
<mount>/i2c-fleetid arrive as the kernel's own FUSE messages (fs/fuse/file.c, ioctl.c),
which CUSE shares, and CuseProtocol answers them; this module adds only what a file
system needs around one file (FUSE_INIT, LOOKUP, GETATTR, FORGET, DESTROY).  A FUSE file
system's ioctls are restricted (fuse_file_ioctl passes no FUSE_IOCTL_UNRESTRICTED): the
kernel sizes them from the request number, so I2C_SLAVE (a plain value) works and
I2C_RDWR (a pointer the kernel cannot size) can only end in the refused retry: EIO.
That is why the product needs CUSE; this harness checks the wire layouts and the file
operations against the kernel.

Structures (include/uapi/linux/fuse.h), native-endian:
    fuse_init_in: major, minor, max_readahead, flags (u32 x4) [, flags2, unused[11]]
    fuse_init_out: major, minor, max_readahead, flags u32; max_background,
        congestion_threshold u16; max_write, time_gran u32; max_pages, map_alignment u16;
        flags2, max_stack_depth u32; request_timeout u16, unused[11] u16 (64 bytes)
    fuse_attr: ino, size, blocks, atime, mtime, ctime u64; atimensec, mtimensec,
        ctimensec, mode, nlink, uid, gid, rdev, blksize, flags u32 (88 bytes)
    fuse_entry_out: nodeid, generation, entry_valid, attr_valid u64; entry_valid_nsec,
        attr_valid_nsec u32; fuse_attr (128 bytes)
    fuse_attr_out: attr_valid u64, attr_valid_nsec u32, dummy u32, fuse_attr (104 bytes)
"""

import ctypes
import errno
import os
import select
import stat
import struct
import threading

from fleetid.sim import cuse

FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_INIT = 26
FUSE_DESTROY = 38
FUSE_BATCH_FORGET = 42

INIT_OUT = struct.Struct("=IIIIHHIIHHII2x22x")
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
ENTRY_OUT_HEAD = struct.Struct("=QQQQII")
ATTR_OUT_HEAD = struct.Struct("=QII")
ROOT_ID = 1
FILE_ID = 2
FILE_NAME = b"i2c-fleetid"


class MountUnavailable(Exception):
    """/dev/fuse cannot be opened or mounted here (`reason`)."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def _attr(node):
    if node == ROOT_ID:
        mode, nlink = stat.S_IFDIR | 0o755, 2
    else:
        mode, nlink = stat.S_IFREG | 0o600, 1
    return ATTR.pack(node, 0, 0, 0, 0, 0, 0, 0, 0, mode, nlink, os.getuid(), os.getgid(),
                     0, 4096, 0)


class FuseMount:
    """Mount a one-file FUSE file system at `mountpoint` whose file CuseProtocol serves.

    Use as a context manager.  Raises: MountUnavailable on entry.
    """

    def __init__(self, protocol, mountpoint):
        self.protocol = protocol
        self.mountpoint = str(mountpoint)
        self.path = os.path.join(self.mountpoint, FILE_NAME.decode())
        self._stop = threading.Event()
        self._fd = None
        self._thread = None
        self.error = None
        self.ioctls = []  # (cmd, in_size, out_size) of every FUSE_IOCTL, in order
        self._libc = ctypes.CDLL(None, use_errno=True)

    def __enter__(self):
        try:
            self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise MountUnavailable("cannot open /dev/fuse: %s" % exc) from None
        opts = "fd=%d,rootmode=40000,user_id=%d,group_id=%d" % (self._fd, os.getuid(),
                                                                  os.getgid())
        if self._libc.mount(b"fleetid-test", self.mountpoint.encode(), b"fuse.fleetid-test",
                            0, opts.encode()) != 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise MountUnavailable("mount -t fuse: %s" % os.strerror(err))
        self.protocol.initialised = True  # the FUSE_INIT below stands in for CUSE_INIT
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._libc.umount2(self.mountpoint.encode(), 2)  # MNT_DETACH
        self._stop.set()
        self._thread.join(timeout=10)
        os.close(self._fd)

    def _serve(self):
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if not ready:
                continue
            try:
                request = os.read(self._fd, cuse.READ_BUFFER)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue
                return  # ENODEV: unmounted
            try:
                reply = self._answer(request)
            except Exception as exc:  # a harness failure: reported by the test
                self.error = exc
                return
            if reply is not None:
                try:
                    os.write(self._fd, reply)
                except OSError:
                    pass

    def _answer(self, request):
        _len, opcode, unique, nodeid = struct.unpack_from("=IIQQ", request)
        body = request[cuse.IN_HEADER.size:]
        if opcode in (FUSE_FORGET, FUSE_BATCH_FORGET, cuse.FUSE_INTERRUPT):
            return None
        if opcode == FUSE_INIT:
            _major, minor, readahead, _flags = struct.unpack_from("=IIII", body)
            out = INIT_OUT.pack(7, min(minor, cuse.FUSE_MINOR_SPOKEN), readahead, 0, 16, 12,
                                cuse.MAX_WRITE, 1, 32, 0, 0, 0)
            return _reply(unique, out)
        if opcode == FUSE_LOOKUP:
            if nodeid != ROOT_ID or body.rstrip(b"\x00") != FILE_NAME:
                return _reply(unique, b"", -errno.ENOENT)
            return _reply(unique, ENTRY_OUT_HEAD.pack(FILE_ID, 0, 1, 1, 0, 0) + _attr(FILE_ID))
        if opcode == FUSE_GETATTR:
            return _reply(unique, ATTR_OUT_HEAD.pack(1, 0, 0) + _attr(nodeid))
        if opcode == FUSE_DESTROY:
            return _reply(unique, b"")
        if opcode == cuse.FUSE_IOCTL:
            _fh, _flags, cmd, _arg, in_size, out_size = cuse.IOCTL_IN.unpack_from(body)
            self.ioctls.append((cmd, in_size, out_size))
        if opcode in cuse.CuseProtocol._HANDLERS:
            return self.protocol.handle(request)
        return _reply(unique, b"", -errno.ENOSYS)


def _reply(unique, payload, error=0):
    return cuse.OUT_HEADER.pack(cuse.OUT_HEADER.size + len(payload), error, unique) + payload
