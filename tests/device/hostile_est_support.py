"""A hostile EST server for the device agent's tests (no tests in this module).

`HostileEst` is the real EST application (fleetid.cloud.http.est_app over the fleet's
EstService, its real issuing CA and registry) served over TLS on 127.0.0.1 with the
cloud's server certificate, behind one aiohttp middleware that plays a compromised EST
front-end: for simpleenroll / simplereenroll it lets the real CA issue, then replaces the
answer by the one `mode` names (FORGERIES below), every time or for the next `remaining`
answers.  The forged certificates are derived from the honest one the real CA issued:
re-signed by the real issuing CA through the line's HSM (cloud.pki.signing), by the fleet
root's HSM key, or by a look-alike CA key with the real CA's name (cloud.pki.profiles
builders); byte-level variants (tampered, truncated, several, empty) start from the real
answer's bytes.  The real agent talks to it through its CPython network adapter
(device/host/agent_net.HostNetwork), the verifier stays the real one.
"""

import asyncio
import base64
import datetime
import os

from aiohttp import web
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetid.cloud.est import messages
from fleetid.cloud.http.est_app import make_est_app
from fleetid.cloud.http.metrics import Metrics
from fleetid.cloud.http.tls import peer_certificate, server_ssl_context
from fleetid.cloud.pki import profiles
from fleetid.cloud.pki.signing import sign_certificate
from fleetid.device.host.agent_net import HostNetwork

DER = serialization.Encoding.DER
_ENROL_OPS = (messages.OP_SIMPLEENROLL, messages.OP_SIMPLEREENROLL)


def _now():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


class Forger:
    """Makes the forged variants of an honest certificate with the line's real PKI."""

    def __init__(self, cloud):
        self.cloud = cloud
        line = cloud.line
        self.line = line
        # The line's device serials, read once here (the server thread must not open a
        # chip the agent under test is using).
        self.serials = []
        for index in range(len(cloud.chips)):
            _record, identity = cloud.device(cloud.session(index))
            self.serials.append(
                identity.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        self.lookalike_key = ec.generate_private_key(ec.SECP256R1())
        self.lookalike_root_key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        # A CA with the real issuing CA's name, "under" the real root's name, made by the
        # project's CA builder; its key and the key that signs it are not the fleet's.
        builder = profiles.issuing_ca_builder(
            line.ca_cert.subject, self.lookalike_key.public_key(), line.root_cert,
            now - datetime.timedelta(days=1), now + datetime.timedelta(days=3650))
        self.lookalike_ca = builder.sign(self.lookalike_root_key, hashes.SHA256())
        # A real CA the fleet root certified (through the line's HSM) that the cloud does
        # not configure (another product line's, a retired one): the device can chain its
        # certificates to the root, the verifier's TLS does not accept them.
        self.unconfigured_key = ec.generate_private_key(ec.SECP256R1())
        builder = profiles.issuing_ca_builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetid retired issuing CA")]),
            self.unconfigured_key.public_key(), line.root_cert,
            now - datetime.timedelta(days=1), now + datetime.timedelta(days=3650))
        self.unconfigured_ca = sign_certificate(line.hsm, line.labels["root"], builder,
                                                line.root_cert.public_key())

    def rebuild(self, honest, signer="ca", subject=None, public_key=None, not_before=None,
                not_after=None, drop=(), replace=None, add=()):
        """A copy of `honest` with the given changes, fresh serial, signed by `signer`:
        "ca" (the real issuing CA's HSM key), "root" (the fleet root's HSM key, issuer
        name the root's), "lookalike" (the look-alike CA key, the real CA's name) or
        "unconfigured" (the root-certified CA the cloud does not configure)."""
        replace = replace or {}
        issuer = {"root": self.line.root_cert.subject,
                  "unconfigured": self.unconfigured_ca.subject}.get(signer, honest.issuer)
        builder = (x509.CertificateBuilder()
                   .subject_name(subject or honest.subject)
                   .issuer_name(issuer)
                   .public_key(public_key or honest.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or honest.not_valid_before_utc)
                   .not_valid_after(not_after or honest.not_valid_after_utc))
        for extension in honest.extensions:
            kind = type(extension.value)
            if kind in drop:
                continue
            if kind in replace:
                value, critical = replace[kind]
                builder = builder.add_extension(value, critical)
                continue
            builder = builder.add_extension(extension.value, extension.critical)
        for value, critical in add:
            builder = builder.add_extension(value, critical)
        if signer == "lookalike":
            return builder.sign(self.lookalike_key, hashes.SHA256())
        if signer == "unconfigured":
            return builder.sign(self.unconfigured_key, hashes.SHA256())
        label = "root" if signer == "root" else "ca"
        issuer_cert = self.line.root_cert if signer == "root" else self.line.ca_cert
        return sign_certificate(self.line.hsm, self.line.labels[label], builder,
                                issuer_cert.public_key())

    def other_device(self, honest):
        """Another device's serial on this line (a real one, from the registry)."""
        mine = honest.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return [serial for serial in self.serials if serial != mine][0]


def _name(common_name, serial_number):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number)])


def _pkcs7(certs):
    return messages.certs_only(certs)


def _empty_pkcs7():
    # A certs-only SignedData with no certificate (RFC 5652 5.1), made with asn1crypto:
    # cryptography refuses to serialize an empty list.
    signed = cms.SignedData({"version": "v1", "digest_algorithms": [],
                             "encap_content_info": {"content_type": "data"},
                             "certificates": [], "signer_infos": []})
    return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


def _flip_in_serial(cert):
    data = bytearray(cert.public_bytes(DER))
    serial = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 7) // 8, "big")
    at = bytes(data).index(serial) + len(serial) - 1
    data[at] ^= 0x01
    return bytes(data)


def _oversized(forger, honest):
    blob = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"),
                                      b"\x04\x82\x0b\xb8" + b"\xa5" * 3000)
    return forger.rebuild(honest, add=[(blob, False)])


# mode: (what the answer is, the refusal expected: a certcheck reason, "ack" (stored,
# refused by the verifier at the acknowledgement), "ack_tls" (stored, refused by the
# verifier's TLS handshake while the old credential's succeeds) or "transient" (no
# certificate: the
# rotation stays at BEGIN and resumes)).  Each entry's `make(forger, honest, peer, now)`
# returns (status, content type, body bytes before base64) or a certificate.
def _forgeries():
    days = datetime.timedelta(days=1)
    table = {}

    def mode(name, expected):
        def register(fn):
            table[name] = (fn, expected)
            return fn
        return register

    @mode("lookalike_ca_key", "signature")
    def _(f, honest, peer, now):
        return f.rebuild(honest, signer="lookalike")

    @mode("lookalike_ca_in_cacerts", "issuer")
    def _(f, honest, peer, now):
        return f.rebuild(honest, signer="lookalike")

    @mode("expired", "expired")
    def _(f, honest, peer, now):
        return f.rebuild(honest, not_before=now - 40 * days, not_after=now - days)

    @mode("not_yet_valid", "not_yet_valid")
    def _(f, honest, peer, now):
        return f.rebuild(honest, not_before=now + days, not_after=now + 30 * days)

    @mode("real_ca_unknown_to_registry", "ack")
    def _(f, honest, peer, now):
        return f.rebuild(honest)

    @mode("signed_by_the_fleet_root", "issuer")
    def _(f, honest, peer, now):
        return f.rebuild(honest, signer="root")

    @mode("root_certified_ca_unknown_to_the_verifier", "ack_tls")
    def _(f, honest, peer, now):
        return f.rebuild(honest, signer="unconfigured")

    @mode("another_key", "key")
    def _(f, honest, peer, now):
        return f.rebuild(honest, public_key=ec.generate_private_key(ec.SECP256R1())
                         .public_key())

    @mode("replayed_current_certificate", "key")
    def _(f, honest, peer, now):
        return x509.load_der_x509_certificate(peer)

    @mode("the_cloud_server_certificate", "eku")
    def _(f, honest, peer, now):
        with open(f.cloud.server_cert, "rb") as fh:
            return x509.load_pem_x509_certificate(fh.read())

    @mode("server_auth_eku", "eku")
    def _(f, honest, peer, now):
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
        return f.rebuild(honest, replace={x509.ExtendedKeyUsage: (eku, False)})

    @mode("no_eku", "eku")
    def _(f, honest, peer, now):
        return f.rebuild(honest, drop=(x509.ExtendedKeyUsage,))

    @mode("a_ca_certificate", "usage")
    def _(f, honest, peer, now):
        basic = x509.BasicConstraints(ca=True, path_length=0)
        return f.rebuild(honest, replace={x509.BasicConstraints: (basic, True)})

    @mode("another_device_cn_and_serial", "identity")
    def _(f, honest, peer, now):
        other = f.other_device(honest)
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
            profiles.device_urn(other))])
        return f.rebuild(honest, subject=_name(other, other),
                         replace={x509.SubjectAlternativeName: (san, False)})

    @mode("another_device_serial_number", "identity")
    def _(f, honest, peer, now):
        mine = honest.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return f.rebuild(honest, subject=_name(mine, f.other_device(honest)))

    @mode("another_device_uri_san", "identity")
    def _(f, honest, peer, now):
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
            profiles.device_urn(f.other_device(honest)))])
        return f.rebuild(honest, replace={x509.SubjectAlternativeName: (san, False)})

    @mode("unknown_critical_extension", "unsupported")
    def _(f, honest, peer, now):
        ext = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.2"),
                                         b"\x05\x00")
        return f.rebuild(honest, add=[(ext, True)])

    @mode("p384_key", "malformed")
    def _(f, honest, peer, now):
        return f.rebuild(honest, public_key=ec.generate_private_key(ec.SECP384R1())
                         .public_key())

    @mode("tampered_serial", "signature")
    def _(f, honest, peer, now):
        return 200, messages.CT_PKCS7_MIME, None, _flip_in_serial(honest)

    @mode("oversized", "too_large")
    def _(f, honest, peer, now):
        return _oversized(f, honest)

    @mode("garbage_der", "malformed")
    def _(f, honest, peer, now):
        return 200, messages.CT_PKCS7_MIME, os.urandom(700), None

    @mode("empty_pkcs7", "malformed")
    def _(f, honest, peer, now):
        return 200, messages.CT_PKCS7_MIME, _empty_pkcs7(), None

    @mode("several_certificates", "malformed")
    def _(f, honest, peer, now):
        return 200, messages.CT_PKCS7_MIME, _pkcs7([honest, f.line.ca_cert]), None

    @mode("truncated", "malformed")
    def _(f, honest, peer, now):
        whole = _pkcs7([honest])
        return 200, messages.CT_PKCS7_MIME, whole[:len(whole) // 2], None

    @mode("wrong_content_type", "malformed")
    def _(f, honest, peer, now):
        return 200, "text/html", _pkcs7([honest]), None

    @mode("not_base64", "malformed")
    def _(f, honest, peer, now):
        return 200, messages.CT_PKCS7_MIME, "<html>not base64</html>", None

    @mode("status_500", "transient")
    def _(f, honest, peer, now):
        return 500, "text/plain", "internal_error: try later", None

    @mode("status_403_refusal", "transient")
    def _(f, honest, peer, now):
        return 403, "text/plain", "policy: refused by the front-end", None

    return table


FORGERIES = _forgeries()


class HostileEst:
    """The real EST app behind a forging middleware, on its own TLS port (module doc).

    Attributes: mode (a FORGERIES key, or None: honest), remaining (None: every answer;
    n: the next n answers, then honest), port, forged (answers replaced so far).
    """

    def __init__(self, cloud):
        self.cloud = cloud
        self.forger = Forger(cloud)
        self.mode = None
        self.remaining = None
        self.forged = 0
        self._runner = None
        self.port = None

        @web.middleware
        async def hostile(request, handler):
            op = request.path.rsplit("/", 1)[-1]
            if op == messages.OP_CACERTS and self.mode == "lookalike_ca_in_cacerts":
                return self._answer(200, messages.CT_PKCS7_MIME,
                                    _pkcs7([self.forger.lookalike_ca,
                                            self.cloud.line.root_cert]))
            if op == messages.OP_CACERTS and \
                    self.mode == "root_certified_ca_unknown_to_the_verifier":
                return self._answer(200, messages.CT_PKCS7_MIME,
                                    _pkcs7([self.cloud.line.ca_cert,
                                            self.forger.unconfigured_ca,
                                            self.cloud.line.root_cert]))
            response = await handler(request)
            if op not in _ENROL_OPS or self.mode is None or response.status != 200:
                return response
            if self.remaining is not None:
                if self.remaining <= 0:
                    return response
                self.remaining -= 1
            self.forged += 1
            honest = messages_certs(response.body)[0]
            return await asyncio.get_running_loop().run_in_executor(
                None, self._forge, honest, peer_certificate(request))

        self.app = make_est_app(cloud.est, Metrics())
        self.app.middlewares.insert(0, hostile)

    def _forge(self, honest, peer):
        make, _expected = FORGERIES[self.mode]
        made = make(self.forger, honest, peer, _now())
        if isinstance(made, x509.Certificate):
            return self._answer(200, messages.CT_PKCS7_MIME + "; smime-type=certs-only",
                                _pkcs7([made]))
        status, content_type, body, raw_cert = made
        if raw_cert is not None:  # one certificate's bytes, not re-encoded by cryptography
            from asn1crypto import x509 as asn1_x509

            signed = cms.SignedData({
                "version": "v1", "digest_algorithms": [],
                "encap_content_info": {"content_type": "data"},
                "certificates": [asn1_x509.Certificate.load(raw_cert)], "signer_infos": []})
            body = cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()
        if isinstance(body, str):
            return web.Response(status=status, text=body, content_type=content_type)
        return self._answer(status, content_type, body)

    @staticmethod
    def _answer(status, content_type, der_bytes):
        response = web.Response(status=status, body=base64.encodebytes(der_bytes),
                                headers={"Content-Transfer-Encoding": "base64"})
        response.headers["Content-Type"] = content_type
        return response

    def start(self):
        async def go():
            runner = web.AppRunner(self.app, access_log=None)
            await runner.setup()
            context = server_ssl_context(self.cloud.server_cert, self.cloud.server_key,
                                         self.cloud.trust.ca_bundle_pem(), False)
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
            await site.start()
            return runner, runner.addresses[0][1]

        self._runner, self.port = asyncio.run_coroutine_threadsafe(
            go(), self.cloud.loop).result(30)
        return self

    def stop(self):
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(),
                                             self.cloud.loop).result(30)
            self._runner = None

    def net(self, se, label):
        """The agent's CPython network: the real verifier, this EST server."""
        return HostNetwork(se, "https://127.0.0.1:%d" % self.cloud.ports["verifier"],
                           "https://127.0.0.1:%d" % self.port, [self.cloud.root_der()],
                           label=label, connect_timeout=5, io_timeout=10)


def messages_certs(body):
    """The certificates of an EST certs-only answer body (base64 PKCS#7)."""
    from cryptography.hazmat.primitives.serialization import pkcs7

    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(bytes(body).split())))
