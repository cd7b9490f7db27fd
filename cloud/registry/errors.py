"""The registry half of the exception tree: one class with a `reason`, and subclasses for
the cases callers branch on.  Messages are short; no certificate or key bytes in them."""

from fleetid.common.errors import FleetidError


class RegistryError(FleetidError):
    """A registry operation failed.  `reason` is one of the constants below; `detail` a
    short, secret-free description.  `retryable`: the database rolled the operation back
    over a conflict with another writer (PostgreSQL's deadlock detection or
    serialization failure: its transaction, or inside a group-commit batch its
    savepoint), so nothing of it was written and the same operation may simply run
    again."""

    retryable = False

    STORAGE = "storage"  # the database failed (I/O, locked past the busy timeout, ...)
    SCHEMA = "schema"  # the database has another schema version
    CONFIG = "config"  # bad registry URI / unsupported backend
    NOT_ALLOCATED = "not_allocated"  # an intent for a serial allocate_serial never gave
    DUPLICATE_SERIAL = "duplicate_serial"
    DUPLICATE_SE_UID = "duplicate_se_uid"  # a second live identity for one chip
    DUPLICATE_CERTIFICATE = "duplicate_certificate"
    DEVICE_NOT_FOUND = "device_not_found"
    CERTIFICATE_NOT_FOUND = "certificate_not_found"
    AMBIGUOUS = "ambiguous"  # one certificate serial under several issuers: name the issuer
    STATE = "state"  # the device is not in a state that allows the operation
    MISMATCH = "mismatch"  # the audit entry does not describe the record being committed
    BAD_INPUT = "bad_input"
    CLOSED = "closed"

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


class DuplicateSerial(RegistryError):
    """An intent record for this serial exists already."""

    def __init__(self, serial):
        super().__init__(RegistryError.DUPLICATE_SERIAL, str(serial))
        self.serial = serial


class DuplicateSeUid(RegistryError):
    """The chip already has a committed identity (one live identity per SE UID)."""

    def __init__(self, se_uid_hex):
        super().__init__(RegistryError.DUPLICATE_SE_UID, se_uid_hex)
        self.se_uid = se_uid_hex


class DeviceNotFound(RegistryError):
    def __init__(self, serial):
        super().__init__(RegistryError.DEVICE_NOT_FOUND, str(serial))
        self.serial = serial


class CertificateNotFound(RegistryError):
    def __init__(self, what):
        super().__init__(RegistryError.CERTIFICATE_NOT_FOUND, str(what))
        self.what = what


class InvalidState(RegistryError):
    """The device's status forbids the operation (e.g. commit of a held device)."""

    def __init__(self, serial, status, operation):
        super().__init__(RegistryError.STATE, "%s of device %s in status %s"
                         % (operation, serial, status))
        self.serial = serial
        self.status = status
        self.operation = operation
