"""An emulated vendor lot: chips made the way sim.fab makes them, their transport keys
delivered to the line the way chip vendors deliver them.

    vendor = lot.vendor_for(line)                          # the simulated SE vendor's CA
    chips = lot.make_lot(line, 100, "lot-2026-11-23a")     # ChipLot(batch, [EmulatedChip])
    lot.load_chips("<line>/chips/<lot>")                   # {uid: EmulatedChip} after a crash

`line` is anything with `hsm` and `vendor_roots`, and, to receive wrapped deliveries,
`transport_wrapping_key()` and `receive_shipment(doc)`: a fleetid.cloud.line Line,
duck-typed, so the emulator imports nothing of the cloud.  The CLI, the tests and the
bench wire this lot into the line.

Custody: the simulated vendor lives in its own folder (`vendor_dir`; default
default_vendor_dir(line): "<line workdir>.se-vendor", beside the line's folder, never in
it).  Each chip gets its own random transport keys; the vendor wraps them for the line's
HSM (sim.ship) and the line receives the shipment: no plaintext transport key reaches a
file or the line.  A line without a wrapping key (made before it had one) gets one lot
key set imported into its HSM instead (the caller's copies wiped).
"""

import datetime
import os
import secrets

from fleetid.common import se_consts as C
from fleetid.sim import chip as chip_mod
from fleetid.sim import fab, ship
from fleetid.sim.nvm import Nvm, remove_stale_temp_files

FIRMWARE_VERSION = b"\x01\x00\x00"


class EmulatedChip:
    """One emulated SE from a lot: `uid`, `chip` (sim.chip.Chip), `nvm`."""

    __slots__ = ("uid", "chip", "nvm")

    def __init__(self, uid, chip, nvm):
        self.uid = uid
        self.chip = chip
        self.nvm = nvm


class ChipLot:
    """Chips of one vendor lot sharing one transport key set (`batch` in the HSM)."""

    def __init__(self, batch, chips):
        self.batch = batch
        self.chips = chips

    def by_uid(self):
        return {c.uid: c for c in self.chips}


def default_vendor_dir(line):
    """The simulated SE vendor's folder for `line`: "<line workdir>.se-vendor"."""
    return os.path.abspath(line.workdir).rstrip(os.sep) + ".se-vendor"


def vendor_for(line, now=None, vendor_dir=None):
    """The simulated SE vendor CA (sim.fab.VendorCa) in `vendor_dir` (default:
    default_vendor_dir(line)), created on first use.
    Raises ValueError when the line does not trust it (its root is not in
    line.vendor_roots: publish it with fab.publish_vendor_root before init_line)."""
    vendor = fab.load_or_create_vendor_ca(vendor_dir or default_vendor_dir(line), now=now)
    roots = getattr(line, "vendor_roots", None)
    if roots is not None and vendor.cert not in roots:
        raise ValueError("the SE vendor in %s is not one this line trusts (name the "
                         "vendor folder the line was initialised with: --vendor-dir)"
                         % (vendor_dir or default_vendor_dir(line)))
    return vendor


def fab_in_memory(vendor, transport_keys, se_uid=None, nvm_path=None, rng=os.urandom):
    """Make one chip the way sim.fab does, holding `transport_keys`, without writing a
    fab record or the vendor's key file (make_lot ships the keys to the line wrapped).
    Returns: EmulatedChip."""
    se_uid = se_uid or rng(16)
    nvm = Nvm(nvm_path)
    enc, mac, dek = transport_keys
    point = chip_mod.fab_initialise(nvm, se_uid, FIRMWARE_VERSION,
                                    (enc, mac, dek, C.SCP03_KVN_TRANSPORT), rng=rng)
    mak_cert = fab.issue_mak_certificate(vendor, se_uid, point)
    chip_mod.fab_store_attestation_chain(nvm, [mak_cert, vendor.cert_der])
    return EmulatedChip(se_uid, chip_mod.Chip(nvm, rng=rng), nvm)


def new_batch_name():
    """A fresh lot name: "lot-<UTC time>-<8 hex>".  Eight random hex digits, not four: a
    bench or a test makes several lots within one second, and four digits made two of them
    collide (the line refused the second: "lot ... was received already")."""
    return "lot-" + datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)


def make_lot(line_or_hsm, count, batch=None, vendor=None, chip_dir=None, rng=os.urandom,
             vendor_dir=None):
    """A vendor lot of `count` chips, its transport keys delivered to the line.

    A line with a transport wrapping key: each chip gets fresh transport keys, wrapped
    for that key in a shipment (sim.ship) the line receives (`receive_shipment`); the
    plaintext keys exist only in this function and the chips.  Otherwise one fresh key
    set for the lot, imported into the HSM under `batch` (the caller's copies wiped).

    Params: line_or_hsm: a line, or an HSM backend (then `vendor` is required; plaintext
        import).  chip_dir: keep each chip's NVM in "<chip_dir>/se-<uid>.nvm" (None: in
        memory).  vendor_dir: the simulated vendor's folder (vendor_for).
    Returns: ChipLot.
    """
    hsm = getattr(line_or_hsm, "hsm", line_or_hsm)
    vendor = vendor or vendor_for(line_or_hsm, vendor_dir=vendor_dir)
    batch = batch or new_batch_name()
    wrapping = getattr(line_or_hsm, "transport_wrapping_key", None)
    wrapping = wrapping() if wrapping is not None else None
    if chip_dir:
        os.makedirs(chip_dir, exist_ok=True)
    chips = []
    if wrapping is None:
        keys = [bytearray(rng(16)) for _ in range(3)]
        for _ in range(count):
            uid = rng(16)
            path = os.path.join(chip_dir, "se-%s.nvm" % uid.hex()) if chip_dir else None
            chips.append(fab_in_memory(vendor, tuple(bytes(k) for k in keys), uid, path, rng))
        hsm.import_transport_keys(batch, keys[0], keys[1], keys[2])  # wipes the bytearrays
        return ChipLot(batch, chips)
    shipped = []
    for _ in range(count):
        uid = rng(16)
        keys = (rng(16), rng(16), rng(16))
        path = os.path.join(chip_dir, "se-%s.nvm" % uid.hex()) if chip_dir else None
        chips.append(fab_in_memory(vendor, keys, uid, path, rng))
        shipped.append((uid, keys))
    doc = ship.ship_keys(vendor, batch, shipped, wrapping, rng=rng)
    del shipped
    line_or_hsm.receive_shipment(doc)
    return ChipLot(batch, chips)


def remove_stale_chip_files(chips_root):
    """Recovery after a killed run: delete the NVM temp files (key scalars of commits that
    never reached their atomic point) in every lot folder under `chips_root`
    (<line>/chips).  Returns the removed paths.  Raises NvmError."""
    removed = []
    if not os.path.isdir(chips_root):
        return removed
    for lot in sorted(os.listdir(chips_root)):
        if os.path.isdir(os.path.join(chips_root, lot)):
            removed += remove_stale_temp_files(os.path.join(chips_root, lot))
    return removed


def load_chips(chip_dir):
    """Re-open chips kept in `chip_dir` (make_lot(chip_dir=...)), after deleting the temp
    files a killed run left there.  Returns {uid: EmulatedChip}."""
    out = {}
    if not chip_dir or not os.path.isdir(chip_dir):
        return out
    remove_stale_temp_files(chip_dir)
    for name in sorted(os.listdir(chip_dir)):
        if name.startswith("se-") and name.endswith(".nvm"):
            nvm = Nvm(os.path.join(chip_dir, name))
            uid = bytes(nvm.get("uid", b""))
            out[uid] = EmulatedChip(uid, chip_mod.Chip(nvm), nvm)
    return out
