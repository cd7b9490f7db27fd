"""The compact revocation set's signer as a device accepts it (CPython: `cryptography`).

A set is verified in the SE against the signer's public point; the signer's certificate
is what makes that point trustworthy: it must be issued by the fleet root (the same root
that names the fleet: common/revset.fleet_id) and carry the revocation-set extended key
usage (common/oids.OID_KP_REVOCATION_SET), which cloud/revocation/revset_publisher.py gives it.
"""

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetid.common import oids, revset

OID_KP_REVOCATION_SET = x509.ObjectIdentifier(oids.OID_KP_REVOCATION_SET)


def public_point(certificate):
    """65-byte uncompressed P-256 point of a certificate's key."""
    return certificate.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def is_revocation_signer(certificate):
    """Whether the certificate carries the revocation-set extended key usage."""
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return OID_KP_REVOCATION_SET in usages


def signer_anchor(signer, root):
    """(signer point, fleet id) for a RevsetCache: the set signer checked to be issued by
    `root` with the revocation-set EKU.
    Raises: ValueError naming what is wrong (TypeError from cryptography is one too)."""
    try:
        signer.verify_directly_issued_by(root)
    except (ValueError, TypeError) as exc:
        raise ValueError("not issued by the fleet root (%s)" % exc) from None
    if not is_revocation_signer(signer):
        raise ValueError("not a revocation-set signer (extendedKeyUsage)")
    return public_point(signer), revset.fleet_id(public_point(root))
