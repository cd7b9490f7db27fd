"""A fleet whose cloud publishes the compact revocation set (cloud/revocation/revset_publisher.py):
the revocation signer certified by the fleet root, a publisher on the fleet's clock."""

from fleetid.cloud.revocation.revset_publisher import (
    RevsetPublisher,
    RevocationSigner,
    ca_key_id,
    new_revocation_signer,
)
from tests.cloud.cloud_support import NOW
from tests.cloud.crl_support import FakeMonotonic


def revocation_signer(fleet, label="revocation-set"):
    """The fleet's RevocationSigner (created in its HSM on first use)."""
    signer = getattr(fleet, "_revocation_signer", None)
    if signer is None:
        cert = new_revocation_signer(fleet.hsm, "fleet-root", fleet.root, label, now=NOW)
        signer = RevocationSigner(fleet.hsm, label, cert, fleet.root)
        fleet._revocation_signer = signer
    return signer


def revset_publisher(fleet, revoked_cas=(), monotonic=None, **kwargs):
    """RevsetPublisher over both issuing CAs; revoked_cas: batch names whose CA is
    revoked (a list the test may extend later)."""
    return RevsetPublisher(
        fleet.registry, revocation_signer(fleet), list(fleet.ca_certs.values()),
        revoked_cas=lambda: [ca_key_id(fleet.ca_certs[b]) for b in revoked_cas],
        clock=fleet.clock, monotonic=monotonic or FakeMonotonic(), **kwargs)
