# Checks on a certificate the CA sends the device, made BEFORE the agent stores it (an
# unchecked certificate in a slot can leave the device unable to authenticate).  Portable:
# CPython and MicroPython.  No crypto of its own: every signature is verified by the SE's
# VERIFY command with the signer's public point (as device/crl_cache.py and
# device/fwkeys.py do), the fleet root being the SE's trust anchor DATA_TRUST_FLEET_ROOT.
#
#     checker = CertificateChecker(se)                     # root read from the SE
#     cas = checker.verified_cas(cacerts_der_list, now)    # EST /cacerts, checked
#     cert = checker.check_issued(cert_der, cas, point, identity, now)
#
# What check_issued() requires of an issued device certificate (RFC 5280 6.1, reduced to
# the fleet's one profile, cloud/pki/profiles.device_builder):
#
#   check                         refusal reason     RFC 5280
#   ----------------------------  -----------------  ------------------------------------
#   <= max_size bytes (the SE's   too_large          (SE PUT CERT limit, se_consts.CERT_MAX)
#   slot), strict DER, v3,
#   ecdsa-with-SHA256, P-256 key  malformed          4.1, RFC 5758 3.2, RFC 5480
#   no unknown critical extension unsupported        4.2 ("MUST reject")
#   not a CA (basicConstraints)   usage              4.2.1.9
#   keyUsage, if present, has     usage              4.2.1.3
#   digitalSignature
#   extKeyUsage has clientAuth    eku                4.2.1.12
#   notBefore <= now + skew       not_yet_valid      4.1.2.5 / 6.1.3 (a)(2)
#   now <= notAfter               expired
#   key = the new slot's point    key                (proof the CA certified OUR key)
#   subject CN, serialNumber and  identity           (the device's identity certificate,
#   URI SANs = the identity                           slot 1, names the device)
#   certificate's
#   issuer = a CA of `cas`, not   issuer             6.1.3 (a)(4); the fleet's root signs
#   the root itself                                     CAs only (the verifier's TLS refuses
#                                                       a device certificate it signed)
#   signature verifies under      signature          6.1.3 (a)(1)
#   that CA's key (SE VERIFY)
#
# verified_cas() keeps the candidates (EST cacerts, RFC 7030 4.1.3: "validated using the
# explicit TA") that are CAs (basicConstraints cA, keyCertSign when keyUsage is present),
# within their validity, and signed by the fleet root or by a CA already kept (at most
# MAX_DEPTH CAs below the root, pathLenConstraint honoured); the others are ignored, and
# so is everything after the first MAX_CANDIDATES (a hostile list costs bounded VERIFYs).
#
# Parsing (strict DER, v3, ecdsa-with-SHA256, P-256, the extensions) is common/x509.py's;
# this module is the agent's policy over it.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common import x509
from fleetid.common.errors import DerError, FleetidError, VerificationFailed, WrongData

_DATA_TRUST_FLEET_ROOT = const(0x0111)  # se_consts.DATA_TRUST_FLEET_ROOT
_LE_LONG = const(65536)
CERT_MAX = const(2048)  # se_consts.CERT_MAX: what PUT CERT stores
ROOT_MAX = const(8192)
MAX_DEPTH = const(3)  # CAs between the fleet root and a device certificate
MAX_CANDIDATES = const(16)  # cacerts entries looked at (each may cost an SE VERIFY)
DEFAULT_SKEW_S = const(300)  # the CA backdates notBefore by 5 minutes (profiles.py)
DEVICE_URI_PREFIX = "urn:fleetid:device:"

REASON_MALFORMED = "malformed"
REASON_TOO_LARGE = "too_large"
REASON_UNSUPPORTED = "unsupported"
REASON_USAGE = "usage"
REASON_EKU = "eku"
REASON_NOT_YET_VALID = x509.NOT_YET_VALID
REASON_EXPIRED = x509.EXPIRED
REASON_KEY = "key"
REASON_IDENTITY = "identity"
REASON_ISSUER = "issuer"
REASON_SIGNATURE = "signature"


class CertificateRefused(FleetidError):
    """A certificate from the CA failed a check; nothing was stored.  `reason` is one of
    the REASON_* strings (module header), `detail` a short text."""

    def __init__(self, reason, detail=""):
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail


def parse_certificate(data, max_size=CERT_MAX):
    """Parse a DER X.509 v3 certificate with a P-256 key, signed with ecdsa-with-SHA256.

    Params: data: bytes.  max_size: largest accepted encoding (bytes).
    Returns: x509.Certificate (common/x509.py).
    Raises: CertificateRefused (TOO_LARGE, MALFORMED, UNSUPPORTED).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CertificateRefused(REASON_MALFORMED, "not bytes")
    if len(data) > max_size:
        raise CertificateRefused(REASON_TOO_LARGE, "%d bytes > %d" % (len(data), max_size))
    try:
        cert = x509.parse_certificate(data)
    except DerError as exc:
        raise CertificateRefused(REASON_MALFORMED, str(exc)) from None
    if cert.unknown_critical is not None:
        raise CertificateRefused(REASON_UNSUPPORTED, "critical extension "
                                 + cert.unknown_critical)
    return cert


class CertificateChecker:
    """Checks certificates against the fleet root held in the SE (module header).

    Params: se: SeSession (get_data, verify).  root_der: the fleet root certificate (None:
        read DATA_TRUST_FLEET_ROOT from the SE).  skew_s: seconds a notBefore may lie in
        the future of the device's clock.
    Raises (constructor): CertificateRefused(MALFORMED) when the anchor is unusable;
        ReferenceNotFound when the SE holds none; link / SE errors.
    """

    def __init__(self, se, root_der=None, skew_s=DEFAULT_SKEW_S):
        if skew_s < 0:
            raise ValueError("skew_s must be >= 0")
        self.se = se
        if root_der is None:
            root_der = se.get_data(_DATA_TRUST_FLEET_ROOT, -1, _LE_LONG)
        self.root = parse_certificate(root_der, ROOT_MAX)
        self.skew_s = skew_s

    def _se_verify(self, point, digest, signature):
        self.se.verify(digest, signature, point=point)

    def _verify(self, cert, point):
        # SHA-256 of the signed bytes, VERIFY in the SE with the signer's point.
        try:
            x509.verify_signature(cert, point, self._se_verify)
        except VerificationFailed:
            raise CertificateRefused(REASON_SIGNATURE, "serial %x does not verify"
                                     % cert.serial) from None
        except (WrongData, ValueError):
            raise CertificateRefused(REASON_SIGNATURE, "malformed signature") from None

    def _validity(self, cert, now):
        reason = x509.time_status(cert, now, self.skew_s)
        if reason == REASON_NOT_YET_VALID:
            raise CertificateRefused(reason, "notBefore %d > now %d" % (cert.not_before, now))
        if reason is not None:
            raise CertificateRefused(reason, "notAfter %d < now %d" % (cert.not_after, now))

    def verified_cas(self, candidates, now):
        """The CA certificates among `candidates` that chain to the fleet root.

        Params: candidates: list of DER certificates (EST cacerts; the first
            MAX_CANDIDATES are looked at).  now: int seconds.
        Returns: list of x509.Certificate, each with `depth` (1 = signed by the root).
        Raises: link / SE errors only (a refused candidate is left out).
        """
        pending = []
        for data in candidates[:MAX_CANDIDATES]:
            try:
                cert = parse_certificate(data, ROOT_MAX)
            except CertificateRefused:
                continue
            if cert.data == self.root.data:
                continue
            if not cert.is_ca or (cert.key_usage is not None and
                                  not cert.key_usage & x509.KU_KEY_CERT_SIGN):
                continue
            try:
                self._validity(cert, now)
            except CertificateRefused:
                continue
            pending.append(cert)
        kept = []
        signers = [(self.root, 0)]
        for _round in range(MAX_DEPTH):
            found = []
            for cert in pending:
                for signer, depth in signers:
                    if cert.issuer != signer.subject:
                        continue
                    if depth and signer.path_len is not None and signer.path_len < 1:
                        continue
                    try:
                        self._verify(cert, signer.point)
                    except CertificateRefused:
                        continue
                    cert.depth = depth + 1
                    found.append(cert)
                    break
            if not found:
                break
            for cert in found:
                pending.remove(cert)
                kept.append(cert)
            signers = [(cert, cert.depth) for cert in found]
        return kept

    def check_issued(self, data, cas, point, identity, now):
        """Check a device certificate before it is stored (module header's table).

        Params: data: DER certificate from the CA.  cas: verified_cas()'s answer.
            point: the new slot's 65-byte public point.  identity: x509.Certificate of
            the device's identity certificate (slot 1).  now: int seconds (agent's clock).
        Returns: x509.Certificate.
        Raises: CertificateRefused (reason: module header); link / SE errors.
        """
        cert = parse_certificate(data)
        if cert.is_ca:
            raise CertificateRefused(REASON_USAGE, "a CA certificate")
        if cert.key_usage is not None and not cert.key_usage & x509.KU_DIGITAL_SIGNATURE:
            raise CertificateRefused(REASON_USAGE, "no digitalSignature key usage")
        if cert.eku is None or x509.OID_CLIENT_AUTH not in cert.eku:
            raise CertificateRefused(REASON_EKU, "no clientAuth extended key usage")
        self._validity(cert, now)
        if cert.point != bytes(point):
            raise CertificateRefused(REASON_KEY, "not the new slot's key")
        if cert.common_name is None or cert.common_name != identity.common_name:
            raise CertificateRefused(REASON_IDENTITY, "CN %r" % (cert.common_name,))
        if cert.serial_number != identity.serial_number:
            raise CertificateRefused(REASON_IDENTITY, "serialNumber %r"
                                     % (cert.serial_number,))
        wanted = identity.uris or [DEVICE_URI_PREFIX + identity.common_name]
        if sorted(cert.uris) != sorted(wanted):
            raise CertificateRefused(REASON_IDENTITY, "URI SAN %r" % (cert.uris,))
        signer = x509.find_issuer(cert, cas)
        if signer is None:
            raise CertificateRefused(REASON_ISSUER, "no issuing CA under the fleet root "
                                     "has its issuer name")
        self._verify(cert, signer.point)
        return cert
