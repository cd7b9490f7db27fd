# The `sim` bus backend: raw bus transactions carried over a socket to the SE emulator
# (sim/server.py).  Portable: CPython and MicroPython (unix port and boards with sockets).
#
# Wire protocol, one request then one response per bus transaction (integers big-endian):
#
#     request  = op(1) | len(u16) | payload(len)
#         op 'W' (0x57)  write a frame        payload = the frame bytes
#         op 'R' (0x52)  read n bytes         payload = n (u16)
#         op 'X' (0x58)  reset the SE         payload empty
#     response = status(1) [| n bytes when op R and status ACK]
#         status 0 ACK, 1 NACK (the SE did not acknowledge: busy / nothing to send),
#                2 error (the emulator failed the transaction; the connection stays usable)
#
# sim/server.py keeps its own copy of these numbers (tests check that both agree): here
# they are private const()s, folded into the bytecode, which keeps this module small on a
# device heap.  Every socket call is bounded by a timeout; a timeout or a closed
# connection is a BusError (the link above turns it into LinkError(BUS)).

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


import socket
import sys

from fleetid.common.errors import BusError, BusNack

DEFAULT_TIMEOUT_MS = 5000

_OP_WRITE = const(0x57)  # 'W'
_OP_READ = const(0x52)  # 'R'
_OP_RESET = const(0x58)  # 'X'
_STATUS_ACK = const(0)
_STATUS_NACK = const(1)
_MAX_PAYLOAD = const(0xFFFF)
# struct sockaddr_un (Linux <sys/un.h>): sa_family_t (native-endian u16), sun_path[108].
_SUN_PATH_MAX = const(108)


class SimBus:
    """A Bus over a connected stream socket to the emulator's server.

    Params: sock: a connected stream socket (CPython or MicroPython).
        timeout_ms: bound on every send and receive.
    """

    def __init__(self, sock, timeout_ms=DEFAULT_TIMEOUT_MS):
        sock.settimeout(timeout_ms / 1000)
        self._sock = sock

    def _transaction(self, op, payload, n=0):
        # One request; returns the n data bytes of an acknowledged read (b"" for n = 0).
        sock = self._sock
        if sock is None:
            raise BusError("bus closed")
        size = len(payload)
        if size > _MAX_PAYLOAD or n > _MAX_PAYLOAD:
            raise BusError("transfer too long for the sim bus")
        try:
            sock.sendall(bytes((op, size >> 8, size & 0xFF)) + payload)
            status = self._recv(1)[0]
            if status == _STATUS_ACK:
                return self._recv(n) if n else b""
        except OSError as exc:
            raise BusError("sim bus: %s" % (exc,))
        if status == _STATUS_NACK:
            raise BusNack()
        raise BusError("the emulator failed the bus transaction (status %d)" % status)

    def _recv(self, n):
        # Usually one recv() delivers all n bytes: return it as is (no copies, which
        # matters on a small device heap); otherwise gather, each wait bounded by the
        # socket timeout and the loop by n.
        data = self._sock.recv(n)
        if len(data) == n:
            return data
        buf = bytearray(data)
        while data and len(buf) < n:
            data = self._sock.recv(n - len(buf))
            buf.extend(data)
        if len(buf) < n:
            raise OSError("connection closed by the emulator")
        return bytes(buf)

    def write(self, frame):
        """One bus write transaction.  Raises BusNack (SE busy), BusError."""
        self._transaction(_OP_WRITE, bytes(frame))

    def read(self, n):
        """One read transaction of exactly n bytes.  Raises BusNack (busy), BusError."""
        if n < 1:
            raise BusError("read length out of range")
        return self._transaction(_OP_READ, bytes((n >> 8, n & 0xFF)), n)

    def reset(self):
        """Reset the emulated SE (its RAM state is lost, like a power cycle)."""
        self._transaction(_OP_RESET, b"")

    def close(self):
        """Close the connection (idempotent)."""
        sock = self._sock
        self._sock = None
        if sock is not None:
            sock.close()


def _connect(family, address, timeout_ms):
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_ms / 1000)
        sock.connect(address)
    except OSError as exc:
        sock.close()
        raise BusError("cannot connect to the emulator: %s" % (exc,))
    return SimBus(sock, timeout_ms)


def connect_unix(path, timeout_ms=DEFAULT_TIMEOUT_MS):
    """Connect to the emulator's Unix socket.

    Returns: SimBus.  Raises: BusError (no server there, refused, timed out).
    """
    address = path
    if sys.implementation.name == "micropython":
        # The MicroPython unix port takes a raw struct sockaddr_un.
        raw = path.encode()
        if len(raw) >= _SUN_PATH_MAX:
            raise BusError("unix socket path too long")
        address = socket.AF_UNIX.to_bytes(2, sys.byteorder) + raw + b"\x00"
    return _connect(socket.AF_UNIX, address, timeout_ms)


def connect_tcp(host, port, timeout_ms=DEFAULT_TIMEOUT_MS):
    """Connect to the emulator on TCP (normally loopback).

    Returns: SimBus.  Raises: BusError (cannot resolve, refused, timed out).
    """
    try:
        info = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except OSError as exc:
        raise BusError("cannot resolve %s: %s" % (host, exc))
    if not info:
        raise BusError("cannot resolve %s" % host)
    return _connect(info[0][0], info[0][-1], timeout_ms)
