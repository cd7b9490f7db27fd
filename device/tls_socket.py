# A socket-like object over the SE-keyed TLS 1.3 stream, for clients written against a
# socket (micropython-lib's umqtt.simple).  Portable: MicroPython and CPython.
#
#     tls = SeTlsWrapper(se, slot, anchors_der, now, server_name="broker.example",
#                        client_chain=[cert_der, issuing_ca_der])
#     sock = tls.wrap_socket(tcp_socket)      # handshake done (the SE signs)
#     sock.write(b"..."); sock.read(4); sock.setblocking(False); sock.read(1) -> None
#
# `wrap_socket(sock, **ignored)` is the shape umqtt.simple expects of its `ssl` (1.4+: an
# SSLContext-like object; 1.3: the `ussl` module, which device/mqtt.UmqttTransport stands
# in for during connect()).  read(n) blocks until n bytes (fewer only at the close) unless
# setblocking(False): then it returns None when no application data is buffered and none
# is waiting on the wire (select.poll with a zero timeout), else what is buffered, at most
# n bytes.  Every TLS failure surfaces as OSError (what socket clients catch); the stream
# is closed after it.
#
# Heap (a board's): the socket is read CHUNK bytes at a time, what is sent goes in
# records of at most CHUNK plaintext bytes, and a received record's data is handed out
# in pieces of at most CHUNK bytes (device/https.py does the same), so no block larger
# than a record is needed.  No shared record buffer: an MQTT session's records are small
# and one kept for the session's life costs more than it saves (bench/micropython.py
# run_mqtt_tls, measured both ways).

CHUNK = 512


class TlsSocket:
    """read / write / setblocking / close over a connected Tls13Stream.

    Params: stream: device/tls13_keys.Tls13Stream (handshake done).  raw: its socket (for
        the zero-timeout poll).
    """

    def __init__(self, stream, raw):
        self._stream = stream
        self._raw = raw
        self._buf = b""
        self._blocking = True
        self._eof = False

    def setblocking(self, flag):
        self._blocking = bool(flag)

    def _fill(self):
        from fleetid.common.errors import TlsError

        try:
            data = self._stream.recv()
        except TlsError as exc:
            raise OSError(str(exc)) from None
        if not data:
            self._eof = True
            return False
        self._buf = self._buf + data if self._buf else bytes(data)
        return True

    def _waiting(self):
        # Application data ready without blocking: buffered in the stream, or records on
        # the wire that turn out to hold some (a ticket or KeyUpdate alone does not count).
        import select

        from fleetid.common.errors import TlsError

        if self._stream.available():
            return True
        poller = select.poll()
        poller.register(self._raw, select.POLLIN)
        if not poller.poll(0):
            return False
        turns = [0]

        def one_read():
            turns[0] += 1
            return turns[0] > 1

        try:
            self._stream.wait(one_read)
        except TlsError as exc:
            raise OSError(str(exc)) from None
        return self._stream.available()

    def read(self, n):
        if not self._blocking and not self._buf and not self._eof:
            if not self._waiting():
                return None
            self._fill()
            out = self._buf[:n]
            self._buf = self._buf[n:]
            return out
        while len(self._buf) < n and not self._eof:
            self._fill()
        out = self._buf[:n]
        self._buf = self._buf[n:]
        return out

    def write(self, buf, n=None):
        from fleetid.common.errors import TlsError

        if isinstance(buf, str):
            buf = buf.encode()
        data = bytes(buf) if n is None else bytes(memoryview(buf)[:n])
        try:
            self._stream.send(data)
        except TlsError as exc:
            raise OSError(str(exc)) from None
        return len(data)

    send = write

    def close(self):
        self._stream.close()


class SeTlsWrapper:
    """Makes TlsSocket objects: the client side of TLS 1.3 with the key in SE slot `slot`.

    Params: se: SeSession.  slot: the client key's slot.  anchors_der: DER trust anchors
        (the fleet root in the SE).  now: epoch-seconds clock.  server_name: the name or IP
        to check in the server's certificate.  client_chain: DER certificates, ours first
        (None: the slot's certificate).  prims: crypto provider (None: portable).
        timeout_s: each wait.  record_size_limit: RFC 8449.  max_transcript: the
        handshake's transcript block (device/https.MAX_TRANSCRIPT says why 5 KiB).
        revocation: the server chain's `revocation(path)` hook (common/tls13_cert.py), or
        None.
    Attributes: stream (the last Tls13Stream), ephemeral (its SeEphemeral).
    """

    def __init__(self, se, slot, anchors_der, now, server_name, client_chain=None,
                 prims=None, timeout_s=30, record_size_limit=4096, max_transcript=5120,
                 revocation=None):
        self.se = se
        self.slot = slot
        self.anchors = list(anchors_der)
        self.now = now
        self.server_name = server_name
        self.client_chain = client_chain
        self.prims = prims
        self.timeout_s = timeout_s
        self.record_size_limit = record_size_limit
        self.max_transcript = max_transcript
        self.revocation = revocation
        self.stream = None
        self.ephemeral = None

    def wrap_socket(self, sock, **ignored):
        """Handshake on the connected `sock`.  Returns: TlsSocket.  Raises: OSError (the
        handshake failed; the socket is closed)."""
        from fleetid.common import tls13
        from fleetid.common.clock import SystemClock
        from fleetid.common.errors import TlsError
        from fleetid.device.tls13_keys import SeEphemeral, Tls13Stream, se_signer, se_verifier

        prims = self.prims
        if prims is None:
            from fleetid.common.tls13_crypto import PortableTls13Primitives

            prims = self.prims = PortableTls13Primitives()
        chain = self.client_chain
        if chain is None:
            chain = [bytes(self.se.get_cert(self.slot))]
        self.ephemeral = SeEphemeral(self.se)
        config = tls13.Tls13Config(prims, self.ephemeral, self.anchors, se_verifier(self.se),
                                   self.now, server_name=self.server_name,
                                   signer=se_signer(self.se, self.slot), client_chain=chain,
                                   revocation=self.revocation,
                                   record_size_limit=self.record_size_limit,
                                   max_transcript=self.max_transcript,
                                   send_fragment=CHUNK, data_chunk=CHUNK)
        sock.settimeout(self.timeout_s)
        self.stream = Tls13Stream(sock, tls13.Tls13Client(config), SystemClock(),
                                  int(self.timeout_s * 1000), CHUNK)
        try:
            self.stream.handshake()
        except TlsError as exc:
            raise OSError(str(exc)) from None
        return TlsSocket(self.stream, sock)
