"""What a line's stations share: its configuration (`LineConfig`) and its services
(`LineResources`: HSM session pool, registry, issuing CA, SE vendor roots, issuance
journal, audit checkpointer).  One instance per run, used by every station thread."""

import contextlib
import datetime
import threading
import time

from cryptography.x509 import verification

from fleetid.cloud.hsm.errors import HsmError
from fleetid.cloud.line.shipment import ShipmentError
from fleetid.cloud.line.steps import IDENTIFY, LineFailure
from fleetid.common import se_consts as C
from fleetid.common.host.hostcrypto import CryptographyPrimitives
from fleetid.common.t1 import PROFILE_GP

_VERIFIER_MAX_AGE_S = 60.0  # rebuild the vendor-chain verifier (its time) once a minute
_DELIVERIES_KEPT = 256  # verified chip deliveries kept between identify and inject


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


class LineResources:
    """The shared services of one line: every station of a run uses the same instance.

    Params: hsm: HsmBackend.  registry: Registry.  issuing_ca: IssuingCa.
        vendor_roots: trusted SE vendor root certificates.  config: LineConfig.
        journal: IssuanceJournal.  checkpointer: audit.Checkpointer or None.
        prims: SCP03 host primitives (default CryptographyPrimitives()).
        wall_clock: epoch seconds (vendor chain validation time).
        shipment: the lot's TransportShipment (shipment.py) and kek_label its KEK in the
        HSM: each chip's transport keys are unwrapped from it inside the HSM; None: the
        HSM's batch key set `config.batch` (imported by the vendor in plaintext).
    """

    def __init__(self, hsm, registry, issuing_ca, vendor_roots, config, journal,
                 checkpointer=None, prims=None, wall_clock=time.time, shipment=None,
                 kek_label=None):
        self.hsm = hsm
        self.registry = registry
        self.issuing_ca = issuing_ca
        self.vendor_roots = list(vendor_roots)
        self.config = config
        self.journal = journal
        self.checkpointer = checkpointer
        self.prims = prims or CryptographyPrimitives()
        self.wall_clock = wall_clock
        self.shipment = shipment
        self.kek_label = kek_label
        self._transport = None
        self._lock = threading.Lock()
        self._verifier = None
        self._verifier_at = None
        self._deliveries = {}  # se_uid -> verified ChipDelivery (oldest first, bounded)
        self.issuer_name = issuing_ca.ca_certificate.subject.rfc4514_string()
        # The CA's evidence verifier, when it trusts exactly the line's vendor roots: the
        # counterfeit check of step 1 then validates each chip's MAK chain through its
        # chain cache, and the CA's own check of the same chain at step 5 is a hit
        # (one path validation per chip instead of two).
        verifier = getattr(issuing_ca, "evidence_verifier", None)
        self.chain_verifier = verifier if (
            verifier is not None and self.vendor_roots
            and list(getattr(verifier, "vendor_roots", ())) == self.vendor_roots) else None

    def transport_keys(self):
        """The batch's transport KeySetHandle (looked up once)."""
        with self._lock:
            if self._transport is None:
                self._transport = self.hsm.transport_keys(self.config.batch)
            return self._transport

    def transport_kvn(self, se_uid):
        """The KVN of the transport key set chip `se_uid` should hold (identify step).
        With a shipment, the chip's entry must be there and its vendor signature verify.
        Raises LineFailure("transport_keys:<reason>") (nothing written yet)."""
        if self.shipment is None:
            return self.transport_keys().kvn
        return self._delivery(se_uid).kvn

    def _delivery(self, se_uid):
        # identify (transport_kvn) and inject (chip_transport_keys) both need the chip's
        # delivery: its vendor signature is verified once, the result kept for the second
        # call (a few chips: one per station in flight; the shipment file is immutable).
        se_uid = bytes(se_uid)
        with self._lock:
            found = self._deliveries.get(se_uid)
        if found is not None:
            return found
        try:
            found = self.shipment.delivery_for(se_uid, self.vendor_roots)
        except ShipmentError as exc:
            raise LineFailure("transport_keys:" + exc.reason, IDENTIFY, exc.detail) from None
        with self._lock:
            if len(self._deliveries) >= _DELIVERIES_KEPT:
                self._deliveries.pop(next(iter(self._deliveries)))
            self._deliveries[se_uid] = found
        return found

    @contextlib.contextmanager
    def chip_transport_keys(self, se_uid):
        """Context manager: the transport KeySetHandle for chip `se_uid`.  From a
        shipment, the chip's keys are unwrapped inside the HSM (on the caller's pinned
        session) and destroyed on exit; otherwise the batch's persistent set.
        Raises LineFailure("transport_keys:wrapped_key_invalid" / ":kcv_mismatch" / ...)
        when the delivery is refused: the device is not personalised."""
        if self.shipment is None:
            yield self.transport_keys()
            return
        delivery = self._delivery(se_uid)
        try:
            handle = self.hsm.unwrap_transport_keys(self.kek_label, se_uid, delivery.wrapped,
                                                    delivery.kcvs, kvn=delivery.kvn)
        except HsmError as exc:
            if exc.reason in (HsmError.WRAPPED_KEY_INVALID, HsmError.KCV_MISMATCH):
                raise LineFailure("transport_keys:" + exc.reason, IDENTIFY,
                                  "chip %s" % bytes(se_uid).hex()) from None
            raise
        try:
            yield handle
        finally:
            try:
                self.hsm.release(handle)
            except HsmError:
                # A lost or closed session took the objects with it; a committed device
                # must not turn into a failure over the clean-up.
                pass

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
