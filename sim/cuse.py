"""CUSE: a character device served from user space through /dev/cuse.  CPython, Linux.

The FUSE kernel protocol (include/uapi/linux/fuse.h) as CUSE uses it (fs/fuse/cuse.c),
with no libfuse: `CuseProtocol` turns one request read from /dev/cuse into the bytes of
its reply (no I/O, so tests feed it requests byte for byte), and `serve()` is the loop
that reads requests from the file descriptor and writes the replies.  What the device
does is a separate object (sim/i2cdev.py's I2cDevBridge for an i2c-dev node):

    device.open(flags) -> fh           device.release(fh)
    device.read(fh, size) -> bytes     device.write(fh, data) -> int (bytes taken)
    device.ioctl(IoctlRequest) -> (result, out_bytes)
each raising OSError(errno) to fail the call, and ioctl raising IoctlRetry to ask the
kernel for user memory (below).

Wire format (all integers native-endian, as the kernel writes them):

    request  = fuse_in_header(40) | opcode-specific struct | data
        fuse_in_header: len u32, opcode u32, unique u64, nodeid u64, uid u32, gid u32,
                        pid u32, total_extlen u16, padding u16
    reply    = fuse_out_header(16) | payload
        fuse_out_header: len u32, error s32 (0 or -errno), unique u64

Session (fs/fuse/cuse.c cuse_channel_open / cuse_process_init_reply): opening /dev/cuse
makes the kernel send CUSE_INIT (cuse_init_in: major, minor, unused, flags: 16 bytes);
the reply is cuse_init_out (major 7, minor >= 11, unused, flags, max_read, max_write,
dev_major, dev_minor, spare[10]: 72 bytes) then "DEVNAME=<name>\\0".  The kernel then
creates /dev/<name> (devtmpfs) and forwards open/read/write/ioctl/release on it as FUSE
requests.  Closing the /dev/cuse descriptor removes the device.

Unrestricted ioctl (fs/fuse/ioctl.c fuse_do_ioctl, CUSE_UNRESTRICTED_IOCTL): the kernel
cannot know what an ioctl's argument points to, so it first sends FUSE_IOCTL with only
`arg` (in_size = out_size = 0).  The server answers FUSE_IOCTL_RETRY with a list of
fuse_ioctl_iovec {base u64, len u64}: in_iovs areas of the caller's memory to copy in,
then out_iovs areas to copy out to; the kernel sends the ioctl again with the in areas
concatenated as data and out_size = the out areas' total.  A server repeats this until
it has every byte it needs (i2c-dev's I2C_RDWR takes three rounds: the
i2c_rdwr_ioctl_data, the i2c_msg array it points to, then the write buffers the messages
point to), then answers with the result and the out data, which the kernel scatters over
the out areas.  At most FUSE_IOCTL_MAX_IOV iovecs, and the data of one round is bounded
by the connection's max_pages (32 pages, 128 KiB, for CUSE).
"""

import errno
import os
import select
import stat
import struct

from fleetid.common.errors import FleetidError

FUSE_KERNEL_VERSION = 7
# The minor we speak: >= 11 (cuse_process_init_reply refuses less) and >= 16 (iovecs
# in the fixed fuse_ioctl_iovec layout, fs/fuse/ioctl.c fuse_copy_ioctl_iovec).  The
# structures used here have not changed size since 7.9 (fuse_read_in/fuse_write_in).
FUSE_MINOR_SPOKEN = 31

# Opcodes (enum fuse_opcode).
FUSE_OPEN = 14
FUSE_READ = 15
FUSE_WRITE = 16
FUSE_RELEASE = 18
FUSE_FLUSH = 25
FUSE_INTERRUPT = 36
FUSE_IOCTL = 39
FUSE_POLL = 40
CUSE_INIT = 4096

CUSE_UNRESTRICTED_IOCTL = 1 << 0  # cuse_init_out.flags
FUSE_IOCTL_COMPAT = 1 << 0  # fuse_ioctl_in.flags: a compat (32-bit) caller
FUSE_IOCTL_UNRESTRICTED = 1 << 1
FUSE_IOCTL_RETRY = 1 << 2  # fuse_ioctl_out.flags
FUSE_IOCTL_32BIT = 1 << 3  # the caller's longs and pointers are 32 bits
FUSE_IOCTL_MAX_IOV = 256
FOPEN_DIRECT_IO = 1 << 0
FOPEN_NONSEEKABLE = 1 << 2

IN_HEADER = struct.Struct("=IIQQIIIHH")  # fuse_in_header, 40 bytes
OUT_HEADER = struct.Struct("=IiQ")  # fuse_out_header, 16 bytes
CUSE_INIT_IN = struct.Struct("=IIII")  # major, minor, unused, flags
CUSE_INIT_OUT = struct.Struct("=IIIIIIII40x")  # ... dev_major, dev_minor, spare[10]: 72 bytes
OPEN_IN = struct.Struct("=II")  # flags, open_flags
OPEN_OUT = struct.Struct("=QIi")  # fh, open_flags, backing_id (padding before 7.40)
READ_IN = struct.Struct("=QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, pad
WRITE_IN = struct.Struct("=QQIIQII")  # fh, offset, size, write_flags, lock_owner, flags, pad
WRITE_OUT = struct.Struct("=II")  # size, padding
RELEASE_IN = struct.Struct("=QIIQ")  # fh, flags, release_flags, lock_owner
IOCTL_IN = struct.Struct("=QIIQII")  # fh, flags, cmd, arg, in_size, out_size: 32 bytes
IOCTL_OUT = struct.Struct("=iIII")  # result, flags, in_iovs, out_iovs: 16 bytes
IOCTL_IOVEC = struct.Struct("=QQ")  # fuse_ioctl_iovec: base, len

CUSE_INIT_INFO_MAX = 4096  # the page the kernel reads the device info into
# Each message is read whole by one read(); a buffer smaller than the request makes the
# kernel fail that request (fs/fuse/dev.c fuse_dev_do_read), so leave room for an ioctl
# round at the 128 KiB max_pages bound plus headers.
READ_BUFFER = 128 * 1024 + 4096
MAX_READ = 8192  # cuse_init_out.max_read / max_write (i2c-dev moves <= 8192 per call)
MAX_WRITE = 8192
_POLL_S = 0.2  # shutdown latency bound of serve()


class CuseError(FleetidError):
    """The CUSE session could not start or broke (`reason` says which step, `errno`)."""

    def __init__(self, reason, err=None):
        super().__init__(reason)
        self.reason = reason
        self.errno = err


class IoctlRetry(FleetidError):
    """Raised by device.ioctl(): copy these areas of the caller's memory and call again.

    Attributes: in_iovs, out_iovs: lists of (address, length) in the caller's space.
    """

    def __init__(self, in_iovs, out_iovs=()):
        super().__init__("ioctl retry")
        self.in_iovs = list(in_iovs)
        self.out_iovs = list(out_iovs)


class IoctlRequest:
    """One FUSE_IOCTL round.

    Attributes: fh, cmd, arg (the caller's argument: a value or a user-space address),
        flags (FUSE_IOCTL_*), in_data (bytes of the in areas asked for so far, in order),
        out_size (total length of the out areas asked for), pointer_bits (32 or 64: the
        caller's ABI, FUSE_IOCTL_32BIT).
    """

    def __init__(self, fh, cmd, arg, flags, in_data, out_size):
        self.fh = fh
        self.cmd = cmd
        self.arg = arg
        self.flags = flags
        self.in_data = in_data
        self.out_size = out_size
        self.pointer_bits = 32 if flags & FUSE_IOCTL_32BIT else 64


def _reply(unique, payload=b"", error=0):
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload


def _error_reply(unique, err):
    return _reply(unique, b"", -err)


class CuseProtocol:
    """The sans-I/O CUSE server: request bytes in, reply bytes out.

    Params: device: the device object (module header).  devname: the node's name under
        /dev ("i2c-fleetid"; a "/" makes a subfolder).  unrestricted_ioctl: ask for the
        retry protocol (needed for ioctls whose argument points to memory).
    Attributes: initialised (CUSE_INIT answered), kernel_version ((major, minor)).
    """

    def __init__(self, device, devname, unrestricted_ioctl=True):
        if not devname or "\x00" in devname or "=" in devname or devname.startswith("/"):
            raise ValueError("bad CUSE device name %r" % (devname,))
        self.device = device
        self.devname = devname
        self.unrestricted_ioctl = unrestricted_ioctl
        self.initialised = False
        self.kernel_version = None

    def handle(self, request):
        """Answer one request read from /dev/cuse.

        Params: request: bytes of one whole message.
        Returns: the reply's bytes, or None when the request takes no reply (interrupt).
        Raises: CuseError for a malformed message or a kernel too old or too new.
        """
        if len(request) < IN_HEADER.size:
            raise CuseError("short FUSE message (%d bytes)" % len(request))
        length, opcode, unique, _nodeid, _uid, _gid, _pid, _ext, _pad = IN_HEADER.unpack_from(
            request
        )
        if length != len(request):
            raise CuseError("FUSE message length %d but %d bytes read" % (length, len(request)))
        body = memoryview(request)[IN_HEADER.size:]
        if opcode == CUSE_INIT:
            if len(body) < CUSE_INIT_IN.size:
                raise CuseError("short CUSE_INIT (%d bytes)" % len(body))
            return self._init(unique, body)
        if not self.initialised:
            raise CuseError("FUSE opcode %d before CUSE_INIT" % opcode)
        if opcode == FUSE_INTERRUPT:
            # Requests are answered one at a time, in order: by the time an interrupt is
            # read, its request has been answered, and the kernel wants no reply.
            return None
        handler = self._HANDLERS.get(opcode)
        if handler is None:
            return _error_reply(unique, errno.ENOSYS)
        try:
            return handler(self, unique, body)
        except OSError as exc:
            return _error_reply(unique, exc.errno or errno.EIO)
        except struct.error:
            return _error_reply(unique, errno.EINVAL)

    def _init(self, unique, body):
        major, minor, _unused, _flags = CUSE_INIT_IN.unpack_from(body)
        self.kernel_version = (major, minor)
        if major != FUSE_KERNEL_VERSION or minor < 16:
            raise CuseError("kernel FUSE protocol %d.%d: need 7.16 or later" % (major, minor))
        spoken = min(minor, FUSE_MINOR_SPOKEN)
        flags = CUSE_UNRESTRICTED_IOCTL if self.unrestricted_ioctl else 0
        info = b"DEVNAME=" + self.devname.encode() + b"\x00"
        if len(info) > CUSE_INIT_INFO_MAX:
            raise CuseError("device name too long")
        out = CUSE_INIT_OUT.pack(FUSE_KERNEL_VERSION, spoken, 0, flags, MAX_READ, MAX_WRITE, 0, 0)
        self.initialised = True
        return _reply(unique, out + info)

    def _open(self, unique, body):
        flags, _open_flags = OPEN_IN.unpack_from(body)
        fh = self.device.open(flags)
        return _reply(unique, OPEN_OUT.pack(fh, FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE, 0))

    def _release(self, unique, body):
        fh = RELEASE_IN.unpack_from(body)[0]
        self.device.release(fh)
        return _reply(unique)

    def _flush(self, unique, body):
        return _reply(unique)

    def _read(self, unique, body):
        fh, _offset, size = READ_IN.unpack_from(body)[:3]
        data = self.device.read(fh, min(size, MAX_READ))
        return _reply(unique, bytes(data))

    def _write(self, unique, body):
        fh, _offset, size = WRITE_IN.unpack_from(body)[:3]
        data = bytes(body[WRITE_IN.size:WRITE_IN.size + size])
        if len(data) != size:
            return _error_reply(unique, errno.EINVAL)
        written = self.device.write(fh, data)
        return _reply(unique, WRITE_OUT.pack(written, 0))

    def _ioctl(self, unique, body):
        fh, flags, cmd, arg, in_size, out_size = IOCTL_IN.unpack_from(body)
        in_data = bytes(body[IOCTL_IN.size:IOCTL_IN.size + in_size])
        if len(in_data) != in_size:
            return _error_reply(unique, errno.EINVAL)
        request = IoctlRequest(fh, cmd, arg, flags, in_data, out_size)
        try:
            result, out = self.device.ioctl(request)
        except IoctlRetry as retry:
            return self._ioctl_retry(unique, flags, retry)
        out = bytes(out)
        if len(out) > out_size:
            # The kernel would fail the call with EIO (transferred > out_size).
            return _error_reply(unique, errno.EIO)
        return _reply(unique, IOCTL_OUT.pack(result, 0, 0, 0) + out)

    def _ioctl_retry(self, unique, flags, retry):
        # Without FUSE_IOCTL_UNRESTRICTED (a FUSE file system, or CUSE_INIT without the
        # flag) the kernel fails the call with EIO on a retry (fs/fuse/ioctl.c): the
        # answer is the same either way, and the caller learns it from the kernel.
        iovs = retry.in_iovs + retry.out_iovs
        if len(iovs) > FUSE_IOCTL_MAX_IOV:
            return _error_reply(unique, errno.ENOMEM)
        payload = b"".join(IOCTL_IOVEC.pack(base, length) for base, length in iovs)
        head = IOCTL_OUT.pack(0, FUSE_IOCTL_RETRY, len(retry.in_iovs), len(retry.out_iovs))
        return _reply(unique, head + payload)

    def _poll(self, unique, body):
        return _error_reply(unique, errno.ENOSYS)  # the kernel then treats it as always ready

    _HANDLERS = {
        FUSE_OPEN: _open,
        FUSE_RELEASE: _release,
        FUSE_FLUSH: _flush,
        FUSE_READ: _read,
        FUSE_WRITE: _write,
        FUSE_IOCTL: _ioctl,
        FUSE_POLL: _poll,
    }


def open_cuse(path="/dev/cuse"):
    """Open the CUSE channel.

    Returns: the file descriptor.
    Raises: CuseError whose `reason` names the cause precisely: no node at `path` (load
        the module: `modprobe cuse`, or create it: `mknod /dev/cuse c 10 203`); ENODEV (the
        node exists but the kernel has no CUSE: CONFIG_CUSE off and no module); EACCES /
        EPERM (not allowed: root, or a container that forbids the device).
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            reason = ("no %s: load the module (modprobe cuse) or create the node "
                      "(mknod %s c 10 203)" % (path, path))
        elif exc.errno in (errno.ENODEV, errno.ENXIO):
            reason = "%s: the kernel has no CUSE driver (CONFIG_CUSE, module cuse)" % path
        elif exc.errno in (errno.EACCES, errno.EPERM):
            reason = ("%s: %s (needs root, or a container/cgroup that allows char device "
                      "10:203)" % (path, os.strerror(exc.errno)))
        else:
            reason = "%s: %s" % (path, os.strerror(exc.errno or errno.EIO))
        raise CuseError(reason, exc.errno) from None


def serve(fd, protocol, stop_event, on_ready=None):
    """Answer CUSE requests on `fd` until `stop_event` is set or the kernel ends the session.

    Params: fd: from open_cuse().  protocol: CuseProtocol.  stop_event: threading.Event
        (checked every 0.2 s).  on_ready: called once, after CUSE_INIT is answered.
    Raises: CuseError (the kernel refused the device, e.g. its name is taken).
    """
    while not stop_event.is_set():
        ready, _, _ = select.select([fd], [], [], _POLL_S)
        if not ready:
            continue
        try:
            request = os.read(fd, READ_BUFFER)
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                continue  # interrupted, or a request the kernel withdrew
            if exc.errno == errno.ENODEV:
                # The kernel aborted the connection (e.g. CUSE_INIT refused: name taken).
                if not protocol.initialised:
                    raise CuseError("the kernel refused the device", exc.errno) from None
                return
            raise CuseError("reading %s: %s" % ("/dev/cuse", exc), exc.errno) from None
        if not request:
            return
        was_initialised = protocol.initialised
        reply = protocol.handle(request)
        if reply is not None:
            try:
                os.write(fd, reply)
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                    raise CuseError("answering the kernel: %s" % exc, exc.errno) from None
        if not was_initialised and protocol.initialised and on_ready is not None:
            on_ready()


def sysfs_name(devname):
    """The device's name in /sys/class/cuse/ (the kernel turns "/" into "!")."""
    return devname.replace("/", "!")


def ensure_node(devname, dev_root="/dev", sys_root="/sys", timeout_s=2.0, clock=None):
    """Make sure /dev/<devname> exists once the kernel has created the device.

    devtmpfs makes the node during device_add(); a container's /dev (a plain tmpfs) does
    not, so after `timeout_s` the node is made here from /sys/class/cuse/<name>/dev
    ("MAJOR:MINOR"), mode 0600.

    Returns: (path, created): created is True when this call made the node (remove it
        when the session ends; devtmpfs removes its own).
    Raises: CuseError (the kernel created no device: name taken or init refused; mknod
        not permitted).
    """
    import time

    monotonic = clock or time.monotonic
    path = os.path.join(dev_root, devname)
    sys_dev = os.path.join(sys_root, "class", "cuse", sysfs_name(devname), "dev")
    deadline = monotonic() + timeout_s
    while True:
        if os.path.exists(path):
            return path, False
        if monotonic() >= deadline:
            break
        time.sleep(0.05)
    try:
        with open(sys_dev) as f:
            major, minor = (int(x) for x in f.read().strip().split(":"))
    except (OSError, ValueError):
        raise CuseError("the kernel created no device %s (%s unreadable)" % (path, sys_dev))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(major, minor))
    except OSError as exc:
        raise CuseError("cannot create %s (char %d:%d): %s" % (path, major, minor, exc),
                        exc.errno) from None
    return path, True
