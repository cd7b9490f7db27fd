# The TLS server's certificate chain, checked to the fleet's trust anchors.  Portable:
# CPython and MicroPython (certificates parsed by common/x509.py, no X.509 library).
#
# Policy (RFC 5280 6.1 trimmed to what a fleet PKI issues, which is all a device needs):
#   * every certificate: ecdsa-with-SHA256 signature, P-256 key, validity covering `now`
#     (the injected wall clock, epoch seconds), no unknown critical extension;
#   * path: leaf, then the certificates the server sent, to a trust anchor whose subject
#     equals the issuer (binary comparison of the DER Names, RFC 5280 7.1's first option);
#     each signature verified with the issuer's point through the injected `verify`
#     (the SE's VERIFY on a device, so no ECDSA code is needed on the board);
#     at most MAX_DEPTH certificates below the anchor;
#   * issuers: basicConstraints cA TRUE, keyUsage keyCertSign when keyUsage is present;
#   * leaf: extendedKeyUsage present and holding id-kp-serverAuth; keyUsage (if present)
#     with digitalSignature; the host name (dNSName, one left-most "*" label allowed) or
#     IP address (iPAddress) in subjectAltName -- the CN is not consulted (RFC 6125 6.4.4);
#   * revocation: a callable the agent passes (its CRL or compact-set cache), called with
#     the path below the anchor; whatever FleetidError it raises refuses the chain.
#
# Every refusal is TlsCertificateError(check, alert): the check that failed and the alert
# the client sends (RFC 8446 6.2).  `verify_server_chain` returns the per-check report
# that `fleetid agent probe-tls` prints.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common import der, x509
from fleetid.common.errors import (
    ApduError,
    DerError,
    FleetidError,
    TlsCertificateError,
    TlsError,
)

MAX_DEPTH = const(4)

# RFC 8446 6.2 alert numbers used here.
ALERT_BAD_CERTIFICATE = const(42)
ALERT_UNSUPPORTED_CERTIFICATE = const(43)
ALERT_CERTIFICATE_REVOKED = const(44)
ALERT_CERTIFICATE_EXPIRED = const(45)
ALERT_UNKNOWN_CA = const(48)
ALERT_INTERNAL_ERROR = const(80)

CHECKS = ("parse", "algorithm", "path", "signature", "validity", "basic_constraints",
          "key_usage", "eku", "name", "revocation")


def _fail(check, alert, detail=""):
    return TlsCertificateError(check, alert, detail)


def parse_certificate(cert_der):
    """Parse a DER certificate for the chain check (common/x509.py).

    Returns: x509.Certificate.
    Raises: TlsCertificateError("parse" or "algorithm") on anything else than a strict DER
        X.509 v3 certificate with a P-256 key, signed with ecdsa-with-SHA256, or one with
        an unknown critical extension.
    """
    try:
        cert = x509.parse_certificate(cert_der)
    except DerError as exc:
        if exc.reason in (der.REASON_ALGORITHM, der.REASON_POINT):
            raise _fail("algorithm", ALERT_UNSUPPORTED_CERTIFICATE, exc.reason) from None
        raise _fail("parse", ALERT_BAD_CERTIFICATE, exc.reason) from None
    if cert.unknown_critical is not None:
        raise _fail("parse", ALERT_UNSUPPORTED_CERTIFICATE,
                    "unknown critical extension " + cert.unknown_critical)
    return cert


def _parse_ipv4(text):
    parts = text.split(".")
    if len(parts) != 4:
        return None
    out = bytearray()
    for part in parts:
        if not part.isdigit() or len(part) > 3 or int(part) > 255:
            return None
        out.append(int(part))
    return bytes(out)


def _parse_ipv6(text):
    if ":" not in text:
        return None
    if "::" in text:
        head, _, tail = text.partition("::")
        head = head.split(":") if head else []
        tail = tail.split(":") if tail else []
        missing = 8 - len(head) - len(tail)
        if missing < 1:
            return None
        groups = head + ["0"] * missing + tail
    else:
        groups = text.split(":")
    if len(groups) != 8:
        return None
    out = bytearray()
    for group in groups:
        if not 1 <= len(group) <= 4:
            return None
        try:
            value = int(group, 16)
        except ValueError:
            return None
        out.append(value >> 8)
        out.append(value & 0xFF)
    return bytes(out)


def parse_ip_address(text):
    """The bytes of an IPv4 (4) or IPv6 (16) literal, or None for a host name."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return _parse_ipv4(text) or _parse_ipv6(text)


def _dns_matches(pattern, host):
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern == host:
        return True
    # RFC 6125 6.4.3: a wildcard only as the whole left-most label, matching one label.
    if pattern.startswith("*.") and "*" not in pattern[2:] and pattern.count(".") >= 2:
        dot = host.find(".")
        return dot > 0 and host[dot + 1:] == pattern[2:]
    return False


def name_matches(cert, server_name):
    """True when `server_name` (host name or IP literal) is in the certificate's SAN."""
    address = parse_ip_address(server_name)
    if address is not None:
        return address in cert.ip_addresses
    for pattern in cert.dns_names:
        if _dns_matches(pattern, server_name):
            return True
    return False


def _check_signature(verify, sha256, cert, issuer):
    try:
        x509.verify_signature(cert, issuer.point, verify, sha256)
    except (ApduError, ValueError):  # VerificationFailed, or WrongData for bad DER
        raise _fail("signature", ALERT_BAD_CERTIFICATE, "serial %d" % cert.serial) from None
    except TlsError:
        raise
    except FleetidError as exc:
        # The SE could not run VERIFY (link down, refused): not the server's fault, but
        # the chain is not verified either.
        raise TlsError("se", ALERT_INTERNAL_ERROR, type(exc).__name__) from None


def _build_path(sent, anchors, verify, sha256):
    # Leaf first, each issuer found by subject == issuer and its signature verified, up
    # to an anchor.  Returns (path, anchor).
    path = [sent[0]]
    pool = sent[1:]
    while True:
        current = path[-1]
        anchor = x509.find_issuer(current, anchors)
        if anchor is not None:
            _check_signature(verify, sha256, current, anchor)
            return path, anchor
        issuer = x509.find_issuer(current, pool)
        if issuer is None:
            raise _fail("path", ALERT_UNKNOWN_CA, "no path to a trust anchor")
        if len(path) >= MAX_DEPTH:
            raise _fail("path", ALERT_BAD_CERTIFICATE, "path too long")
        _check_signature(verify, sha256, current, issuer)
        pool.remove(issuer)
        path.append(issuer)


def _check_profile(path, anchor, now, report):
    # Validity of every certificate, CA flags and key usages (RFC 5280 6.1.3, 6.1.4).
    for cert in path + [anchor]:
        status = x509.time_status(cert, now)
        if status == x509.NOT_YET_VALID:
            raise _fail("validity", ALERT_BAD_CERTIFICATE, "not yet valid: serial %d" % cert.serial)
        if status is not None:
            raise _fail("validity", ALERT_CERTIFICATE_EXPIRED, "expired: serial %d" % cert.serial)
    report.append(("validity", "every certificate valid now"))
    for cert in path[1:] + [anchor]:
        if cert.is_ca is not True:
            raise _fail("basic_constraints", ALERT_BAD_CERTIFICATE, "issuer is not a CA")
        if cert.key_usage is not None and not cert.key_usage & x509.KU_KEY_CERT_SIGN:
            raise _fail("key_usage", ALERT_BAD_CERTIFICATE, "issuer without keyCertSign")
    leaf = path[0]
    if leaf.is_ca:
        raise _fail("basic_constraints", ALERT_BAD_CERTIFICATE, "leaf is a CA")
    report.append(("basic_constraints", "issuers are CAs, the leaf is not"))
    if leaf.key_usage is not None and not leaf.key_usage & x509.KU_DIGITAL_SIGNATURE:
        raise _fail("key_usage", ALERT_BAD_CERTIFICATE, "leaf without digitalSignature")
    report.append(("key_usage", "digitalSignature" if leaf.key_usage is not None else "absent"))
    if leaf.eku is None or x509.OID_SERVER_AUTH not in leaf.eku:
        raise _fail("eku", ALERT_UNSUPPORTED_CERTIFICATE, "no serverAuth")
    report.append(("eku", "serverAuth"))


def _check_revocation(path, revocation, report):
    if revocation is None:
        report.append(("revocation", "no cache"))
        return
    try:
        revocation(path)
    except TlsError:
        raise
    except FleetidError as exc:
        raise _fail("revocation", ALERT_CERTIFICATE_REVOKED, type(exc).__name__) from None
    report.append(("revocation", "not revoked"))


def verify_server_chain(chain_der, anchors_der, server_name, now, verify, sha256,
                        revocation=None):
    """Check the server's chain to one of the trust anchors.

    Params: chain_der: list of DER certificates as the server sent them, leaf first.
        anchors_der: list of DER trust-anchor certificates (the fleet root from the SE).
        server_name: the host name or IP literal the client connected to (None: no name
            check -- only for probes that say so).  now: epoch seconds.
        verify: `verify(point65, digest32, signature_der)`, raising VerificationFailed
            when the signature does not verify (SeSession.verify with point=, or
            common.host.tls13_host.ecdsa_verify).  sha256: one-shot digest function.
        revocation: optional `revocation(path)`, path = list of x509.Certificate below
            the anchor, leaf first; raises a FleetidError when one is revoked (or the
            status cannot be established under the agent's policy).
    Returns: (path, report): the x509.Certificates leaf first, and a list of
        (check, verdict text) for every check passed.
    Raises: TlsCertificateError(check, alert); TlsError("se") if the SE cannot verify.
    """
    if not chain_der:
        raise _fail("path", ALERT_BAD_CERTIFICATE, "empty chain")
    report = []
    sent = [parse_certificate(c) for c in chain_der]
    anchors = [parse_certificate(c) for c in anchors_der]
    report.append(("parse", "%d certificate(s), P-256, ecdsa-with-SHA256" % len(sent)))
    path, anchor = _build_path(sent, anchors, verify, sha256)
    report.append(("path", "%d certificate(s) to the anchor" % len(path)))
    report.append(("signature", "%d signature(s) verified" % len(path)))
    _check_profile(path, anchor, now, report)
    if server_name is not None:
        if not name_matches(path[0], server_name):
            raise _fail("name", ALERT_BAD_CERTIFICATE, "not in subjectAltName")
        report.append(("name", server_name + " in subjectAltName"))
    else:
        report.append(("name", "not checked"))
    _check_revocation(path, revocation, report)
    return path, report
