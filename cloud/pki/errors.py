"""Errors of the fleet PKI (ceremony, CA creation, certificate signing).

Attestation-gated issuance has its own error (`fleetid.cloud.ca.errors.IssuanceRefused`);
these are for operator and configuration mistakes and for HSM signatures that do not
check out.
"""

from fleetid.common.errors import FleetidError


class PkiError(FleetidError):
    """A PKI operation could not be done.  `reason` is one of the constants below;
    `detail` is a short, secret-free description."""

    BAD_INPUT = "bad_input"  # a parameter is out of range (empty operators, bad serial, ...)
    KEY_MISMATCH = "key_mismatch"  # the HSM key under a label is not the certificate's key
    BAD_SIGNATURE = "bad_signature"  # what the HSM signed does not verify (wrong label/key)
    VALIDITY = "validity"  # a certificate would outlive its issuer
    CEREMONY = "ceremony"  # a ceremony record is missing, malformed, or does not verify
    EXISTS = "exists"  # the ceremony directory already holds a record

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail
