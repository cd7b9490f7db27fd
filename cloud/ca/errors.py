"""Errors of attestation-gated issuance.

One reason-code table serves both the issuing CA (`IssuanceRefused`) and the offline
re-check of an issued certificate (`AttestationError`), so a verifier, the line report
and the EST error mapping all branch on the same strings.  Messages are short; `detail`
never holds key material.
"""

from fleetid.common.errors import FleetidError

# Reason codes, in the order IssuingCa.issue() checks them.
BAD_CSR = "bad_csr"  # not a DER PKCS#10 CSR, not P-256 / ecdsa-with-SHA256
BAD_POP = "bad_pop"  # CSR signature does not verify: no proof of possession
NO_EVIDENCE = "no_evidence"  # no evidence attribute (CSR) / attestation extension (cert)
BAD_EVIDENCE = "bad_evidence"  # evidence present but malformed (DER, duplicate, MAK cert)
UNKNOWN_VENDOR = "unknown_vendor"  # MAK chain does not validate to a trusted SE vendor root
BAD_STATEMENT_SIGNATURE = "bad_statement_signature"  # statement not signed by that MAK
KEY_MISMATCH = "key_mismatch"  # attested key is not the CSR's / certificate's key
POLICY = "policy"  # key policy flags or life cycle not acceptable
SE_UID_MISMATCH = "se_uid_mismatch"  # attested SE UID is not the expected one
NONCE_UNKNOWN = "nonce_unknown"  # nonce not issued by this CA (or already purged)
NONCE_REPLAYED = "nonce_replayed"  # nonce already consumed (success or burned)
NONCE_EXPIRED = "nonce_expired"  # nonce older than its time to live

REASONS = (
    BAD_CSR,
    BAD_POP,
    NO_EVIDENCE,
    BAD_EVIDENCE,
    UNKNOWN_VENDOR,
    BAD_STATEMENT_SIGNATURE,
    KEY_MISMATCH,
    POLICY,
    SE_UID_MISMATCH,
    NONCE_UNKNOWN,
    NONCE_REPLAYED,
    NONCE_EXPIRED,
)


class _ReasonError(FleetidError):
    def __init__(self, reason, detail=""):
        if reason not in REASONS:
            raise ValueError("unknown reason code %r" % (reason,))
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


class AttestationError(_ReasonError):
    """Evidence does not prove that a key lives in a genuine SE.  `reason` in REASONS."""


class IssuanceRefused(_ReasonError):
    """The issuing CA refused a request; nothing was issued.  `reason` in REASONS.

    The only state a refusal may have changed is the consumption of the request's nonce
    (see IssuingCa.issue for when a nonce is burned)."""


class NonceRefused(_ReasonError):
    """A nonce store refused a nonce (`reason`: NONCE_UNKNOWN, NONCE_REPLAYED,
    NONCE_EXPIRED)."""
