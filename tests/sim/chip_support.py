"""Shared test fixtures for the emulated SE: a fabbed chip in a tmp dir, APDU helpers,
an SCP03 session against the chip, and a test-only back door that plants a known private
key in a slot through the Nvm API (never through an APDU).

    chip, record = fab_test_chip(tmp_path)          # selected, OP_READY, file-backed NVM
    data, sw = send(chip, C.INS_GET_DATA, 0x01, 0x01, le=256)
    host = open_scp(chip, record.static_keys())     # Scp03Host over chip.process
"""

import os

from fleetid.common import se_consts as C
from fleetid.common.apdu_wire import encode_command, split_response
from fleetid.sim.chip import Chip, encode_key_record, key_nvm_name
from fleetid.sim.fab import fab_chip
from fleetid.sim.nvm import Nvm


def fab_test_chip(tmp_path, life_cycle=C.LC_OP_READY, rng=None, select=True, name="chip",
                  vendor_dir=None, **fab_kwargs):
    """Fab a chip under `tmp_path` and power it up.

    Params: tmp_path: folder (pytest tmp_path).  life_cycle: LC_* after fab.  rng: rng(n)
        for fab and chip (default os.urandom).  select: SELECT the applet.  name: NVM file
        stem.  vendor_dir: vendor CA folder (default tmp_path/"vendor").
    Returns: (Chip, FabRecord).
    """
    vendor_dir = vendor_dir or os.path.join(str(tmp_path), "vendor")
    nvm_path = os.path.join(str(tmp_path), name + ".nvm")
    record = fab_chip(vendor_dir, nvm_path, life_cycle=life_cycle, rng=rng, **fab_kwargs)
    chip = Chip(Nvm(nvm_path), rng=rng)
    if select:
        select_applet(chip)
    return chip, record


def apdu(ins, p1=0, p2=0, data=b"", le=None, cla=C.CLA_PROPRIETARY, extended=None):
    """Encode a command APDU (proprietary class by default)."""
    return encode_command(cla, ins, p1, p2, data, le, extended)


def send(chip, ins, p1=0, p2=0, data=b"", le=None, cla=C.CLA_PROPRIETARY, extended=None):
    """Send one command to the chip.  Returns: (data, sw)."""
    return split_response(chip.process(apdu(ins, p1, p2, data, le, cla, extended)))


def sw_of(response):
    """The status word of a response."""
    return split_response(response)[1]


def select_applet(chip):
    """SELECT the fleetid applet; returns the FCI (raises AssertionError on failure)."""
    data, sw = send(chip, C.INS_SELECT, 0x04, 0x00, C.AID, 256, cla=C.CLA_ISO)
    if sw != C.SW_OK:
        raise AssertionError("SELECT failed: %04X" % sw)
    return data


def plant_key(nvm, slot, private_scalar, policy=C.POLICY_SIGN | C.POLICY_ECDH):
    """TEST-ONLY back door: write a known private key into `slot` via the Nvm API.

    Returns: the 65-byte public point."""
    record, point = encode_key_record(
        policy | C.POLICY_NON_EXPORTABLE | C.POLICY_GENERATED_ON_CHIP, private_scalar
    )
    nvm.commit({key_nvm_name(slot): record})
    return point


def open_scp(chip, static_keys, level=0x33, kvn=0):
    """Open an SCP03 session over chip.process.  Returns: the open Scp03Host."""
    from fleetid.common import scp03
    from fleetid.common.host.hostcrypto import CryptographyPrimitives

    prims = CryptographyPrimitives()
    host = scp03.Scp03Host(
        chip.process, prims, scp03.static_session_keys_fn(prims, static_keys), level=level,
        kvn=kvn,
    )
    host.open()
    return host


def send_secure(host, ins, p1=0, p2=0, data=b"", le=None):
    """Send one proprietary command through an open Scp03Host.  Returns: (data, sw)."""
    return split_response(host.transceive(apdu(ins, p1, p2, data, le)))


def counting_rng(seed=0):
    """A deterministic rng(n) for reproducible chips (NOT random: tests only)."""
    import hashlib

    state = {"n": 0}

    def rng(n):
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(b"%d:%d" % (seed, state["n"])).digest()
        return out[:n]

    return rng
