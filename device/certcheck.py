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
# Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
# TBSCertificate ::= SEQUENCE { [0] EXPLICIT version (v3 = 2), serialNumber, signature,
#     issuer Name, validity, subject Name, subjectPublicKeyInfo,
#     [1] issuerUniqueID OPTIONAL, [2] subjectUniqueID OPTIONAL, [3] EXPLICIT extensions }
# Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }

import hashlib

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common import asn1time, der
from fleetid.common.errors import DerError, FleetidError, VerificationFailed, WrongData

_DATA_TRUST_FLEET_ROOT = const(0x0111)  # se_consts.DATA_TRUST_FLEET_ROOT
_LE_LONG = const(65536)
CERT_MAX = const(2048)  # se_consts.CERT_MAX: what PUT CERT stores
ROOT_MAX = const(8192)
MAX_DEPTH = const(3)  # CAs between the fleet root and a device certificate
MAX_CANDIDATES = const(16)  # cacerts entries looked at (each may cost an SE VERIFY)
DEFAULT_SKEW_S = const(300)  # the CA backdates notBefore by 5 minutes (profiles.py)
DEVICE_URI_PREFIX = "urn:fleetid:device:"

_OID_COMMON_NAME = "2.5.4.3"
_OID_SERIAL_NUMBER = "2.5.4.5"
_OID_BASIC_CONSTRAINTS = "2.5.29.19"
_OID_KEY_USAGE = "2.5.29.15"
_OID_EXT_KEY_USAGE = "2.5.29.37"
_OID_SUBJECT_ALT_NAME = "2.5.29.17"
_OID_CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"  # id-kp-clientAuth (RFC 5280 4.2.1.12)
# Non-critical extensions this module reads nothing from but knows: SKI, AKI, CRL DP,
# the fleet's attestation extension.  Unknown non-critical ones are ignored (4.2).
_TAG_URI = const(0x86)  # GeneralName uniformResourceIdentifier [6] IA5String
_KU_DIGITAL_SIGNATURE = const(0x80)  # bit 0 of the first octet
_KU_KEY_CERT_SIGN = const(0x04)  # bit 5

REASON_MALFORMED = "malformed"
REASON_TOO_LARGE = "too_large"
REASON_UNSUPPORTED = "unsupported"
REASON_USAGE = "usage"
REASON_EKU = "eku"
REASON_NOT_YET_VALID = "not_yet_valid"
REASON_EXPIRED = "expired"
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


class ParsedCertificate:
    """What the checks read.  data (the DER), tbs (start, end offsets of the signed part),
    signature (DER ECDSA-Sig-Value), serial (int), issuer / subject (DER Name bytes),
    not_before / not_after (int seconds), common_name / serial_number (str or None),
    point (65 bytes), ca (bool), path_len (int or None), key_usage (first octet or None),
    eku (list of dotted OIDs, or None when absent), uris (list of str)."""

    def __init__(self):
        self.data = b""
        self.tbs = (0, 0)
        self.signature = b""
        self.serial = 0
        self.issuer = b""
        self.subject = b""
        self.not_before = 0
        self.not_after = 0
        self.common_name = None
        self.serial_number = None
        self.point = b""
        self.ca = False
        self.path_len = None
        self.key_usage = None
        self.eku = None
        self.uris = []
        self.depth = 0  # verified_cas(): CAs between this one and the root, itself included


def _text(tag, value):
    # DirectoryString as the fleet writes it: UTF8String or PrintableString.
    if tag == der.TAG_UTF8_STRING:
        return der.DerReader(der.encode_tlv(tag, value)).read_utf8_string()
    if tag == der.TAG_PRINTABLE_STRING:
        return der.DerReader(der.encode_tlv(tag, value)).read_printable_string()
    raise DerError(der.REASON_TAG, "name attribute not UTF8String / PrintableString")


def _name(raw, cert):
    # Name ::= SEQUENCE OF SET OF AttributeTypeAndValue; the CN and serialNumber, each at
    # most once (two CNs would make "the device's name" ambiguous).
    rdns = der.DerReader(raw).read_sequence()
    while not rdns.at_end():
        rdn = rdns.read_set()
        while not rdn.at_end():
            atv = rdn.read_sequence()
            oid = atv.read_oid()
            tag, value = atv.read_tlv()
            atv.finish()
            if oid == _OID_COMMON_NAME:
                if cert.common_name is not None:
                    raise DerError(der.REASON_VALUE, "two common names")
                cert.common_name = _text(tag, value)
            elif oid == _OID_SERIAL_NUMBER:
                if cert.serial_number is not None:
                    raise DerError(der.REASON_VALUE, "two serialNumbers")
                cert.serial_number = _text(tag, value)


def _extension(cert, oid, critical, value):
    reader = der.DerReader(value)
    if oid == _OID_BASIC_CONSTRAINTS:
        seq = reader.read_sequence()
        if seq.peek_tag() == der.TAG_BOOLEAN:
            cert.ca = seq.read_boolean()
        if seq.peek_tag() == der.TAG_INTEGER:
            cert.path_len = seq.read_small_integer(0, 255)
        seq.finish()
    elif oid == _OID_KEY_USAGE:
        bits, _unused = reader.read_bit_string_bits()
        cert.key_usage = bits[0] if bits else 0
    elif oid == _OID_EXT_KEY_USAGE:
        seq = reader.read_sequence()
        cert.eku = []
        while not seq.at_end():
            cert.eku.append(seq.read_oid())
    elif oid == _OID_SUBJECT_ALT_NAME:
        seq = reader.read_sequence()
        while not seq.at_end():
            tag, name = seq.read_tlv()
            if tag == _TAG_URI:
                cert.uris.append(der.DerReader(der.encode_tlv(der.TAG_IA5_STRING, name))
                                 .read_ia5_string())
    elif critical:
        raise CertificateRefused(REASON_UNSUPPORTED, "critical extension " + oid)
    else:
        return
    reader.finish()


def parse_certificate(data, max_size=CERT_MAX):
    """Parse a DER X.509 v3 certificate with a P-256 key, signed with ecdsa-with-SHA256.

    Params: data: bytes.  max_size: largest accepted encoding (bytes).
    Returns: ParsedCertificate.
    Raises: CertificateRefused (TOO_LARGE, MALFORMED, UNSUPPORTED).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CertificateRefused(REASON_MALFORMED, "not bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise CertificateRefused(REASON_TOO_LARGE, "%d bytes > %d" % (len(data), max_size))
    cert = ParsedCertificate()
    cert.data = data
    try:
        top = der.DerReader(data)
        outer = top.read_sequence()
        top.finish()
        start = outer.span()[0]
        tbs = outer.read_sequence()
        cert.tbs = (start, outer.span()[0])
        der.read_ecdsa_with_sha256_algorithm(outer)
        cert.signature = outer.read_bit_string()
        outer.finish()
        version = tbs.read_context(0)
        version.read_small_integer(2, 2)  # v3: extensions are what the checks read
        version.finish()
        cert.serial = tbs.read_integer()
        der.read_ecdsa_with_sha256_algorithm(tbs)
        cert.issuer = tbs.read_raw(der.TAG_SEQUENCE)
        validity = tbs.read_sequence()
        tag, contents = validity.read_tlv()
        cert.not_before = asn1time.parse_time(tag, contents)
        tag, contents = validity.read_tlv()
        cert.not_after = asn1time.parse_time(tag, contents)
        validity.finish()
        cert.subject = tbs.read_raw(der.TAG_SEQUENCE)
        _name(cert.subject, cert)
        cert.point = der.read_p256_spki(tbs)
        tbs.read_optional_context(1, False)
        tbs.read_optional_context(2, False)
        extensions = tbs.read_optional_context(3)
        tbs.finish()
        if extensions is not None:
            seen = []
            items = extensions.read_sequence()
            extensions.finish()
            while not items.at_end():
                ext = items.read_sequence()
                oid = ext.read_oid()
                critical = ext.read_boolean() if ext.peek_tag() == der.TAG_BOOLEAN else False
                value = ext.read_octet_string()
                ext.finish()
                if oid in seen:  # RFC 5280 4.2: at most one instance
                    raise DerError(der.REASON_VALUE, "extension %s twice" % oid)
                seen.append(oid)
                _extension(cert, oid, critical, value)
    except (DerError, ValueError, IndexError) as exc:
        raise CertificateRefused(REASON_MALFORMED, str(exc)) from None
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

    def _verify(self, cert, point):
        # SHA-256 of the signed bytes, VERIFY in the SE with the signer's point.
        start, end = cert.tbs
        digest = hashlib.sha256(cert.data[start:end]).digest()
        try:
            self.se.verify(digest, cert.signature, point=point)
        except VerificationFailed:
            raise CertificateRefused(REASON_SIGNATURE, "serial %x does not verify"
                                     % cert.serial) from None
        except (WrongData, ValueError):
            raise CertificateRefused(REASON_SIGNATURE, "malformed signature") from None

    def _validity(self, cert, now):
        if now + self.skew_s < cert.not_before:
            raise CertificateRefused(REASON_NOT_YET_VALID, "notBefore %d > now %d"
                                     % (cert.not_before, now))
        if now > cert.not_after:
            raise CertificateRefused(REASON_EXPIRED, "notAfter %d < now %d"
                                     % (cert.not_after, now))

    def verified_cas(self, candidates, now):
        """The CA certificates among `candidates` that chain to the fleet root.

        Params: candidates: list of DER certificates (EST cacerts; the first
            MAX_CANDIDATES are looked at).  now: int seconds.
        Returns: list of ParsedCertificate, each with `depth` (1 = signed by the root).
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
            if not cert.ca or (cert.key_usage is not None and
                               not cert.key_usage & _KU_KEY_CERT_SIGN):
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
            point: the new slot's 65-byte public point.  identity: ParsedCertificate of
            the device's identity certificate (slot 1).  now: int seconds (agent's clock).
        Returns: ParsedCertificate.
        Raises: CertificateRefused (reason: module header); link / SE errors.
        """
        cert = parse_certificate(data)
        if cert.ca:
            raise CertificateRefused(REASON_USAGE, "a CA certificate")
        if cert.key_usage is not None and not cert.key_usage & _KU_DIGITAL_SIGNATURE:
            raise CertificateRefused(REASON_USAGE, "no digitalSignature key usage")
        if cert.eku is None or _OID_CLIENT_AUTH not in cert.eku:
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
        signer = None
        for ca in cas:
            if ca.subject == cert.issuer:
                signer = ca
                break
        if signer is None:
            raise CertificateRefused(REASON_ISSUER, "no issuing CA under the fleet root "
                                     "has its issuer name")
        self._verify(cert, signer.point)
        return cert
