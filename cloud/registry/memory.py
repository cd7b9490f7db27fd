"""The in-memory registry: the fake the service and line tests run against.

Same contract as SqliteRegistry (tests/cloud/test_registry.py runs on both), no
durability.  One lock serialises everything; each write checks everything first and
mutates only after every check passed, so a refused operation leaves no trace.
"""

import dataclasses
import threading
import time

from fleetid.cloud import audit
from fleetid.cloud.registry.errors import (
    CertificateNotFound,
    DeviceNotFound,
    DuplicateSerial,
    DuplicateSeUid,
    InvalidState,
    RegistryError,
)
from fleetid.cloud.registry.interface import (
    COMMITTED,
    HELD,
    IDENTITY,
    INTENT,
    REVOKED,
    DeviceRecord,
    Registry,
    build_hold,
    certificate_from_row,
    certificate_row,
    check_commit,
    check_se_uid,
    check_serial,
    check_text,
    identity_cert_present,
    row_facts,
    wrap_audit_error,
)
from fleetid.cloud.registry.rotation import RotationState


class MemoryRegistry(Registry):
    """Registry in process memory.  `MemoryRegistry(wall_clock=time.time)`."""

    def __init__(self, wall_clock=time.time):
        self.wall_clock = wall_clock
        self._lock = threading.RLock()
        self._next_serial = 1
        self._devices = {}  # serial -> DeviceRecord
        self._certs = {}  # fingerprint -> CertificateRecord
        self._log = []  # (AuditEntry, device_serial or None)
        self._head = audit.GENESIS_PREV

    # -- helpers ----------------------------------------------------------------------------------

    def _device(self, serial):
        device = self._devices.get(serial)
        if device is None:
            raise DeviceNotFound(serial)
        return device

    def _update(self, serial, **changes):
        self._devices[serial] = dataclasses.replace(self._devices[serial], **changes)

    def _seal_next(self, fields):
        """Seal (all checks) without appending; _push appends."""
        if fields.get("type") == audit.CHECKPOINT:
            covers = fields.get("covers")
            if not isinstance(covers, int) or not 1 <= covers <= len(self._log):
                raise RegistryError(RegistryError.BAD_INPUT, "checkpoint covers %r" % (covers,))
            if self._log[covers - 1][0].hash_hex != fields.get("head"):
                raise RegistryError(RegistryError.MISMATCH, "checkpoint head")
        return audit.seal(fields, len(self._log), self._head)

    def _push(self, entry, serial):
        self._log.append((entry, serial))
        self._head = entry.hash_hex
        return entry

    def _cert(self, cert_serial, issuer):
        cert_serial = (audit.cert_serial_hex(cert_serial) if isinstance(cert_serial, int)
                       else audit.to_hex(cert_serial))
        found = [c for c in self._certs.values() if c.cert_serial == cert_serial
                 and (issuer is None or c.issuer == issuer)]
        if not found:
            raise CertificateNotFound(cert_serial)
        if len(found) > 1:
            raise RegistryError(RegistryError.AMBIGUOUS, "serial %s: give the issuer"
                                % cert_serial)
        return found[0]

    def _check_new_cert(self, cert):
        if cert["fingerprint"] in self._certs or any(
                c.issuer == cert["issuer"] and c.cert_serial == cert["cert_serial"]
                for c in self._certs.values()):
            raise RegistryError(RegistryError.DUPLICATE_CERTIFICATE, cert["fingerprint"])

    # -- serials and intents ----------------------------------------------------------------------

    def allocate_serial(self):
        with self._lock:
            serial = self._next_serial
            self._next_serial += 1
            return serial

    def write_intent(self, serial, se_uid, station, operator="", batch="", hsm_session=""):
        check_serial(serial)
        uid_hex = check_se_uid(se_uid)
        for name, value in (("station", station), ("operator", operator), ("batch", batch),
                            ("hsm_session", hsm_session)):
            check_text(name, value)
        now = self._now()
        with self._lock:
            if serial >= self._next_serial:
                raise RegistryError(RegistryError.NOT_ALLOCATED, str(serial))
            if serial in self._devices:
                raise DuplicateSerial(serial)
            device = DeviceRecord(serial=serial, se_uid=bytes.fromhex(uid_hex), status=INTENT,
                                  station=station, operator=operator, batch=batch,
                                  hsm_session=hsm_session, intent_at=now, updated_at=now)
            self._devices[serial] = device
            return device

    def allocate_intent(self, se_uid, station, operator="", batch="", hsm_session=""):
        uid_hex = check_se_uid(se_uid)
        for name, value in (("station", station), ("operator", operator), ("batch", batch),
                            ("hsm_session", hsm_session)):
            check_text(name, value)
        now = self._now()
        with self._lock:
            serial = self._next_serial
            self._next_serial += 1
            device = DeviceRecord(serial=serial, se_uid=bytes.fromhex(uid_hex), status=INTENT,
                                  station=station, operator=operator, batch=batch,
                                  hsm_session=hsm_session, intent_at=now, updated_at=now)
            self._devices[serial] = device
            return device

    def list_in_flight(self):
        with self._lock:
            return [d for _s, d in sorted(self._devices.items()) if d.status == INTENT]

    @wrap_audit_error
    def commit_identity(self, record, audit_entry):
        check_serial(record.serial)
        now = self._now()
        cert = certificate_row(record.serial, record.identity_cert_der, IDENTITY, now)
        with self._lock:
            device = self._device(record.serial)
            check_commit(device, record, audit_entry, cert)
            if any(d.status == COMMITTED and d.se_uid == device.se_uid
                   for d in self._devices.values()):
                raise DuplicateSeUid(device.se_uid.hex())
            present = identity_cert_present(self._certs.get(cert["fingerprint"]), record,
                                            cert)
            if not present:
                self._check_new_cert(cert)
            entry = self._seal_next(audit_entry)
            # every check passed: apply
            self._update(record.serial, status=COMMITTED, committed_at=now, updated_at=now,
                         slot=record.slot, aid=bytes(record.aid), issuing_ca=cert["issuer"],
                         attestation_hash=record.attestation_hash,
                         identity_fingerprint=cert["fingerprint"], station=record.station,
                         operator=record.operator, batch=record.batch,
                         hsm_session=record.hsm_session)
            if not present:
                self._certs[cert["fingerprint"]] = certificate_from_row(cert)
            return self._push(entry, record.serial)

    @wrap_audit_error
    def hold(self, serial, reason, station="", operator=""):
        check_text("reason", reason, allow_empty=False)
        now = self._now()
        with self._lock:
            device = self._device(serial)
            if device.status == REVOKED:
                raise InvalidState(serial, device.status, "hold")
            entry = self._seal_next(build_hold(device, reason, station, operator, now))
            self._update(serial, status=HELD, hold_reason=reason, updated_at=now)
            return self._push(entry, serial)

    @wrap_audit_error
    def reconcile(self, serial, outcome, reason, station="", operator="", cert_serial=None,
                  cert_fingerprint=None):
        check_text("outcome", outcome, allow_empty=False)
        now = self._now()
        with self._lock:
            device = self._device(serial)
            if device.status != INTENT:
                raise InvalidState(serial, device.status, "reconcile")
            entry = self._seal_next(audit.reconcile_entry(
                serial=serial, outcome=outcome, reason=reason, station=station,
                operator=operator, when=now, se_uid=device.se_uid, cert_serial=cert_serial,
                cert_fingerprint=cert_fingerprint))
            self._update(serial, status=HELD, hold_reason="reconciled: " + outcome,
                         updated_at=now)
            return self._push(entry, serial)

    @wrap_audit_error
    def mark_revoked(self, cert_serial, reason, operator="", issuer=None):
        check_text("reason", reason, allow_empty=False)
        now = self._now()
        with self._lock:
            cert = self._cert(cert_serial, issuer)
            if cert.revoked:
                raise RegistryError(RegistryError.STATE, "already revoked")
            fields = self._revoke_fields(cert, reason, operator, now)
            return self._apply_revoke(cert, self._seal_next(fields), reason, now)

    @wrap_audit_error
    def mark_devices_revoked(self, serials, reason, operator=""):
        check_text("reason", reason, allow_empty=False)
        serials = list(serials)
        with self._lock:
            for serial in serials:
                self._device(serial)  # every device found before anything changes
            done, planned = {}, []
            for serial in serials:
                mine = [] if serial in done else sorted(
                    (c for c in self._certs.values()
                     if c.device_serial == serial and not c.revoked),
                    key=lambda c: (c.added_at, c.fingerprint), reverse=True)
                done[serial] = [cert.cert_serial for cert in mine]
                for cert in mine:
                    now = self._now()
                    planned.append((cert, self._revoke_fields(cert, reason, operator, now), now))
            for cert, fields, now in planned:
                self._apply_revoke(cert, self._seal_next(fields), reason, now)
            return done

    def _revoke_fields(self, cert, reason, operator, now):
        return audit.revoke_entry(serial=cert.device_serial, cert_serial=cert.cert_serial,
                                  cert_fingerprint=cert.fingerprint, reason=reason,
                                  operator=operator, when=now)

    def _apply_revoke(self, cert, entry, reason, now):
        device = self._device(cert.device_serial)
        self._certs[cert.fingerprint] = dataclasses.replace(
            cert, revoked_at=now, revocation_reason=reason)
        if cert.kind == IDENTITY and device.identity_fingerprint == cert.fingerprint:
            self._update(device.serial, status=REVOKED, updated_at=now)
        return self._push(entry, device.serial)

    # -- devices and certificates -----------------------------------------------------------------

    def get_device(self, serial):
        with self._lock:
            return self._device(serial)

    def find_by_se_uid(self, se_uid):
        uid = bytes.fromhex(check_se_uid(se_uid))
        with self._lock:
            return [d for _s, d in sorted(self._devices.items(), reverse=True)
                    if d.se_uid == uid]

    @wrap_audit_error
    def add_certificate(self, serial, cert_der, kind, rotation_state=None,
                        operation="recorded", operator=""):
        if rotation_state is not None:
            check_text("rotation state", rotation_state)
        now = self._now()
        cert = certificate_row(serial, cert_der, kind, now)
        fields = audit.issuance_entry(serial=serial, kind=kind, operation=operation,
                                      operator=operator, when=now, facts=row_facts(cert))
        with self._lock:
            self._device(serial)
            self._check_new_cert(cert)
            entry = self._seal_next(fields)
            record = certificate_from_row(cert)
            self._certs[cert["fingerprint"]] = record
            if rotation_state is not None:
                self._update(serial, rotation_state=rotation_state, updated_at=now)
            self._push(entry, serial)
            return record

    def certificates(self, serial):
        with self._lock:
            self._device(serial)
            return sorted((c for c in self._certs.values() if c.device_serial == serial),
                          key=lambda c: (c.added_at, c.fingerprint))

    def certificate_status(self, cert_serial, issuer=None):
        with self._lock:
            return self._cert(cert_serial, issuer)

    def revoked_certificates(self, issuer):
        with self._lock:
            return sorted((c for c in self._certs.values()
                           if c.issuer == issuer and c.revoked_at is not None),
                          key=lambda c: c.cert_serial)

    def certificate_serials(self, issuer, valid_at=None):
        with self._lock:
            found = sorted(c.cert_serial for c in self._certs.values()
                           if c.issuer == issuer and c.not_after > (valid_at or ""))
        return iter([int(serial, 16) for serial in found])

    def certificate_and_device(self, cert_serial, issuer=None):
        with self._lock:  # one lock: both records of the same moment
            record = self._cert(cert_serial, issuer)
            return record, self._device(record.device_serial)

    def set_rotation_state(self, serial, state):
        check_text("rotation state", state)
        with self._lock:
            self._device(serial)
            self._update(serial, rotation_state=state, updated_at=self._now())

    @wrap_audit_error
    def acknowledge_rotation(self, serial, cert_fingerprint):
        with self._lock:  # one lock: read, decide and write as one step
            current = RotationState.parse(self._device(serial).rotation_state)
            state = current.acknowledged(cert_fingerprint)
            if state is None:
                return current
            now = self._now()
            entry = self._seal_next(audit.rotation_ack_entry(
                serial=serial, cert_fingerprint=state.new, previous_fingerprint=state.old,
                when=now))
            self._update(serial, rotation_state=state.format(), updated_at=now)
            self._push(entry, serial)
            return state

    # -- the audit chain --------------------------------------------------------------------------

    @wrap_audit_error
    def append_audit(self, fields):
        if fields.get("type") not in audit.DEVICELESS_TYPES:
            raise RegistryError(RegistryError.BAD_INPUT,
                                "device entries are written by the operation they record")
        with self._lock:
            return self._push(self._seal_next(fields), None)

    def head(self):
        with self._lock:
            return len(self._log), self._head

    def iter_audit_lines(self, start=0):
        with self._lock:
            lines = [entry.line for entry, _s in self._log[start:]]
        return iter(lines)

    def audit_snapshot(self):
        with self._lock:
            return len(self._log), self._head, iter([e.line for e, _s in self._log])

    def audit_entries_for(self, serial):
        with self._lock:
            return [entry for entry, s in self._log if s == serial]

    def last_checkpoint(self):
        with self._lock:
            for entry, _s in reversed(self._log):
                if entry.type == audit.CHECKPOINT:
                    return entry
        return None
