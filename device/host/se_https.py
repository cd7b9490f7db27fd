"""HTTPS whose client key lives in the secure element (CPython host adapter), on the
portable TLS 1.3 client (fleetid.common.tls13 bound to the SE by
fleetid.device.host.tls13_socket).

Python's `ssl` cannot sign with a key it does not hold, so the device's TLS is the
project's own TLS 1.3 client: the ECDHE share is the SE's transient key, the
CertificateVerify is signed by the SE's SIGN, the server chain is verified to the fleet
root with the SE's VERIFY (validity, EKU serverAuth, host name or IP, revocation through
an optional hook).  http.client does the HTTP/1.1 framing over a TlsSocket.

    se = SeSession(protocol); se.select()
    tickets = TicketCache()
    client = SeTlsClient(se, slot=1, cert_chain_der=[se.get_cert(1)],
                         trust_roots_der=[se.get_data(DATA_TRUST_FLEET_ROOT)], tickets=tickets)
    response = client.request("127.0.0.1", 8443, "GET", "/v1/whoami")
    response.status, response.headers, response.body

One request per connection.  Resumption: the session ticket the server sends is kept in
`tickets` (keyed by the server's name, slot and client certificate: a resumed TLS 1.3
session keeps the client certificate of the full handshake, so a ticket is never offered
for another key) and used once by the next connection to the same server name with the
same key (PSK-DHE: a fresh ECDHE in the SE, no SIGN, no chain check).  The port is not
part of the key: RFC 8446 4.6.1 ties a ticket to the server's identity (the SNI the
chain was checked for), and the cloud's verifier and EST listeners share one session
cache (cloud/server.py), so a ticket from one resumes on the other.  A server that does
not know the ticket answers with a full handshake; the ticket is spent either way.  Every network wait is
bounded (connect and per-I/O timeouts, a handshake deadline).  Failures raise
TlsClientError(reason, detail).
"""

import hashlib
import http.client
import threading

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetid.common.errors import FleetidError, TlsAlertReceived, TlsCertificateError, TlsError
from fleetid.device.host.tls13_socket import TlsSocket, se_client_config

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_IO_TIMEOUT = 30.0
MAX_RESPONSE = 1024 * 1024
_POINT_FORMAT = (serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


class TlsClientError(FleetidError):
    """The TLS/HTTPS exchange failed.  `reason` is one of the constants below; `detail`
    is a short text (never key material); `alert` the TLS alert number when one was sent
    or received, else None."""

    CONNECT = "connect"  # TCP connection refused / unreachable
    TIMEOUT = "timeout"  # a bounded wait expired
    HANDSHAKE = "handshake"  # TLS refused: an alert from the server (e.g. our certificate
    #                          refused: TLS 1.3 servers say so after our Finished), no
    #                          common parameters, a malformed handshake
    SERVER_CERTIFICATE = "server_certificate"  # server chain / name not trusted
    SE = "se"  # the SE could not do its part (ECDH, SIGN, VERIFY)
    PROTOCOL = "protocol"  # malformed or oversized HTTP response, connection dropped

    def __init__(self, reason, detail="", alert=None):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail
        self.alert = alert


# RFC 8446 6 AlertDescription names, for messages ("peer alert 44 certificate_revoked").
ALERT_NAMES = {
    0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac",
    22: "record_overflow", 40: "handshake_failure", 42: "bad_certificate",
    43: "unsupported_certificate", 44: "certificate_revoked", 45: "certificate_expired",
    46: "certificate_unknown", 47: "illegal_parameter", 48: "unknown_ca",
    49: "access_denied", 50: "decode_error", 51: "decrypt_error", 70: "protocol_version",
    71: "insufficient_security", 80: "internal_error", 86: "inappropriate_fallback",
    90: "user_canceled", 109: "missing_extension", 110: "unsupported_extension",
    112: "unrecognized_name", 113: "bad_certificate_status_response",
    115: "unknown_psk_identity", 116: "certificate_required",
    120: "no_application_protocol",
}


def client_error(exc, answered):
    """TlsClientError for a TlsError of the TLS 1.3 client.  `answered`: whether the
    server had sent application data on the connection.  Until it has, a lost connection
    is the server refusing the session (HANDSHAKE): a TLS 1.3 server checks the client's
    certificate after the client's Finished, and may just close then; once it answered,
    a lost connection is PROTOCOL."""
    if isinstance(exc, TlsCertificateError):
        return TlsClientError(TlsClientError.SERVER_CERTIFICATE, exc.detail, exc.alert)
    if isinstance(exc, TlsAlertReceived):
        # A TLS 1.3 server refuses the client's certificate after the client's Finished:
        # its alert arrives on the first read.  Either way the server refused the session.
        return TlsClientError(TlsClientError.HANDSHAKE, "%s %s" % (
            exc, ALERT_NAMES.get(exc.alert, "")), exc.alert)
    reason = exc.reason
    if reason == "connect":
        if exc.detail in ("TimeoutError", "timeout"):
            return TlsClientError(TlsClientError.TIMEOUT, "connect")
        return TlsClientError(TlsClientError.CONNECT, exc.detail)
    if reason == "timeout" or (reason == "io" and exc.detail in ("TimeoutError", "timeout")):
        return TlsClientError(TlsClientError.TIMEOUT, str(exc))
    if reason == "se":
        return TlsClientError(TlsClientError.SE, exc.detail, exc.alert)
    if reason in ("io", "eof") and answered:
        return TlsClientError(TlsClientError.PROTOCOL, str(exc))
    return TlsClientError(TlsClientError.HANDSHAKE, str(exc), exc.alert)


class TicketCache:
    """Session tickets for PSK-DHE resumption, one per (server name, slot, client
    certificate), each used once (servers that keep sessions, as the cloud's OpenSSL
    cache does, forget a session once resumed).  At most `limit` tickets: the oldest goes
    first (a rotated-away certificate's ticket is never taken again).  Thread-safe.
    Tickets hold a resumption secret: kept in memory only, never written or logged."""

    def __init__(self, limit=16):
        self._tickets = {}
        self._lock = threading.Lock()
        self.limit = limit

    def take(self, key):
        with self._lock:
            return self._tickets.pop(key, None)

    def put(self, key, ticket):
        with self._lock:
            self._tickets.pop(key, None)
            self._tickets[key] = ticket  # dicts keep insertion order: newest last
            while len(self._tickets) > self.limit:
                del self._tickets[next(iter(self._tickets))]

    def clear(self):
        with self._lock:
            self._tickets.clear()

    def __len__(self):
        return len(self._tickets)


class VerifiedSignatures:
    """Signatures the client has already verified, so a server chain seen again costs
    no second VERIFY of the same certificate signature (RFC 8446 4.4.2: the server sends
    the same chain on every full handshake; only its CertificateVerify, over a new
    transcript, is new).  An ECDSA verification is a function of (public key, digest,
    signature) alone, so a remembered success stays true; failures are never remembered.
    Bounded (`limit` entries, the oldest dropped).  Thread-safe.  Holds digests of public
    data only."""

    def __init__(self, limit=64):
        self._known = {}
        self._lock = threading.Lock()
        self.limit = limit
        self.hits = 0

    def wrap(self, verify):
        """`verify(point, digest, signature)` that skips `verify` for a signature it
        verified before (and raises as `verify` does otherwise)."""
        def remembered(point, digest, signature):
            key = hashlib.sha256(b"%d:%d:" % (len(point), len(digest)) + bytes(point)
                                 + bytes(digest) + bytes(signature)).digest()
            with self._lock:
                if key in self._known:
                    self.hits += 1
                    return None
            result = verify(point, digest, signature)
            with self._lock:
                self._known[key] = True
                while len(self._known) > self.limit:
                    del self._known[next(iter(self._known))]
            return result
        return remembered


class HttpResponse:
    """status (int), reason (str), headers (dict, lower-case names), body (bytes),
    connection (a KeptConnection when the request asked to keep it open, else None)."""

    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.connection = None

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def __repr__(self):
        return "HttpResponse(%d %s, %d bytes)" % (self.status, self.reason, len(self.body))


class CountedCall:
    """Wraps one SE operation of the TLS client (its SIGN or VERIFY callable) and counts
    its calls, for reports (`fleetid agent probe-tls`, the rotation benchmark)."""
    def __init__(self, function):
        self.function = function
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return self.function(*args)


class _SeHttpsConnection(http.client.HTTPConnection):
    # http.client does the HTTP/1.1 framing; connect() is the TLS 1.3 handshake with the
    # SE-held key over a TlsSocket.

    default_port = http.client.HTTPS_PORT

    def __init__(self, client, host, port, timeout):
        http.client.HTTPConnection.__init__(self, host, port, timeout=timeout)
        self._client = client

    def connect(self):
        self.sock = self.tls = self._client.open(self.host, self.port)


class SeTlsClient:
    """HTTPS (and raw TLS) client authenticated by a certificate whose key is in the SE.

    Params: se: SeSession (selected).  slot: the key slot, or None for no client
        certificate (public documents: a CRL; the SE still does ECDHE and VERIFY).
        cert_chain_der: [leaf DER, intermediates...] to present (slot given).
        trust_roots_der: DER roots the server chain must validate to (the device's fleet
        root trust anchor).  connect_timeout / io_timeout: seconds (every socket wait is
        bounded by one of them, the handshake by io_timeout overall).  now: () -> epoch
        seconds (default: the host's clock).  tickets: a TicketCache shared by the clients
        of one agent (default: this client's own).  revocation: the chain's revocation
        hook (device/board.server_revocation).  verify_in_se: True (default) checks the
        server's chain and CertificateVerify with the SE's VERIFY; False with
        `cryptography` on the host (common/host/tls13_host.ecdsa_verify: public-key
        operations, the anchors still the ones read from the SE; saves two SE VERIFYs
        per full handshake).  verified: a VerifiedSignatures shared by the clients of
        one agent (None: every signature verified), so a server chain seen before
        costs no VERIFY (the CertificateVerify is verified on every full handshake).
    Attributes: certificate (x509, the client's), last_info (HandshakeInfo of the last
        connection), handshakes / resumed (counts), se_operations (ECDHE + SIGN + VERIFY
        commands issued).
    """

    def __init__(self, se, slot, cert_chain_der, trust_roots_der,
                 connect_timeout=DEFAULT_CONNECT_TIMEOUT, io_timeout=DEFAULT_IO_TIMEOUT,
                 now=None, tickets=None, revocation=None, verify_in_se=True,
                 verified=None):
        if not trust_roots_der:
            raise ValueError("trust_roots_der needs at least one root")
        self.se = se
        self.slot = slot
        self.cert_chain_der = [bytes(d) for d in cert_chain_der or ()]
        self.certificate = None
        if slot is not None:
            if not self.cert_chain_der:
                raise ValueError("cert_chain_der needs the client certificate")
            leaf = x509.load_der_x509_certificate(self.cert_chain_der[0])
            _policy, point = se.public_key(slot)
            if leaf.public_key().public_bytes(*_POINT_FORMAT) != bytes(point):
                raise ValueError("the certificate is not for the key in slot %d" % slot)
            self.certificate = leaf
        self.trust_roots_der = [bytes(d) for d in trust_roots_der]
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.now = now
        self.tickets = tickets if tickets is not None else TicketCache()
        self.revocation = revocation
        self.verify_in_se = verify_in_se
        self.verified = verified
        self.last_info = None
        self.handshakes = 0
        self.resumed = 0
        self.signatures = 0
        self.verifications = 0
        self.se_operations = 0

    def _ticket_key(self, host):
        # The server name (SNI, the name the full handshake checked), not the port.
        leaf = hashlib.sha256(self.cert_chain_der[0]).digest() if self.cert_chain_der else b""
        return (host, self.slot, leaf)

    def open(self, host, port):
        """One TLS 1.3 connection to host:port, resuming with a ticket kept for the
        server name when there is one.  Returns: a connected TlsSocket.
        Raises: TlsClientError."""
        key = self._ticket_key(host)
        ticket = self.tickets.take(key)
        config, ephemeral = se_client_config(
            self.se, self.slot if self.slot is not None else 0, self.trust_roots_der, host,
            client_chain=self.cert_chain_der, revocation=self.revocation, ticket=ticket,
            now=self.now)
        if self.slot is None:
            config.signer = None
        else:
            config.signer = CountedCall(config.signer)
        if self.verify_in_se:
            config.verify = CountedCall(config.verify)
        else:
            from fleetid.common.host.tls13_host import ecdsa_verify

            config.verify = CountedCall(ecdsa_verify)
        counted_verify = config.verify
        if self.verified is not None:
            config.verify = self.verified.wrap(counted_verify)
        try:
            tls = TlsSocket.connect(host, port, config, connect_timeout=self.connect_timeout,
                                    io_timeout=self.io_timeout)
        except TlsError as exc:
            raise client_error(exc, False) from None
        finally:
            signed = config.signer.calls if config.signer is not None else 0
            verified = counted_verify.calls if self.verify_in_se else 0
            self.signatures += signed
            self.verifications += verified
            self.se_operations += ephemeral.operations + verified + signed
        self.handshakes += 1
        self.last_info = tls.info
        if tls.info.resumed:
            self.resumed += 1
        tls.ticket_key = key
        return tls

    def keep_ticket(self, tls):
        """Keep the newest ticket `tls` received for the next connection (request() does
        this after reading the answer)."""
        if tls.tickets:
            self.tickets.put(tls.ticket_key, tls.tickets[-1])

    def request(self, host, port, method, path, body=None, headers=None,
                max_response=MAX_RESPONSE, keep_open=False, connection=None):
        """One HTTPS request, on a fresh connection unless `connection` is given (answers
        over `max_response` bytes are refused).

        Params: keep_open: leave the connection open after the answer when the server
            allows it (a persistent HTTP/1.1 connection, RFC 9112 9.3): the answer's
            `connection` is then a KeptConnection for one next request to the same
            server (None when the server closes it).  connection: a KeptConnection from
            an earlier answer: the request goes over it, without a new handshake.
        Returns: HttpResponse.  Raises: TlsClientError (connect, timeout, handshake,
        server_certificate, se, protocol).  An HTTP error status is not an exception.
        """
        if connection is not None:
            conn = connection.conn
        else:
            conn = _SeHttpsConnection(self, host, port, self.io_timeout)
            conn.tls = None
        kept = None
        try:
            send = dict(headers or {})
            if not keep_open:
                send.setdefault("Connection", "close")
            conn.request(method, path, body=body, headers=send)
            response = conn.getresponse()
            data = response.read(max_response + 1)
            if len(data) > max_response:
                raise TlsClientError(TlsClientError.PROTOCOL, "response over %d bytes"
                                     % max_response)
            if conn.tls is not None and connection is None:
                self.keep_ticket(conn.tls)
            if keep_open and not response.will_close and response.isclosed():
                kept = KeptConnection(conn, host, port)
            answer = HttpResponse(response.status, response.reason,
                                  {k.lower(): v for k, v in response.getheaders()}, data)
            answer.connection = kept
            return answer
        except TlsClientError:
            raise
        except TlsError as exc:
            raise client_error(exc, conn.tls is not None and conn.tls.data_received) \
                from None
        except TimeoutError:
            raise TlsClientError(TlsClientError.TIMEOUT, "%s %s" % (method, path)) from None
        except (http.client.HTTPException, OSError) as exc:
            raise TlsClientError(TlsClientError.PROTOCOL, "%s: %s" % (
                type(exc).__name__, exc)) from None
        finally:
            if kept is None:
                _close(conn)


def _close(conn):
    conn.close()
    if conn.tls is not None:
        conn.tls.close(force=True)


class KeptConnection:
    """An open, authenticated connection left by SeTlsClient.request(keep_open=True), for
    one next request to the same server (request(connection=...)).  The caller closes
    it when it does not use it (close())."""

    def __init__(self, conn, host, port):
        self.conn = conn
        self.host = host
        self.port = port

    def close(self):
        _close(self.conn)
