"""One personalisation station: the per-device flow of the factory line (architecture,
"Factory line, per device", steps 1-8).

    station = Station("st-01", line)                 # line: LineResources (below)
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
    inject     SCP03 with the batch transport keys (session keys
               from the HSM), PUT KEY of the HSM-diversified set,
               the SE's KCVs checked against the HSM's            SE: new SCP03 keys
    attest     GENERATE KEY (identity slot) and ATTEST with a
               fresh CA nonce                                     SE: identity key
    issue      CSR built here (common/der.py) and signed inside
               the SE; the issuing CA verifies the attestation;
               the certificate goes to the issuance journal       journal: the certificate
    personalise PUT CERT, STORE DATA trust anchors, SET STATUS
               SECURED                                            SE: cert, anchors, SECURED
    confirm    fresh SCP03 session with the NEW keys (the card
               cryptogram proves the card holds them), life cycle
               read back, certificate read back, the SE signs a
               fresh challenge that must verify under the issued
               certificate's key
    commit     Registry.commit_identity: identity record + audit
               injection entry in one transaction                 committed record + audit

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

import datetime
import hashlib
import json
import os
import threading
import time

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509 import verification

from fleetid.cloud import audit
from fleetid.cloud.ca.errors import IssuanceRefused
from fleetid.cloud.hsm import interface as hsm_interface
from fleetid.cloud.hsm.errors import HsmBusy, HsmError
from fleetid.cloud.registry.errors import RegistryError
from fleetid.cloud.registry.interface import COMMITTED, IdentityRecord
from fleetid.common import attestation, der, scp03
from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.common.errors import (
    ApduError,
    ApduFormatError,
    DerError,
    FleetidError,
    LinkError,
    SecureChannelError,
)
from fleetid.common.host.hostcrypto import CryptographyPrimitives
from fleetid.common.t1 import PROFILE_GP
from fleetid.device import enrol, stack
from fleetid.device.se import SeSession

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

# Domain separation of the confirmation challenge: the SE signs SHA-256(domain || 32 random
# bytes || serial), so the signature cannot be replayed as anything else.
CONFIRM_DOMAIN = b"fleetid/line-confirm/v1\n"
CHALLENGE_BYTES = 32

IDENTITY_POLICY = C.POLICY_SIGN  # the SE adds NON_EXPORTABLE and GENERATED_ON_CHIP
REVOCATION_REASON = "cessationOfOperation"  # RFC 5280 5.3.1 CRLReason: never shipped
_VERIFIER_MAX_AGE_S = 60.0  # rebuild the vendor-chain verifier (its time) once a minute
_HSM_BUSY_RETRIES = 3  # HsmBusy before anything is written: wait for a session again


class LineFailure(FleetidError):
    """A device failed at the line.  `cause` is a short machine-readable string
    ("counterfeit:unknown_vendor", "issuance_refused:key_mismatch", ...), `step` the step
    it failed in, `detail` a secret-free description."""

    def __init__(self, cause, step="", detail=""):
        super().__init__(cause if not detail else cause + ": " + detail)
        self.cause = cause
        self.step = step
        self.detail = detail


class LineConfig:
    """What a line needs to know besides its services.

    Params: batch: the chip batch (names the HSM transport key set; 1..128 chars).
        ca_label: the issuing CA's key label (for the report).  master_label: the HSM's
        SCP03 master key.  operator: who runs the line.  serial_prefix: device serials are
        "<prefix>-<9 digits>" (certificate CN / serialNumber).  fleet_root_der: DER of the
        fleet root (STORE DATA DGI_FLEET_ROOT).  firmware_key_point: 65-byte point of the
        firmware-signing key or None.  server_root_der: DER or None.  scp_level: SCP03
        security level (default C-MAC, C-DEC, R-MAC, R-ENC).  link_profile: T=1' framing.
    """

    def __init__(self, batch, fleet_root_der, master_label="scp03-master", operator="line",
                 serial_prefix="FID", firmware_key_point=None, server_root_der=None,
                 scp_level=0x33, slot=C.SLOT_IDENTITY, link_profile=PROFILE_GP,
                 cert_profile="identity"):
        self.batch = batch
        self.fleet_root_der = bytes(fleet_root_der)
        self.master_label = master_label
        self.operator = operator
        self.serial_prefix = serial_prefix
        self.firmware_key_point = firmware_key_point
        self.server_root_der = server_root_der
        self.scp_level = scp_level
        self.slot = slot
        self.link_profile = link_profile
        self.cert_profile = cert_profile

    def trust_dgis(self):
        """The STORE DATA DGIs of the trust anchors: [(dgi, value)], fleet root first."""
        dgis = [(C.DGI_FLEET_ROOT, self.fleet_root_der)]
        if self.firmware_key_point is not None:
            dgis.append((C.DGI_FIRMWARE_KEY, self.firmware_key_point))
        if self.server_root_der is not None:
            dgis.append((C.DGI_SERVER_ROOT, self.server_root_der))
        return dgis

    def device_serial(self, serial):
        """The device serial string the certificate carries for registry serial `serial`."""
        return "%s-%09d" % (self.serial_prefix, serial)


class IssuanceJournal:
    """Durable record of every certificate the line received from the CA, written before
    the certificate goes to the SE (module docstring).  JSON lines, thread-safe;
    certificates are public, nothing secret is written.

    Durability with group commit: `record` returns only once an fsync that started after
    its line was written has completed.  Stations appending at the same moment share one
    fsync (the first becomes the syncer, the others wait for it), so K stations do not
    queue K fsyncs one behind the other.

    Line format: {"serial": int, "se_uid": hex, "cert": hex DER, "time": RFC 3339}.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._cond = threading.Condition()
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._written = 0  # lines appended (in the file, maybe not on disk yet)
        self._synced = 0  # lines known to be on disk
        self._syncing = False
        self.fsyncs = 0

    def record(self, serial, se_uid, cert_der, when=None):
        """Append one issued certificate and return once it is on disk (fsync)."""
        line = json.dumps({"serial": serial, "se_uid": bytes(se_uid).hex(),
                           "cert": bytes(cert_der).hex(),
                           "time": audit.format_time(time.time() if when is None else when)},
                          sort_keys=True, separators=(",", ":")).encode() + b"\n"
        with self._cond:
            if self._fd is None:
                raise RegistryError(RegistryError.CLOSED, "issuance journal closed")
            os.write(self._fd, line)  # O_APPEND: one write, one whole line
            self._written += 1
            mine = self._written
            while self._synced < mine:
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                target = self._written
                fd = self._fd
                self._cond.release()
                try:
                    os.fsync(fd)
                    ok = True
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._cond.notify_all()
                if ok:
                    self.fsyncs += 1
                    self._synced = max(self._synced, target)

    def entries(self):
        """Every journaled certificate: list of (serial, se_uid bytes, cert DER).  A torn
        last line (crash during the write) is ignored: its certificate never left."""
        out = []
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return out
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
                out.append((int(item["serial"]), bytes.fromhex(item["se_uid"]),
                            bytes.fromhex(item["cert"])))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def certificates_for(self, serial):
        """DER certificates journaled for registry serial `serial`, oldest first."""
        return [cert for s, _uid, cert in self.entries() if s == serial]

    def close(self):
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class LineResources:
    """The shared services of one line: every station of a run uses the same instance.

    Params: hsm: HsmBackend.  registry: Registry.  issuing_ca: IssuingCa.
        vendor_roots: trusted SE vendor root certificates.  config: LineConfig.
        journal: IssuanceJournal.  checkpointer: audit.Checkpointer or None.
        prims: SCP03 host primitives (default CryptographyPrimitives()).
        wall_clock: epoch seconds (vendor chain validation time).
    """

    def __init__(self, hsm, registry, issuing_ca, vendor_roots, config, journal,
                 checkpointer=None, prims=None, wall_clock=time.time):
        self.hsm = hsm
        self.registry = registry
        self.issuing_ca = issuing_ca
        self.vendor_roots = list(vendor_roots)
        self.config = config
        self.journal = journal
        self.checkpointer = checkpointer
        self.prims = prims or CryptographyPrimitives()
        self.wall_clock = wall_clock
        self._transport = None
        self._lock = threading.Lock()
        self._verifier = None
        self._verifier_at = None
        self.issuer_name = issuing_ca.ca_certificate.subject.rfc4514_string()
        # issuer Name DER -> RFC 4514 string, for the audit facts (certificate_facts).
        self.issuer_names = {}

    def transport_keys(self):
        """The batch's transport KeySetHandle (looked up once)."""
        with self._lock:
            if self._transport is None:
                self._transport = self.hsm.transport_keys(self.config.batch)
            return self._transport

    def vendor_verifier(self):
        """A cryptography client verifier for MAK chains (cached, rebuilt each minute)."""
        now = self.wall_clock()
        with self._lock:
            if self._verifier is None or now - self._verifier_at > _VERIFIER_MAX_AGE_S:
                if not self.vendor_roots:
                    raise LineFailure("counterfeit:unknown_vendor", IDENTIFY,
                                      "no trusted SE vendor roots")
                at = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
                # MAK certificates are SE-vendor end-entity certificates (no SAN, no EKU):
                # the same policy split as fleetid.cloud.ca.evidence.
                self._verifier = (
                    verification.PolicyBuilder()
                    .store(verification.Store(self.vendor_roots))
                    .time(at)
                    .max_chain_depth(4)
                    .extension_policies(
                        ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                        ee_policy=verification.ExtensionPolicy.permit_all())
                    .build_client_verifier())
                self._verifier_at = now
            return self._verifier


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


def check_vendor_chain(resources, chain_der, se_uid):
    """Step 1's counterfeit check: the chip's MAK chain validates to a trusted SE vendor
    root, and the MAK certificate names this UID when it carries a serialNumber.

    Raises LineFailure("counterfeit:<why>")."""
    if not chain_der:
        raise LineFailure("counterfeit:no_chain", IDENTIFY)
    try:
        certificates = [x509.load_der_x509_certificate(c) for c in chain_der]
    except ValueError:
        raise LineFailure("counterfeit:bad_chain", IDENTIFY) from None
    mak = certificates[0]
    try:
        resources.vendor_verifier().verify(mak, certificates[1:])
    except LineFailure:
        raise
    except Exception:  # noqa: BLE001 - VerificationError or a malformed certificate
        raise LineFailure("counterfeit:unknown_vendor", IDENTIFY) from None
    names = mak.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)
    if names and names[0].value.lower() != se_uid.hex():
        raise LineFailure("counterfeit:uid_mismatch", IDENTIFY,
                          "MAK certificate names another SE")
    return mak


def confirm_device(resources, link, se_uid, device_keys, cert, device_serial, slot):
    """The confirmation gate (step 7), also used by reconcile to resume a device.

    Opens a fresh SCP03 session with the per-device keys (the card cryptogram, checked in
    constant time by Scp03Host.open, proves the card holds them), reads back the life cycle
    (must be SECURED) and the certificate (must be `cert`), and has the SE sign a fresh
    challenge that must verify under the certificate's key.
    Returns: None.  Raises LineFailure("confirmation:<what>") or link / SE errors.
    """
    hsm = resources.hsm
    host = scp03.Scp03Host(
        link.transceive, resources.prims,
        lambda h, c, _ki: hsm.scp03_session_keys(device_keys, h, c),
        level=resources.config.scp_level, kvn=device_keys.kvn)
    host.open()
    try:  # the session (its prepared session keys) is dropped whatever the outcome
        _confirm_checks(host, device_keys, cert, device_serial, slot)
    finally:
        host.close()


def _confirm_checks(host, device_keys, cert, device_serial, slot):
    if host.key_info is None or host.key_info[0] != device_keys.kvn:
        raise LineFailure("confirmation:kvn", CONFIRM, "the card used another key set")
    se = SeSession(ApduProtocol(host.transceive))
    if se.life_cycle() != C.LC_SECURED:
        raise LineFailure("confirmation:life_cycle", CONFIRM)
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    if se.get_cert(slot) != cert_der:
        raise LineFailure("confirmation:certificate", CONFIRM, "SE holds another certificate")
    challenge = os.urandom(CHALLENGE_BYTES)
    digest = hashlib.sha256(CONFIRM_DOMAIN + challenge + device_serial.encode()).digest()
    signature = se.sign(slot, digest)
    try:
        cert.public_key().verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature:
        raise LineFailure("confirmation:possession", CONFIRM,
                          "challenge signature does not verify") from None


def statement_from_certificate(cert):
    """The DER attestation statement carried in an issued certificate's extension."""
    from fleetid.cloud.ca.evidence import ATTESTATION_EXTENSION_OID

    value = cert.extensions.get_extension_for_oid(ATTESTATION_EXTENSION_OID).value.value
    bundle = attestation.decode_evidence_bundle(value)
    return bundle.statements[0].statement_der


def certificate_facts(resources, cert_der, cert=None):
    """audit.certificate_facts(cert_der), from the parsed `cert` when the caller has it
    (no second parse; the issuer's RFC 4514 string cached per issuer DER)."""
    if cert is None:
        return audit.certificate_facts(cert_der)
    issuer_der = _issuer_der(cert_der)  # cheaper than building cert.issuer's Name
    names = getattr(resources, "issuer_names", None)
    if issuer_der is None:
        names = None
    issuer = names.get(issuer_der) if names is not None else None
    if issuer is None:
        issuer = cert.issuer.rfc4514_string()
        if names is not None and len(names) < 64:
            names[issuer_der] = issuer
    return {
        "cert_serial": audit.cert_serial_hex(cert.serial_number),
        "cert_fingerprint": hashlib.sha256(bytes(cert_der)).hexdigest(),
        "issuing_ca": issuer,
    }


def _issuer_der(cert_der):
    # Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    #   serialNumber, signature AlgorithmIdentifier, issuer Name, ... } ... } (RFC 5280
    # 4.1): the issuer's encoding, as the cache key of its string.  None if unreadable.
    try:
        tbs = der.DerReader(cert_der).read_sequence().read_sequence()
        if tbs.peek_tag() == 0xA0:
            tbs.read_tlv(0xA0)
        tbs.read_tlv(der.TAG_INTEGER)
        tbs.read_raw(der.TAG_SEQUENCE)
        return tbs.read_raw(der.TAG_SEQUENCE)
    except DerError:
        return None


def build_commit(resources, station_name, serial, se_uid, cert_der, attestation_hash,
                 hsm_session, operator=None, batch=None, cert=None):
    """(IdentityRecord, unsealed injection audit entry) for one confirmed device.

    cert: the parsed certificate of cert_der, if the caller has it (saves a parse)."""
    config = resources.config
    operator = operator or config.operator
    batch = batch or config.batch
    record = IdentityRecord(
        serial=serial, se_uid=bytes(se_uid), identity_cert_der=bytes(cert_der),
        slot=config.slot, aid=C.AID, batch=batch, station=station_name,
        operator=operator, hsm_session=hsm_session, attestation_hash=attestation_hash)
    facts = certificate_facts(resources, cert_der, cert)
    entry = audit.injection_entry(
        serial=serial, se_uid=se_uid, slot=config.slot, aid=C.AID,
        cert_serial=facts["cert_serial"], cert_fingerprint=facts["cert_fingerprint"],
        issuing_ca=facts["issuing_ca"], batch=batch, station=station_name,
        operator=operator, hsm_session=hsm_session, attestation_hash=attestation_hash,
        when=resources.registry.wall_clock())
    return record, entry


def revoke_uncommitted(registry, serial, cert_der, operator, reason=REVOCATION_REASON):
    """Record `cert_der` in device `serial`'s history and mark it revoked.  Tolerates a
    certificate already recorded or already revoked.  Raises RegistryError otherwise."""
    cert = x509.load_der_x509_certificate(bytes(cert_der))
    try:
        registry.add_certificate(serial, cert_der, "identity", operation="line-uncommitted",
                                 operator=operator)
    except RegistryError as exc:
        if exc.reason != RegistryError.DUPLICATE_CERTIFICATE:
            raise
    try:
        registry.mark_revoked(cert.serial_number, reason, operator=operator,
                              issuer=cert.issuer.rfc4514_string())
    except RegistryError as exc:
        if exc.reason != RegistryError.STATE:  # already revoked
            raise


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
        link = opened.link
        plain = opened.se
        se_uid = result.se_uid = plain.uid()
        life_cycle = plain.life_cycle()
        if life_cycle not in (C.LC_OP_READY, C.LC_INITIALIZED):
            raise LineFailure("not_personalisable:" + C.LC_NAMES.get(life_cycle, "?"), IDENTIFY)
        transport = res.transport_keys()
        if transport.kvn not in bytes(plain.get_data(C.DATA_SCP_INFO)):
            raise LineFailure("not_in_transport_state", IDENTIFY,
                              "transport key set 0x%02X absent" % transport.kvn)
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
            self._personalise(opened, se_uid, result, state, clock)
        finally:
            session_cm.__exit__(None, None, None)

    def _personalise(self, opened, se_uid, result, state, clock):
        res = self.resources
        config = res.config
        hsm = res.hsm
        registry = res.registry
        slot = config.slot

        # 2. serial + intent: from here on the device exists for the registry.
        self._enter(state, result, INTENT, clock())
        # One durable transaction: serial + intent (a crash leaves both or neither).
        serial = registry.allocate_intent(se_uid, self.name, config.operator, config.batch,
                                          result.hsm_session).serial
        result.serial = serial
        result.device_serial = device_serial = config.device_serial(serial)

        # 3. SCP03 with the transport keys; PUT KEY of the diversified set.
        self._enter(state, result, INJECT, clock())
        transport = res.transport_keys()
        se = opened.secure(res.prims,
                           lambda h, c, _ki: hsm.scp03_session_keys(transport, h, c),
                           level=config.scp_level, kvn=transport.kvn)
        with hsm.diversify(config.master_label, se_uid) as device_keys:
            payload = hsm.put_key_payload(device_keys, transport, device_keys.kvn)
            answer = se.put_key(payload, old_kvn=transport.kvn)
            if answer != hsm_interface.put_key_response_expected(payload):
                raise LineFailure("inject:kcv", INJECT, "the SE's key check values differ")

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

            # 6. certificate, trust anchors, life cycle SECURED.
            self._enter(state, result, PERSONALISE, clock())
            se.put_cert(slot, cert_der)
            # The trust anchors in one STORE DATA (the applet stores all DGIs or none).
            anchors = config.trust_dgis()
            se.store_data(anchors[0][0], anchors[0][1], more=anchors[1:])
            se.set_status(C.LC_SECURED)
            opened.close_secure()

            # 7. confirmation gate: new keys, read-back, proof of possession.
            self._enter(state, result, CONFIRM, clock())
            self._confirm(opened, se_uid, device_keys, cert, device_serial)

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

    def _confirm(self, opened, se_uid, device_keys, cert, device_serial):
        """The gate, with one retry from scratch after a transient failure: the device is
        SECURED with its certificate by now, and a power glitch or a lost HSM session (the
        per-device key objects die with it: diversify again, the result is the same keys)
        should not cost a good device.  The retry re-selects the applet and repeats every
        check; a failing check (LineFailure) is not retried."""
        res = self.resources
        try:
            confirm_device(res, opened.link, se_uid, device_keys, cert, device_serial,
                           res.config.slot)
            return
        except LineFailure:
            raise
        except (LinkError, SecureChannelError, ApduError, HsmError):
            pass
        opened.se.select()
        with res.hsm.diversify(res.config.master_label, se_uid) as fresh_keys:
            confirm_device(res, opened.link, se_uid, fresh_keys, cert, device_serial,
                           res.config.slot)

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
