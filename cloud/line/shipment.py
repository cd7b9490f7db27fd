"""The line's side of a chip vendor's transport-key shipment (format: fleetid.sim.ship,
"fleetid-transport-shipment/1"): parse it strictly, check it is addressed to this line's
wrapping key and comes from a vendor the line trusts, and hand each chip's wrapped keys to
the HSM, which unwraps them inside (HsmBackend.unwrap_transport_keys).

    shipment = TransportShipment.load(path)
    shipment.check_recipient(recipient_id)              # SHA-256 of the line key's SPKI
    shipment.check_vendor(vendor_roots)                 # the header's vendor signature
    delivery = shipment.delivery_for(se_uid, vendor_roots)   # signature checked per chip

Nothing here ever holds a plaintext key: the document has none.
"""

import hashlib
import json
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.common.errors import FleetidError

FORMAT = "fleetid-transport-shipment/1"
KEK_ALG = "rsaes-oaep-sha1"
WRAP_ALG = "aes-kw-rfc3394"
MAX_BYTES = 64 * 1024 * 1024
_HEX = re.compile(r"\A[0-9a-f]*\Z")


class ShipmentError(FleetidError):
    """A shipment (or one chip's entry in it) is refused.  `reason`: "malformed",
    "recipient" (wrapped for another line's key), "vendor" (not from a trusted vendor
    root), "received" (this lot was received already), "not_shipped" (no entry for this
    chip), "signature" (the chip's entry does not verify); `detail` is secret-free."""

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


def recipient_id(public_key):
    """SHA-256 hex of a public key's SubjectPublicKeyInfo DER (how shipments name the
    line key they are wrapped for)."""
    return hashlib.sha256(public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _hex(value, size, what):
    if not isinstance(value, str) or not _HEX.match(value) or \
            (size is not None and len(value) != 2 * size):
        raise ShipmentError("malformed", what)
    return bytes.fromhex(value)


class ChipDelivery:
    """One chip's entry: se_uid, kvn, wrapped (enc, mac, dek), kcvs (3 x 3 bytes)."""

    __slots__ = ("se_uid", "kvn", "wrapped", "kcvs")

    def __init__(self, se_uid, kvn, wrapped, kcvs):
        self.se_uid = se_uid
        self.kvn = kvn
        self.wrapped = wrapped
        self.kcvs = kcvs

    def __repr__(self):
        return "ChipDelivery(%s kvn=0x%02X)" % (self.se_uid.hex(), self.kvn)


class TransportShipment:
    """A parsed shipment.  Attributes: lot, vendor (subject string), recipient (hex id),
    wrapped_kek (bytes), chips ({se_uid: raw entry dict}), doc (the document)."""

    def __init__(self, doc):
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ShipmentError("malformed", "not a %s document" % FORMAT)
        try:
            self.lot = doc["lot"]
            self.vendor = doc["vendor"]
            self.recipient = doc["recipient"]
            kek = doc["kek"]
            entries = doc["chips"]
        except (KeyError, TypeError):
            raise ShipmentError("malformed", "missing field") from None
        if not isinstance(self.lot, str) or not 0 < len(self.lot) <= 128 or \
                not isinstance(self.vendor, str) or not isinstance(kek, dict) or \
                kek.get("alg") != KEK_ALG or not isinstance(entries, list):
            raise ShipmentError("malformed", "lot, vendor or kek")
        _hex(self.recipient, 32, "recipient")
        self.wrapped_kek = _hex(kek.get("wrapped"), None, "kek")
        self.doc = doc
        # Per-chip signed text = this prefix + the chip's entry + "]" (delivery_for), and
        # the vendor keys that may sign it per trusted-root list: both fixed per shipment.
        self._entry_prefix = json.dumps([FORMAT, self.lot, self.recipient, kek["wrapped"]],
                                        sort_keys=True, separators=(",", ":"))[:-1] + ","
        self._vendor_keys = (None, ())
        self.chips = {}
        for entry in entries:
            if not isinstance(entry, dict):
                raise ShipmentError("malformed", "chip entry")
            uid = _hex(entry.get("uid"), None, "uid")
            if not 4 <= len(uid) <= 64 or uid in self.chips:
                raise ShipmentError("malformed", "uid %s" % entry.get("uid"))
            self.chips[uid] = entry

    @classmethod
    def load(cls, path):
        """Read and parse a shipment file.  Raises ShipmentError, OSError."""
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise ShipmentError("malformed", "larger than %d bytes" % MAX_BYTES)
        try:
            return cls(json.loads(data.decode("utf-8")))
        except (ValueError, RecursionError):
            raise ShipmentError("malformed", "not JSON") from None

    def check_recipient(self, line_recipient_id):
        """Raise ShipmentError("recipient") unless the KEK is wrapped for this line."""
        if self.recipient != line_recipient_id:
            raise ShipmentError("recipient", "lot %s is wrapped for another line key" % self.lot)

    def _verify(self, vendor_roots, signature, signed):
        """True when a trusted vendor root of the shipment's vendor name signed `signed`."""
        for key in self._keys_of(vendor_roots):
            try:
                key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
                return True
            except InvalidSignature:
                continue
        return False

    def _keys_of(self, vendor_roots):
        """The EC public keys of the roots in `vendor_roots` named like the shipment's
        vendor; kept for the last list seen (the line passes the same list per chip)."""
        roots = tuple(vendor_roots)
        cached_roots, keys = self._vendor_keys
        if cached_roots != roots:
            keys = tuple(key for key, root in ((r.public_key(), r) for r in roots)
                         if root.subject.rfc4514_string() == self.vendor
                         and isinstance(key, ec.EllipticCurvePublicKey))
            self._vendor_keys = (roots, keys)
        return keys

    def check_vendor(self, vendor_roots):
        """Raise ShipmentError("vendor") unless a trusted SE vendor root signed the
        shipment's header (lot, vendor, recipient, wrapped KEK)."""
        signature = _hex(self.doc["kek"].get("signature"), None, "kek signature")
        signed = json.dumps([FORMAT, self.lot, self.vendor, self.recipient,
                             self.doc["kek"]["wrapped"]], sort_keys=True,
                            separators=(",", ":")).encode()
        if not self._verify(vendor_roots, signature, signed):
            raise ShipmentError("vendor", "lot %s is not signed by a trusted SE vendor (%s)"
                                % (self.lot, self.vendor))

    def delivery_for(self, se_uid, vendor_roots):
        """The chip's wrapped keys, after its entry's signature verified under the vendor
        root.  Raises ShipmentError("not_shipped" / "signature" / "malformed" / "vendor")."""
        entry = self.chips.get(bytes(se_uid))
        if entry is None:
            raise ShipmentError("not_shipped", "chip %s is not in lot %s"
                                % (bytes(se_uid).hex(), self.lot))
        signature = _hex(entry.get("signature"), None, "signature")
        body = dict((k, v) for k, v in entry.items() if k != "signature")
        # = json.dumps([FORMAT, lot, recipient, wrapped KEK, body]) with the same options
        signed = (self._entry_prefix + json.dumps(body, sort_keys=True, separators=(",", ":"))
                  + "]").encode()
        if not self._verify(vendor_roots, signature, signed):
            raise ShipmentError("signature", "chip %s" % bytes(se_uid).hex())
        kvn = entry.get("kvn")
        kcvs = entry.get("kcv")
        if entry.get("wrap") != WRAP_ALG or not isinstance(kvn, int) or not 0 < kvn < 0x80 \
                or not isinstance(kcvs, list) or len(kcvs) != 3:
            raise ShipmentError("malformed", "chip %s" % bytes(se_uid).hex())
        wrapped = tuple(_hex(entry.get(name), 24, name) for name in ("enc", "mac", "dek"))
        return ChipDelivery(bytes(se_uid), kvn, wrapped,
                            tuple(_hex(k, 3, "kcv") for k in kcvs))
