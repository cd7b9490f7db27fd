"""fleetid.cloud.ca: the attestation-gated issuing CA (factory line now, EST later).

    from fleetid.cloud.ca import IssuingCa, IssuanceRefused, verify_attestation_extension
    ca = IssuingCa(hsm, "ca-widget-b42-eu", ca_cert, vendor_roots)
    nonce = ca.issue_nonce()
    cert = ca.issue(csr_der, se_uid, "WX-000042", "identity")
    statement = verify_attestation_extension(cert, vendor_roots, expected_se_uid=se_uid)

Order of checks, reason codes and the nonce-burning rule: issuing.py and errors.py.
"""

from fleetid.cloud.ca.errors import REASONS, AttestationError, IssuanceRefused, NonceRefused
from fleetid.cloud.ca.evidence import (
    ATTESTATION_EXTENSION_OID,
    EvidenceVerifier,
    verify_attestation_extension,
)
from fleetid.cloud.ca.issuing import IssuingCa
from fleetid.cloud.ca.nonces import InMemoryNonceStore, NonceStore

__all__ = [
    "IssuingCa",
    "IssuanceRefused",
    "AttestationError",
    "NonceRefused",
    "REASONS",
    "NonceStore",
    "InMemoryNonceStore",
    "EvidenceVerifier",
    "verify_attestation_extension",
    "ATTESTATION_EXTENSION_OID",
]
