"""The emulator's socket server: one emulated SE bus on a Unix or loopback TCP socket.

It serves a bus endpoint (sim/endpoint.py BusEndpoint, or anything with write/read/reset)
to one client at a time, like one host on a physical I2C bus; further clients wait in the
listen backlog and are served in turn.  The wire protocol is the one in
device/bus_sim.py (request = op | len u16 | payload; response = status [| data]).

Every wait is bounded: accept and receive poll with a short interval so shutdown() takes
effect promptly, and a client idle for longer than `idle_timeout_s` is dropped so a stuck
client cannot hold the bus forever.
"""

import errno
import ipaddress
import logging
import os
import select
import socket
import stat
import struct
import threading

from fleetid.common.errors import BusNack, FleetidError

log = logging.getLogger("fleetid.sim.server")

# The wire protocol of device/bus_sim.py (which keeps private const() copies for the
# device heap; tests/sim/test_server.py checks both sides agree).
OP_WRITE = 0x57  # 'W': payload = frame
OP_READ = 0x52  # 'R': payload = n (u16 BE)
OP_RESET = 0x58  # 'X': no payload
STATUS_ACK = 0
STATUS_NACK = 1
STATUS_ERROR = 2

_POLL_S = 0.05  # shutdown latency bound for accept/recv waits
_BACKLOG = 8


class ListenAddressError(FleetidError, ValueError):
    """A --listen value that does not parse or is not allowed.  Also a ValueError (a
    malformed argument value, caught as one by its callers)."""


def parse_listen(listen, dangerous_allow_non_loopback=False):
    """Parse "unix:/path" or "tcp:HOST:PORT" (PORT 0 = pick a free one).

    Returns: ("unix", path) or ("tcp", host, port).
    Raises: ListenAddressError (malformed; a TCP host that is not loopback unless
        dangerous_allow_non_loopback: the socket carries raw SE bus traffic, unauthenticated).
    """
    kind, _, rest = listen.partition(":")
    if kind == "unix" and rest:
        return ("unix", rest)
    if kind == "tcp" and rest:
        host, _, port_text = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(port_text)
        except ValueError:
            raise ListenAddressError("bad port in %r" % listen) from None
        if not host or not 0 <= port <= 65535:
            raise ListenAddressError("expected tcp:HOST:PORT, got %r" % listen)
        if not dangerous_allow_non_loopback:
            try:
                loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ListenAddressError(
                    "refusing to listen on non-loopback %s: the SE bus is unauthenticated" % host
                )
        return ("tcp", host, port)
    raise ListenAddressError("expected unix:/path or tcp:HOST:PORT, got %r" % listen)


class _ClientGone(FleetidError):
    pass


class SimServer:
    """Serve one bus endpoint on a socket.

    Params: endpoint: object with write(frame), read(n) -> bytes, reset() (a BusEndpoint).
        listen: "unix:/path" or "tcp:127.0.0.1:PORT".
        idle_timeout_s: drop a client that sends nothing for this long.
    Attributes: clients_served, transactions (counts), bus_uri (for open_bus()).
    """

    def __init__(self, endpoint, listen, idle_timeout_s=30.0, dangerous_allow_non_loopback=False):
        self.endpoint = endpoint
        self.listen = parse_listen(listen, dangerous_allow_non_loopback)
        self.idle_timeout_s = idle_timeout_s
        self.clients_served = 0
        self.transactions = 0
        self._sock = None
        self._stop = threading.Event()
        self._bound_path = None

    # -- lifecycle ----------------------------------------------------------------------

    def bind(self):
        """Create, bind and listen.  Raises OSError (address in use, no permission)."""
        if self.listen[0] == "unix":
            path = self.listen[1]
            _remove_stale_unix_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
                os.chmod(path, 0o600)  # only this user may drive the emulated SE
            except OSError:
                sock.close()
                raise
            self._bound_path = path
        else:
            _, host, port = self.listen
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                raise
        sock.listen(_BACKLOG)
        self._sock = sock
        return self

    @property
    def bus_uri(self):
        """The device-side bus URI for this server (sim:unix:... or sim:tcp:...)."""
        if self.listen[0] == "unix":
            return "sim:unix:" + self.listen[1]
        host, port = self._sock.getsockname()[:2] if self._sock else self.listen[1:]
        if ":" in host:
            host = "[" + host + "]"
        return "sim:tcp:%s:%d" % (host, port)

    def shutdown(self):
        """Ask serve_forever() to return (it does within about 50 ms)."""
        self._stop.set()

    def close(self):
        """Close the listening socket and remove the Unix socket file."""
        sock = self._sock
        self._sock = None
        if sock is not None:
            sock.close()
        if self._bound_path is not None:
            try:
                os.unlink(self._bound_path)
            except FileNotFoundError:
                pass
            self._bound_path = None

    def serve_forever(self):
        """Accept and serve clients one after another until shutdown()."""
        if self._sock is None:
            self.bind()
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self._sock], [], [], _POLL_S)
                if not ready:
                    continue
                try:
                    conn, _ = self._sock.accept()
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EINTR):
                        continue
                    raise
                self.clients_served += 1
                try:
                    self._serve_client(conn)
                finally:
                    conn.close()
        finally:
            self.close()

    # -- one client ---------------------------------------------------------------------

    def _recv_exact(self, conn, n):
        buf = bytearray()
        idle = 0.0
        while len(buf) < n:
            if self._stop.is_set():
                raise _ClientGone()
            ready, _, _ = select.select([conn], [], [], _POLL_S)
            if not ready:
                idle += _POLL_S
                if idle >= self.idle_timeout_s:
                    log.info("dropping a client idle for %.0f s", self.idle_timeout_s)
                    raise _ClientGone()
                continue
            try:
                chunk = conn.recv(n - len(buf))
            except (ConnectionResetError, BrokenPipeError):
                raise _ClientGone() from None
            if not chunk:
                raise _ClientGone()
            buf += chunk
            idle = 0.0
        return bytes(buf)

    def _serve_client(self, conn):
        conn.setblocking(True)
        conn.settimeout(max(self.idle_timeout_s, 1.0))  # bounds sendall()
        try:
            while True:
                header = self._recv_exact(conn, 3)
                op = header[0]
                length = (header[1] << 8) | header[2]
                payload = self._recv_exact(conn, length) if length else b""
                reply, keep = self._transaction(op, payload)
                conn.sendall(reply)
                self.transactions += 1
                if not keep:
                    return
        except _ClientGone:
            return
        except OSError as exc:
            log.info("client connection lost: %s", exc)

    def _transaction(self, op, payload):
        # Returns (reply bytes, keep the connection).
        try:
            if op == OP_WRITE:
                if not payload:
                    return bytes((STATUS_ERROR,)), True
                self.endpoint.write(payload)
                return bytes((STATUS_ACK,)), True
            if op == OP_READ:
                if len(payload) != 2:
                    return bytes((STATUS_ERROR,)), False
                (n,) = struct.unpack(">H", payload)
                if n == 0:
                    return bytes((STATUS_ERROR,)), True
                data = bytes(self.endpoint.read(n))
                if len(data) != n:
                    log.error("endpoint returned %d bytes for a read of %d", len(data), n)
                    return bytes((STATUS_ERROR,)), True
                return bytes((STATUS_ACK,)) + data, True
            if op == OP_RESET:
                self.endpoint.reset()
                return bytes((STATUS_ACK,)), True
        except BusNack:
            return bytes((STATUS_NACK,)), True
        except FleetidError as exc:
            log.warning("bus transaction failed: %s", exc)
            return bytes((STATUS_ERROR,)), True
        except Exception:  # an emulator bug must not take the bus server down
            log.exception("emulator error in a bus transaction")
            return bytes((STATUS_ERROR,)), True
        # Unknown op: the stream is out of step; answer once and drop the client.
        return bytes((STATUS_ERROR,)), False


def _remove_stale_unix_socket(path):
    # A socket file left by a crashed server is removed; a live server, or a file that is
    # not a socket, is left alone (bind() then fails with EADDRINUSE).
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


class ServerThread:
    """A SimServer running in a daemon thread (for tests and in-process demos).

    Use as a context manager, or call stop().  Attributes: server, bus_uri.
    """

    def __init__(self, server):
        self.server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="fleetid-sim-server", daemon=True
        )

    @property
    def bus_uri(self):
        return self.server.bus_uri

    def start(self):
        self.server.bind()
        self._thread.start()
        return self

    def stop(self, timeout_s=5.0):
        """Shut the server down and wait (bounded) for its thread.

        Raises: RuntimeError if the thread does not finish within timeout_s.
        """
        self.server.shutdown()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError("sim server thread did not stop")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def serve_in_thread(endpoint, listen, idle_timeout_s=30.0):
    """Bind a SimServer for `endpoint` on `listen` and serve it from a daemon thread.

    Returns: a started ServerThread (the socket is bound when this returns, so clients
        may connect at once).
    """
    return ServerThread(SimServer(endpoint, listen, idle_timeout_s)).start()
