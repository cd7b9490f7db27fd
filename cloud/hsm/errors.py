"""The HSM half of the exception tree.

Every backend raises these and nothing else for HSM-side trouble, so stations branch on
`reason` (data), never on message text or on a backend's native exception type.  Messages
are short and never contain a PIN, a passphrase or key bytes.
"""

from fleetid.common.errors import FleetidError


class HsmError(FleetidError):
    """An HSM operation failed.  `reason` is one of the class constants below.

    `detail` is a short, secret-free description for logs (a label, a mechanism name).
    """

    LOGIN = "login"  # wrong PIN / passphrase, or the token refused the login
    CONFIG = "config"  # bad URI or missing setting (PIN / passphrase variable unset, ...)
    TOKEN = "token"  # the token / module cannot be found or loaded
    EXISTS = "exists"  # a key with this label already exists
    BAD_INPUT = "bad_input"  # a caller-supplied value is out of range (UID length, KVN, ...)
    BAD_HANDLE = "bad_handle"  # a key-set handle from another backend, released, or the wrong kind
    POLICY = "policy"  # the key's usage attributes forbid the operation
    KCV_MISMATCH = "kcv_mismatch"  # imported key material does not match the fab record's KCVs
    WRAPPED_KEY_INVALID = "wrapped_key_invalid"  # a wrapped key fails its unwrap integrity check
    SESSION_LOST = "session_lost"  # the session broke, and so did the one retry on a fresh one
    KEYSTORE = "keystore"  # the soft keystore file is corrupt, unreadable or too permissive
    CLOSED = "closed"  # the backend was closed
    BACKEND = "backend"  # any other failure inside the token / library
    BUSY = "busy"  # see HsmBusy
    KEY_NOT_FOUND = "key_not_found"  # see KeyNotFound

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


class HsmBusy(HsmError):
    """No HSM session became free within the acquire timeout.

    A line station should hold the device (retry later), not fail it: the bound is the
    HSM's session capacity, shared by every station.  `max_sessions` and `waited_s` say
    how large the pool was and how long the caller waited.
    """

    def __init__(self, max_sessions, waited_s):
        super().__init__(
            HsmError.BUSY, "%d sessions in use, waited %.3f s" % (max_sessions, waited_s)
        )
        self.max_sessions = max_sessions
        self.waited_s = waited_s


class KeyNotFound(HsmError):
    """No key (or key set) with this label exists in the backend.  `label` names it."""

    def __init__(self, label):
        super().__init__(HsmError.KEY_NOT_FOUND, label)
        self.label = label


class SessionLost(HsmError):
    """Internal: the backend session under an operation is gone (closed, device reset).

    The pool discards that session and the operation is retried once on a fresh one; a
    caller only sees this if the retry fails as well.
    """

    def __init__(self, detail=""):
        super().__init__(HsmError.SESSION_LOST, detail)
