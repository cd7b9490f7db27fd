"""One personalisation station: the per-device flow of the factory line, steps 1-8.

    station = Station("st-01", resources)            # resources: LineResources (resources.py)
    result = station.provision(bus)                  # bus: the chip's Bus (write/read/reset)
    result.ok, result.serial, result.cause, result.timings

Steps, what each writes, and what happens when it fails
-------------------------------------------------------

    step       what happens                                       written before it ends
    identify   T=1' open, SELECT, GET DATA (UID, life cycle,      nothing
               SCP key versions, MAK chain); the MAK chain must
               validate to a trusted SE vendor root and name the
               UID; the chip must be in transport state and not
               already in the registry                            (refusal: nothing at all)
    intent     allocate_intent (serial + intent, one transaction) serial, intent record
    inject     SCP03 with the chip's transport keys (unwrapped
               inside the HSM from the vendor's shipment, or the
               batch's set; session keys from the HSM), PUT KEY
               of the HSM-diversified set,
               the SE's KCVs checked against the HSM's            SE: new SCP03 keys
    attest     GENERATE KEY (identity slot) and ATTEST with a
               fresh CA nonce                                     SE: identity key
    issue      CSR built here (common/der.py) and signed inside
               the SE; the issuing CA verifies the attestation;
               the certificate goes to the issuance journal       journal: the certificate
                                                                  (journal.py)
    personalise PUT CERT, STORE DATA trust anchors, SET STATUS
               SECURED                                            SE: cert, anchors, SECURED
    confirm    (gate.py) fresh SCP03 session with the NEW keys (the card
               cryptogram proves the card holds them), life cycle
               read back, certificate read back, the SE signs a
               fresh challenge that must verify under the issued
               certificate's key
    commit     Registry.commit_identity: identity record + audit
               injection entry in one transaction                 committed record + audit

The shared services (HSM pool, registry, CA, journal, checkpointer) are in resources.py,
the counterfeit check and the confirmation gate in gate.py, the registry record and audit
facts of a device in records.py, step names and failure causes in steps.py.

Every check of the confirmation gate is positive: a value is compared or a signature
verified.  No error is not enough.

A failure after `intent` never leaves a device that could ship: the station revokes the
certificate if one was issued (registry add_certificate + mark_revoked) and then holds the
device (status "held", a hold audit entry with the cause).  If those writes fail too (the
database is down), the intent stays in flight and `fleetid line reconcile`
(reconcile.py) resolves it from the issuance journal.  A crash (process kill) anywhere
leaves the same state as a failed write: an intent, maybe a journaled certificate.

The station never holds a static SCP03 key: transport, master and per-device keys stay
behind the HSM interface, which hands out PUT KEY payloads wrapped under the card's DEK
and ephemeral SCP03 session keys (cloud/hsm/README.md).

Why the issuance journal: the registry stores a certificate only together with a state
change (commit, or revoke after add_certificate), so between "the CA signed" and "the
registry committed" something durable must remember the certificate, or a crash in that
window would leave a valid certificate nobody can revoke.  The journal (JSON lines, fsync
per entry, certificates only: public data) is written before the certificate leaves the
station for the SE.
"""

import time

from cryptography.hazmat.primitives import serialization

from fleetid.cloud import audit
from fleetid.cloud.hsm import interface as hsm_interface
from fleetid.cloud.hsm.errors import HsmBusy, HsmError
from fleetid.cloud.line.gate import check_vendor_chain, confirm_device
from fleetid.cloud.line.records import build_commit, revoke_uncommitted
from fleetid.cloud.line.steps import (
    AFTER_COMMIT,
    ATTEST,
    COMMIT,
    CONFIRM,
    IDENTIFY,
    INJECT,
    INTENT,
    ISSUE,
    PERSONALISE,
    STEPS,
    LineFailure,
    classify,
)
from fleetid.cloud.registry.interface import COMMITTED
from fleetid.common import se_consts as C
from fleetid.common.errors import ApduError, LinkError, SecureChannelError
from fleetid.common.t1 import PROFILE_GP
from fleetid.device import enrol, stack

__all__ = ["Station", "DeviceResult", "open_se_stack", "LineFailure", "STEPS",
           "AFTER_COMMIT"]

IDENTITY_POLICY = C.POLICY_SIGN  # the SE adds NON_EXPORTABLE and GENERATED_ON_CHIP
_HSM_BUSY_RETRIES = 3  # HsmBusy before anything is written: wait for a session again


class DeviceResult:
    """The outcome of one device at one station.

    Attributes: ok (committed), serial (int or None: None = nothing was written),
    device_serial (str or None), se_uid (bytes or None), cause / step / detail (failure),
    cert_der, timings ({step: seconds}), cycle_s, held (the registry holds it),
    revoked (its certificate was revoked), hsm_session.
    """

    __slots__ = ("ok", "serial", "device_serial", "se_uid", "cause", "step", "detail",
                 "cert_der", "timings", "cycle_s", "held", "revoked", "hsm_session",
                 "station")

    def __init__(self, station):
        self.station = station
        self.ok = False
        self.serial = None
        self.device_serial = None
        self.se_uid = None
        self.cause = None
        self.step = None
        self.detail = ""
        self.cert_der = None
        self.timings = {}
        self.cycle_s = 0.0
        self.held = False
        self.revoked = False
        self.hsm_session = ""

    def __repr__(self):
        if self.ok:
            return "DeviceResult(ok serial=%s)" % self.serial
        return "DeviceResult(failed %s at %s serial=%s)" % (self.cause, self.step, self.serial)


def open_se_stack(bus, profile=PROFILE_GP, clock=None, ifsd=None):
    """The SE stack on a chip's bus (device/stack.py: T=1' link opened with the CIP
    exchange and S(IFS), the applet selected).

    ifsd: the largest INF the line host accepts; None = the profile's maximum (GP T=1':
    0xFF9, GPC_SPE_172 4; SE05x: 254).  The line host has the memory, and a certificate
    chain or a certificate then comes back in one I-block instead of a chain of 254-byte
    ones (fewer bus transactions; each costs host CPU and, on a real bus, an address
    byte and a turnaround).  The SE still sends at most what it can.
    Returns: device.stack.SeStack.  Raises LinkError, ApduError (the bus is closed then)."""
    return stack.open_se(bus, profile, clock, ifsd=ifsd)


class Station:
    """One programmer station.  Not thread-safe itself: one thread per station; stations
    share `resources` (HSM pool, registry, CA, journal), which are.

    Params: name: station id (audit "station").  resources: LineResources.
        step_hook: optional callable(step_name) run at every step boundary (before each
            step from INTENT on, and AFTER_COMMIT); fault-injection tests raise from it.
        link_clock: clock for the T=1' link (FakeClock in fault tests; SystemClock).
        on_step: optional callable(station, step_name) for progress displays.
    """

    def __init__(self, name, resources, step_hook=None, link_clock=None, on_step=None):
        self.name = name
        self.resources = resources
        self.step_hook = step_hook
        self.link_clock = link_clock
        self.on_step = on_step

    # -- the flow ------------------------------------------------------------------------

    def provision(self, bus):
        """Personalise the chip behind `bus`: steps 1-8.

        Returns: DeviceResult (ok, or the failure's cause; a failure after the intent has
        held the device, and revoked its certificate if one was issued, where the registry
        allowed).  Raises only BaseException subclasses that are not Exception (a test's
        simulated process kill, KeyboardInterrupt): the state is then what a crash leaves.
        """
        result = DeviceResult(self.name)
        started = time.perf_counter()
        state = _DeviceState()
        try:
            self._run(bus, result, state)
            result.ok = True
        except Exception as exc:  # noqa: BLE001 - every failure ends in a hold, by cause
            result.cause = classify(exc)
            result.step = state.step
            result.detail = getattr(exc, "detail", "") or ""
            if result.serial is not None:
                self._contain(result, state)
        finally:
            result.cycle_s = time.perf_counter() - started
            if state.stack is not None:
                try:
                    state.stack.close()
                except Exception:  # noqa: BLE001 - the bus may be gone already
                    pass
        return result

    def _enter(self, state, result, step, now):
        if state.step is not None:
            result.timings[state.step] = now - state.step_started
        state.step = step
        state.step_started = now
        if self.on_step is not None:
            self.on_step(self, step)
        if self.step_hook is not None and step != IDENTIFY:
            self.step_hook(step)

    def _run(self, bus, result, state):
        res = self.resources
        config = res.config
        clock = time.perf_counter
        self._enter(state, result, IDENTIFY, clock())
        opened = state.stack = open_se_stack(bus, config.link_profile, self.link_clock)
        plain = opened.se
        se_uid = result.se_uid = plain.uid()
        life_cycle = plain.life_cycle()
        if life_cycle not in (C.LC_OP_READY, C.LC_INITIALIZED):
            raise LineFailure("not_personalisable:" + C.LC_NAMES.get(life_cycle, "?"), IDENTIFY)
        transport_kvn = res.transport_kvn(se_uid)
        if transport_kvn not in bytes(plain.get_data(C.DATA_SCP_INFO)):
            raise LineFailure("not_in_transport_state", IDENTIFY,
                              "transport key set 0x%02X absent" % transport_kvn)
        state.chain = plain.attestation_chain()
        check_vendor_chain(res, state.chain, se_uid)
        for earlier in res.registry.find_by_se_uid(se_uid):
            if earlier.status == COMMITTED:
                raise LineFailure("duplicate_se_uid", IDENTIFY,
                                  "chip already has identity %s" % earlier.serial)

        # One pooled HSM session for the whole device (the HSM's session bound counts
        # stations, not calls).  HsmBusy here has written nothing: wait and try again.
        for attempt in range(_HSM_BUSY_RETRIES):
            try:
                session_cm = res.hsm.session()
                pooled = session_cm.__enter__()
                break
            except HsmBusy:
                if attempt == _HSM_BUSY_RETRIES - 1:
                    raise
        try:
            result.hsm_session = "%s#%d" % (type(res.hsm).__name__, pooled.serial)
            # A shipped chip's transport keys: unwrapped inside the HSM on this session
            # (still identify: a refused delivery writes nothing), destroyed afterwards.
            with res.chip_transport_keys(se_uid) as transport:
                self._personalise(opened, se_uid, transport, result, state, clock)
        finally:
            session_cm.__exit__(None, None, None)

    def _personalise(self, opened, se_uid, transport, result, state, clock):
        res = self.resources
        config = res.config
        hsm = res.hsm
        registry = res.registry

        # 2. serial + intent: from here on the device exists for the registry.
        self._enter(state, result, INTENT, clock())
        # One durable transaction: serial + intent (a crash leaves both or neither).
        serial = registry.allocate_intent(se_uid, self.name, config.operator, config.batch,
                                          result.hsm_session).serial
        result.serial = serial
        result.device_serial = device_serial = config.device_serial(serial)

        # 3. SCP03 with the transport keys; PUT KEY of the diversified set.
        self._enter(state, result, INJECT, clock())
        se = opened.secure(res.prims,
                           lambda h, c, _ki: hsm.scp03_session_keys(transport, h, c),
                           level=config.scp_level, kvn=transport.kvn)
        with hsm.diversify(config.master_label, se_uid) as device_keys:
            payload = hsm.put_key_payload(device_keys, transport, device_keys.kvn)
            answer = se.put_key(payload, old_kvn=transport.kvn)
            if answer != hsm_interface.put_key_response_expected(payload):
                raise LineFailure("inject:kcv", INJECT, "the SE's key check values differ")

            # 4.-5. identity key generated inside, attested, certified.
            cert, cert_der, attestation_hash = self._attest_and_issue(
                se, se_uid, serial, device_serial, result, state, clock)

            # 6. certificate, trust anchors, life cycle SECURED.
            self._enter(state, result, PERSONALISE, clock())
            self._secure(opened, se, cert_der)

            # 7. confirmation gate: new keys, read-back, proof of possession.
            self._enter(state, result, CONFIRM, clock())
            self._confirm(opened, se_uid, device_keys, cert, cert_der, device_serial)

        # 8. one transaction: identity record + audit entry.
        self._enter(state, result, COMMIT, clock())
        record, entry = build_commit(res, self.name, serial, se_uid, cert_der,
                                     attestation_hash, result.hsm_session, cert=cert)
        registry.commit_identity(record, entry)
        result.timings[COMMIT] = clock() - state.step_started
        state.step = None
        if res.checkpointer is not None:
            try:
                res.checkpointer.maybe_checkpoint()
            except Exception:  # noqa: BLE001 - a late checkpoint is not a device failure
                pass
        if self.step_hook is not None:
            self.step_hook(AFTER_COMMIT)

    def _attest_and_issue(self, se, se_uid, serial, device_serial, result, state, clock):
        """Steps 4 and 5: a new identity key made inside the SE, attested with a fresh CA
        nonce; a CSR signed inside the SE, the CA verifies the attestation and issues.
        The certificate is journalled before it leaves for the SE.
        Returns: (certificate, its DER, the attestation statement's hash for the audit
        entry)."""
        res = self.resources
        config = res.config
        slot = config.slot
        # 4. identity key generated inside; attested with a fresh CA nonce.
        self._enter(state, result, ATTEST, clock())
        nonce = res.issuing_ca.issue_nonce()
        # Parsed strictly once (device/enrol.py); the bundle reuses the parsed element.
        point, signed = enrol.new_attested_key(se, slot, nonce, IDENTITY_POLICY)
        attestation_hash = audit.attestation_hash(signed.statement_der)

        # 5. CSR signed inside the SE -> the CA verifies the attestation -> certificate.
        self._enter(state, result, ISSUE, clock())
        csr = enrol.attested_csr(se, slot, point, signed, state.chain, device_serial,
                                 device_serial)
        cert = res.issuing_ca.issue(csr, se_uid, device_serial, config.cert_profile)
        cert_der = cert.public_bytes(serialization.Encoding.DER)
        res.journal.record(serial, se_uid, cert_der)
        state.cert_der = result.cert_der = cert_der
        return cert, cert_der, attestation_hash

    def _secure(self, opened, se, cert_der):
        """Step 6: the certificate and the trust anchors into the SE, life cycle SECURED,
        the SCP03 session closed."""
        config = self.resources.config
        se.put_cert(config.slot, cert_der)
        # The trust anchors in one STORE DATA (the applet stores all DGIs or none).
        anchors = config.trust_dgis()
        se.store_data(anchors[0][0], anchors[0][1], more=anchors[1:])
        se.set_status(C.LC_SECURED)
        opened.close_secure()

    def _confirm(self, opened, se_uid, device_keys, cert, cert_der, device_serial):
        """The gate, with one retry from scratch after a transient failure: the device is
        SECURED with its certificate by now, and a power glitch or a lost HSM session (the
        per-device key objects die with it: diversify again, the result is the same keys)
        should not cost a good device.  The retry re-selects the applet and repeats every
        check; a failing check (LineFailure) is not retried."""
        res = self.resources
        try:
            confirm_device(res, opened.link, se_uid, device_keys, cert, device_serial,
                           res.config.slot, cert_der)
            return
        except LineFailure:
            raise
        except (LinkError, SecureChannelError, ApduError, HsmError):
            pass
        opened.se.select()
        with res.hsm.diversify(res.config.master_label, se_uid) as fresh_keys:
            confirm_device(res, opened.link, se_uid, fresh_keys, cert, device_serial,
                           res.config.slot, cert_der)

    # -- failure containment ---------------------------------------------------------------

    def _contain(self, result, state):
        """After a failure past the intent: revoke the certificate if one was issued, then
        hold the device.  A registry failure here leaves the intent for reconcile."""
        registry = self.resources.registry
        operator = self.resources.config.operator
        if state.cert_der is not None:
            try:
                revoke_uncommitted(registry, result.serial, state.cert_der, operator)
                result.revoked = True
            except Exception:  # noqa: BLE001 - reconcile revokes it from the journal
                return
        try:
            reason = audit.free_text("%s: %s" % (result.step, result.cause))
            registry.hold(result.serial, reason, self.name, operator)
            result.held = True
        except Exception:  # noqa: BLE001 - the intent stays in flight for reconcile
            pass


class _DeviceState:
    __slots__ = ("step", "step_started", "cert_der", "stack", "chain")

    def __init__(self):
        self.chain = None
        self.step = None
        self.step_started = 0.0
        self.cert_der = None
        self.stack = None
