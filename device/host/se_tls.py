"""mTLS client whose private key lives in the secure element (CPython host adapter).

Python's `ssl` module cannot sign with a key it does not hold, so the device's TLS client
is tlslite-ng (pure Python, pluggable key objects).  `SeEcdsaKey` is a tlslite-ng key
object whose ECDSA signing is the SE's SIGN command: the TLS 1.2 CertificateVerify
(RFC 5246 7.4.8) is signed inside the SE and the private key never exists outside it.
tlslite-ng does client certificates in TLS 1.2 only (its TLS 1.3 post-handshake and
in-handshake client authentication is unimplemented upstream), so the client offers
exactly TLS 1.2 with ECDHE-ECDSA and AES-GCM (RFC 5289), which the fleet verifier accepts.

    se = SeSession(protocol); se.select()
    client = SeTlsClient(se, slot=1, cert_chain_der=[se.get_cert(1)],
                         trust_roots_der=[se.get_data(DATA_TRUST_FLEET_ROOT)])
    response = client.request("127.0.0.1", 8443, "GET", "/v1/whoami")
    response.status, response.headers, response.body

The server certificate chain is validated with `cryptography.x509.verification` against
the given trust roots (for a device: the fleet root the line stored in its SE) and the
host name or IP address.  Every network wait is bounded (connect and per-I/O timeouts);
one request per connection.  Failures raise TlsClientError(reason, detail).
"""

import datetime
import http.client
import ipaddress
import socket

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509 import verification
from tlslite import X509, HandshakeSettings, TLSConnection, X509CertChain
from tlslite.errors import TLSError
from tlslite.utils.ecdsakey import ECDSAKey

from fleetid.common.errors import FleetidError

_P256_BITS = 256
_P256_BYTES = 32  # SEC 1 2.3.3: field element length of P-256
_DIGEST_LEN = 32  # SHA-256, the only hash offered (settings.ecdsaSigHashes)
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_IO_TIMEOUT = 30.0
MAX_RESPONSE = 1024 * 1024
_POINT_FORMAT = (serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


class TlsClientError(FleetidError):
    """The TLS/HTTPS exchange failed.  `reason` is one of the constants below; `detail`
    is a short text (never key material)."""

    CONNECT = "connect"  # TCP connection refused / unreachable
    TIMEOUT = "timeout"  # a bounded wait expired
    HANDSHAKE = "handshake"  # TLS handshake failed (alert, no common parameters)
    SERVER_CERTIFICATE = "server_certificate"  # server chain / name not trusted
    SE = "se"  # the SE could not sign
    PROTOCOL = "protocol"  # malformed or oversized HTTP response, connection dropped

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


class _CurveSize:
    # tlslite-ng's KeyExchange.makeCertificateVerify truncates the hash to
    # `privateKey.private_key.curve.baselen` bytes (SEC 1 4.1.3 step 5); this stand-in
    # answers that one question.  It holds no key material.
    baselen = _P256_BYTES


class _SeKeyHandle:
    curve = _CurveSize()


class SeEcdsaKey(ECDSAKey):
    """tlslite-ng ECDSA key object for a P-256 key held in an SE slot.

    Params: se: SeSession (selected).  slot: the key's slot.  point: its 65-byte public
        point (default: read with GET PUBLIC KEY).
    Signing sends the 32-byte digest to SE SIGN; verification (tlslite checks every
    signature it makes) runs on the host with the public key.
    """

    key_type = "ecdsa"
    curve_name = "NIST256p"

    def __init__(self, se, slot, point=None):
        self.se = se
        self.slot = slot
        if point is None:
            _policy, point = se.public_key(slot)
        self.point = bytes(point)
        self._public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(),
                                                                    self.point)
        self.private_key = _SeKeyHandle()  # see _CurveSize
        self.signatures = 0

    # tlslite-ng's key interface (its camelCase names): size, capabilities, signing.

    def __len__(self):
        return _P256_BITS

    def hasPrivateKey(self):
        return True

    def acceptsPassword(self):
        return False

    def write(self, password=None):
        raise TlsClientError(TlsClientError.SE, "an SE-held key cannot be exported")

    def _sign(self, data, hash_alg):
        if hash_alg != "sha256" or len(data) != _DIGEST_LEN:
            raise TlsClientError(TlsClientError.SE, "the SE signs SHA-256 digests only")
        try:
            signature = self.se.sign(self.slot, bytes(data))
        except FleetidError as exc:
            raise TlsClientError(TlsClientError.SE, "SIGN failed: %s" % type(exc).__name__) \
                from None
        self.signatures += 1
        return bytearray(signature)

    def _hashAndSign(self, data, hAlg):
        if hAlg != "sha256":
            raise TlsClientError(TlsClientError.SE, "the SE signs SHA-256 digests only")
        digest = hashes.Hash(hashes.SHA256())
        digest.update(bytes(data))
        return self._sign(digest.finalize(), hAlg)

    def _verify(self, signature, hash_bytes):
        try:
            self._public.verify(bytes(signature), bytes(hash_bytes),
                                ec.ECDSA(Prehashed(hashes.SHA256())))
        except (InvalidSignature, ValueError):
            return False
        return True


def tls12_settings():
    """HandshakeSettings: TLS 1.2 only, ECDHE-ECDSA, AES-GCM, P-256, SHA-256 signatures
    (what the SE can sign and the verifier accepts)."""
    settings = HandshakeSettings()
    settings.minVersion = (3, 3)
    settings.maxVersion = (3, 3)
    settings.cipherNames = ["aes128gcm", "aes256gcm"]
    settings.keyExchangeNames = ["ecdhe_ecdsa"]
    settings.eccCurves = ["secp256r1"]
    settings.defaultCurve = "secp256r1"
    settings.ecdsaSigHashes = ["sha256"]
    settings.more_sig_schemes = []
    settings.dsaSigHashes = []
    settings.rsaSchemes = ["pkcs1"]
    settings.rsaSigHashes = []
    settings.keyShares = ["secp256r1"]
    settings.useEncryptThenMAC = False  # AEAD suites only (RFC 7366 does not apply)
    return settings


def _server_subject(host):
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class HttpResponse:
    """status (int), reason (str), headers (dict, lower-case names), body (bytes)."""

    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def __repr__(self):
        return "HttpResponse(%d %s, %d bytes)" % (self.status, self.reason, len(self.body))


class _SeHttpsConnection(http.client.HTTPConnection):
    # http.client does the HTTP/1.1 framing; connect() is the tlslite-ng handshake with
    # the SE-held key, then the server chain check.

    default_port = http.client.HTTPS_PORT

    def __init__(self, client, host, port, timeout):
        http.client.HTTPConnection.__init__(self, host, port, timeout=timeout)
        self._client = client

    def connect(self):
        client = self._client
        try:
            sock = socket.create_connection((self.host, self.port),
                                            timeout=client.connect_timeout)
        except TimeoutError:
            raise TlsClientError(TlsClientError.TIMEOUT, "connect to %s:%d" % (
                self.host, self.port)) from None
        except OSError as exc:
            raise TlsClientError(TlsClientError.CONNECT, "%s:%d: %s" % (
                self.host, self.port, exc.strerror or exc)) from None
        sock.settimeout(client.io_timeout)
        tls = TLSConnection(sock)
        try:
            server_name = self.host if isinstance(_server_subject(self.host),
                                                  x509.DNSName) else None
            tls.handshakeClientCert(client.cert_chain, client.key,
                                    settings=client.settings, serverName=server_name)
        except TimeoutError:
            sock.close()
            raise TlsClientError(TlsClientError.TIMEOUT, "TLS handshake") from None
        except TlsClientError:
            sock.close()
            raise
        except (TLSError, OSError) as exc:
            sock.close()
            raise TlsClientError(TlsClientError.HANDSHAKE, "%s: %s" % (
                type(exc).__name__, exc)) from None
        try:
            client.check_server(tls, self.host)
        except TlsClientError:
            tls.close()
            raise
        self.sock = tls


class SeTlsClient:
    """HTTPS client authenticated by a certificate whose key is in the SE.

    Params: se: SeSession (selected).  slot: the key slot.  cert_chain_der: [leaf DER,
        intermediates...] to present.  trust_roots_der: DER root certificates the server
        chain must validate to (the device's fleet root trust anchor).
        connect_timeout / io_timeout: seconds (every socket wait is bounded by one of
        them).  clock: () -> aware datetime for the chain's validity check.
    """

    def __init__(self, se, slot, cert_chain_der, trust_roots_der,
                 connect_timeout=DEFAULT_CONNECT_TIMEOUT, io_timeout=DEFAULT_IO_TIMEOUT,
                 clock=None):
        if not cert_chain_der:
            raise ValueError("cert_chain_der needs the client certificate")
        if not trust_roots_der:
            raise ValueError("trust_roots_der needs at least one root")
        self.se = se
        self.slot = slot
        self.key = SeEcdsaKey(se, slot)
        leaf = x509.load_der_x509_certificate(bytes(cert_chain_der[0]))
        if leaf.public_key().public_bytes(*_POINT_FORMAT) != self.key.point:
            raise ValueError("the certificate is not for the key in slot %d" % slot)
        self.certificate = leaf
        chain = []
        for der in cert_chain_der:
            cert = X509()
            cert.parseBinary(bytearray(der))
            chain.append(cert)
        self.cert_chain = X509CertChain(chain)
        self.roots = [x509.load_der_x509_certificate(bytes(d)) for d in trust_roots_der]
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.clock = clock or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self.settings = tls12_settings()
        self.last_server_chain = None
        self.last_cipher = None

    def check_server(self, tls, host):
        """Validate the server's chain to the trust roots for `host` (RFC 6125 name /
        IP SAN) at the injected time.  Raises TlsClientError(SERVER_CERTIFICATE)."""
        session = tls.session
        chain = getattr(session, "serverCertChain", None)
        if chain is None or not chain.x509List:
            raise TlsClientError(TlsClientError.SERVER_CERTIFICATE, "no server certificate")
        try:
            certs = [x509.load_der_x509_certificate(bytes(c.bytes)) for c in chain.x509List]
            verifier = (verification.PolicyBuilder()
                        .store(verification.Store(self.roots)).time(self.clock())
                        .build_server_verifier(_server_subject(host)))
            verifier.verify(certs[0], certs[1:])
        except Exception as exc:
            raise TlsClientError(TlsClientError.SERVER_CERTIFICATE, "%s is not trusted: %s"
                                 % (host, exc)) from None
        self.last_server_chain = certs
        self.last_cipher = session.getCipherName(), session.getMacName()

    def request(self, host, port, method, path, body=None, headers=None):
        """One HTTPS request on a fresh connection.

        Returns: HttpResponse.  Raises: TlsClientError (connect, timeout, handshake,
        server_certificate, se, protocol).  An HTTP error status is not an exception.
        """
        conn = _SeHttpsConnection(self, host, port, self.io_timeout)
        try:
            send = dict(headers or {})
            send.setdefault("Connection", "close")
            conn.request(method, path, body=body, headers=send)
            response = conn.getresponse()
            data = response.read(MAX_RESPONSE + 1)
            if len(data) > MAX_RESPONSE:
                raise TlsClientError(TlsClientError.PROTOCOL, "response over %d bytes"
                                     % MAX_RESPONSE)
            return HttpResponse(response.status, response.reason,
                                {k.lower(): v for k, v in response.getheaders()}, data)
        except TimeoutError:
            raise TlsClientError(TlsClientError.TIMEOUT, "%s %s" % (method, path)) from None
        except TlsClientError:
            raise
        except (http.client.HTTPException, TLSError, OSError) as exc:
            raise TlsClientError(TlsClientError.PROTOCOL, "%s: %s" % (
                type(exc).__name__, exc)) from None
        finally:
            conn.close()

