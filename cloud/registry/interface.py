"""The registry's storage interface: what the factory line and the cloud services need.

Backends: `sqlite_backend.SqliteRegistry` (default), `postgres_backend.PostgresRegistry`
(shared by many hosts), `memory.MemoryRegistry` (the fake for tests); all opened by
`open_registry(uri)`.  The schema in `schema.py` runs on SQLite and PostgreSQL unchanged.

Device life cycle (column `devices.status`):

    allocate_serial() -> write_intent()         status "intent"   (in flight at a station)
    allocate_intent()                           the same, ONE durable transaction (the line)
    commit_identity(record, audit_entry)        status "committed" (identity record + cert +
                                                                   audit entry, one transaction)
    hold(serial, reason)                        status "held"      (quarantined, never shipped)
    reconcile(serial, outcome, reason)          status "held"      (an intent resolved after a
                                                                   crash: see below)
    mark_revoked(cert_serial, reason)           status "revoked"   when it is the identity cert
    mark_devices_revoked([serial])              every certificate of many devices, ONE transaction

Crash recovery of the line (fleetid.cloud.line.reconcile): at start,
`list_in_flight()` gives every intent never committed.  For each, if the CA issued a
certificate for it: add_certificate(serial, der, "identity"), mark_revoked(cert_serial,
"cessationOfOperation") and reconcile(serial, "revoked-orphan-cert", ...); otherwise
reconcile(serial, "no-certificate", ...).  Every one of those writes its audit entry in
its own transaction with the state change.

Every state change appends an audit entry (fleetid.cloud.audit) in the same
transaction; the chain and its head live in the registry database.
"""

import functools
import hashlib
import time
from dataclasses import dataclass

from cryptography import x509

from fleetid.cloud import audit
from fleetid.cloud.registry.errors import InvalidState, RegistryError

INTENT = "intent"
COMMITTED = "committed"
HELD = "held"
REVOKED = "revoked"
STATUSES = (INTENT, COMMITTED, HELD, REVOKED)

IDENTITY = "identity"
OPERATIONAL = "operational"
CERT_KINDS = (IDENTITY, OPERATIONAL)


@dataclass(frozen=True)
class IdentityRecord:
    """What the line commits for a device that passed the confirmation gate.

    serial int; se_uid bytes; identity_cert_der bytes (the issued certificate); slot int
    (the SE key slot); aid bytes (the applet AID); batch, station, operator, hsm_session
    str; attestation_hash str (hex SHA-256 of the attestation statement DER).
    """

    serial: int
    se_uid: bytes
    identity_cert_der: bytes
    slot: int
    aid: bytes
    batch: str
    station: str
    operator: str
    hsm_session: str
    attestation_hash: str


@dataclass(frozen=True)
class DeviceRecord:
    """One device as the registry knows it.  Times are RFC 3339 UTC strings."""

    serial: int
    se_uid: bytes
    status: str
    station: str
    operator: str
    batch: str
    hsm_session: str
    intent_at: str
    updated_at: str
    committed_at: str = None
    hold_reason: str = None
    slot: int = None
    aid: bytes = None
    issuing_ca: str = None
    attestation_hash: str = None
    identity_fingerprint: str = None
    rotation_state: str = None


@dataclass(frozen=True)
class CertificateRecord:
    """A certificate in a device's history (identity or operational)."""

    fingerprint: str
    device_serial: int
    kind: str
    cert_serial: str
    issuer: str
    not_before: str
    not_after: str
    added_at: str
    der: bytes
    revoked_at: str = None
    revocation_reason: str = None

    @property
    def revoked(self):
        return self.revoked_at is not None


def device_from_row(row):
    """DeviceRecord from a column-name -> value mapping (hex columns decoded)."""
    values = dict(row)
    values["se_uid"] = bytes.fromhex(values["se_uid"])
    if values.get("aid") is not None:
        values["aid"] = bytes.fromhex(values["aid"])
    return DeviceRecord(**values)


def certificate_from_row(row):
    values = dict(row)
    values["der"] = bytes(values["der"])
    return CertificateRecord(**values)


def certificate_row(serial, cert_der, kind, now_text):
    """The certificates-table row for a DER certificate.  Raises RegistryError(BAD_INPUT)."""
    if kind not in CERT_KINDS:
        raise RegistryError(RegistryError.BAD_INPUT, "certificate kind %r" % (kind,))
    try:
        cert = x509.load_der_x509_certificate(bytes(cert_der))
    except ValueError:
        raise RegistryError(RegistryError.BAD_INPUT, "not a DER certificate") from None
    return {
        "fingerprint": hashlib.sha256(bytes(cert_der)).hexdigest(),
        "device_serial": serial,
        "kind": kind,
        "cert_serial": audit.cert_serial_hex(cert.serial_number),
        "issuer": audit.issuer_name(cert_der, cert),
        "not_before": audit.format_time(cert.not_valid_before_utc),
        "not_after": audit.format_time(cert.not_valid_after_utc),
        "added_at": now_text,
        "der": bytes(cert_der),
        "revoked_at": None,
        "revocation_reason": None,
    }


def row_facts(cert):
    """audit.certificate_facts of a certificate_row's certificate, read from the row
    (the same three values, derived there from the same DER)."""
    return {"cert_serial": cert["cert_serial"], "cert_fingerprint": cert["fingerprint"],
            "issuing_ca": cert["issuer"]}


def check_serial(serial):
    if not isinstance(serial, int) or isinstance(serial, bool) or not 0 < serial < 2**63:
        raise RegistryError(RegistryError.BAD_INPUT, "serial must be a positive int")
    return serial


def check_text(name, value, allow_empty=True):
    if not isinstance(value, str) or len(value) > audit.MAX_TEXT or not value.isprintable() \
            or (not allow_empty and not value):
        raise RegistryError(RegistryError.BAD_INPUT, "bad %s" % name)
    return value


def check_se_uid(se_uid):
    if not isinstance(se_uid, (bytes, bytearray)) or not 4 <= len(se_uid) <= 64:
        raise RegistryError(RegistryError.BAD_INPUT, "se_uid must be 4..64 bytes")
    return bytes(se_uid).hex()


def identity_cert_present(existing, record, cert):
    """For commit_identity: True when the identity certificate was already added to this
    device (add_certificate before the SE got it), False when it is new; raises
    RegistryError(DUPLICATE_CERTIFICATE) when the stored one is another device's, another
    kind, or revoked.  `existing` is the stored CertificateRecord for cert's fingerprint
    (or None)."""
    if existing is None:
        return False
    if existing.device_serial != record.serial or existing.kind != IDENTITY \
            or existing.revoked:
        raise RegistryError(RegistryError.DUPLICATE_CERTIFICATE, cert["fingerprint"])
    return True


def check_commit(device, record, fields, cert):
    """Refuse a commit whose parts disagree.  `device` is the current DeviceRecord,
    `cert` the certificate row built from record.identity_cert_der."""
    if device.status != INTENT:
        raise InvalidState(record.serial, device.status, "commit")
    if device.se_uid != bytes(record.se_uid):
        raise RegistryError(RegistryError.MISMATCH, "se_uid differs from the intent record")
    if not isinstance(fields, dict) or fields.get("type") != audit.INJECTION:
        raise RegistryError(RegistryError.MISMATCH, "the audit entry must be an injection")
    expected = {
        "serial": record.serial,
        "se_uid": bytes(record.se_uid).hex(),
        "slot": record.slot,
        "aid": bytes(record.aid).hex(),
        "cert_serial": cert["cert_serial"],
        "cert_fingerprint": cert["fingerprint"],
        "issuing_ca": cert["issuer"],
        "batch": record.batch,
        "station": record.station,
        "operator": record.operator,
        "hsm_session": record.hsm_session,
        "attestation_hash": record.attestation_hash,
    }
    for name, value in expected.items():
        if fields.get(name) != value:
            raise RegistryError(RegistryError.MISMATCH, "audit field %s" % name)


class Registry:
    """The storage interface.  Every method is thread-safe (parallel stations).

    Errors: RegistryError (with `reason`) and its subclasses; nothing backend-native.
    Construction takes `wall_clock` (epoch seconds callable) for every stored time.
    """

    wall_clock = staticmethod(time.time)

    def _now(self):
        return audit.format_time(self.wall_clock())

    # -- serials and intents ----------------------------------------------------------------------

    def allocate_serial(self):
        """Return the next device serial: monotonic, never handed out twice, also across
        crashes and reopen (the counter is committed durably before the call returns; a
        crash after it leaves a gap, never a repeat).  Raises RegistryError(STORAGE)."""
        raise NotImplementedError

    def write_intent(self, serial, se_uid, station, operator="", batch="", hsm_session=""):
        """Record that `station` starts personalising chip `se_uid` as device `serial`.

        Returns: DeviceRecord (status "intent").
        Raises: DuplicateSerial, RegistryError(NOT_ALLOCATED / BAD_INPUT / STORAGE).
        """
        raise NotImplementedError

    def allocate_intent(self, se_uid, station, operator="", batch="", hsm_session=""):
        """allocate_serial() and write_intent() in ONE durable transaction: the serial is
        never handed out without its intent record, and the line pays one commit.

        Returns: DeviceRecord (status "intent"; `.serial` is the new serial).
        Raises: RegistryError(BAD_INPUT / STORAGE).
        """
        serial = self.allocate_serial()
        return self.write_intent(serial, se_uid, station, operator, batch, hsm_session)

    def list_in_flight(self):
        """Every device still in status "intent", oldest serial first."""
        raise NotImplementedError

    def commit_identity(self, record, audit_entry):
        """In ONE transaction: mark the device committed with `record`'s facts, store its
        identity certificate, and append `audit_entry` (unsealed fields from
        audit.injection_entry) to the audit chain.  Either all of it is visible afterwards
        or none of it.  The certificate may already be in the device's history
        (add_certificate(serial, der, "identity") before it went to the SE; not revoked):
        it is then kept, not added twice.

        Params: record IdentityRecord; audit_entry dict (must describe the same device,
        certificate and attestation: checked).
        Returns: the sealed AuditEntry.
        Raises: InvalidState (not in flight), DuplicateSeUid, RegistryError(MISMATCH /
        BAD_INPUT / DUPLICATE_CERTIFICATE / STORAGE), DeviceNotFound.  On any of them the
        line must hold() the device.
        """
        raise NotImplementedError

    def hold(self, serial, reason, station="", operator=""):
        """Quarantine a device (status "held", `reason` kept in hold_reason) with a hold
        audit entry, one transaction.  Allowed from intent, committed and held.
        Returns the sealed AuditEntry.
        Raises DeviceNotFound, InvalidState (revoked), RegistryError(BAD_INPUT / STORAGE)."""
        raise NotImplementedError

    def reconcile(self, serial, outcome, reason, station="", operator="", cert_serial=None,
                  cert_fingerprint=None):
        """Resolve an in-flight intent after a crash: status "held" plus a reconcile audit
        entry saying what was done (`outcome`, e.g. "revoked-orphan-cert").
        Returns the sealed AuditEntry.  Raises DeviceNotFound, InvalidState (not in flight)."""
        raise NotImplementedError

    def mark_revoked(self, cert_serial, reason, operator="", issuer=None):
        """Mark a certificate revoked (and its device "revoked" if it is the identity
        certificate), with a revoke audit entry, one transaction.

        Params: cert_serial int or hex; issuer (RFC 4514 string) when the serial alone is
        ambiguous.  Returns the sealed AuditEntry.
        Raises: CertificateNotFound, RegistryError(AMBIGUOUS / STATE: already revoked).
        """
        raise NotImplementedError

    def mark_devices_revoked(self, serials, reason, operator=""):
        """Revoke every unrevoked certificate of each device of `serials` in ONE
        transaction (a bulk revocation's chunk), newest first per device (the identity
        one last: it marks the device revoked), each with the revoke audit entry
        mark_revoked would give it, in that order.  The certificates are read inside the
        transaction, once the devices are locked.  Every device is found first: an unknown
        one raises and nothing is written.

        Returns: {serial: [cert serial hex revoked]} (a serial listed twice: [] the second
        time).  Raises: DeviceNotFound, RegistryError(BAD_INPUT / STORAGE; STORAGE with
        .retryable when the server ended it over a lock conflict).
        """
        raise NotImplementedError

    # -- devices and certificates -----------------------------------------------------------------

    def get_device(self, serial):
        """Return the DeviceRecord.  Raises DeviceNotFound."""
        raise NotImplementedError

    def find_by_se_uid(self, se_uid):
        """Every device record for chip `se_uid` (bytes), newest serial first (a chip that
        was held and reworked has several)."""
        raise NotImplementedError

    def add_certificate(self, serial, cert_der, kind, rotation_state=None,
                        operation="recorded", operator=""):
        """Add a certificate (kind "identity" or "operational") to a device's history with
        its "issuance" audit entry (`operation`, e.g. "simpleenroll", and `operator` are
        recorded) and, when `rotation_state` is not None, store the device's rotation
        state (the text of a rotation.RotationState), all in ONE transaction: no path adds a certificate
        without its audit entry.
        Returns CertificateRecord.  Raises DeviceNotFound, RegistryError(BAD_INPUT /
        DUPLICATE_CERTIFICATE)."""
        raise NotImplementedError

    def certificates(self, serial):
        """The device's certificate history, oldest first (list of CertificateRecord)."""
        raise NotImplementedError

    def certificate_status(self, cert_serial, issuer=None):
        """The CertificateRecord for a serial (revoked / revoked_at / revocation_reason).
        Raises CertificateNotFound, RegistryError(AMBIGUOUS)."""
        raise NotImplementedError

    def revoked_certificates(self, issuer):
        """Every revoked certificate issued by `issuer` (RFC 4514 string, as stored in
        CertificateRecord.issuer), ordered by serial: what a CRL of that CA lists.
        Returns: list of CertificateRecord (revoked_at set)."""
        raise NotImplementedError

    def certificate_serials(self, issuer, valid_at=None):
        """The serials (int) of every certificate issued by `issuer` (RFC 4514 string)
        whose notAfter is after `valid_at` (RFC 3339 UTC text as the records store it;
        None: all), revoked or not: what an OCSP responder pre-signs.  An iterator read in
        pages (one query per page), so a fleet of millions is never one list."""
        raise NotImplementedError

    def certificate_and_device(self, cert_serial, issuer=None):
        """(CertificateRecord, DeviceRecord): a certificate's record and its device's, in
        ONE read (one query, one snapshot) where the backend can; what the verifier checks
        on every request (revocation, device status, SE UID, rotation state).
        Raises CertificateNotFound, RegistryError(AMBIGUOUS), DeviceNotFound.
        This default reads twice; backends override it."""
        record = self.certificate_status(cert_serial, issuer=issuer)
        return record, self.get_device(record.device_serial)

    def set_rotation_state(self, serial, state):
        """Store the device's credential-rotation state: the text of a
        rotation.RotationState (the formats are in rotation.py; the EST service writes them
        with add_certificate, this is for repairs and tests).  Raises DeviceNotFound."""
        raise NotImplementedError

    def acknowledge_rotation(self, serial, cert_fingerprint):
        """The device switched to its certificate `cert_fingerprint`.  In ONE transaction
        (the device row locked): read the rotation state; if it is the overlap that
        certificate opened, store it as acked and append a "rotation_ack" audit entry naming
        both fingerprints.  Returns the rotation.RotationState after the call (unchanged,
        nothing written, when there was nothing to acknowledge).  Raises DeviceNotFound."""
        raise NotImplementedError

    # -- the audit chain --------------------------------------------------------------------------

    def append_audit(self, fields):
        """Seal and append an entry that changes no device (audit.DEVICELESS_TYPES:
        checkpoints, CA revocations).  A checkpoint's covered head is checked against the
        stored chain.  Returns the AuditEntry."""
        raise NotImplementedError

    def head(self):
        """(entry count, head hash hex) from the audit_head row."""
        raise NotImplementedError

    def iter_audit_lines(self, start=0):
        """Yield the stored audit lines (bytes) from seq `start`, in order."""
        raise NotImplementedError

    def audit_entries_for(self, serial):
        """Every audit entry about device `serial`, in order (self-checked AuditEntry)."""
        raise NotImplementedError

    def last_checkpoint(self):
        """The newest checkpoint entry, or None."""
        raise NotImplementedError

    def close(self):
        """Close the backend.  Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def build_hold(device, reason, station, operator, now):
    return audit.hold_entry(serial=device.serial, reason=reason, station=station,
                            operator=operator, when=now, se_uid=device.se_uid)


def wrap_audit_error(fn):
    """Turn an AuditError (bad entry fields) into RegistryError(BAD_INPUT)."""

    @functools.wraps(fn)  # keeps the signature visible (inspect.signature)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except audit.AuditError as exc:
            raise RegistryError(RegistryError.BAD_INPUT, exc.reason + " " + exc.detail) \
                from None

    return wrapper
