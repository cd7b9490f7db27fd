# A sans-I/O TLS 1.3 client (RFC 8446) whose private keys stay in the secure element.
# Portable: CPython and MicroPython.  Bytes in, events and bytes out: no sockets, no
# threads; randomness, the wall clock, the crypto provider and the SE's key operations are
# injected (device/tls13_keys.py binds the SE; common/host/tls13_host.py has the CPython
# provider, common/tls13_crypto.py the portable one).
#
#     client = Tls13Client(config)            # config: Tls13Config
#     send(client.start())                    # the ClientHello
#     while ...:
#         for kind, value in client.receive(recv()):   # EVENT_* tuples
#             ...
#         send(client.data_to_send())
#     client.send_data(b"GET / ...")  /  client.key_update()  /  client.close()
#
# One configuration, chosen for a constrained board with an SE and said once here:
#   * TLS 1.3 only.  TLS 1.2 would need a second handshake, the RSA/DHE machinery and a
#     PRF; a server answering TLS 1.2 is refused (protocol_version).
#   * TLS_AES_128_GCM_SHA256 only: the suite every TLS 1.3 implementation must offer
#     (RFC 8446 9.1).  AES-256-GCM/SHA-384 buys nothing against the P-256 keys used here
#     (both ~128-bit) and needs SHA-384, which MicroPython's hashlib lacks; ChaCha20-Poly1305
#     has no primitive in MicroPython's cryptolib; the CCM suites are not offered by
#     common servers (OpenSSL disables them by default).
#   * Group secp256r1 only: the one curve the SE computes ECDH on (its transient key).
#     X25519 is not in the SE's command set, and a host-side X25519 would put the key
#     share outside the SE.
#   * Signature scheme ecdsa_secp256r1_sha256 only: the SE's keys are P-256 and its SIGN
#     and VERIFY take a SHA-256 digest; the fleet PKI issues nothing else.  RSA (PSS or
#     PKCS#1) and EdDSA would need a software verifier on the board.
#   * PSK only with (EC)DHE (psk_dhe_ke): psk_ke would give resumed sessions no forward
#     secrecy.  No 0-RTT early data (replayable, RFC 8446 8), no post-handshake client
#     authentication, no ALPN/OCSP stapling/compression.
#   * record_size_limit (RFC 8449) offered so the server's records fit the board's
#     buffers; max_fragment_length (RFC 6066) is not offered (superseded by RFC 8449).
#
# Wire formats: RFC 8446 4 (handshake), 5 (record layer), 6 (alerts); all integers
# big-endian.  The transcript's bytes are not kept: MicroPython's hashlib has no copy()
# and its digest() ends a hash, so every handshake message is fed to as many running
# SHA-256 objects as the handshake will take transcript hashes, and each hash ends one of
# them (_Transcript).  No buffer of the whole transcript, which on a fragmented board heap
# needed one block larger than the data.
#
# Every failure is a TlsError (common/errors.py) with `reason` and `alert`; when the
# failure is ours to report, the fatal alert record is queued in data_to_send() first.
# After any TlsError the client is closed.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common import tls13_crypto as K
from fleetid.common.errors import (
    ApduError,
    FleetidError,
    TlsAlertReceived,
    TlsError,
)
from fleetid.common.tls13_cert import parse_ip_address, verify_server_chain

# Record layer, RFC 8446 5.1 ContentType and 5.2 limits.
CT_CHANGE_CIPHER_SPEC = const(20)
CT_ALERT = const(21)
CT_HANDSHAKE = const(22)
CT_APPLICATION_DATA = const(23)
LEGACY_VERSION = const(0x0303)
TLS13 = const(0x0304)
MAX_PLAINTEXT = const(16384)  # 2^14
MAX_CIPHERTEXT = const(16640)  # 2^14 + 256
_HEADER = const(5)

# Handshake types, RFC 8446 4.
HT_CLIENT_HELLO = const(1)
HT_SERVER_HELLO = const(2)
HT_NEW_SESSION_TICKET = const(4)
HT_END_OF_EARLY_DATA = const(5)
HT_ENCRYPTED_EXTENSIONS = const(8)
HT_CERTIFICATE = const(11)
HT_CERTIFICATE_REQUEST = const(13)
HT_CERTIFICATE_VERIFY = const(15)
HT_FINISHED = const(20)
HT_KEY_UPDATE = const(24)
HT_MESSAGE_HASH = const(254)

# Extensions, RFC 8446 4.2 (and RFC 6066 3, RFC 8449 4).
EXT_SERVER_NAME = const(0)
EXT_SUPPORTED_GROUPS = const(10)
EXT_SIGNATURE_ALGORITHMS = const(13)
EXT_RECORD_SIZE_LIMIT = const(28)
EXT_PRE_SHARED_KEY = const(41)
EXT_SUPPORTED_VERSIONS = const(43)
EXT_COOKIE = const(44)
EXT_PSK_KEY_EXCHANGE_MODES = const(45)
EXT_KEY_SHARE = const(51)

CIPHER_TLS_AES_128_GCM_SHA256 = const(0x1301)
GROUP_SECP256R1 = const(0x0017)
SIG_ECDSA_SECP256R1_SHA256 = const(0x0403)
PSK_DHE_KE = const(1)

# Alerts, RFC 8446 6.
ALERT_LEVEL_WARNING = const(1)
ALERT_LEVEL_FATAL = const(2)
ALERT_CLOSE_NOTIFY = const(0)
ALERT_UNEXPECTED_MESSAGE = const(10)
ALERT_BAD_RECORD_MAC = const(20)
ALERT_RECORD_OVERFLOW = const(22)
ALERT_HANDSHAKE_FAILURE = const(40)
ALERT_ILLEGAL_PARAMETER = const(47)
ALERT_DECODE_ERROR = const(50)
ALERT_DECRYPT_ERROR = const(51)
ALERT_PROTOCOL_VERSION = const(70)
ALERT_INTERNAL_ERROR = const(80)
ALERT_USER_CANCELED = const(90)
ALERT_MISSING_EXTENSION = const(109)
ALERT_UNSUPPORTED_EXTENSION = const(110)

# RFC 8446 4.1.3: the ServerHello.random of a HelloRetryRequest (SHA-256 of
# "HelloRetryRequest"), and the TLS 1.2/1.1 downgrade sentinels in the last 8 bytes.
HRR_RANDOM = (b"\xcf\x21\xad\x74\xe5\x9a\x61\x11\xbe\x1d\x8c\x02\x1e\x65\xb8\x91"
              b"\xc2\xa2\x11\x16\x7a\xbb\x8c\x5e\x07\x9e\x09\xe2\xc8\xa8\x33\x9c")
_DOWNGRADE_TLS12 = b"DOWNGRD\x01"
_DOWNGRADE_TLS11 = b"DOWNGRD\x00"

_SERVER_CV_CONTEXT = b"TLS 1.3, server CertificateVerify"
_CLIENT_CV_CONTEXT = b"TLS 1.3, client CertificateVerify"
_MAX_TICKET_LIFETIME = const(604800)  # 7 days, RFC 8446 4.6.1

# Events returned by receive().
EVENT_HANDSHAKE_COMPLETE = "handshake_complete"  # value: HandshakeInfo
EVENT_DATA = "data"  # value: application data bytes
EVENT_SESSION_TICKET = "session_ticket"  # value: SessionTicket
EVENT_KEY_UPDATE = "key_update"  # value: True when the peer asked us to update too
EVENT_CLOSED = "closed"  # value: None (the peer sent close_notify)

# States.
_WAIT_SH = const(0)
_WAIT_EE = const(1)
_WAIT_CERT_CR = const(2)
_WAIT_CERT = const(3)
_WAIT_CV = const(4)
_WAIT_FINISHED = const(5)
_CONNECTED = const(6)
_CLOSED = const(7)
_START = const(8)

RECORD_SIZE_LIMIT_DEFAULT = const(4096)
MAX_HANDSHAKE_DEFAULT = const(16384)
MAX_TRANSCRIPT_DEFAULT = const(8192)  # a fleet handshake is 3-4 KB (two chains of 1-2 certs)
# Transcript hashes one ClientHello..client Finished takes at most: the PSK binder, the
# handshake secrets, the server's CertificateVerify and Finished, the application
# secrets, our CertificateVerify and Finished, the resumption secret.  A
# HelloRetryRequest takes one more hash (ClientHello1) and restarts the transcript.
_TRANSCRIPT_HASHES = const(8)


def _u16(n):
    return bytes((n >> 8 & 0xFF, n & 0xFF))


def _u24(n):
    return bytes((n >> 16 & 0xFF, n >> 8 & 0xFF, n & 0xFF))


def _vec8(b):
    return bytes((len(b),)) + b


def _vec16(b):
    return _u16(len(b)) + b


def _vec24(b):
    return _u24(len(b)) + b


def _handshake(msg_type, body):
    return bytes((msg_type,)) + _u24(len(body)) + body


def _ct_equal(a, b):
    # Constant time in the contents (lengths are public): the Finished check.
    if len(a) != len(b):
        return False
    acc = 0
    for i in range(len(a)):
        acc |= a[i] ^ b[i]
    return acc == 0


def _decode_error(detail):
    return TlsError("decode", ALERT_DECODE_ERROR, detail)


class _Reader:
    # Bounds-checked reads over one message; any overrun is decode_error.
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, n):
        end = self.pos + n
        if end > len(self.data):
            raise _decode_error("truncated")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def u8(self):
        return self.take(1)[0]

    def u16(self):
        b = self.take(2)
        return b[0] << 8 | b[1]

    def u24(self):
        b = self.take(3)
        return b[0] << 16 | b[1] << 8 | b[2]

    def u32(self):
        b = self.take(4)
        return b[0] << 24 | b[1] << 16 | b[2] << 8 | b[3]

    def vec8(self):
        return self.take(self.u8())

    def vec16(self):
        return self.take(self.u16())

    def vec24(self):
        return self.take(self.u24())

    def done(self):
        if self.pos != len(self.data):
            raise _decode_error("trailing bytes")


def _extensions(data, allowed):
    # Extension extensions<...>: a dict type -> data.  RFC 8446 4.2: no duplicates, and a
    # client aborts on an extension it did not offer (unsupported_extension).
    reader = _Reader(data)
    out = {}
    while reader.pos < len(data):
        ext_type = reader.u16()
        ext_data = reader.vec16()
        if ext_type in out:
            raise TlsError("duplicate_extension", ALERT_ILLEGAL_PARAMETER, "%d" % ext_type)
        if ext_type not in allowed:
            raise TlsError("unsupported_extension", ALERT_UNSUPPORTED_EXTENSION, "%d" % ext_type)
        out[ext_type] = ext_data
    return out


class _Transcript:
    # The handshake transcript (RFC 8446 4.4.1) as `count` running SHA-256 objects fed
    # the same messages; hash() ends one of them.  `limit` bounds the bytes fed.
    def __init__(self, count, limit):
        import hashlib

        self._pool = [hashlib.sha256() for _ in range(count)]
        self.length = 0
        self._limit = limit

    def add(self, message):
        self.length += len(message)
        if self.length > self._limit:
            raise TlsError("limit", ALERT_INTERNAL_ERROR, "transcript")
        for running in self._pool:
            running.update(message)

    def hash(self, partial=None):
        """Transcript-Hash of the messages so far (and `partial` bytes after them)."""
        if not self._pool:
            raise TlsError("limit", ALERT_INTERNAL_ERROR, "transcript hashes")
        running = self._pool.pop()
        if partial is not None:
            running.update(partial)
        return running.digest()


class SessionTicket:
    """A NewSessionTicket (RFC 8446 4.6.1) with its resumption PSK.

    Attributes: ticket (bytes, opaque to the client), psk (32 bytes: secret, never log),
    lifetime_s, age_add, received_s (wall clock at receipt), server_name.
    The repr shows no secret."""

    def __init__(self, ticket, psk, lifetime_s, age_add, received_s, server_name):
        self.ticket = ticket
        self.psk = psk
        self.lifetime_s = lifetime_s
        self.age_add = age_add
        self.received_s = received_s
        self.server_name = server_name

    def usable(self, now_s, server_name):
        """True while the ticket is within its lifetime and was issued for that name."""
        return server_name == self.server_name and 0 <= now_s - self.received_s < self.lifetime_s

    def __repr__(self):
        return "SessionTicket(lifetime=%ds, <redacted>)" % self.lifetime_s


class HandshakeInfo:
    """What was negotiated: version, suite, group (names), resumed (PSK-DHE with a ticket),
    hello_retry (a HelloRetryRequest came), client_certificate (we authenticated),
    peer_record_size_limit (or None), chain_report (list of (check, verdict) of the
    server chain; empty when resumed: the PSK authenticates the server)."""

    def __init__(self):
        self.version = "TLSv1.3"
        self.suite = "TLS_AES_128_GCM_SHA256"
        self.group = "secp256r1"
        self.signature_scheme = "ecdsa_secp256r1_sha256"
        self.resumed = False
        self.hello_retry = False
        self.client_certificate = False
        self.peer_record_size_limit = None
        self.chain_report = []


class Tls13Config:
    """Everything the client is given.

    Params:
        prims: the crypto provider (common/tls13_crypto.py header).
        ephemeral: the ECDHE key: `generate() -> 65-byte point` and
            `shared_secret(peer_point) -> 32 bytes` (the SE's transient key).
        anchors: list of DER trust anchors (the fleet root the line stored in the SE).
        verify: `verify(point, digest, signature_der)` raising VerificationFailed (the SE's
            VERIFY with a point, or a software verifier).
        now: `now() -> int` wall-clock epoch seconds (certificate validity, ticket age).
        server_name: host name or IP literal to check in the server certificate, and sent
            as SNI when it is a name.  None: no name check (probe only).
        signer: `sign(digest32) -> DER ECDSA signature` with the client key (SE SIGN), or
            None to send an empty Certificate when asked.
        client_chain: list of DER certificates, ours first.
        revocation: optional `revocation(path)` (common/tls13_cert.py).
        ticket: a SessionTicket to offer for PSK-DHE resumption, or None.
        record_size_limit: what we accept per record (RFC 8449; 64..16385).
        send_fragment: the largest plaintext we put in one record (a board sends small
            records so that no large block is needed to seal one; default 2^14).
        data_chunk: None, or the largest bytes object one EVENT_DATA carries: a record's
            data is then handed out in pieces of at most that size (a board needs no
            block of a whole record for it).
        record_buffer: a bytearray received records are assembled and opened in when
            they fit (one connection at a time may use it), allocated once by a board
            while its heap is whole; None or a larger record: a buffer per record.
        max_handshake / max_transcript: bounds on one handshake message and on the
            transcript's bytes (hashed as they come, not kept).
        initial_key_share: False sends the first ClientHello with an empty key_share
            (RFC 8446 4.2.8 lets a client ask the server to pick the group); the share is
            then made after the HelloRetryRequest.  Costs a round trip: for tests and
            servers that insist on choosing.
    """

    def __init__(self, prims, ephemeral, anchors, verify, now, server_name=None,
                 signer=None, client_chain=None, revocation=None, ticket=None,
                 record_size_limit=RECORD_SIZE_LIMIT_DEFAULT,
                 max_handshake=MAX_HANDSHAKE_DEFAULT, max_transcript=MAX_TRANSCRIPT_DEFAULT,
                 initial_key_share=True, send_fragment=MAX_PLAINTEXT, record_buffer=None,
                 data_chunk=None):
        if not 64 <= record_size_limit <= MAX_PLAINTEXT + 1:
            raise ValueError("record_size_limit must be 64..16385")
        self.prims = prims
        self.ephemeral = ephemeral
        self.anchors = list(anchors)
        self.verify = verify
        self.now = now
        self.server_name = server_name
        self.signer = signer
        self.client_chain = list(client_chain or ())
        self.revocation = revocation
        self.ticket = ticket
        self.record_size_limit = record_size_limit
        self.max_handshake = max_handshake
        self.max_transcript = max_transcript
        self.initial_key_share = initial_key_share
        self.send_fragment = max(64, min(send_fragment, MAX_PLAINTEXT))
        self.record_buffer = record_buffer
        self.data_chunk = data_chunk


class RecordProtection:
    """One direction of record protection (RFC 8446 5.2, 5.3): the AEAD and static IV of a
    traffic secret, and the 64-bit sequence number.

    Params: prims: the crypto provider.  secret: the traffic secret."""

    def __init__(self, prims, secret):
        self.secret = secret
        key, self._iv = K.traffic_keys(prims, secret)
        self._aead = prims.aead(key)
        self._nonce_buf = bytearray(self._iv)  # rewritten per record: no allocation
        self.seq = 0

    def _nonce(self):
        # RFC 8446 5.3: the sequence number, left-padded to 12 bytes, XORed with the IV,
        # written into one buffer per direction (used before the next record's nonce).
        seq = self.seq
        self.seq += 1
        iv = self._iv
        out = self._nonce_buf
        for i in range(11, 3, -1):
            out[i] = iv[i] ^ (seq & 0xFF)
            seq >>= 8
        return out

    def seal(self, content_type, fragment):
        """TLSCiphertext for one fragment (no padding).  Returns: header || encrypted
        (a bytearray written in place when the provider can seal in place: one block
        per record, no inner plaintext nor ciphertext copy)."""
        n = len(fragment)
        in_place = getattr(self._aead, "seal_in_place", None)
        if in_place is not None:
            size = n + 1 + K.TAG_LEN
            record = bytearray(_HEADER + size)
            record[0] = CT_APPLICATION_DATA
            record[1] = LEGACY_VERSION >> 8
            record[2] = LEGACY_VERSION & 0xFF
            record[3] = size >> 8
            record[4] = size & 0xFF
            record[_HEADER:_HEADER + n] = fragment
            record[_HEADER + n] = content_type
            view = memoryview(record)
            in_place(self._nonce(), view[:_HEADER], view[_HEADER:])
            return record
        inner = bytearray(n + 1)
        inner[:n] = fragment
        inner[n] = content_type
        header = bytes((CT_APPLICATION_DATA,)) + _u16(LEGACY_VERSION) + _u16(n + 1 + K.TAG_LEN)
        sealed = self._aead.seal(self._nonce(), header, inner)
        inner = None
        return header + sealed

    def open(self, header, body):
        """Decrypt one record.  Returns: TLSInnerPlaintext (content || type || zeros):
        a view of `body` itself when body is a memoryview (of a writable buffer) and the provider
        decrypts in place, else new bytes.  Raises: TlsError("bad_record_mac")."""
        if len(body) < K.TAG_LEN + 1:
            raise TlsError("bad_record_mac", ALERT_BAD_RECORD_MAC, "short record")
        in_place = getattr(self._aead, "open_in_place", None)
        if in_place is not None and isinstance(body, memoryview):
            # The portable provider decrypts into the record's own buffer: no copy.
            n = in_place(self._nonce(), header, body)
            plain = None if n is None else body[:n]
        else:
            plain = self._aead.open(self._nonce(), header, body)
        if plain is None:
            raise TlsError("bad_record_mac", ALERT_BAD_RECORD_MAC)
        return plain


class Tls13Client:
    """The client state machine.  See the module header for the flow.

    Params: config: Tls13Config.
    Attributes: info (HandshakeInfo once the handshake completed, else None),
        ticket (the last SessionTicket received, or None), state_name (for reports).
    """

    def __init__(self, config):
        self._cfg = config
        self._prims = config.prims
        self._state = _START
        self._out = []  # records queued for the peer, each its own bytes
        self._head = bytearray()  # the next record's header, while incomplete
        self._rec = None  # the record being received: a writable buffer of its size
        self._fill = 0  # bytes of _rec received
        self._hs = bytearray()  # handshake bytes not yet a whole message
        self._rest = 0  # bytes of the record after the message being handled
        self._transcript = None  # _Transcript from start()
        self._read = None
        self._write = None
        self._peer_limit = None  # peer's record_size_limit
        self._our_limit_active = False
        self._point = None
        self._random = None
        self._session_id = b""
        self._cookie = None
        self._psk = None
        self._early = None
        self._hs_secret = None
        self._c_hs = None
        self._s_hs = None
        self._master = None
        self._res_master = None
        self._cert_requested = False
        self._cr_context = b""
        self._server_point = None
        self._chain_report = []
        self._hrr = False
        self._resumed = False
        self.info = None
        self.ticket = None

    # -- public API -------------------------------------------------------------------

    @property
    def connected(self):
        """True between handshake completion and close."""
        return self._state == _CONNECTED

    @property
    def closed(self):
        return self._state == _CLOSED

    def start(self):
        """Build the ClientHello (generates the ECDHE key in the SE).

        Returns: the bytes to send.  Raises: TlsError (e.g. "se" when the SE fails)."""
        if self._state != _START:
            raise TlsError("state", ALERT_INTERNAL_ERROR, "already started")
        try:
            self._transcript = _Transcript(_TRANSCRIPT_HASHES, self._cfg.max_transcript)
            self._random = self._prims.random(32)
            if self._cfg.initial_key_share:
                self._generate_share()
            ticket = self._cfg.ticket
            if ticket is not None and ticket.usable(self._cfg.now(), self._cfg.server_name):
                self._psk = ticket.psk
            self._early = K.hkdf_extract(self._prims, b"", self._psk or K.ZEROS)
            self._state = _WAIT_SH
            self._send_client_hello()
        except TlsError:
            self._state = _CLOSED
            raise
        except FleetidError as exc:
            self._state = _CLOSED
            raise TlsError("se", ALERT_INTERNAL_ERROR, type(exc).__name__) from None
        except MemoryError:
            self._state = _CLOSED
            raise TlsError("memory", ALERT_INTERNAL_ERROR) from None
        except Exception as exc:  # a bug must surface as a typed error, not a stack trace
            self._state = _CLOSED
            raise TlsError("internal", ALERT_INTERNAL_ERROR, type(exc).__name__) from None
        return self.data_to_send()

    def _generate_share(self):
        self._point = self._cfg.ephemeral.generate()
        if len(self._point) != 65 or self._point[0] != 4:
            raise TlsError("se", ALERT_INTERNAL_ERROR, "bad key share point")

    def data_to_send(self):
        """Returns (and clears) the bytes queued for the peer."""
        out = b"".join(self._out)
        self._out = []
        return out

    def records_to_send(self):
        """Returns (and clears) the queued records as a list of bytes: the same bytes as
        data_to_send() without joining them into one block (a board sends them one by
        one)."""
        out = self._out
        self._out = []
        return out

    def receive(self, data):
        """Feed bytes from the peer (any split: partial, whole or several records).

        Returns: list of (EVENT_*, value).
        Raises: TlsAlertReceived for the peer's fatal alerts; TlsError for everything we
            refuse (the alert to send is then queued in data_to_send()).  Closed after.
        """
        if self._state == _CLOSED:
            raise TlsError("closed", None, "connection closed")
        if self._state == _START:
            raise TlsError("state", ALERT_INTERNAL_ERROR, "start() first")
        events = []
        try:
            self._feed(data, events)
        except TlsAlertReceived:
            self._state = _CLOSED
            raise
        except TlsError as exc:
            self._fail(exc.alert)
            raise
        except ApduError as exc:
            # The SE refused an operation on peer data (e.g. ECDH with a point off the curve)
            self._fail(ALERT_ILLEGAL_PARAMETER)
            raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER,
                           type(exc).__name__) from None
        except FleetidError as exc:
            self._fail(ALERT_INTERNAL_ERROR)
            raise TlsError("se", ALERT_INTERNAL_ERROR, type(exc).__name__) from None
        except MemoryError:
            self._fail(ALERT_INTERNAL_ERROR)
            raise TlsError("memory", ALERT_INTERNAL_ERROR) from None
        except Exception as exc:  # a bug must surface as a typed error, not a stack trace
            self._fail(ALERT_INTERNAL_ERROR)
            raise TlsError("internal", ALERT_INTERNAL_ERROR, type(exc).__name__) from None
        return events

    def send_data(self, data):
        """Queue application data (fragmented to the peer's record size limit)."""
        if self._state != _CONNECTED:
            raise TlsError("state", ALERT_INTERNAL_ERROR, "not connected")
        self._write_record(CT_APPLICATION_DATA, memoryview(data))

    def key_update(self, request_peer=False):
        """Send KeyUpdate and move to the next write secret (RFC 8446 4.6.3).

        Params: request_peer: ask the peer to update its sending keys too."""
        if self._state != _CONNECTED:
            raise TlsError("state", ALERT_INTERNAL_ERROR, "not connected")
        self._send_key_update(1 if request_peer else 0)

    def close(self):
        """Queue close_notify (RFC 8446 6.1) and close the client."""
        if self._state != _CLOSED and self._state != _START:
            self._send_alert(ALERT_LEVEL_WARNING, ALERT_CLOSE_NOTIFY)
        self._state = _CLOSED
        self._forget()

    # -- failures -----------------------------------------------------------------------

    def _fail(self, alert):
        if self._state != _CLOSED:
            try:
                self._send_alert(ALERT_LEVEL_FATAL, alert)
            except Exception:  # noqa: S110 the alert is best effort; the error is raised
                pass
        self._state = _CLOSED
        self._forget()

    def _forget(self):
        self._transcript = None
        self._hs = bytearray()
        self._head = bytearray()
        self._rec = None
        self._psk = self._early = self._hs_secret = self._master = None
        self._c_hs = self._s_hs = None

    # -- record layer (RFC 8446 5) ----------------------------------------------------------

    def _max_fragment(self):
        step = self._cfg.send_fragment
        if self._peer_limit is not None and self._write is not None:
            return min(step, self._peer_limit - 1)  # RFC 8449 4: includes the type
        return step

    def _write_record(self, content_type, payload):
        step = self._max_fragment()
        i = 0
        while True:
            chunk = payload[i:i + step]
            if self._write is None:
                self._out.append(bytes((content_type,)) + _u16(LEGACY_VERSION) + _vec16(chunk))
            else:
                self._out.append(self._write.seal(content_type, chunk))
            i += step
            if i >= len(payload):
                break

    def _write_handshake_pieces(self, pieces):
        # One handshake message given as consecutive pieces: each fed to the transcript,
        # and the bytes written in handshake records of at most send_fragment bytes
        # (RFC 8446 5.1 lets a handshake message span records).
        total = 0
        for piece in pieces:
            total += len(piece)
        step = min(self._max_fragment(), total)
        stage = bytearray(step)
        fill = 0
        for piece in pieces:
            self._add(piece)
            view = memoryview(piece)
            i = 0
            while i < len(view):
                take = min(len(view) - i, step - fill)
                stage[fill:fill + take] = view[i:i + take]
                fill += take
                i += take
                if fill == step:
                    self._write_record(CT_HANDSHAKE, stage)
                    fill = 0
        if fill:
            self._write_record(CT_HANDSHAKE, memoryview(stage)[:fill])

    def _send_alert(self, level, description):
        self._write_record(CT_ALERT, bytes((level, description)))

    def _feed(self, data, events):
        # Records assembled in place: the 5-byte header, then one buffer of exactly the
        # record's size, filled from `data` and processed when whole.  No buffer grows and
        # nothing after a record is copied (the board's heap holds each record once).
        view = memoryview(data)
        i = 0
        while i < len(view) and self._state != _CLOSED:
            rec = self._rec
            if rec is None:
                take = min(_HEADER - len(self._head), len(view) - i)
                self._head.extend(view[i:i + take])
                i += take
                if len(self._head) < _HEADER:
                    return
                size = _HEADER + self._record_length(self._head)
                shared = self._cfg.record_buffer
                if shared is not None and size <= len(shared):
                    rec = memoryview(shared)[:size]
                else:
                    rec = bytearray(size)
                self._rec = rec
                rec[:_HEADER] = self._head
                self._head = bytearray()
                self._fill = _HEADER
            take = min(len(rec) - self._fill, len(view) - i)
            rec[self._fill:self._fill + take] = view[i:i + take]
            self._fill += take
            i += take
            if self._fill == len(rec):
                self._rec = None
                self._record(rec, events)
                rec = None

    def _record_length(self, header):
        # The body length a record header announces, within our limits.
        length = header[3] << 8 | header[4]
        limit = MAX_CIPHERTEXT if self._read is not None else MAX_PLAINTEXT
        if self._read is not None and self._our_limit_active:
            limit = self._cfg.record_size_limit + K.TAG_LEN
        if length > limit:
            raise TlsError("record_overflow", ALERT_RECORD_OVERFLOW, "%d bytes" % length)
        return length

    def _record(self, buf, events):
        # One whole record (a writable buffer of header || body, ours to decrypt in
        # place; no view of it outlives this call: the record buffer is reused).
        size = len(buf)
        content_type = buf[0]
        header = bytes(buf[:_HEADER])
        if self._read is not None and content_type == CT_APPLICATION_DATA:
            body = memoryview(buf)[_HEADER:size]  # opened in place where it can be
        else:
            body = bytes(buf[_HEADER:size])
        buf = None
        if content_type == CT_CHANGE_CIPHER_SPEC:
            # RFC 8446 5: one byte 0x01, only while the handshake runs; dropped.
            if body != b"\x01" or self._state == _CONNECTED:
                raise TlsError("unexpected_message", ALERT_UNEXPECTED_MESSAGE, "change_cipher_spec")
            return
        if self._read is not None:
            if content_type != CT_APPLICATION_DATA:
                if content_type == CT_ALERT and len(body) == 2:
                    self._alert(body, events)  # an unprotected alert: the peer gave up
                    return
                raise TlsError("unexpected_message", ALERT_UNEXPECTED_MESSAGE,
                               "unprotected record %d" % content_type)
            plain = self._read.open(header, body)
            body = None
            end = len(plain)
            while end > 0 and plain[end - 1] == 0:
                end -= 1  # RFC 8446 5.4: strip the zero padding
            if end == 0:
                raise TlsError("unexpected_message", ALERT_UNEXPECTED_MESSAGE, "no content type")
            content_type = plain[end - 1]
            inner_limit = MAX_PLAINTEXT + 1
            if self._our_limit_active:
                inner_limit = self._cfg.record_size_limit
            if len(plain) > inner_limit:
                raise TlsError("record_overflow", ALERT_RECORD_OVERFLOW, "inner plaintext")
            body = plain[:end - 1]
            plain = None
        elif content_type == CT_APPLICATION_DATA:
            raise TlsError("unexpected_message", ALERT_UNEXPECTED_MESSAGE, "data before keys")
        if content_type == CT_HANDSHAKE:
            if len(body) == 0:
                raise TlsError("unexpected_message", ALERT_UNEXPECTED_MESSAGE,
                               "empty handshake record")
            self._handshake_data(body, events)
            body = None
        elif content_type == CT_ALERT:
            self._alert(body, events)
        elif content_type == CT_APPLICATION_DATA:
            if self._state != _CONNECTED:
                raise TlsError("unexpected_message", ALERT_UNEXPECTED_MESSAGE, "early data")
            if self._hs:
                # RFC 8446 5.1: handshake messages must not be interleaved with other types
                raise TlsError("unexpected_message", ALERT_UNEXPECTED_MESSAGE, "interleaved")
            self._data(body, events)
        else:
            raise TlsError("unexpected_message", ALERT_UNEXPECTED_MESSAGE,
                           "content type %d" % content_type)

    def _data(self, body, events):
        # Application data out as bytes, in pieces of at most data_chunk bytes.
        step = self._cfg.data_chunk or len(body)
        if not step:
            events.append((EVENT_DATA, b""))  # an empty record, as it came
            return
        for i in range(0, len(body), step):
            events.append((EVENT_DATA, bytes(body[i:i + step])))

    def _alert(self, body, events):
        if len(body) != 2:
            raise _decode_error("alert length")
        description = body[1]
        if description == ALERT_CLOSE_NOTIFY:
            if self._state == _CONNECTED:
                events.append((EVENT_CLOSED, None))
                self.close()  # answer with our close_notify (RFC 8446 6.1)
                return
            self._state = _CLOSED
            raise TlsAlertReceived("closed", description, "close_notify during the handshake")
        if description == ALERT_USER_CANCELED:
            return  # RFC 8446 6.1: followed by close_notify
        self._state = _CLOSED
        self._forget()
        raise TlsAlertReceived("alert", description, "peer alert %d" % description)

    # -- handshake framing ----------------------------------------------------------------

    def _handshake_data(self, body, events):
        # One record's handshake bytes (bytes, or a view of the record buffer that must
        # not outlive this call).  With no partial message pending, the whole messages
        # are taken straight from the record (no copy into _hs; the Certificate message
        # as a view, every other one as its own bytes) and only a trailing partial
        # message is kept in _hs; otherwise the bytes join _hs.
        if self._hs:
            self._hs.extend(body)
            self._handshake_messages(events)
            return
        view = memoryview(body)
        size = len(view)
        pos = 0
        while self._state != _CLOSED and size - pos >= 4:
            length = self._message_length(view, pos)
            end = pos + 4 + length
            if end > size:
                break
            self._rest = size - end  # bytes after this message (_expect_key_change)
            self._dispatch(view[pos:end], events)
            pos = end
        self._rest = 0
        if pos < size and self._state != _CLOSED:
            self._hs = bytearray(view[pos:])

    def _message_length(self, data, pos):
        length = data[pos + 1] << 16 | data[pos + 2] << 8 | data[pos + 3]
        if length > self._cfg.max_handshake:
            raise TlsError("handshake_too_large", ALERT_ILLEGAL_PARAMETER, "%d bytes" % length)
        return length

    def _dispatch(self, view, events):
        # A whole message given as a view: the Certificate message (the largest, parsed
        # with views; x509 copies each certificate once) stays a view, every other
        # message becomes its own bytes (their handlers keep and compare slices).
        msg_type = view[0]
        self._message(msg_type, view if msg_type == HT_CERTIFICATE else bytes(view), events)

    def _handshake_messages(self, events):
        while self._state != _CLOSED:
            hs = self._hs
            if len(hs) < 4:
                return
            end = 4 + self._message_length(hs, 0)
            if len(hs) < end:
                return
            self._hs = hs[end:]
            self._dispatch(memoryview(hs)[:end], events)
            hs = None

    def _expect_key_change(self):
        # RFC 8446 5.1: handshake messages must not span a key change.
        if self._hs or self._rest:
            raise TlsError("unexpected_message", ALERT_UNEXPECTED_MESSAGE,
                           "message spans key change")

    def _add(self, message):
        self._transcript.add(message)

    def _th(self):
        return self._transcript.hash()

    def _message(self, msg_type, message, events):
        state = self._state
        body = memoryview(message)[4:] if msg_type == HT_CERTIFICATE else message[4:]
        if state == _CONNECTED:
            if msg_type == HT_NEW_SESSION_TICKET:
                events.append((EVENT_SESSION_TICKET, self._new_session_ticket(body)))
            elif msg_type == HT_KEY_UPDATE:
                events.append((EVENT_KEY_UPDATE, self._key_update(body)))
            else:
                raise TlsError("unexpected_message", ALERT_UNEXPECTED_MESSAGE,
                               "post-handshake %d" % msg_type)
            return
        if state == _WAIT_SH and msg_type == HT_SERVER_HELLO:
            self._server_hello(message, body)
        elif state == _WAIT_EE and msg_type == HT_ENCRYPTED_EXTENSIONS:
            self._encrypted_extensions(message, body)
        elif state == _WAIT_CERT_CR and msg_type == HT_CERTIFICATE_REQUEST:
            self._certificate_request(message, body)
        elif state in (_WAIT_CERT_CR, _WAIT_CERT) and msg_type == HT_CERTIFICATE:
            self._certificate(message, body)
        elif state == _WAIT_CV and msg_type == HT_CERTIFICATE_VERIFY:
            self._certificate_verify(message, body)
        elif state == _WAIT_FINISHED and msg_type == HT_FINISHED:
            self._finished(message, body, events)
        else:
            raise TlsError("unexpected_message", ALERT_UNEXPECTED_MESSAGE,
                           "handshake type %d in state %d" % (msg_type, state))

    # -- ClientHello ----------------------------------------------------------------------

    def _send_client_hello(self):
        cfg = self._cfg
        ext = bytearray()
        name = cfg.server_name
        if name and parse_ip_address(name) is None:
            # RFC 6066 3: ServerNameList with one host_name (type 0); never an IP literal.
            entry = b"\x00" + _vec16(name.encode())
            ext += _u16(EXT_SERVER_NAME) + _vec16(_vec16(entry))
        ext += _u16(EXT_SUPPORTED_GROUPS) + _vec16(_vec16(_u16(GROUP_SECP256R1)))
        ext += _u16(EXT_SIGNATURE_ALGORITHMS) + _vec16(_vec16(_u16(SIG_ECDSA_SECP256R1_SHA256)))
        ext += _u16(EXT_SUPPORTED_VERSIONS) + _vec16(_vec8(_u16(TLS13)))
        share = _u16(GROUP_SECP256R1) + _vec16(self._point) if self._point else b""
        ext += _u16(EXT_KEY_SHARE) + _vec16(_vec16(share))
        ext += _u16(EXT_RECORD_SIZE_LIMIT) + _vec16(_u16(cfg.record_size_limit))
        ext += _u16(EXT_PSK_KEY_EXCHANGE_MODES) + _vec16(_vec8(bytes((PSK_DHE_KE,))))
        if self._cookie is not None:
            ext += _u16(EXT_COOKIE) + _vec16(_vec16(self._cookie))
        binder_len = 0
        if self._psk is not None:
            ticket = cfg.ticket
            age_ms = (cfg.now() - ticket.received_s) * 1000
            obfuscated = (age_ms + ticket.age_add) & 0xFFFFFFFF
            identity = _vec16(ticket.ticket) + obfuscated.to_bytes(4, "big")
            binders = _vec16(_vec8(bytes(K.HASH_LEN)))
            binder_len = len(binders)
            # RFC 8446 4.2.11: pre_shared_key is the last extension.
            ext += _u16(EXT_PRE_SHARED_KEY) + _vec16(_vec16(identity) + binders)
        body = (_u16(LEGACY_VERSION) + self._random + _vec8(self._session_id)
                + _vec16(_u16(CIPHER_TLS_AES_128_GCM_SHA256)) + b"\x01\x00" + _vec16(bytes(ext)))
        message = bytearray(_handshake(HT_CLIENT_HELLO, body))
        if binder_len:
            # RFC 8446 4.2.11.2: the binder is a Finished MAC over the transcript up to
            # and including the identities (the ClientHello without the binders list).
            binder_key = K.derive_secret(self._prims, self._early, b"res binder",
                                         self._prims.sha256(b""))
            truncated = memoryview(message)[:len(message) - binder_len]
            binder = K.finished_mac(self._prims, binder_key, self._transcript.hash(truncated))
            truncated = None
            message[len(message) - K.HASH_LEN:] = binder
        self._add(message)
        self._write_record(CT_HANDSHAKE, bytes(message))

    # -- ServerHello / HelloRetryRequest (RFC 8446 4.1.3, 4.1.4) -------------------------------

    def _server_hello(self, message, body):
        reader = _Reader(body)
        legacy_version = reader.u16()
        random = reader.take(32)
        session_id = reader.vec8()
        suite = reader.u16()
        compression = reader.u8()
        raw_ext = reader.vec16() if reader.pos < len(body) else b""
        reader.done()
        hrr = random == HRR_RANDOM
        allowed = (EXT_SUPPORTED_VERSIONS, EXT_KEY_SHARE, EXT_COOKIE) if hrr else \
            (EXT_SUPPORTED_VERSIONS, EXT_KEY_SHARE, EXT_PRE_SHARED_KEY)
        try:
            extensions = _extensions(raw_ext, allowed)
        except TlsError:
            if EXT_SUPPORTED_VERSIONS not in _lenient_types(raw_ext):
                raise TlsError("protocol_version", ALERT_PROTOCOL_VERSION, "not TLS 1.3") from None
            raise
        versions = extensions.get(EXT_SUPPORTED_VERSIONS)
        if versions is None or legacy_version != LEGACY_VERSION:
            # A TLS 1.2 (or older) ServerHello: we offered TLS 1.3 only (RFC 8446 4.2.1).
            raise TlsError("protocol_version", ALERT_PROTOCOL_VERSION, "not TLS 1.3")
        if len(versions) != 2 or (versions[0] << 8 | versions[1]) != TLS13:
            raise TlsError("protocol_version", ALERT_PROTOCOL_VERSION, "selected version")
        if random[24:] in (_DOWNGRADE_TLS12, _DOWNGRADE_TLS11):
            raise TlsError("downgrade", ALERT_ILLEGAL_PARAMETER, "downgrade sentinel")
        if session_id != self._session_id:
            raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER, "session id echo")
        if suite != CIPHER_TLS_AES_128_GCM_SHA256:
            raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER, "cipher suite")
        if compression != 0:
            raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER, "compression")
        if hrr:
            self._hello_retry(message, extensions)
            return
        share = extensions.get(EXT_KEY_SHARE)
        if share is None:
            # psk_ke (no key share) was not offered.
            raise TlsError("missing_extension", ALERT_MISSING_EXTENSION, "key_share")
        share_reader = _Reader(share)
        group = share_reader.u16()
        point = share_reader.vec16()
        share_reader.done()
        if group != GROUP_SECP256R1 or len(point) != 65 or point[0] != 4 or self._point is None:
            raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER, "key share")
        psk = extensions.get(EXT_PRE_SHARED_KEY)
        if psk is not None:
            if self._psk is None or psk != b"\x00\x00":
                raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER, "selected identity")
            self._resumed = True
        else:
            self._psk = None
            self._early = K.hkdf_extract(self._prims, b"", K.ZEROS)
        self._add(message)
        self._handshake_keys(point)
        self._state = _WAIT_EE

    def _handshake_keys(self, point):
        # RFC 8446 7.1: the (EC)DHE secret with the server's share (in the SE), the
        # handshake secret and both handshake traffic keys over the transcript up to the
        # ServerHello, and the master secret; records are protected from here on.
        shared = self._cfg.ephemeral.shared_secret(point)
        prims = self._prims
        empty_hash = prims.sha256(b"")
        derived = K.derive_secret(prims, self._early, b"derived", empty_hash)
        self._hs_secret = K.hkdf_extract(prims, derived, shared)
        th = self._th()
        self._c_hs = K.derive_secret(prims, self._hs_secret, b"c hs traffic", th)
        self._s_hs = K.derive_secret(prims, self._hs_secret, b"s hs traffic", th)
        derived = K.derive_secret(prims, self._hs_secret, b"derived", empty_hash)
        self._master = K.hkdf_extract(prims, derived, K.ZEROS)
        self._expect_key_change()
        self._read = RecordProtection(prims, self._s_hs)
        self._write = RecordProtection(prims, self._c_hs)

    def _hello_retry(self, message, extensions):
        if self._hrr:
            raise TlsError("unexpected_message", ALERT_UNEXPECTED_MESSAGE,
                           "second HelloRetryRequest")
        self._hrr = True
        share = extensions.get(EXT_KEY_SHARE)
        cookie = extensions.get(EXT_COOKIE)
        if share is not None:
            # RFC 8446 4.2.8: the selected group must be one we offered (secp256r1 only)
            # and not one we already sent a share for.
            if len(share) != 2 or (share[0] << 8 | share[1]) != GROUP_SECP256R1 or \
                    self._point is not None:
                raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER, "HRR selected group")
        elif cookie is None:
            # RFC 8446 4.1.4: an HRR that would not change the ClientHello.
            raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER, "HRR changes nothing")
        if cookie is not None:
            cookie_reader = _Reader(cookie)
            self._cookie = cookie_reader.vec16()
            cookie_reader.done()
            if not self._cookie:
                raise _decode_error("empty cookie")
        if self._point is None:
            self._generate_share()
        # RFC 8446 4.4.1: ClientHello1 is replaced by message_hash(Hash(ClientHello1)).
        ch1_hash = self._th()
        self._transcript = _Transcript(_TRANSCRIPT_HASHES, self._cfg.max_transcript)
        self._add(_handshake(HT_MESSAGE_HASH, ch1_hash))
        self._add(message)
        self._expect_key_change()
        self._send_client_hello()

    # -- the encrypted flight -------------------------------------------------------------

    def _encrypted_extensions(self, message, body):
        reader = _Reader(body)
        extensions = _extensions(reader.vec16(), (EXT_SERVER_NAME, EXT_SUPPORTED_GROUPS,
                                                  EXT_RECORD_SIZE_LIMIT))
        reader.done()
        limit = extensions.get(EXT_RECORD_SIZE_LIMIT)
        if limit is not None:
            if len(limit) != 2:
                raise _decode_error("record_size_limit")
            value = limit[0] << 8 | limit[1]
            if value < 64:
                raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER, "record_size_limit")
            self._peer_limit = min(value, MAX_PLAINTEXT + 1)
            self._our_limit_active = True  # RFC 8449 4: the server supports it
        if extensions.get(EXT_SERVER_NAME, b"") != b"":
            raise _decode_error("server_name in EncryptedExtensions")
        self._add(message)
        self._state = _WAIT_FINISHED if self._resumed else _WAIT_CERT_CR

    def _certificate_request(self, message, body):
        reader = _Reader(body)
        self._cr_context = reader.vec8()
        raw_ext = reader.vec16()
        reader.done()
        if self._cr_context:
            raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER, "request context")
        reader = _Reader(raw_ext)
        algorithms = None
        seen = []
        while reader.pos < len(raw_ext):
            ext_type = reader.u16()
            ext_data = reader.vec16()
            if ext_type in seen:
                raise TlsError("duplicate_extension", ALERT_ILLEGAL_PARAMETER, "%d" % ext_type)
            seen.append(ext_type)
            if ext_type == EXT_SIGNATURE_ALGORITHMS:
                algorithms = ext_data
        if algorithms is None:
            raise TlsError("missing_extension", ALERT_MISSING_EXTENSION, "signature_algorithms")
        schemes = _Reader(algorithms)
        listed = schemes.vec16()
        schemes.done()
        if len(listed) % 2 or not listed:
            raise _decode_error("signature_algorithms")
        ours = False
        for i in range(0, len(listed), 2):
            if (listed[i] << 8 | listed[i + 1]) == SIG_ECDSA_SECP256R1_SHA256:
                ours = True
        if not ours and self._cfg.signer is not None:
            raise TlsError("handshake_failure", ALERT_HANDSHAKE_FAILURE,
                           "no common signature scheme")
        self._cert_requested = True
        self._add(message)
        self._state = _WAIT_CERT

    def _certificate(self, message, body):
        # body and message are views (_dispatch): nothing of them is kept.
        reader = _Reader(body)
        if len(reader.vec8()):
            raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER, "certificate context")
        entries = _Reader(reader.vec24())
        reader.done()
        chain = []
        while entries.pos < len(entries.data):
            cert = entries.vec24()
            entries.vec16()  # per-certificate extensions (none were requested)
            if not len(cert):
                raise _decode_error("empty certificate")
            chain.append(cert)
        if not chain:
            raise _decode_error("empty server Certificate")  # RFC 8446 4.4.2.4
        cfg = self._cfg
        path, report = verify_server_chain(chain, cfg.anchors, cfg.server_name, cfg.now(),
                                           cfg.verify, self._prims.sha256, cfg.revocation)
        self._server_point = path[0].point
        self._chain_report = report
        self._add(message)
        self._state = _WAIT_CV

    def _certificate_verify(self, message, body):
        reader = _Reader(body)
        scheme = reader.u16()
        signature = reader.vec16()
        reader.done()
        if scheme != SIG_ECDSA_SECP256R1_SHA256:
            raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER, "signature scheme")
        # RFC 8446 4.4.3: 64 spaces || context string || 00 || Transcript-Hash.
        content = b"\x20" * 64 + _SERVER_CV_CONTEXT + b"\x00" + self._th()
        try:
            self._cfg.verify(self._server_point, self._prims.sha256(content), signature)
        except ApduError:  # VerificationFailed, or WrongData for a malformed signature
            raise TlsError("bad_certificate_verify", ALERT_DECRYPT_ERROR) from None
        except ValueError:  # the SE session's own shape checks (signature length)
            raise TlsError("bad_certificate_verify", ALERT_DECRYPT_ERROR, "shape") from None
        self._add(message)
        self._state = _WAIT_FINISHED

    def _finished(self, message, body, events):
        prims = self._prims
        expected = K.finished_mac(prims, self._s_hs, self._th())
        if not _ct_equal(body, expected):
            raise TlsError("bad_finished", ALERT_DECRYPT_ERROR)
        self._add(message)
        th = self._th()
        c_ap = K.derive_secret(prims, self._master, b"c ap traffic", th)
        s_ap = K.derive_secret(prims, self._master, b"s ap traffic", th)
        self._expect_key_change()
        self._read = RecordProtection(prims, s_ap)
        # Our flight, still under the client handshake traffic key (RFC 8446 4.4).
        if self._cert_requested:
            self._send_client_certificate()
        verify_data = K.finished_mac(prims, self._c_hs, self._th())
        finished = _handshake(HT_FINISHED, verify_data)
        self._add(finished)
        self._write_record(CT_HANDSHAKE, finished)
        self._res_master = K.derive_secret(prims, self._master, b"res master", self._th())
        self._write = RecordProtection(prims, c_ap)
        info = HandshakeInfo()
        info.resumed = self._resumed
        info.hello_retry = self._hrr
        info.client_certificate = self._cert_requested and self._cfg.signer is not None
        info.peer_record_size_limit = self._peer_limit
        info.chain_report = self._chain_report
        self.info = info
        self._state = _CONNECTED
        # The transcript and handshake secrets are no longer needed.
        self._transcript = None
        self._psk = self._early = self._hs_secret = self._master = None
        self._c_hs = self._s_hs = None
        events.append((EVENT_HANDSHAKE_COMPLETE, info))

    def _send_client_certificate(self):
        # The Certificate message in pieces (header, then per certificate its length, its
        # DER and empty extensions), each hashed and written in records of at most
        # send_fragment bytes: the chain is never copied into one message-sized block.
        cfg = self._cfg
        chain = cfg.client_chain if cfg.signer is not None else ()
        entries = 0
        for cert in chain:
            entries += 3 + len(cert) + 2
        context = _vec8(self._cr_context)
        pieces = [bytes((HT_CERTIFICATE,)) + _u24(len(context) + 3 + entries) + context
                  + _u24(entries)]
        for cert in chain:
            pieces.append(_u24(len(cert)))
            pieces.append(cert)
            pieces.append(b"\x00\x00")
        self._write_handshake_pieces(pieces)
        pieces = None
        if cfg.signer is None:
            return  # RFC 8446 4.4.2: an empty Certificate, no CertificateVerify
        content = b"\x20" * 64 + _CLIENT_CV_CONTEXT + b"\x00" + self._th()
        signature = cfg.signer(self._prims.sha256(content))
        verify = _handshake(HT_CERTIFICATE_VERIFY,
                            _u16(SIG_ECDSA_SECP256R1_SHA256) + _vec16(bytes(signature)))
        self._add(verify)
        self._write_record(CT_HANDSHAKE, verify)

    # -- post-handshake (RFC 8446 4.6) ------------------------------------------------------

    def _new_session_ticket(self, body):
        reader = _Reader(body)
        lifetime = reader.u32()
        age_add = reader.u32()
        nonce = reader.vec8()
        ticket = reader.vec16()
        reader.vec16()  # extensions (early_data only; ignored, 0-RTT is not used)
        reader.done()
        if not ticket:
            raise _decode_error("empty ticket")
        if lifetime > _MAX_TICKET_LIFETIME:
            raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER, "ticket lifetime")
        psk = K.hkdf_expand_label(self._prims, self._res_master, b"resumption", nonce, K.HASH_LEN)
        self.ticket = SessionTicket(ticket, psk, lifetime, age_add, self._cfg.now(),
                                    self._cfg.server_name)
        return self.ticket

    def _key_update(self, body):
        if len(body) != 1 or body[0] > 1:
            raise TlsError("illegal_parameter", ALERT_ILLEGAL_PARAMETER, "KeyUpdate")
        self._expect_key_change()
        self._read = RecordProtection(self._prims,
                                      K.next_traffic_secret(self._prims, self._read.secret))
        requested = body[0] == 1
        if requested:
            self._send_key_update(0)
        return requested

    def _send_key_update(self, request):
        self._write_record(CT_HANDSHAKE, _handshake(HT_KEY_UPDATE, bytes((request,))))
        self._write = RecordProtection(self._prims,
                                       K.next_traffic_secret(self._prims, self._write.secret))


def _lenient_types(raw_ext):
    # The extension types of a ServerHello we could not accept, to tell a TLS 1.2 answer
    # (which carries TLS 1.2 extensions) from a malformed TLS 1.3 one.
    types = []
    try:
        reader = _Reader(raw_ext)
        while reader.pos < len(raw_ext):
            types.append(reader.u16())
            reader.vec16()
    except TlsError:
        pass
    return types
