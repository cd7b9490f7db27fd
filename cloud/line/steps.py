"""The steps of the line's per-device flow (station.py), the failure a device ends with,
and the cause string the report groups failures by."""

from fleetid.cloud.ca.errors import IssuanceRefused
from fleetid.cloud.hsm.errors import HsmBusy, HsmError
from fleetid.cloud.registry.errors import RegistryError
from fleetid.common.errors import (
    ApduError,
    ApduFormatError,
    DerError,
    FleetidError,
    LinkError,
    SecureChannelError,
)

# Step names, in order (results, hooks, the report and hold reasons use them).
IDENTIFY = "identify"
INTENT = "intent"
INJECT = "inject"
ATTEST = "attest"
ISSUE = "issue"
PERSONALISE = "personalise"
CONFIRM = "confirm"
COMMIT = "commit"
STEPS = (IDENTIFY, INTENT, INJECT, ATTEST, ISSUE, PERSONALISE, CONFIRM, COMMIT)
AFTER_COMMIT = "after-commit"  # the boundary after the last step (hooks only)


class LineFailure(FleetidError):
    """A device failed at the line.  `cause` is a short machine-readable string
    ("counterfeit:unknown_vendor", "issuance_refused:key_mismatch", ...), `step` the step
    it failed in, `detail` a secret-free description."""

    def __init__(self, cause, step="", detail=""):
        super().__init__(cause if not detail else cause + ": " + detail)
        self.cause = cause
        self.step = step
        self.detail = detail


def classify(exc):
    """A failure cause string for an exception (the report groups by it)."""
    if isinstance(exc, LineFailure):
        return exc.cause
    if isinstance(exc, IssuanceRefused):
        return "issuance_refused:" + exc.reason
    if isinstance(exc, HsmBusy):
        return "hsm:busy"
    if isinstance(exc, HsmError):
        return "hsm:" + exc.reason
    if isinstance(exc, LinkError):
        return "se_link:" + exc.reason
    if isinstance(exc, SecureChannelError):
        return "secure_channel:" + str(getattr(exc, "reason", "error"))
    if isinstance(exc, ApduError):
        return "se_refused:%04X" % (exc.sw or 0)
    if isinstance(exc, (ApduFormatError, DerError)):
        return "se_format"
    if isinstance(exc, RegistryError):
        return "registry:" + exc.reason
    return "internal:" + type(exc).__name__
