"""The SE-keyed TLS 1.3 client (fleetid.common.tls13) over a CPython TCP socket.

    config = se_client_config(se, slot, anchors, server_name=host)
    stream = connect(host, port, config)          # handshake done, bounded waits
    stream.send(b"..."); stream.recv(); stream.close()

`se_client_config` binds the SE: the ECDHE share in its transient key object, the
CertificateVerify signed with the key in `slot`, the server chain verified with the SE's
VERIFY, the wall clock of this host.  `connect` returns the portable
fleetid.device.tls13_keys.Tls13Stream, which a MicroPython board drives over its own
socket the same way.

    sock = TlsSocket.connect(host, port, config)  # a socket-like object (CPython only)
    sock.sendall(b"..."); sock.recv(4096); sock.makefile("rb"); sock.close()

`TlsSocket` is what http.client (device/host/se_https.py) and the MQTT tunnel
(device/host/mqtt_paho.py) use: sendall/recv/recv_into/makefile over the TLS session,
safe for one reading and one writing thread at a time (the tunnel's two pumps), every
socket wait bounded by the socket's timeout and the handshake by an overall deadline,
close_notify sent on close().  Session tickets received are kept in `.tickets` for
PSK-DHE resumption (a Tls13Config(ticket=...) of the next connection).
"""

import io
import socket
import threading
import time

from fleetid.common import tls13
from fleetid.common.clock import SystemClock
from fleetid.common.errors import TlsError
from fleetid.common.host.tls13_host import CryptographyTls13Primitives
from fleetid.common.tls13 import Tls13Client, Tls13Config
from fleetid.device.tls13_keys import SeEphemeral, Tls13Stream, se_signer, se_verifier

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_IO_TIMEOUT = 30.0


def se_client_config(se, slot, anchors_der, server_name, client_chain=None, revocation=None,
                     ticket=None, prims=None, now=None, **kwargs):
    """A Tls13Config with every private-key operation in the SE behind `se`.

    Params: se: selected SeSession.  slot: the client key's slot (identity or
        operational).  anchors_der: DER trust anchors (the fleet root from the SE).
        server_name: host name or IP to check.  client_chain: DER certificates (default:
        the certificate stored beside the key, GET CERT `slot`).  revocation, ticket,
        record_size_limit, ...: as Tls13Config.  now: epoch-seconds clock (default
        time.time).
    Returns: (Tls13Config, SeEphemeral) -- the latter counts the SE's ECDHE operations.
    """
    if client_chain is None:
        client_chain = [bytes(se.get_cert(slot))]
    ephemeral = SeEphemeral(se)
    config = Tls13Config(
        prims or CryptographyTls13Primitives(), ephemeral, anchors_der, se_verifier(se),
        now or (lambda: int(time.time())), server_name=server_name,
        signer=se_signer(se, slot), client_chain=client_chain, revocation=revocation,
        ticket=ticket, **kwargs)
    return config, ephemeral


def connect(host, port, config, connect_timeout=DEFAULT_CONNECT_TIMEOUT,
            io_timeout=DEFAULT_IO_TIMEOUT):
    """Open TCP to host:port and run the handshake.

    Returns: a connected Tls13Stream (its .info says what was negotiated).
    Raises: TlsError("connect") when TCP fails, TlsError for every handshake refusal
        (TlsCertificateError for the server chain, TlsAlertReceived for the peer's alerts);
        the socket is closed on any error.
    """
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as exc:
        raise TlsError("connect", None, type(exc).__name__) from None
    sock.settimeout(io_timeout)
    stream = Tls13Stream(sock, Tls13Client(config), SystemClock(),
                         deadline_ms=int(io_timeout * 1000))
    stream.handshake()
    return stream


class TlsSocket:
    """A connected TLS 1.3 session as a socket-like object (module docstring).

    Params: sock: a connected CPython socket (its timeout bounds every wait).
        client: an unstarted common.tls13.Tls13Client.  handshake_timeout: seconds for
        the whole handshake.
    Attributes: info (HandshakeInfo), tickets (SessionTickets received, newest last).
    Raises (every method but close): TlsError -- "io" (socket error; detail
        "TimeoutError" for an expired wait), "timeout" (handshake deadline), "eof" (TCP
        closed without close_notify), or the client's own refusals (TlsAlertReceived,
        TlsCertificateError, ...); the socket is closed after any error.
    """

    _CHUNK = 16384 + 512

    def __init__(self, sock, client, handshake_timeout=DEFAULT_IO_TIMEOUT):
        self._sock = sock
        self._client = client
        self._handshake_timeout = handshake_timeout
        self._lock = threading.Lock()  # the client's state: reader and writer threads
        self._pending = bytearray()
        self._eof = False
        self._closed = False
        self._close_requested = False
        self._files = 0  # open makefile() readers: close() waits for them, as socket's
        self.info = None
        self.tickets = []
        self.data_received = False  # any application data yet (see se_https.client_error)

    @classmethod
    def connect(cls, host, port, config, connect_timeout=DEFAULT_CONNECT_TIMEOUT,
                io_timeout=DEFAULT_IO_TIMEOUT):
        """TCP to host:port, then the handshake.  Returns: a TlsSocket.
        Raises: TlsError("connect") when TCP fails (detail: the OSError's name),
            TlsError as the class says for the handshake."""
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as exc:
            raise TlsError("connect", None, type(exc).__name__) from None
        sock.settimeout(io_timeout)
        tls = cls(sock, Tls13Client(config), handshake_timeout=io_timeout)
        tls.handshake()
        return tls

    # -- internals ------------------------------------------------------------------------

    def _fail(self, exc):
        with self._lock:
            try:
                self._sock.sendall(self._client.data_to_send())  # a queued alert
            except Exception:  # noqa: S110 best effort: the peer may be gone
                pass
        self._close_socket()
        if isinstance(exc, TlsError):
            return exc
        return TlsError("io", None, type(exc).__name__)

    def _close_socket(self):
        if not self._closed:
            self._closed = True
            try:
                self._sock.close()
            except OSError:
                pass

    def _feed(self, data):
        # Process bytes from the peer (under the lock) and send what the client queued
        # (alerts, KeyUpdate answers).
        with self._lock:
            events = self._client.receive(data)
            out = self._client.data_to_send()
            if out:
                self._sock.sendall(out)
        for kind, value in events:
            if kind == tls13.EVENT_HANDSHAKE_COMPLETE:
                self.info = value
            elif kind == tls13.EVENT_DATA:
                self._pending += value
                self.data_received = self.data_received or bool(value)
            elif kind == tls13.EVENT_SESSION_TICKET:
                self.tickets.append(value)
            elif kind == tls13.EVENT_CLOSED:
                self._eof = True

    def _read_more(self):
        data = self._sock.recv(self._CHUNK)
        if not data:
            raise TlsError("eof", None, "connection closed by the peer")
        self._feed(data)

    # -- socket-like API ------------------------------------------------------------------

    def handshake(self):
        """Run the handshake (connect() does).  Returns: HandshakeInfo."""
        try:
            with self._lock:
                first = self._client.start()
            self._sock.sendall(first)
            end = time.monotonic() + self._handshake_timeout
            while not self._client.connected:
                if self._client.closed:
                    raise TlsError("eof", None, "closed during the handshake")
                if time.monotonic() > end:
                    raise TlsError("timeout", None, "handshake deadline")
                self._read_more()
        except Exception as exc:
            raise self._fail(exc) from None
        return self.info

    def settle(self, seconds):
        """After the handshake, read until the server's first session ticket (or data, or
        close) arrives, at most `seconds`.  A TLS 1.3 server checks the client's
        certificate after the client's Finished and sends its tickets only once it has
        accepted it: waiting for them turns a refused certificate into an error here
        rather than a silent drop later.
        Returns: True when a ticket or data came, False when the wait expired (the
        connection stays open).  Raises: TlsError (the server's alert, eof)."""
        previous = self._sock.gettimeout()
        try:
            self._sock.settimeout(seconds)
            end = time.monotonic() + seconds
            while not self.tickets and not self._pending and not self._eof:
                if time.monotonic() > end:
                    return False
                try:
                    data = self._sock.recv(self._CHUNK)
                except TimeoutError:
                    return False
                if not data:
                    raise TlsError("eof", None, "connection closed by the peer")
                self._feed(data)
            return True
        except Exception as exc:
            raise self._fail(exc) from None
        finally:
            if not self._closed:
                self._sock.settimeout(previous)

    def recv(self, bufsize):
        """Up to `bufsize` bytes of application data; b"" after close_notify."""
        if self._closed and not self._pending:
            return b""
        try:
            while not self._pending and not self._eof:
                self._read_more()
        except Exception as exc:
            raise self._fail(exc) from None
        data = bytes(self._pending[:bufsize])
        del self._pending[:bufsize]
        return data

    def recv_into(self, buffer, nbytes=0):
        data = self.recv(nbytes or len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def sendall(self, data):
        """Send application data (split into records by the client)."""
        try:
            with self._lock:
                self._client.send_data(bytes(data))
                self._sock.sendall(self._client.data_to_send())
        except Exception as exc:
            raise self._fail(exc) from None

    def send(self, data):
        self.sendall(data)
        return len(data)

    def makefile(self, mode="rb", buffering=None, **_kwargs):
        """A buffered binary reader (what http.client's response reads from)."""
        if mode not in ("r", "rb"):
            raise ValueError("TlsSocket.makefile: read-only binary")
        self._files += 1
        return io.BufferedReader(_TlsRawIO(self))

    def _file_closed(self):
        self._files -= 1
        if self._close_requested and self._files <= 0:
            self.close()

    def settimeout(self, seconds):
        self._sock.settimeout(seconds)

    def gettimeout(self):
        return self._sock.gettimeout()

    def shutdown(self, how):
        """Unblock a reader in another thread (the tunnel's close)."""
        try:
            self._sock.shutdown(how)
        except OSError:
            pass

    def close(self, force=False):
        """Send close_notify (best effort) and close the socket.  Never raises.  As with
        a socket, a reader from makefile() keeps the connection until it is closed too
        (http.client closes the connection before the response is read), unless force."""
        if self._closed:
            return
        self._close_requested = True
        if self._files > 0 and not force:
            return
        # The lock is taken with a bound: a writer blocked on a peer that reads nothing
        # must not block close (the close_notify is skipped then).
        if self._lock.acquire(timeout=1.0):
            try:
                if not self._client.closed:
                    self._client.close()
                    self._sock.sendall(self._client.data_to_send())
            except Exception:  # noqa: S110 the peer may be gone
                pass
            finally:
                self._lock.release()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a reader in another thread
        except OSError:
            pass
        self._close_socket()

    @property
    def closed(self):
        return self._closed


class _TlsRawIO(io.RawIOBase):
    def __init__(self, tls):
        io.RawIOBase.__init__(self)
        self._tls = tls

    def readable(self):
        return True

    def readinto(self, buffer):
        return self._tls.recv_into(buffer)

    def close(self):
        if not self.closed:
            io.RawIOBase.close(self)
            self._tls._file_closed()
