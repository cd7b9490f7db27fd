"""EST message formats (RFC 7030 with RFC 8951's clarifications), sans I/O.

Bodies:
    request  simpleenroll / simplereenroll: base64 of a DER PKCS#10 CertificationRequest,
             Content-Type application/pkcs10 (RFC 7030 4.2.1).  RFC 8951 3: the
             Content-Transfer-Encoding header is ignored and base64 is accepted with or
             without line breaks (any ASCII whitespace is dropped before decoding).
    response cacerts / enroll: base64 of a DER CMS SignedData "certs-only" message
             (RFC 7030 4.1.3 / 4.2.3, RFC 5751 3.2.2), Content-Type
             application/pkcs7-mime (enroll responses add smime-type=certs-only).
    csrattrs base64 of DER CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID
             (RFC 7030 4.5.2), Content-Type application/csrattrs.
"""

import base64
import binascii
import re

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from fleetid.cloud.verifier import errors
from fleetid.cloud.verifier.errors import RequestRefused
from fleetid.common import der
from fleetid.common.oids import (
    OID_ATTR_EVIDENCE,
    OID_EC_PUBLIC_KEY,
    OID_ECDSA_WITH_SHA256,
    OID_PRIME256V1,
)

# RFC 7030 3.2.2 operation path segments.
WELL_KNOWN = "/.well-known/est"
OP_CACERTS = "cacerts"
OP_SIMPLEENROLL = "simpleenroll"
OP_SIMPLEREENROLL = "simplereenroll"
OP_CSRATTRS = "csrattrs"
# fleetid addition: a fresh single-use attestation nonce for the label's CA.
OP_NONCE = "nonce"

CT_PKCS10 = "application/pkcs10"  # RFC 7030 4.2.1
CT_PKCS7_MIME = "application/pkcs7-mime"  # RFC 7030 4.1.3, 4.2.3
CT_CSRATTRS = "application/csrattrs"  # RFC 7030 4.5.2
CT_NONCE = "application/octet-stream"
SMIME_CERTS_ONLY = "certs-only"  # RFC 5751 3.2.2

# Labels are one path segment (RFC 7030 3.2.2: "arbitrary label"); ours are CA scopes.
LABEL_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_WHITESPACE = re.compile(rb"[ \t\r\n\f\v]+")


def decode_base64_body(body):
    """DER bytes from a base64 request body (line breaks and other whitespace allowed).

    Raises: RequestRefused(bad_base64) for anything else (bad alphabet, padding, empty).
    """
    compact = _WHITESPACE.sub(b"", bytes(body))
    if not compact:
        raise RequestRefused(errors.BAD_BASE64, "empty body")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise RequestRefused(errors.BAD_BASE64, "body is not base64") from None


def encode_base64(data):
    """base64 with CRLF line breaks every 64 characters (RFC 7030 examples; RFC 8951
    clients accept either form)."""
    text = base64.b64encode(bytes(data))
    return b"".join(text[i:i + 64] + b"\r\n" for i in range(0, len(text), 64))


def certs_only(certificates):
    """DER CMS SignedData certs-only (degenerate, no signers) of x509 certificates."""
    return pkcs7.serialize_certificates(list(certificates), serialization.Encoding.DER)


def csr_attributes():
    """DER CsrAttrs telling clients what a fleetid CSR must be (RFC 7030 4.5.2):
    ecdsa-with-SHA256, a P-256 key (id-ecPublicKey attribute with the curve), and the
    evidence attribute carrying the SE attestation bundle."""
    return der.encode_sequence([
        der.encode_oid(OID_ECDSA_WITH_SHA256),
        # Attribute { id-ecPublicKey, SET { prime256v1 } }
        der.encode_sequence([der.encode_oid(OID_EC_PUBLIC_KEY),
                             der.encode_set([der.encode_oid(OID_PRIME256V1)])]),
        der.encode_oid(OID_ATTR_EVIDENCE),
    ])
