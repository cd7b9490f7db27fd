# The TLS 1.3 client (common/tls13.py) bound to the SE and to a socket.  Portable: CPython
# and MicroPython.
#
#   SeEphemeral(se)          the ECDHE share: the SE's transient (RAM-only) key object, so
#                            a handshake writes no NVM (GENERATE KEY + ECDH, slot 0x80)
#   se_signer(se, slot)      CertificateVerify signed by SIGN with the identity or
#                            operational key
#   se_verifier(se)          certificate and CertificateVerify signatures checked by the
#                            SE's VERIFY with a point (no ECDSA code on the board)
#   Tls13Stream(sock, ...)   drives a Tls13Client over any blocking socket with recv(n) and
#                            send(b) (CPython's socket, MicroPython's socket), every wait
#                            bounded by the socket's timeout and an overall deadline
#
# device/host/tls13_socket.py opens the TCP connection on CPython.  The server chain's
# revocation hook is device/board.server_revocation, the one both runtimes pass.


class SeEphemeral:
    """The ECDHE key of one handshake in the SE's transient key object.

    Attributes: operations (SE commands issued: GENERATE KEY and ECDH)."""

    def __init__(self, se):
        self._se = se
        self.operations = 0

    def generate(self):
        self.operations += 1
        return self._se.generate_transient_key()

    def shared_secret(self, peer_point):
        self.operations += 1
        return self._se.ecdh_transient(peer_point)


def se_signer(se, slot):
    """`sign(digest) -> DER` with the SE key in `slot` (SeSession.sign)."""

    def sign(digest):
        return se.sign(slot, digest)

    return sign


def se_verifier(se):
    """`verify(point, digest, signature_der)` by the SE's VERIFY with a given point;
    raises VerificationFailed when the signature does not verify."""

    def verify(point, digest, signature):
        se.verify(digest, signature, point=point)

    return verify


class Tls13Stream:
    """A Tls13Client over a blocking socket.

    Params: sock: an object with recv(n) -> bytes and send(bytes) -> int (or write());
            its own timeout bounds each wait (set it before).
        client: a started-or-not common.tls13.Tls13Client.
        clock: common.clock-style object with now_ms(); deadline_ms bounds the whole
            handshake and each recv() call.
    Attributes: info (HandshakeInfo), tickets (SessionTickets received, newest last),
        key_updates (KeyUpdates received).
    Raises (every method): TlsError -- TlsError("io") for a socket error or a timeout,
        TlsError("timeout") when the deadline passes; the socket is closed after any error.
    """

    def __init__(self, sock, client, clock, deadline_ms=30000, chunk=2048):
        self._sock = sock
        self._client = client
        self._clock = clock
        self._deadline_ms = deadline_ms
        self._chunk = chunk
        self._pending = []
        self._closed = False
        self.info = None
        self.tickets = []
        self.key_updates = 0

    def _flush(self):
        # Record by record (Tls13Client.records_to_send): no block of the whole flight.
        sender = getattr(self._sock, "send", None) or self._sock.write
        for record in self._client.records_to_send():
            view = memoryview(record)
            while len(view):
                n = sender(view)
                if n is None:
                    n = len(view)
                view = view[n:]

    def _fail(self, exc):
        from fleetid.common.errors import TlsError

        try:
            self._flush()  # the alert the client queued, if any
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
            except Exception:  # noqa: S110
                pass

    def _pump(self, until, deadline_ms=None):
        # Read and process until `until()` or the deadline; returns nothing.
        from fleetid.common import tls13
        from fleetid.common.errors import TlsError

        end = self._clock.now_ms() + (self._deadline_ms if deadline_ms is None else deadline_ms)
        while not until():
            if self._clock.now_ms() > end:
                raise TlsError("timeout", None, "deadline")
            data = self._sock.recv(self._chunk)
            if not data:
                raise TlsError("eof", None, "connection closed by the peer")
            for kind, value in self._client.receive(data):
                if kind == tls13.EVENT_HANDSHAKE_COMPLETE:
                    self.info = value
                elif kind == tls13.EVENT_DATA:
                    if value:
                        self._pending.append(value)
                elif kind == tls13.EVENT_SESSION_TICKET:
                    self.tickets.append(value)
                elif kind == tls13.EVENT_KEY_UPDATE:
                    self.key_updates += 1
                elif kind == tls13.EVENT_CLOSED:
                    self._pending.append(b"")
            self._flush()

    def _guard(self, work):
        try:
            return work()
        except Exception as exc:  # every failure leaves as a TlsError, socket closed
            raise self._fail(exc) from None

    def handshake(self):
        """Run the handshake.  Returns: HandshakeInfo."""

        def work():
            if not self._client.connected:
                first = self._client.start()
                sender = getattr(self._sock, "send", None) or self._sock.write
                view = memoryview(first)
                while len(view):
                    n = sender(view)
                    view = view[len(view) if n is None else n:]
            self._pump(lambda: self._client.connected)
            return self.info

        return self._guard(work)

    def send(self, data):
        """Send application data."""

        def work():
            self._client.send_data(data)
            self._flush()

        self._guard(work)

    def recv(self):
        """Next application data; b"" once the peer closed (close_notify)."""

        def work():
            if not self._pending and self._client.closed:
                return b""
            self._pump(lambda: bool(self._pending))
            return self._pending.pop(0)

        return self._guard(work)

    def available(self):
        """True when recv() returns without reading the socket: application data is
        buffered, or the peer has closed."""
        return bool(self._pending) or self._client.closed

    def wait(self, condition, deadline_ms=None):
        """Process records until `condition()` holds (e.g. a ticket arrived).

        Params: deadline_ms: a shorter bound than the stream's for this wait; the socket
            timeout is lowered to it for the wait (when the socket has settimeout) and
            restored after (when it has gettimeout; MicroPython's has not).
        A timeout closes the stream, as every failure does."""
        if deadline_ms is None:
            self._guard(lambda: self._pump(condition))
            return
        settimeout = getattr(self._sock, "settimeout", None)
        gettimeout = getattr(self._sock, "gettimeout", None)
        previous = gettimeout() if gettimeout is not None else None
        if settimeout is not None:
            settimeout(deadline_ms / 1000)
        self._guard(lambda: self._pump(condition, deadline_ms))
        if settimeout is not None and previous is not None:
            settimeout(previous)

    def key_update(self, request_peer=False):
        """Send a KeyUpdate (and ask the peer for one when request_peer)."""

        def work():
            self._client.key_update(request_peer)
            self._flush()

        self._guard(work)

    def close(self):
        """Send close_notify and close the socket (never raises)."""
        try:
            if not self._client.closed:
                self._client.close()
                self._flush()
        except Exception:  # noqa: S110
            pass
        self._close_socket()
