"""A scripted TLS 1.3 server for the sans-I/O client tests (no tests in this module).

It speaks only what the client offers (TLS_AES_128_GCM_SHA256, secp256r1,
ecdsa_secp256r1_sha256), builds each message of its flight as bytes the test may alter,
and protects them into records the test may split, coalesce or corrupt.  Interop with a
real server is tests/device/test_tls13_openssl.py; this one exists so that every refusal
has a precise, deterministic trigger.

`TestPki` makes a root, a server certificate (serverAuth, SAN server.test and 127.0.0.1)
and a client certificate with `cryptography`.
"""

import datetime
import hashlib
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetid.common import tls13 as T
from fleetid.common import tls13_crypto as K
from fleetid.common.host.tls13_host import (
    CryptographyTls13Primitives,
    SoftwareEphemeral,
    ecdsa_verify,
)

DER = serialization.Encoding.DER
NOW = 1_900_000_000  # 2030-03-17, the injected wall clock of these tests
SERVER_NAME = "server.test"


def _u16(n):
    return n.to_bytes(2, "big")


def _vec8(b):
    return bytes((len(b),)) + b


def _vec16(b):
    return _u16(len(b)) + b


def _vec24(b):
    return len(b).to_bytes(3, "big") + b


def handshake(msg_type, body):
    return bytes((msg_type,)) + len(body).to_bytes(3, "big") + body


def ext(ext_type, data):
    return _u16(ext_type) + _vec16(data)


class TestPki:
    """A root CA and leaf certificates under it (P-256, ecdsa-with-SHA256)."""

    __test__ = False

    def __init__(self, root_name="Test Root"):
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, root_name)])
        self.root = self._build(name, name, self.root_key, self.root_key.public_key(), True)
        self.server_key = ec.generate_private_key(ec.SECP256R1())
        self.server = self.leaf(self.server_key)
        self.client_key = ec.generate_private_key(ec.SECP256R1())
        self.client = self.leaf(self.client_key, eku=ExtendedKeyUsageOID.CLIENT_AUTH, names=())

    def _build(self, subject, issuer, signer, public_key, ca, not_before=None, not_after=None,
               extensions=()):
        start = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or start - datetime.timedelta(days=1))
                   .not_valid_after(not_after or start + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(signer, hashes.SHA256())

    def leaf(self, key, eku=ExtendedKeyUsageOID.SERVER_AUTH, names=(SERVER_NAME, "127.0.0.1"),
             not_before=None, not_after=None):
        """A leaf certificate for `key` under the root (DER)."""
        extensions = [x509.ExtendedKeyUsage([eku])]
        if names:
            general = []
            for name in names:
                try:
                    general.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    general.append(x509.DNSName(name))
            extensions.append(x509.SubjectAlternativeName(general))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "c")])
        cert = self._build(subject, self.root.subject, self.root_key, key.public_key(), False,
                           not_before, not_after, extensions)
        return cert.public_bytes(DER)

    def root_der(self):
        return self.root.public_bytes(DER)

    def client_signer(self):
        def sign(digest):
            return self.client_key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        return sign


def client_config(pki, prims=None, ephemeral=None, **kwargs):
    """A Tls13Config with software keys, trusting `pki`'s root, at NOW."""
    kwargs.setdefault("server_name", SERVER_NAME)
    kwargs.setdefault("signer", pki.client_signer())
    kwargs.setdefault("client_chain", [pki.client])
    return T.Tls13Config(prims or CryptographyTls13Primitives(), ephemeral or SoftwareEphemeral(),
                         [pki.root_der()], ecdsa_verify, lambda: NOW, **kwargs)


def parse_records(data):
    """[(content_type, header, body)] of whole records in `data`."""
    out = []
    while data:
        length = int.from_bytes(data[3:5], "big")
        out.append((data[0], data[:5], data[5:5 + length]))
        data = data[5 + length:]
    return out


class FakeServer:
    """One TLS 1.3 server connection, driven by the test.

    server_hello(client_bytes) -> records of ServerHello (or HelloRetryRequest);
    flight() -> list of handshake messages [EE, (CR), Certificate, CV, Finished] under the
    handshake key, which protect() turns into records; then client_flight(bytes) checks
    the client's Certificate/CertificateVerify/Finished and switches to application keys.
    """

    def __init__(self, pki, chain=None, request_client_cert=True, record_size_limit=None,
                 prims=None):
        self.prims = prims or CryptographyTls13Primitives()
        self.pki = pki
        self.chain = chain if chain is not None else [pki.server]
        self.request_client_cert = request_client_cert
        self.record_size_limit = record_size_limit
        self.transcript = b""
        self.psk = None
        self.client_point = None
        self.client_certificate = None
        self.session_ticket_psks = {}
        self.write = None
        self.read = None

    # -- hello ---------------------------------------------------------------------------

    def _client_hello(self, data):
        records = parse_records(data)
        body = b"".join(b for t, _h, b in records if t == T.CT_HANDSHAKE)
        message = body[:4 + int.from_bytes(body[1:4], "big")]
        reader = T._Reader(message[4:])
        reader.u16()
        self.client_random = reader.take(32)
        self.session_id = reader.vec8()
        reader.vec16()
        reader.vec8()
        extensions = {}
        raw = reader.vec16()
        r = T._Reader(raw)
        while r.pos < len(raw):
            t = r.u16()
            extensions[t] = r.vec16()
        shares = T._Reader(extensions[T.EXT_KEY_SHARE]).vec16()
        self.client_point = shares[4:] if shares else None
        self.client_extensions = extensions
        return message

    def hello_retry(self, client_bytes, cookie=b"cookie!", select_group=False):
        """Answer the first ClientHello with a HelloRetryRequest."""
        message = self._client_hello(client_bytes)
        self.transcript = handshake(T.HT_MESSAGE_HASH, hashlib.sha256(message).digest())
        extensions = ext(T.EXT_SUPPORTED_VERSIONS, _u16(T.TLS13))
        if select_group:
            extensions += ext(T.EXT_KEY_SHARE, _u16(T.GROUP_SECP256R1))
        if cookie:
            extensions += ext(T.EXT_COOKIE, _vec16(cookie))
        hrr = handshake(T.HT_SERVER_HELLO, _u16(0x0303) + T.HRR_RANDOM + _vec8(self.session_id)
                        + _u16(T.CIPHER_TLS_AES_128_GCM_SHA256) + b"\x00" + _vec16(extensions))
        self.transcript += hrr
        self._after_hrr = True
        return self.plain(hrr)

    def server_hello(self, client_bytes, version_ext=True, suite=T.CIPHER_TLS_AES_128_GCM_SHA256,
                     accept_psk=True, random=None):
        """Parse the ClientHello and answer with a ServerHello (bytes of one record)."""
        message = self._client_hello(client_bytes)
        if not getattr(self, "_after_hrr", False):
            self.transcript = b""  # a new connection
        self._after_hrr = False
        psk_ext = self.client_extensions.get(T.EXT_PRE_SHARED_KEY)
        self.psk = None
        if psk_ext is not None and accept_psk:
            identities = T._Reader(T._Reader(psk_ext).vec16())
            ticket = identities.vec16()
            self.psk = self.session_ticket_psks.get(ticket)
        self.transcript += message
        key = ec.generate_private_key(ec.SECP256R1())
        point = key.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), self.client_point)
        shared = key.exchange(ec.ECDH(), peer)
        extensions = ext(T.EXT_KEY_SHARE, _u16(T.GROUP_SECP256R1) + _vec16(point))
        if version_ext:
            extensions += ext(T.EXT_SUPPORTED_VERSIONS, _u16(T.TLS13))
        if self.psk is not None:
            extensions += ext(T.EXT_PRE_SHARED_KEY, b"\x00\x00")
        sh = handshake(T.HT_SERVER_HELLO, _u16(0x0303) + (random or os.urandom(32))
                       + _vec8(self.session_id) + _u16(suite) + b"\x00" + _vec16(extensions))
        self.transcript += sh
        p = self.prims
        early = K.hkdf_extract(p, b"", self.psk or K.ZEROS)
        empty = hashlib.sha256(b"").digest()
        hs = K.hkdf_extract(p, K.derive_secret(p, early, b"derived", empty), shared)
        th = hashlib.sha256(self.transcript).digest()
        self.c_hs = K.derive_secret(p, hs, b"c hs traffic", th)
        self.s_hs = K.derive_secret(p, hs, b"s hs traffic", th)
        self.master = K.hkdf_extract(p, K.derive_secret(p, hs, b"derived", empty), K.ZEROS)
        self.write = T.RecordProtection(p, self.s_hs)
        self.read = T.RecordProtection(p, self.c_hs)
        return self.plain(sh)

    # -- the encrypted flight ---------------------------------------------------------------

    def encrypted_extensions(self, extra=b""):
        extensions = extra
        if self.record_size_limit is not None:
            extensions += ext(T.EXT_RECORD_SIZE_LIMIT, _u16(self.record_size_limit))
        return handshake(T.HT_ENCRYPTED_EXTENSIONS, _vec16(extensions))

    def certificate_request(self):
        algorithms = ext(T.EXT_SIGNATURE_ALGORITHMS, _vec16(_u16(T.SIG_ECDSA_SECP256R1_SHA256)))
        return handshake(T.HT_CERTIFICATE_REQUEST, b"\x00" + _vec16(algorithms))

    def certificate(self):
        entries = b"".join(_vec24(c) + _vec16(b"") for c in self.chain)
        return handshake(T.HT_CERTIFICATE, b"\x00" + _vec24(entries))

    def certificate_verify(self, transcript):
        content = b"\x20" * 64 + b"TLS 1.3, server CertificateVerify\x00" + \
            hashlib.sha256(transcript).digest()
        signature = self.pki.server_key.sign(content, ec.ECDSA(hashes.SHA256()))
        return handshake(T.HT_CERTIFICATE_VERIFY, _u16(T.SIG_ECDSA_SECP256R1_SHA256)
                         + _vec16(signature))

    def finished(self, transcript):
        return handshake(T.HT_FINISHED, K.finished_mac(self.prims, self.s_hs,
                                                       hashlib.sha256(transcript).digest()))

    def flight(self):
        """The server's flight after ServerHello, each message in order, transcript kept."""
        messages = [self.encrypted_extensions()]
        if self.psk is None:
            if self.request_client_cert:
                messages.append(self.certificate_request())
            messages.append(self.certificate())
        for message in messages:
            self.transcript += message
        if self.psk is None:
            cv = self.certificate_verify(self.transcript)
            self.transcript += cv
            messages.append(cv)
        fin = self.finished(self.transcript)
        self.transcript += fin
        messages.append(fin)
        th = hashlib.sha256(self.transcript).digest()
        self.c_ap = K.derive_secret(self.prims, self.master, b"c ap traffic", th)
        self.s_ap = K.derive_secret(self.prims, self.master, b"s ap traffic", th)
        return messages

    def plain(self, payload, content_type=T.CT_HANDSHAKE):
        return bytes((content_type,)) + b"\x03\x03" + _vec16(payload)

    def protect(self, payload, content_type=T.CT_HANDSHAKE, fragment=16384):
        """Records of `payload` under the current write key, `fragment` bytes each."""
        out = b""
        for i in range(0, len(payload), fragment):
            out += self.write.seal(content_type, payload[i:i + fragment])
        return out

    def client_flight(self, data):
        """Decrypt and check the client's Certificate / CertificateVerify / Finished;
        switch to the application keys.  Returns the handshake message types seen."""
        plain = b""
        for content_type, header, body in parse_records(data):
            if content_type == T.CT_CHANGE_CIPHER_SPEC:
                continue
            inner = self.read.open(header, body).rstrip(b"\x00")
            if inner[-1] != T.CT_HANDSHAKE:
                raise AssertionError("client sent content type %d" % inner[-1])
            plain += inner[:-1]
        seen = []
        transcript = self.transcript
        while plain:
            length = int.from_bytes(plain[1:4], "big")
            message, plain = plain[:4 + length], plain[4 + length:]
            seen.append(message[0])
            if message[0] == T.HT_CERTIFICATE:
                entries = T._Reader(message[5:]).vec24()
                self.client_certificate = T._Reader(entries).vec24() if entries else None
            elif message[0] == T.HT_CERTIFICATE_VERIFY:
                content = b"\x20" * 64 + b"TLS 1.3, client CertificateVerify\x00" + \
                    hashlib.sha256(transcript).digest()
                cert = x509.load_der_x509_certificate(self.client_certificate)
                signature = T._Reader(message[6:]).vec16()
                cert.public_key().verify(signature, content, ec.ECDSA(hashes.SHA256()))
            elif message[0] == T.HT_FINISHED:
                expected = K.finished_mac(self.prims, self.c_hs,
                                          hashlib.sha256(transcript).digest())
                if message[4:] != expected:
                    raise AssertionError("client Finished does not verify")
            transcript += message
        self.res_master = K.derive_secret(self.prims, self.master, b"res master",
                                          hashlib.sha256(transcript).digest())
        self.write = T.RecordProtection(self.prims, self.s_ap)
        self.read = T.RecordProtection(self.prims, self.c_ap)
        return seen

    def new_session_ticket(self, ticket=b"ticket-1", nonce=b"\x00", lifetime=3600):
        psk = K.hkdf_expand_label(self.prims, self.res_master, b"resumption", nonce, 32)
        self.session_ticket_psks[ticket] = psk
        body = lifetime.to_bytes(4, "big") + b"\x00\x00\x00\x07" + _vec8(nonce) + \
            _vec16(ticket) + _vec16(b"")
        return self.protect(handshake(T.HT_NEW_SESSION_TICKET, body))

    def read_application(self, data):
        """Decrypt client records: [(content_type, content)]."""
        out = []
        for _t, header, body in parse_records(data):
            inner = self.read.open(header, body).rstrip(b"\x00")
            out.append((inner[-1], inner[:-1]))
        return out


def full_handshake(client, server):
    """Drive client and server through a full handshake.  Returns the client's events."""
    first = client.start()
    events = client.receive(server.server_hello(first))
    flight = b"".join(server.flight())
    events += client.receive(server.protect(flight))
    server.client_flight(client.data_to_send())
    return events
