# HTTP/1.1 (RFC 9112) for the board: one request per connection, over the SE-keyed TLS 1.3
# stream (device/tls13_keys.Tls13Stream) or a plain socket (a CRL is a public, signed
# document).  Portable: CPython and MicroPython (socket, no urllib, no http.client).
#
#     client = HttpsClient(se, anchors_der, now, prims)       # keeps session tickets
#     response = client.request(slot, "https://10.0.0.2:8443", "GET", "/v1/whoami")
#     response = fetch("http://10.0.0.2:8080/crl/widget.crl")      # plain HTTP
#     response.status / response.header("Content-Type") / response.body
#
# Bounds (the board's heap): the status line and each header line at most MAX_LINE bytes,
# at most MAX_HEADERS header lines, the body at most `max_body` bytes (Content-Length,
# chunked transfer coding RFC 9112 7.1, or read to the close); every socket wait bounded by
# the socket timeout and the stream's deadline.  Anything else is HttpError.
#
# Resumption: the client keeps the newest NewSessionTicket per (slot, server name) together
# with a digest of the certificate the full handshake authenticated with (RFC 8446 4.6.1:
# a resumed session carries the original client identity, and is tied to the server's
# name, not its port: the cloud's verifier and EST listeners share one session cache, so
# a ticket from one resumes on the other).  A ticket is offered only while that slot still
# holds the same certificate, so a rotation (new key in the slot) does one full handshake
# with the new key, and the other calls of a cycle resume.
#
# Errors: HttpError.reason uses device/agent.NetError's words (LINK, TIMEOUT, HANDSHAKE,
# REFUSED for a server certificate the fleet root does not vouch for); device/board_net.py
# turns them, and the HTTP status of an answer, into NetError.  Nothing else escapes.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.errors import FleetidError

MAX_LINE = const(1024)
MAX_HEADERS = const(32)
MAX_BODY_DEFAULT = const(32768)
CONNECT_TIMEOUT_S = const(10)
IO_TIMEOUT_S = const(30)
RECORD_SIZE_LIMIT = const(4096)  # RFC 8449: what the board accepts per TLS record
# Transcript bytes one handshake may keep (Tls13Config.max_transcript, one contiguous
# block): a full handshake with `fleetid cloud serve` measured 3,005 B (server leaf signed
# by the root, the identity certificate as ours).  Below common/tls13's 8 KiB default
# because that block is what a fragmented board heap fails to find; a longer server chain
# needs it raised (a handshake over it fails with TlsError "limit").
MAX_TRANSCRIPT = const(5120)
# The board's side of the heap: what it sends goes in records of at most SEND_FRAGMENT
# plaintext bytes (Tls13Config.send_fragment; a 1.5 KB certificate or a 2.4 KB base64 CSR
# is never sealed as one block), and the socket is read RECV_CHUNK bytes at a time
# (MicroPython's recv(n) allocates n first).  Measured (bench/micropython.py run_tls):
# on a heap fragmented by a handshake, blocks of 1.5-2.4 KB were what failed first.
SEND_FRAGMENT = const(512)
RECV_CHUNK = const(512)
# Received records are assembled and opened in one buffer the client allocates once
# (Tls13Config.record_buffer): a record of up to RECORD_SIZE_LIMIT plaintext bytes.
_RECORD_BUFFER = const(RECORD_SIZE_LIMIT + 22)  # header 5, content type 1, tag 16


class HttpError(FleetidError):
    """A request failed before an HTTP answer was read whole.

    reason: "link" (connect / send / receive failed, or the answer is not HTTP/1.1 within
    the bounds), "timeout", "handshake" (the TLS handshake failed or the peer sent an
    alert), "refused" (the server's certificate failed a check: `check` names it).
    """

    LINK = "link"
    TIMEOUT = "timeout"
    HANDSHAKE = "handshake"
    REFUSED = "refused"

    def __init__(self, reason, detail="", check=None):
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail
        self.check = check


class HttpResponse:
    """status (int), headers (dict, lower-case names), body (bytes or bytearray), pieces
    (None, or a 200 answer's body as the list of pieces it arrived in, body then None:
    read_response's `pieces`)."""

    def __init__(self, status, headers, body, pieces=None):
        self.status = status
        self.headers = headers
        self.body = body
        self.pieces = pieces

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)


def parse_url(url):
    """(scheme, host, port, path) of an http:// or https:// URL (no userinfo, no IPv6
    literal).  Raises: ValueError."""
    if url.startswith("https://"):
        scheme, rest, port = "https", url[8:], 443
    elif url.startswith("http://"):
        scheme, rest, port = "http", url[7:], 80
    else:
        raise ValueError("not an http(s) URL")
    slash = rest.find("/")
    authority, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    if "@" in authority or "[" in authority or not authority:
        raise ValueError("unsupported authority")
    host, _, port_text = authority.partition(":")
    if port_text:
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError("bad port")
    return scheme, host, port, path


class _Reader:
    # Buffered reads over `recv() -> bytes` (b"" at the end of the stream).  The data
    # received is consumed by moving a position, never by slicing off what was read (a
    # 2 KB answer in one record would be copied once per header line otherwise).
    def __init__(self, recv):
        self._recv = recv
        self._buf = b""
        self._pos = 0
        self._eof = False

    def _left(self):
        return len(self._buf) - self._pos

    def _more(self):
        if self._eof:
            return False
        data = self._recv()
        if not data:
            self._eof = True
            return False
        if self._left():
            self._buf = self._buf[self._pos:] + data
        else:
            self._buf = bytes(data)
        self._pos = 0
        return True

    def line(self):
        while True:
            end = self._buf.find(b"\r\n", self._pos)
            if end >= 0:
                if end - self._pos > MAX_LINE:
                    break
                out = self._buf[self._pos:end]
                self._pos = end + 2
                return out
            if self._left() > MAX_LINE:
                break
            if not self._more():
                raise HttpError(HttpError.LINK, "answer cut short")
        raise HttpError(HttpError.LINK, "line over %d bytes" % MAX_LINE)

    def _take(self, n, out):
        # Up to n buffered bytes into `out` (a bytearray); returns how many.
        take = min(n, self._left())
        if take:
            out.extend(memoryview(self._buf)[self._pos:self._pos + take])
            self._pos += take
        return take

    def fill(self, view):
        # Exactly len(view) bytes into the writable `view`.
        got = 0
        while got < len(view):
            if not self._left() and not self._more():
                raise HttpError(HttpError.LINK, "body cut short")
            take = min(len(view) - got, self._left())
            view[got:got + take] = memoryview(self._buf)[self._pos:self._pos + take]
            self._pos += take
            got += take

    def exact(self, n, out):
        while n:
            if not self._left() and not self._more():
                raise HttpError(HttpError.LINK, "body cut short")
            n -= self._take(n, out)

    def pieces(self, n):
        # Exactly n bytes as the list of pieces they arrive in (the buffered part sliced
        # off, then each recv() piece as it is, the last one cut): no block of n bytes.
        out = []
        take = min(n, self._left())
        if take:
            out.append(self._buf[self._pos:self._pos + take])
            self._pos += take
            n -= take
        while n:
            data = self._recv()
            if not data:
                self._eof = True
                raise HttpError(HttpError.LINK, "body cut short")
            if len(data) > n:
                data = data[:n]
            out.append(data)
            n -= len(data)
        return out

    def to_end(self, limit, out):
        while True:
            if len(out) + self._left() > limit:
                raise HttpError(HttpError.LINK, "body over %d bytes" % limit)
            self._take(self._left(), out)
            if not self._more():
                return


def _head(method, host, port, path, body, headers):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: %s:%d" % (host, port),
             "Connection: close", "User-Agent: fleetid-board"]
    for name in headers or ():
        lines.append("%s: %s" % (name, headers[name]))
    if body is not None or method == "POST":
        lines.append("Content-Length: %d" % (len(body) if body is not None else 0))
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_headers(reader):
    """The header section as {lower-case name: value}, bounded to MAX_HEADERS lines."""
    headers = {}
    count = 0
    while True:
        line = reader.line()
        if not line:
            return headers
        count += 1
        if count > MAX_HEADERS:
            raise HttpError(HttpError.LINK, "over %d header lines" % MAX_HEADERS)
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise HttpError(HttpError.LINK, "bad header line")
        # Repeated fields other than Set-Cookie may be joined with commas (RFC 9110 5.3).
        key = name.decode().lower()
        text = value.strip().decode()
        headers[key] = headers[key] + ", " + text if key in headers else text


def _read_chunked(reader, max_body, body):
    """A chunked body (RFC 9112 7.1) into `body`, at most max_body bytes; the trailer
    section is read and ignored."""
    while True:
        size_text = reader.line().split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError(HttpError.LINK, "bad chunk size") from None
        if size < 0 or len(body) + size > max_body:
            raise HttpError(HttpError.LINK, "body over %d bytes" % max_body)
        if size == 0:
            break
        reader.exact(size, body)
        if reader.line():
            raise HttpError(HttpError.LINK, "chunk not followed by CRLF")
    for _ in range(MAX_HEADERS + 1):  # trailer section, ignored
        if not reader.line():
            return
    raise HttpError(HttpError.LINK, "trailer too long")


def _send_body(stream, body):
    """Send a request body: bytes-like, None, or an iterable of pieces (board_net.Base64Body)
    sent as they come."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        if len(body):
            stream.send(body)
    elif body is not None:
        for piece in body:
            stream.send(piece)


def read_response(recv, max_body=MAX_BODY_DEFAULT, method="GET", pieces=False):
    """Read one HTTP/1.1 answer through `recv() -> bytes` (b"" at the close).

    Params: pieces: a 200 answer with a Content-Length keeps its body as the list of
        pieces recv() gave (response.pieces; response.body None): a board that decodes
        the body as it goes (an EST answer's base64) needs no block of the whole body.
    Returns: HttpResponse; its body is a bytearray (no copy into bytes).  Raises:
    HttpError(LINK) for anything that is not a bounded HTTP/1.1 answer (status line,
    header lines, Content-Length or chunked body)."""
    reader = _Reader(recv)
    status_line = reader.line()
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3:
        raise HttpError(HttpError.LINK, "not an HTTP/1.1 status line")
    try:
        status = int(parts[1])
    except ValueError:
        raise HttpError(HttpError.LINK, "bad status code") from None
    if not 100 <= status <= 599:
        raise HttpError(HttpError.LINK, "bad status code")
    headers = _read_headers(reader)
    body = bytearray()
    if method == "HEAD" or status in (204, 304) or status < 200:
        return HttpResponse(status, headers, b"")
    coding = headers.get("transfer-encoding")
    if coding is not None:
        # RFC 9112 6.3: chunked must be the final coding; nothing else is supported here.
        if coding.lower() != "chunked":
            raise HttpError(HttpError.LINK, "transfer coding %s" % coding)
        _read_chunked(reader, max_body, body)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise HttpError(HttpError.LINK, "bad Content-Length") from None
        if length < 0 or length > max_body:
            raise HttpError(HttpError.LINK, "body of %d bytes over %d" % (length, max_body))
        if pieces and status == 200:
            return HttpResponse(status, headers, None, reader.pieces(length))
        body = bytearray(length)  # one block of the announced size, filled in place
        reader.fill(memoryview(body))
    else:
        reader.to_end(max_body, body)
    return HttpResponse(status, headers, body)


def _connect(host, port, timeout_s):
    import socket

    sock = socket.socket()
    try:
        sock.settimeout(timeout_s)
        sock.connect(socket.getaddrinfo(host, port)[0][-1])
    except OSError as exc:
        sock.close()
        raise HttpError(HttpError.TIMEOUT if _is_timeout(exc) else HttpError.LINK,
                        "connect %s:%d" % (host, port)) from None
    return sock


def _is_timeout(exc):
    # MicroPython: OSError(ETIMEDOUT) (it has no TimeoutError); CPython: TimeoutError.
    import errno

    if exc.args and exc.args[0] == errno.ETIMEDOUT:
        return True
    try:
        return isinstance(exc, TimeoutError)
    except NameError:
        return False


def _send_all(sock, data):
    view = memoryview(data)
    while len(view):
        n = sock.send(view)
        view = view[len(view) if n is None else n:]


def fetch(url, max_body=65536, timeout_s=IO_TIMEOUT_S):
    """Plain HTTP GET of a public document (a CRL: its signature is what makes it
    trustworthy, RFC 5280 5).  https:// URLs are refused here (use HttpsClient).

    Returns: HttpResponse.  Raises: HttpError, ValueError (not an http:// URL)."""
    scheme, host, port, path = parse_url(url)
    if scheme != "http":
        raise ValueError("fetch() is for http:// URLs")
    sock = _connect(host, port, timeout_s)
    try:
        _send_all(sock, _head("GET", host, port, path, None, None))
        return read_response(lambda: sock.recv(1024), max_body)
    except OSError as exc:
        raise HttpError(HttpError.TIMEOUT if _is_timeout(exc) else HttpError.LINK,
                        "GET %s" % url) from None
    finally:
        sock.close()


def _tls_error(exc):
    from fleetid.common.errors import TlsCertificateError

    if isinstance(exc, TlsCertificateError):
        return HttpError(HttpError.REFUSED, str(exc), exc.check)
    if exc.reason == "timeout":
        return HttpError(HttpError.TIMEOUT, str(exc))
    if exc.reason in ("io", "eof", "closed"):
        return HttpError(HttpError.LINK, str(exc))
    return HttpError(HttpError.HANDSHAKE, str(exc))


def _copied_ticket(ticket):
    # A SessionTicket in new blocks (bytes(memoryview(b)) copies; bytes(b) would not).
    from fleetid.common.tls13 import SessionTicket

    return SessionTicket(bytes(memoryview(ticket.ticket)), bytes(memoryview(ticket.psk)),
                         ticket.lifetime_s, ticket.age_add, ticket.received_s,
                         ticket.server_name)


class HttpsClient:
    """HTTPS with the SE's key (module header).

    Params: se: selected SeSession.  anchors_der: list of DER trust anchors (the fleet
        root in the SE).  now: `now() -> epoch seconds` (certificate validity, ticket
        age).  prims: the TLS crypto provider (None: common/tls13_crypto's portable one).
        server_name: the name or IP to check in every server's certificate (None: the
        URL's host).  revocation: optional `revocation(path)` for the server chain
        (device/board.server_revocation).  timeout_s: per socket wait; the handshake and
        each answer are bounded by it too.  max_body: largest answer body.
        max_transcript: Tls13Config.max_transcript (MAX_TRANSCRIPT above).
    Attributes: handshakes, resumed (counts), se_operations (ECDHE operations in the SE).
    """

    def __init__(self, se, anchors_der, now, prims=None, server_name=None, revocation=None,
                 timeout_s=IO_TIMEOUT_S, max_body=MAX_BODY_DEFAULT,
                 max_transcript=MAX_TRANSCRIPT):
        if prims is None:
            from fleetid.common.tls13_crypto import PortableTls13Primitives

            prims = PortableTls13Primitives()
        self.se = se
        self.anchors = list(anchors_der)
        self.now = now
        self.prims = prims
        self.server_name = server_name
        self.revocation = revocation
        self.timeout_s = timeout_s
        self.max_body = max_body
        self.max_transcript = max_transcript
        self._tickets = {}  # (slot, server name) -> (certificate digest, SessionTicket)
        # The record buffer lives as long as the client: collected first, so that it is
        # placed in the lowest hole it fits (just above what is live now) instead of
        # above the garbage the SE session's setup left, where it would split the free
        # heap the connections need into two smaller parts (measured under MicroPython:
        # 4 KiB placed near the top of the used heap).
        import gc

        gc.collect()
        self._record_buffer = bytearray(_RECORD_BUFFER)
        self.handshakes = 0
        self.resumed = 0
        self.se_operations = 0

    def forget(self):
        """Drop every session ticket (the next requests do full handshakes)."""
        self._tickets = {}

    def _take_ticket(self, key, digest, name):
        """The session ticket kept for (slot, server name), if it was made with the same
        client certificate (digest) and is still usable for `name`; it is used once."""
        kept = self._tickets.pop(key, None)
        if kept is not None and kept[0] == digest and kept[1].usable(int(self.now()), name):
            return kept[1]
        return None

    def _config(self, slot, cert, name, ticket, ephemeral):
        """The Tls13Config of one connection with the key in `slot` (certificate `cert`)."""
        from fleetid.common import tls13
        from fleetid.device.tls13_keys import se_signer, se_verifier

        return tls13.Tls13Config(self.prims, ephemeral, self.anchors, se_verifier(self.se),
                                 self.now, server_name=name, signer=se_signer(self.se, slot),
                                 client_chain=[cert], revocation=self.revocation,
                                 ticket=ticket, record_size_limit=RECORD_SIZE_LIMIT,
                                 max_transcript=self.max_transcript, send_fragment=SEND_FRAGMENT,
                                 record_buffer=self._record_buffer, data_chunk=RECV_CHUNK)

    def request(self, slot, base_url, method, path, body=None, headers=None, pieces=False):
        """One request on its own connection, authenticated by the key in `slot`.

        Params: base_url: https://HOST:PORT (a path in it is ignored).  body: bytes, None,
            or an iterable of bytes pieces with len() (their total) sent one by one.
            headers: dict or None.  pieces: read_response's (a 200 answer's body as the
            pieces it arrived in).
        Returns: HttpResponse (any status; the caller maps it).
        Raises: HttpError; ApduError / LinkError when the SE fails.
        """
        import hashlib

        from fleetid.common import tls13
        from fleetid.common.clock import SystemClock
        from fleetid.common.errors import TlsError
        from fleetid.device.tls13_keys import SeEphemeral, Tls13Stream

        scheme, host, port, _ = parse_url(base_url)
        if scheme != "https":
            raise ValueError("HttpsClient takes https:// URLs")
        cert = bytes(self.se.get_cert(slot))
        digest = hashlib.sha256(cert).digest()
        name = self.server_name or host
        key = (slot, name)
        ticket = self._take_ticket(key, digest, name)
        ephemeral = SeEphemeral(self.se)
        config = self._config(slot, cert, name, ticket, ephemeral)
        cert = None
        # Collect before the handshake's largest allocation (the transcript buffer, one
        # block): under MicroPython a heap left to collect on its own mid-handshake
        # fragments until that block no longer fits, well above the heap needed here.
        import gc

        gc.collect()
        sock = _connect(host, port, self.timeout_s)
        stream = Tls13Stream(sock, tls13.Tls13Client(config), SystemClock(),
                             int(self.timeout_s * 1000), RECV_CHUNK)
        try:
            info = stream.handshake()
            self.handshakes += 1
            if info.resumed:
                self.resumed += 1
            stream.send(_head(method, host, port, path, body, headers))
            _send_body(stream, body)
            response = read_response(stream.recv, self.max_body, method, pieces)
        except TlsError as exc:
            raise _tls_error(exc) from None
        finally:
            self.se_operations += ephemeral.operations
            stream.close()
            if stream.tickets:
                # Kept past this connection: copied after a collection, so that it lands
                # in a low hole rather than among the connection's garbage, where it
                # would split the free heap the next connections need.
                ticket = stream.tickets[-1]
                stream = config = None
                gc.collect()
                self._tickets[key] = (digest, _copied_ticket(ticket))
        return response
