"""Images signed by MCUboot's own imgtool (the installed `imgtool` command, PyPI imgtool, a
dependency of fleetid pinned in pyproject.toml) and an emulated SE provisioned with the
signing key.

    keys = ImgtoolKeys(folder)                       # imgtool keygen -t ecdsa-p256, twice
    image = sign_image(folder, keys.a, payload, version="1.2.3+4", security_counter=5)
    se, chip, record = provisioned_se(vendor_dir, folder, keys.a_point)

The SE gets the firmware-signing key the way the factory line writes it: STORE DATA of
DGI_FIRMWARE_KEY inside an SCP03 session with the chip's transport keys.
"""

import os
import pathlib
import shutil
import struct
import subprocess
import sys

from cryptography.hazmat.primitives import serialization

from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.device.se import SeSession
from tests.conftest import require

HEADER_SIZE = 0x200
SLOT_SIZE = 0x40000


def imgtool_path():
    """The imgtool console script (beside the venv's python or on PATH); skips if absent."""
    candidate = pathlib.Path(sys.executable).parent / "imgtool"
    found = str(candidate) if candidate.exists() else shutil.which("imgtool")
    require(found is not None, "imgtool (pip install fleetid)")
    return found


def imgtool(*args):
    """Run `imgtool ARGS...`; returns its stdout.  Fails loudly on a non-zero exit."""
    proc = subprocess.run([imgtool_path()] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError("imgtool %s failed:\n%s%s" % (args[0], proc.stdout, proc.stderr))
    return proc.stdout


def point_of_pem(path):
    """The 65-byte uncompressed point of an imgtool key file (public part only)."""
    key = serialization.load_pem_private_key(pathlib.Path(path).read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


class ImgtoolKeys:
    """Two firmware-signing keys made by `imgtool keygen -t ecdsa-p256`: a (the fleet's)
    and b (someone else's)."""

    def __init__(self, folder):
        folder = pathlib.Path(folder)
        self.a = folder / "fw-a.pem"
        self.b = folder / "fw-b.pem"
        for path in (self.a, self.b):
            imgtool("keygen", "-k", path, "-t", "ecdsa-p256")
        self.a_point = point_of_pem(self.a)
        self.b_point = point_of_pem(self.b)


def sign_image(folder, key, payload, name, version="1.2.3+4", security_counter=None,
               extra=()):
    """`imgtool sign` a raw payload (header padded in by --pad-header).

    Params: key: key file, or None for an unsigned image (hash TLV only).
        security_counter: int or None (no SEC_CNT TLV).  extra: more imgtool arguments.
    Returns: the signed image bytes.
    """
    folder = pathlib.Path(folder)
    raw = folder / (name + ".bin")
    out = folder / (name + ".signed.bin")
    raw.write_bytes(payload)
    args = ["sign", "--pad-header", "-H", HEADER_SIZE, "-S", SLOT_SIZE, "-v", version]
    if key is not None:
        args += ["-k", key]
    if security_counter is not None:
        args += ["-s", security_counter]
    imgtool(*(args + list(extra) + [raw, out]))
    return out.read_bytes()


def split_image(image):
    """(signed part, [(type, value), ...] of the unprotected TLV area) of a little-endian
    MCUboot image (test-side parser, independent of device/boot.py's)."""
    hdr_size, prot_size, img_size = struct.unpack_from("<HHI", image, 8)
    end = hdr_size + img_size + prot_size
    magic, total = struct.unpack_from("<HH", image, end)
    assert magic == 0x6907
    tlvs = []
    pos = end + 4
    while pos < end + total:
        tlv_type, length = struct.unpack_from("<HH", image, pos)
        tlvs.append((tlv_type, image[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return image[:end], tlvs


def join_image(signed_part, tlvs):
    """Inverse of split_image()."""
    body = b"".join(struct.pack("<HH", t, len(v)) + v for t, v in tlvs)
    return signed_part + struct.pack("<HH", 0x6907, 4 + len(body)) + body


def provision_firmware_key(chip, record, point, fleet_root_der=None):
    """STORE DATA DGI_FIRMWARE_KEY = point (and DGI_FLEET_ROOT = fleet_root_der when
    given) inside SCP03 (as the factory line does)."""
    from tests.sim.chip_support import open_scp, send_secure

    host = open_scp(chip, record.static_keys())
    value = struct.pack(">HB", C.DGI_FIRMWARE_KEY, len(point)) + point
    if fleet_root_der is not None:  # GP CS 2.3 11.11.3.2: length FF || u16 from 255 on
        value += struct.pack(">HBH", C.DGI_FLEET_ROOT, 0xFF, len(fleet_root_der)) + \
            fleet_root_der
    _, sw = send_secure(host, C.INS_STORE_DATA, 0x80, 0, value)
    assert sw == C.SW_OK, "STORE DATA: SW %04X" % sw


def provisioned_se(vendor_dir, folder, point, name="chip", fleet_root_der=None):
    """A fabbed chip holding `point` as its firmware-signing key (None: no key) and
    `fleet_root_der` as its fleet root anchor (None: none).

    Returns: (SeSession over chip.process, Chip, FabRecord)."""
    from fleetid.sim.chip import Chip
    from fleetid.sim.fab import fab_chip
    from fleetid.sim.nvm import Nvm

    nvm_path = os.path.join(str(folder), name + ".nvm")
    record = fab_chip(vendor_dir, nvm_path)
    chip = Chip(Nvm(nvm_path))
    se = SeSession(ApduProtocol(chip.process))
    se.select()
    if point is not None:
        provision_firmware_key(chip, record, point, fleet_root_der)
        se.select()  # a fresh selection ends the SCP03 session
    return se, chip, record
