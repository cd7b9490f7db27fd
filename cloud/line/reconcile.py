"""`fleetid line reconcile`: resolve every in-flight device after a crash.

A station that dies (process kill, power cut of the line host, database down while it
tried to hold a device) leaves intent records in the registry and, if the CA had already
answered, a certificate in the issuance journal (journal.py).  Reconcile decides, per
intent, from what is durable (registry + journal) and, when the chip is still on its
programmer, from the chip itself:

    journaled cert  chip reachable and          outcome
                    passes the gate
    ---------------------------------------------------------------------------------
    yes (one)       yes                         "resumed": the confirmation gate ran
                                                now (new-key SCP03 session, SECURED,
                                                certificate read back, fresh challenge
                                                signed); identity record + injection
                                                entry committed in one transaction
    yes             no / not reachable          "revoked-orphan-cert": every journaled
                                                certificate recorded and revoked; device
                                                held (quarantined)
    no              -                           "no-certificate": device held
                                                (quarantined); nothing was issued

Then a sweep over the whole journal: any journaled certificate that is neither the
identity certificate of a committed device nor already revoked is revoked (a station
whose revoke succeeded but whose hold failed, or the reverse, is covered).  Afterwards:
no certificate exists without a committed record unless it is revoked; no intent is left
in flight; every decision has its audit entry (reconcile / revoke / injection).

Reconcile is idempotent: running it twice changes nothing the second time.
"""

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetid.cloud import audit
from fleetid.cloud.line import records, steps
from fleetid.cloud.line.gate import confirm_device
from fleetid.cloud.line.station import open_se_stack
from fleetid.cloud.registry.errors import RegistryError
from fleetid.cloud.registry.interface import COMMITTED, INTENT

RESUMED = "resumed"
REVOKED_ORPHAN = "revoked-orphan-cert"
NO_CERTIFICATE = "no-certificate"
SWEEP_REVOKED = "sweep-revoked"


class ReconcileReport:
    """What reconcile did.  Attributes: decisions (list of (serial, outcome, detail)),
    swept (certificate fingerprints revoked by the sweep), checkpoint (the signed
    checkpoint entry appended at the end, or None when every entry was already covered),
    counts() -> {outcome: n}."""

    def __init__(self):
        self.decisions = []
        self.swept = []
        self.checkpoint = None

    def add(self, serial, outcome, detail=""):
        self.decisions.append((serial, outcome, detail))

    def counts(self):
        out = {}
        for _serial, outcome, _detail in self.decisions:
            out[outcome] = out.get(outcome, 0) + 1
        if self.swept:
            out[SWEEP_REVOKED] = len(self.swept)
        return out

    def __repr__(self):
        return "ReconcileReport(%r)" % (self.counts(),)


def reconcile(resources, chip_bus=None, operator="reconcile", station="reconcile",
              link_clock=None):
    """Resolve every in-flight intent (see the module docstring).

    Params: resources: resources.LineResources (registry, HSM, journal, CA, config).
        chip_bus: optional callable(se_uid bytes) -> a Bus to the chip, or None when the
            chip is not on a programmer any more.  Without it nothing is resumed.
        operator, station: who reconciles (audit fields).  link_clock: T=1' link clock.
    Returns: ReconcileReport.
    Raises: RegistryError when the registry itself fails (run again later: idempotent).
    """
    registry = resources.registry
    report = ReconcileReport()
    journal_entries = resources.journal.entries()
    by_serial = {}
    for serial, _uid, cert_der in journal_entries:
        by_serial.setdefault(serial, [])
        if cert_der not in by_serial[serial]:
            by_serial[serial].append(cert_der)

    for device in registry.list_in_flight():
        certs = by_serial.get(device.serial, [])
        if len(certs) == 1 and chip_bus is not None:
            detail = _try_resume(resources, device, certs[0], chip_bus, operator, link_clock)
            if detail is None:
                report.add(device.serial, RESUMED)
                continue
        else:
            detail = "no chip access" if certs else ""
        if certs:
            for cert_der in certs:
                records.revoke_uncommitted(registry, device.serial, cert_der, operator)
            last = x509.load_der_x509_certificate(certs[-1])
            registry.reconcile(
                device.serial, REVOKED_ORPHAN,
                audit.free_text("certificate issued, injection not confirmed: "
                                + (detail or "")),
                station=station, operator=operator,
                cert_serial=last.serial_number,
                cert_fingerprint=audit.certificate_facts(certs[-1])["cert_fingerprint"])
            report.add(device.serial, REVOKED_ORPHAN, detail or "")
        else:
            registry.reconcile(device.serial, NO_CERTIFICATE,
                               "crash before issuance: quarantined", station=station,
                               operator=operator)
            report.add(device.serial, NO_CERTIFICATE)

    _sweep(resources, journal_entries, operator, report)
    # Recovery ends with a signed checkpoint: whatever the killed run appended after its
    # last checkpoint (and the entries written here) is anchored now, not at some later
    # run's end.  Nothing new since the last checkpoint: no entry.
    if resources.checkpointer is not None:
        report.checkpoint = resources.checkpointer.checkpoint()
    return report


def _try_resume(resources, device, cert_der, chip_bus, operator, link_clock):
    """Run the confirmation gate against the chip and commit.  Returns None on success,
    else a short reason why the device cannot be resumed (nothing was written then)."""
    try:
        bus = chip_bus(device.se_uid)
    except Exception as exc:  # noqa: BLE001 - the chip is gone: revoke instead
        return "chip not reachable: %s" % type(exc).__name__
    if bus is None:
        return "chip not reachable"
    config = resources.config
    hsm = resources.hsm
    opened = None
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        device_serial = config.device_serial(device.serial)
        opened = open_se_stack(bus, config.link_profile, link_clock)
        link = opened.link
        plain = opened.se
        if plain.uid() != device.se_uid:
            return "another chip on the programmer"
        with hsm.session() as pooled:
            hsm_session = "%s#%d" % (type(hsm).__name__, pooled.serial)
            with hsm.diversify(config.master_label, device.se_uid) as device_keys:
                confirm_device(resources, link, device.se_uid, device_keys, cert,
                               device_serial, config.slot)
            statement_der = records.statement_from_certificate(cert)
            record, entry = records.build_commit(
                resources, device.station or "reconcile", device.serial, device.se_uid,
                cert.public_bytes(serialization.Encoding.DER),
                audit.attestation_hash(statement_der), hsm_session, operator=operator,
                batch=device.batch or None)
            resources.registry.commit_identity(record, entry)
        return None
    except RegistryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the gate means: revoke
        return "confirmation failed: %s" % steps.classify(exc)
    finally:
        if opened is not None:
            opened.close()


def _sweep(resources, journal_entries, operator, report):
    """Revoke journaled certificates that have no committed record and are not revoked."""
    registry = resources.registry
    seen = set()
    for serial, _uid, cert_der in journal_entries:
        facts = audit.certificate_facts(cert_der)
        fingerprint = facts["cert_fingerprint"]
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        try:
            device = registry.get_device(serial)
        except RegistryError as exc:
            if exc.reason == RegistryError.DEVICE_NOT_FOUND:
                continue  # a journal from another registry: not ours to judge
            raise
        if device.status == COMMITTED and device.identity_fingerprint == fingerprint:
            continue
        if device.status == INTENT:
            continue  # resolved above (or the registry failed: the next run does it)
        try:
            status = registry.certificate_status(facts["cert_serial"],
                                                 issuer=facts["issuing_ca"])
            if status.revoked:
                continue
        except RegistryError as exc:
            if exc.reason != RegistryError.CERTIFICATE_NOT_FOUND:
                raise
        records.revoke_uncommitted(registry, serial, cert_der, operator)
        report.swept.append(fingerprint)


def in_flight_count(registry):
    """How many intents are unresolved (for `fleetid line run` to refuse to start)."""
    return len(registry.list_in_flight())


__all__ = ["reconcile", "ReconcileReport", "RESUMED", "REVOKED_ORPHAN", "NO_CERTIFICATE",
           "in_flight_count"]
