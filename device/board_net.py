# The board's network for the agent (device/board.py's `board_net` contract), on `socket`
# and the SE-keyed TLS 1.3 client: what a MicroPython board (and the unix port, the same
# file) uses against `fleetid cloud serve`.  Portable: MicroPython and CPython.
#
#     # boards/<board>/main.py
#     from fleetid.device.board import run
#     run("machine:i2c:0:0x48", "se05x", 3600, net_module="fleetid.device.board_net",
#         verifier_url="https://10.0.0.2:8443", est_url="https://10.0.0.2:8444")
#
# device/board.run passes the board's constants to make_net(se, ...) below.  Paths,
# bodies and the mapping of answers to device.agent.NetError are those of the CPython
# reference, device/host/agent_net.HostNetwork:
#
#   whoami     GET  verifier /v1/whoami                    200 JSON object
#   cacerts    GET  est /.well-known/est[/label]/cacerts   200 base64 certs-only PKCS#7
#   nonce      GET  est .../nonce                          200 base64, 1..64 bytes
#   enroll     POST est .../simpleenroll | simplereenroll  base64 PKCS#10 in (RFC 7030
#                                                          4.2.1), 200 base64 certs-only
#                                                          PKCS#7 with exactly one
#                                                          certificate out
#   ack        POST verifier /v1/rotation/ack              200
#   fetch_revocation  GET the CRL: crl_url, else the first http(s) URI of the slot
#                     certificate's CRL distribution points (RFC 5280 4.2.1.13)
#   fetch_root_revocation  GET the fleet root's CRL: root_crl_url, else root.crl beside
#                     the issuing CA's CRL URL (the cloud's revocation listener)
#
#   transport: HttpError link -> LINK, timeout -> TIMEOUT, handshake -> HANDSHAKE, a
#   server certificate refused -> REFUSED (server_reason "certificate_revoked" when a
#   CRL cache lists it: the `revocation` hook, device/board.server_revocation).  HTTP: 202 -> PENDING (Retry-After seconds),
#   5xx -> SERVER, other non-200 -> REFUSED with the server's reason code (the text before
#   the first ":" of its answer).  An enrolment answer that is not exactly one certificate
#   in a certs-only PKCS#7 -> device.certcheck.CertificateRefused(MALFORMED).
#
# Every request is its own connection; session tickets make all but the first of a
# cycle's connections per slot a PSK-DHE resumption (device/https.py header).  PKCS#7 is
# read with common/der.py: SignedData (RFC 5652 5.1) certificates [0] IMPLICIT.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.errors import FleetidError
from fleetid.device.agent import CERTIFICATE_REVOKED, NetError

WELL_KNOWN = "/.well-known/est"  # RFC 7030 3.2.2
CT_PKCS10 = "application/pkcs10"  # RFC 7030 4.2.1
CT_PKCS7_MIME = "application/pkcs7-mime"  # RFC 7030 4.2.3 (certs-only)
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"  # RFC 5652 5.1
OID_CRL_DISTRIBUTION_POINTS = "2.5.29.31"  # RFC 5280 4.2.1.13
MAX_RETRY_AFTER = 24 * 3600
MAX_CRL = 65536
ROOT_CRL_FILE = "root.crl"  # cloud/revocation/crl.py ROOT_CRL_NAME + ".crl"
_DATA_TRUST_FLEET_ROOT = 0x0111  # se_consts.DATA_TRUST_FLEET_ROOT
_SLOT_IDENTITY = 0x01  # se_consts.SLOT_IDENTITY
_EPOCH_2000 = 946684800  # seconds from 1970 to 2000 (ports whose time() counts from 2000)
_WHITESPACE = b" \t\n\r\x0b\x0c"  # what bytes.split() drops (RFC 8951 3: line breaks)


class Pkcs7Error(FleetidError):
    """Not a certs-only PKCS#7 (detail says why)."""


def pkcs7_certificates(data):
    """The certificates of a certs-only PKCS#7 (RFC 5652 5.1 SignedData, RFC 7030 4.1.3),
    DER.  Returns: list of DER certificates (possibly empty).  Raises: Pkcs7Error."""
    from fleetid.common import der
    from fleetid.common.errors import DerError

    try:
        info = der.DerReader(data).read_sequence()
        if info.read_oid() != OID_SIGNED_DATA:
            raise Pkcs7Error("not SignedData")
        signed = info.read_context(0).read_sequence()
        signed.read_integer()  # version
        signed.read_set()  # digestAlgorithms (empty in certs-only)
        signed.read_sequence()  # encapContentInfo
        certs = []
        block = signed.read_optional_context(0)
        if block is not None:
            while not block.at_end():
                certs.append(bytes(block.read_raw(der.TAG_SEQUENCE)))
        return certs
    except DerError as exc:
        raise Pkcs7Error("bad DER: %s" % exc) from None


def crl_urls(cert_der):
    """The http(s) URIs of a certificate's CRL distribution points (fullName
    uniformResourceIdentifier, RFC 5280 4.2.1.13), in order.  Raises: DerError."""
    from fleetid.common import der

    tbs = der.DerReader(cert_der).read_sequence().read_sequence()
    out = []
    while not tbs.at_end():
        if tbs.peek_tag() != 0xA3:  # [3] extensions
            tbs.read_tlv()
            continue
        extensions = tbs.read_context(3).read_sequence()
        while not extensions.at_end():
            extension = extensions.read_sequence()
            if extension.read_oid() != OID_CRL_DISTRIBUTION_POINTS:
                continue
            if extension.peek_tag() == der.TAG_BOOLEAN:
                extension.read_boolean()
            points = der.DerReader(extension.read_octet_string()).read_sequence()
            while not points.at_end():
                point = points.read_sequence()
                name = point.read_optional_context(0)  # distributionPoint
                full = name.read_optional_context(0) if name is not None else None
                while full is not None and not full.at_end():
                    tag, value = full.read_tlv()
                    if tag == 0x86:  # [6] IMPLICIT IA5String uniformResourceIdentifier
                        uri = bytes(value).decode()
                        if uri.startswith("http://") or uri.startswith("https://"):
                            out.append(uri)
    return out


def root_crl_url_beside(crl_url):
    """The fleet root's CRL URL served beside an issuing CA's: the cloud's revocation
    listener serves /crl/<label>.crl and /crl/root.crl (cloud/revocation/crl.py
    ROOT_CRL_NAME), so the last path segment becomes "root.crl"."""
    base, slash, _ = crl_url.rpartition("/")
    if not slash or base.endswith("/"):
        raise NetError(NetError.REFUSED, "no root CRL URL beside %s" % crl_url, None,
                       None, "no_crl_url")
    return base + "/" + ROOT_CRL_FILE


def net_error(exc):
    """device/https.HttpError -> NetError.  A server certificate refused because a CRL
    cache lists it (the chain's "revocation" check, alert 44) is REFUSED with
    server_reason "certificate_revoked" (HostNetwork maps it the same way)."""
    if exc.reason == NetError.REFUSED and exc.check == "revocation":
        return NetError(NetError.REFUSED, CERTIFICATE_REVOKED + ": " + exc.detail, None,
                        None, CERTIFICATE_REVOKED)
    return NetError(exc.reason, exc.detail)


def retry_after_seconds(value):
    """Retry-After as delay-seconds (RFC 9110 10.2.3), or None."""
    try:
        delay = int(value)
    except (TypeError, ValueError):
        return None
    return min(max(delay, 0), MAX_RETRY_AFTER)


def error_for(response):
    """NetError for a non-success HTTP answer (module header)."""
    try:
        text = response.body[:300].decode().strip()
    except UnicodeError:  # not UTF-8 (or cut inside a character): no reason code
        text = ""
    status = response.status
    retry_after = retry_after_seconds(response.header("Retry-After"))
    if status == 202:
        return NetError(NetError.PENDING, text, status, retry_after)
    if status >= 500:
        return NetError(NetError.SERVER, text, status, retry_after)
    reason = text.split(":", 1)[0].strip() or None
    return NetError(NetError.REFUSED, text, status, retry_after, reason)


def decode_base64(body):
    """RFC 8951 3: base64 with or without line breaks.  Raises: ValueError."""
    import binascii

    text = b"".join(bytes(body).split())
    if len(text) % 4:
        raise ValueError("not base64")
    try:
        return binascii.a2b_base64(text)
    except Exception:  # binascii.Error (CPython), ValueError (MicroPython)
        raise ValueError("not base64") from None


_BASE64_CHUNK = const(64)  # base64 characters decoded at a time (48 bytes)
_BASE64_STEP = const(384)  # bytes encoded at a time (512 characters, a send fragment)


def decode_base64_pieces(pieces):
    """RFC 8951 3: base64 with or without line breaks (any whitespace), given as a list
    of bytes-like pieces in order (device/https's `pieces`: a body as it arrived),
    decoded into one bytearray of exactly the decoded size.  The text is never joined
    into one block, and each piece is dropped from the list once decoded, so a board
    needs no block of the whole base64 body, only one of the result.

    Returns: bytearray.  Raises: ValueError (not base64: length, padding, alphabet)."""
    import binascii

    count = 0
    first_pad = -1
    last = second = 0
    for piece in pieces:
        for c in piece:
            if c in _WHITESPACE:
                continue
            if c == 0x3D and first_pad < 0:  # "="
                first_pad = count
            count += 1
            second, last = last, c
    pads = (last == 0x3D) + (second == 0x3D)
    if count % 4 or (first_pad >= 0 and first_pad < count - pads):
        raise ValueError("not base64")
    out = bytearray(count // 4 * 3 - pads)
    stage = bytearray(_BASE64_CHUNK)
    fill = written = 0
    try:
        while pieces:
            piece = pieces.pop(0)
            for c in piece:
                if c in _WHITESPACE:
                    continue
                stage[fill] = c
                fill += 1
                if fill == _BASE64_CHUNK:
                    written = _decode_chunk(binascii, stage, out, written)
                    fill = 0
            piece = None
        if fill:
            written = _decode_chunk(binascii, memoryview(stage)[:fill], out, written)
    except ValueError:
        raise
    except Exception:  # binascii.Error is a ValueError on CPython; MicroPython: ValueError
        raise ValueError("not base64") from None
    if written != len(out):
        raise ValueError("not base64")
    return out


def _decode_chunk(binascii, text, out, written):
    # One staged run of base64 characters (a multiple of 4) into out[written:].
    chunk = binascii.a2b_base64(text)
    end = written + len(chunk)
    if end > len(out):
        raise ValueError("not base64")
    out[written:end] = chunk
    return end


class Base64Body:
    """A request body: the base64 of `data` as binascii.b2a_base64 gives it (one line and
    a final newline), encoded _BASE64_STEP bytes at a time as it is sent (device/https
    sends an iterable body piece by piece), so no block of the whole text is made.
    len() is the text's length (Content-Length)."""

    def __init__(self, data):
        self._data = data

    def __len__(self):
        return (len(self._data) + 2) // 3 * 4 + 1

    def __iter__(self):
        import binascii

        view = memoryview(self._data)
        size = len(view)
        if not size:
            yield b"\n"
        for i in range(0, size, _BASE64_STEP):
            yield binascii.b2a_base64(view[i:i + _BASE64_STEP],
                                      newline=i + _BASE64_STEP >= size)


def nonce_value(body):
    """The CA's nonce from a 200 answer's body: base64 (RFC 8951), 1..64 bytes.
    Raises: NetError(SERVER) otherwise."""
    try:
        value = decode_base64(body)
    except ValueError:
        raise NetError(NetError.SERVER, "nonce is not base64") from None
    if not 1 <= len(value) <= 64:
        raise NetError(NetError.SERVER, "nonce of %d bytes" % len(value))
    return value


class BoardNetwork:
    """device.agent's `net` over device/https.py (module header).

    Params: se: SeSession.  verifier_url, est_url: https://HOST:PORT.  now: epoch seconds
        clock.  server_name: the name or IP in the servers' certificates (None: the URL
        host).  est_label: EST label or None.  crl_url: fixed CRL URL (None: the
        certificate's distribution point).  timeout_s, max_body: device/https bounds.
        anchors_der: trust anchors (None: the fleet root the line stored in the SE).
        root_crl_url: the fleet root's CRL (None: root_crl_url_beside the issuing CA's
        CRL URL).  revocation: the servers' chains' `revocation(path)` hook
        (device/board.server_revocation) or None.
    Attributes: https (the HttpsClient: handshakes / resumed / se_operations).
    """

    def __init__(self, se, verifier_url, est_url, now, server_name=None, est_label=None,
                 crl_url=None, timeout_s=30, max_body=16384, anchors_der=None,
                 root_crl_url=None, revocation=None):
        from fleetid.device.https import HttpsClient, parse_url

        for url in (verifier_url, est_url):
            if parse_url(url)[0] != "https":
                raise ValueError("verifier and EST URLs are https://")
        if anchors_der is None:
            anchors_der = [bytes(se.get_data(_DATA_TRUST_FLEET_ROOT, -1, 65536))]
        self.se = se
        self.verifier_url = verifier_url
        self.est_url = est_url
        self.est_label = est_label
        self.crl_url = crl_url
        self.root_crl_url = root_crl_url
        self.https = HttpsClient(se, anchors_der, now, server_name=server_name,
                                 revocation=revocation, timeout_s=timeout_s,
                                 max_body=max_body)

    def _request(self, slot, base, method, path, body=None, headers=None, pieces=False):
        from fleetid.device.https import HttpError

        try:
            return self.https.request(slot, base, method, path, body, headers, pieces=pieces)
        except HttpError as exc:
            raise net_error(exc) from None

    def _ok(self, slot, base, method, path, body=None, headers=None, pieces=False):
        response = self._request(slot, base, method, path, body, headers, pieces)
        if response.status != 200:
            raise error_for(response)
        return response

    def _est_path(self, op):
        return "%s/%s%s" % (WELL_KNOWN, self.est_label + "/" if self.est_label else "", op)

    def whoami(self, slot):
        """GET /v1/whoami.  Returns: dict."""
        import json

        response = self._ok(slot, self.verifier_url, "GET", "/v1/whoami")
        try:
            identity = json.loads(response.body)
        except ValueError:
            raise NetError(NetError.SERVER, "whoami answer is not JSON") from None
        if not isinstance(identity, dict):
            raise NetError(NetError.SERVER, "whoami answer is not an object")
        return identity

    def _pkcs7(self, response):
        # The base64 body decoded from the pieces it arrived in (device/https `pieces`,
        # after the connection closed), each dropped once decoded; the decoded DER is the
        # one block of the answer's size the board needs (then copied once for
        # common/der.py, which reads bytes).
        content_type = response.header("Content-Type", "")
        if not content_type.startswith(CT_PKCS7_MIME):
            raise Pkcs7Error("content type %s" % content_type)
        pieces = getattr(response, "pieces", None)
        if pieces is None:
            pieces = [response.body]
        response.pieces = response.body = None
        try:
            decoded = decode_base64_pieces(pieces)
        except ValueError:
            raise Pkcs7Error("body is not base64") from None
        pieces = None
        data = bytes(decoded)
        decoded = None
        return pkcs7_certificates(data)

    def cacerts(self, slot):
        """GET cacerts (RFC 7030 4.1).  Returns: list of DER certificates, unchecked."""
        response = self._ok(slot, self.est_url, "GET", self._est_path("cacerts"),
                            pieces=True)
        try:
            return self._pkcs7(response)
        except Pkcs7Error as exc:
            raise NetError(NetError.SERVER, "cacerts: %s" % exc) from None

    def nonce(self, slot):
        """GET nonce.  Returns: bytes (1..64)."""
        return nonce_value(self._ok(slot, self.est_url, "GET", self._est_path("nonce")).body)

    def enroll(self, slot, csr_der, reenroll):
        """POST simpleenroll / simplereenroll.  Returns: the certificate DER.  Raises:
        NetError; CertificateRefused(MALFORMED) for a 200 answer that is not exactly one
        certificate in a certs-only PKCS#7."""
        from fleetid.device.certcheck import REASON_MALFORMED, CertificateRefused

        op = "simplereenroll" if reenroll else "simpleenroll"
        body = Base64Body(csr_der)
        response = self._ok(slot, self.est_url, "POST", self._est_path(op), body,
                            {"Content-Type": CT_PKCS10,
                             "Content-Transfer-Encoding": "base64"}, pieces=True)
        body = None
        try:
            certs = self._pkcs7(response)
        except Pkcs7Error as exc:
            raise CertificateRefused(REASON_MALFORMED, str(exc)) from None
        if len(certs) != 1:
            raise CertificateRefused(REASON_MALFORMED, "%d certificates" % len(certs))
        return certs[0]

    def ack(self, slot):
        """POST /v1/rotation/ack with the new credential."""
        self._ok(slot, self.verifier_url, "POST", "/v1/rotation/ack", b"")

    def _crl_url(self, slot):
        # crl_url, else the first http(s) distribution point of the slot's certificate.
        from fleetid.common.errors import DerError

        url = self.crl_url
        if url is None:
            try:
                urls = crl_urls(bytes(self.se.get_cert(slot)))
            except DerError:
                urls = ()
            url = urls[0] if urls else None
        if not url:
            raise NetError(NetError.REFUSED, "no CRL distribution point", None, None,
                           "no_crl_url")
        return url

    def forget_sessions(self):
        """Drop the session tickets (device/agent.py calls it after a CRL changed)."""
        self.https.forget()

    def fetch_revocation(self, slot):
        """GET the CRL for the certificate in `slot` (crl_url, else its distribution
        point).  Returns: bytes.  Raises: NetError (REFUSED with "no_crl_url")."""
        return self._get_crl(slot, self._crl_url(slot))

    def fetch_root_revocation(self, slot):
        """GET the fleet root's CRL: root_crl_url, else root_crl_url_beside(the issuing
        CA's CRL URL).  Returns: bytes.  Raises: NetError."""
        url = self.root_crl_url or root_crl_url_beside(self._crl_url(slot))
        return self._get_crl(slot, url)

    def _get_crl(self, slot, url):
        from fleetid.device.https import HttpError, fetch

        try:
            if url.startswith("https://"):
                from fleetid.device.https import parse_url

                _, host, port, path = parse_url(url)
                response = self.https.request(slot, "https://%s:%d" % (host, port), "GET",
                                              path)
            else:
                response = fetch(url, MAX_CRL)
        except HttpError as exc:
            raise net_error(exc) from None
        except ValueError as exc:
            raise NetError(NetError.REFUSED, "CRL URL %s: %s" % (url, exc), None, None,
                           "bad_crl_url") from None
        if response.status != 200:
            raise error_for(response)
        return response.body


class BoardClock:
    """The agent's clock on a board: now() in whole seconds since 1970 UTC (time.time(),
    corrected on ports that count from 2000; set it by NTP first -- ntptime.settime()),
    sleep(seconds) with time.sleep."""

    def __init__(self):
        import time

        self._time = time
        self._offset = _EPOCH_2000 if time.gmtime(0)[0] == 2000 else 0

    def now(self):
        return int(self._time.time()) + self._offset

    def sleep(self, seconds):
        if seconds > 0:
            self._time.sleep(seconds)


def make_clock():
    """device/board.py contract: the board's wall clock."""
    return BoardClock()


def make_net(se, verifier_url=None, est_url=None, server_name=None, est_label=None,
             crl_url=None, timeout_s=30, now=None, revocation=None, root_crl_url=None):
    """device/board.py contract: the agent's `net` for the SE session `se`, with the
    board's constants (device/board.run passes them).

    Params: revocation: the servers' chains' `revocation(path)` hook (device/board.run
        passes device/board.server_revocation when the board keeps a CRL), or None.
    Raises: ValueError when the verifier or EST URL is missing or not https://."""
    if verifier_url is None or est_url is None:
        raise ValueError("board_net needs verifier_url and est_url (board constants)")
    if now is None:
        now = BoardClock().now
    return BoardNetwork(se, verifier_url, est_url, now, server_name=server_name,
                        est_label=est_label, crl_url=crl_url, timeout_s=timeout_s,
                        root_crl_url=root_crl_url, revocation=revocation)


def parse_mqtt_url(url):
    """(host, port) of mqtts://HOST[:PORT] (port 8883 by default, RFC-less but IANA's).
    Raises: ValueError."""
    scheme, sep, rest = url.partition("://")
    rest = rest.rstrip("/")
    if scheme != "mqtts" or not sep or not rest or "/" in rest:
        raise ValueError("%r: expected mqtts://HOST[:PORT]" % url)
    host, colon, port = rest.rpartition(":")
    if not colon or "]" in port:
        return rest.strip("[]"), 8883
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("%r: bad host or port" % url)
    return host.strip("[]"), int(port)


def make_mqtt(se, name, mqtt_url, anchors_der=None, chain_der=(), server_name=None,
              timeout_s=20, keepalive_s=60, revocation=None, now=None):
    """device/board.py contract (optional): the MQTT transport of the board's session,
    device/mqtt.UmqttTransport (micropython-lib's umqtt.simple) over the SE-keyed TLS 1.3
    client (device/tls_socket.SeTlsWrapper), authenticated by the identity key.

    Params: se: SeSession.  name: the MQTT client id (the identity certificate's CN).
        mqtt_url: mqtts://HOST[:PORT].  anchors_der: the broker's trust anchors (None:
        the fleet root in the SE).  chain_der: certificates sent after the identity
        certificate (intermediates a broker lacks).  server_name: name or IP in the
        broker's certificate (None: the URL's host).  timeout_s: each TLS wait.
        revocation: the broker chain's `revocation(path)` hook or None.
    Returns: UmqttTransport (not connected).  Raises: ValueError (bad URL).
    """
    from fleetid.device.mqtt import UmqttTransport
    from fleetid.device.tls_socket import SeTlsWrapper

    host, port = parse_mqtt_url(mqtt_url)
    if anchors_der is None:
        anchors_der = [bytes(se.get_data(_DATA_TRUST_FLEET_ROOT, -1, 65536))]
    if now is None:
        now = BoardClock().now
    identity = bytes(se.get_cert(_SLOT_IDENTITY))
    tls = SeTlsWrapper(se, _SLOT_IDENTITY, anchors_der, now, server_name or host,
                       client_chain=[identity] + list(chain_der), timeout_s=timeout_s,
                       revocation=revocation)
    return UmqttTransport(name, host, port, keepalive=keepalive_s, tls=tls)
