# Signed boot: check an MCUboot-format image against the firmware-signing key held by the
# SE, and its security counter against the SE's monotonic counter.  Portable: CPython and
# MicroPython (struct, hashlib; no crypto of its own: the SE verifies the signature).
#
# Image layout (MCUboot docs/design.md "Image format"; checked against images made by
# imgtool 2.5.0 `imgtool sign`).  Little-endian, imgtool's default (--endian little); a
# big-endian image fails the magic check.
#
#   0                 +--------------------------------------------------------+
#                     | header, 32 B ("<IIHHIIBBHII")                          |
#                     |   0 magic u32 0x96f3b83d    4 load_addr u32            |
#                     |   8 hdr_size u16           10 protect_tlv_size u16     |
#                     |  12 img_size u32           16 flags u32                |
#                     |  20 version: major u8, minor u8, revision u16,         |
#                     |     build u32              28 pad u32                  |
#                     | ... zero padding up to hdr_size (imgtool --pad-header) |
#   hdr_size          +--------------------------------------------------------+
#                     | payload, img_size bytes                                |
#   hdr+img           +--------------------------------------------------------+
#                     | protected TLV area (absent when protect_tlv_size is 0) |
#                     |   info "<HH": magic 0x6908, total (= protect_tlv_size, |
#                     |   info included); then TLVs "<HH": type, len, value    |
#   hdr+img+prot      +--------------------------------------------------------+
#                     | TLV area: info "<HH": magic 0x6907, total (info        |
#                     |   included); TLVs: SHA256, KEYHASH or PUBKEY, ECDSASIG |
#                     +--------------------------------------------------------+
#
#   SHA256 (0x10) = SHA-256 of bytes [0, hdr_size + img_size + protect_tlv_size): the
#   header, payload and protected TLVs; ECDSASIG (0x22) = DER ECDSA-Sig-Value over that
#   same digest; KEYHASH (0x01) = SHA-256 of the signing key's SubjectPublicKeyInfo DER
#   (PUBKEY (0x02) = the SPKI itself, imgtool --public-key-format full); SEC_CNT (0x50)
#   u32 in the protected area, so the signature covers it.
#
# Policy (what MCUboot does with MCUBOOT_HW_ROLLBACK_PROT, plus what this device needs):
#   - the firmware-signing key is the SE's trust anchor DATA_TRUST_FIRMWARE_KEY (a 65-byte
#     P-256 point written at the factory line, read-only once SECURED); KEYHASH/PUBKEY
#     must name that key; the SE verifies the signature (VERIFY with the point);
#   - SEC_CNT is required, must sit in the protected area, and must be >= the SE's
#     monotonic counter COUNTER_FIRMWARE;
#   - the counter is advanced to SEC_CNT only by confirm_boot(), after the new image has
#     booted and proved itself: a power cut between check and confirm leaves the counter
#     at its old value, so the same image (or the previous one) still boots;
#   - encrypted, compressed and non-bootable images are refused (this agent has no
#     decryption key and no decompressor); unknown protected TLVs are allowed (signed),
#     unknown unprotected TLVs are ignored (they cannot change any decision);
#   - one SHA256, one key TLV and one signature: duplicates are refused as ambiguous.
#
# Heap: the image is streamed through one CHUNK-byte buffer into SHA-256, so a 1 MB image
# costs the same heap as a 1 KB one; only the TLV areas (<= TLV_AREA_MAX each) are kept.

import hashlib
import struct

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.errors import (
    FleetidError,
    ReferenceNotFound,
    VerificationFailed,
    WrongData,
)

IMAGE_MAGIC = const(0x96F3B83D)
TLV_INFO_MAGIC = const(0x6907)  # unprotected TLV area
TLV_PROT_INFO_MAGIC = const(0x6908)  # protected TLV area
TLV_KEYHASH = const(0x01)
TLV_PUBKEY = const(0x02)
TLV_SHA256 = const(0x10)
TLV_ECDSASIG = const(0x22)
TLV_SEC_CNT = const(0x50)

# Header flags (imgtool image.py IMAGE_F) this agent cannot boot.
_F_ENCRYPTED = const(0x0000000C)  # ENCRYPTED_AES128 0x04 | ENCRYPTED_AES256 0x08
_F_NON_BOOTABLE = const(0x00000010)
_F_COMPRESSED = const(0x00000E00)  # COMPRESSED_LZMA1 | LZMA2 | ARM_THUMB

_HEADER_FMT = "<IIHHIIBBHII"
_HEADER_SIZE = const(32)
_TLV_INFO_FMT = "<HH"
_TLV_INFO_SIZE = const(4)
_DIGEST_LEN = const(32)
_POINT_LEN = const(65)
_SIG_MIN = const(8)  # shortest DER ECDSA-Sig-Value the SE accepts
_SIG_MAX = const(72)

CHUNK = const(512)  # streaming buffer
TLV_AREA_MAX = const(1024)  # bound on each TLV area kept in RAM
DEFAULT_MAX_SIZE = const(0x100000)  # 1 MiB slot unless the board says otherwise
_COUNTER_FIRMWARE = const(0x00)  # se_consts.COUNTER_FIRMWARE
_DATA_TRUST_FIRMWARE_KEY = const(0x0112)  # se_consts.DATA_TRUST_FIRMWARE_KEY

# RFC 5480 SubjectPublicKeyInfo for an uncompressed P-256 point: this fixed prefix, then the
# 65-byte point (the DER that common/der.encode_p256_spki builds; a constant here keeps
# the DER module out of a boot-time heap).  SEQUENCE(89) { SEQUENCE(19) { id-ecPublicKey,
# prime256v1 }, BIT STRING(66) 00 || point }.
_SPKI_P256_PREFIX = b"\x30\x59\x30\x13\x06\x07\x2a\x86\x48\xce\x3d\x02\x01\x06\x08\x2a" \
    b"\x86\x48\xce\x3d\x03\x01\x07\x03\x42\x00"

# BootError.reason values: one per kind of refusal.
REASON_TRUNCATED = "truncated"  # the image ends before its header, payload or TLVs do
REASON_OVERSIZED = "oversized"  # the image, or the file holding it, is larger than the slot
REASON_MAGIC = "magic"  # not an MCUboot image (or big-endian)
REASON_HEADER = "header"  # header fields inconsistent
REASON_FLAGS = "flags"  # encrypted / compressed / non-bootable
REASON_TLV = "tlv"  # malformed, duplicated or misplaced TLVs
REASON_HASH = "hash"  # SHA-256 does not match: the image was altered
REASON_UNSIGNED = "unsigned"  # no signature or no key TLV
REASON_NO_TRUST_ANCHOR = "no_trust_anchor"  # the SE holds no firmware-signing key
REASON_KEY = "key_mismatch"  # signed by a key other than the SE's firmware key
REASON_SIGNATURE = "signature"  # the SE says the signature does not verify
REASON_NO_COUNTER = "security_counter_missing"  # no protected SEC_CNT TLV
REASON_ROLLBACK = "rollback"  # SEC_CNT below the SE's monotonic counter
REASON_NOT_CHECKED = "not_checked"  # confirm_boot() given a report that did not pass



class BootError(FleetidError):
    """Signed boot refused an image.

    `reason`: one of the REASON_* strings above (one per kind of refusal); `detail`: a
    short text; `report`: the BootReport with every check run so far, the refused one last
    (None from confirm_boot).  Defined here rather than in common/errors.py so that a
    device that never boots an image does not carry it (common/errors.py is imported by
    every device task and the 64 KB MicroPython budget has no room to spare).
    """

    def __init__(self, reason, detail="", report=None):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail
        self.report = report


VERDICT_OK = "ok"
VERDICT_REFUSED = "refused"


class BootReport:
    """What check_image() found, check by check.

    Attributes: checks: list of (name, verdict, detail) in the order run; verdict "ok" or
        "refused" (only the last can be refused, and then BootError carries the report).
        ok: True when every check passed.  version: (major, minor, revision, build).
        security_counter: the image's SEC_CNT (int or None).  se_counter: the SE's
        COUNTER_FIRMWARE when checked (int or None).  image_hash: 32-byte digest.
        load_addr, img_size, hdr_size, flags: header fields.  total_size: bytes the image
        occupies (header to the end of its TLVs).  checked_at: the `now` given (or None).
        key_serial: serial of the firmware certificate whose key signed (device/fwkeys.py),
        None for the bare point.  key_name: that certificate's CN (None for the bare
        point).  file_size: bytes from the header to the end of the reader, when the
        reader can tell (bytes, seekable files), else None.
    """

    def __init__(self, checked_at=None):
        self.checks = []
        self.ok = False
        self.version = None
        self.security_counter = None
        self.se_counter = None
        self.image_hash = None
        self.load_addr = None
        self.img_size = None
        self.hdr_size = None
        self.flags = None
        self.total_size = None
        self.checked_at = checked_at
        self.key_serial = None  # certificate serial of the signing key (fwkeys), if any
        self.key_name = None
        self.file_size = None

    def version_string(self):
        """The version as imgtool writes it: "major.minor.revision+build"."""
        if self.version is None:
            return ""
        return "%d.%d.%d+%d" % self.version

    def _pass(self, name, detail=""):
        self.checks.append((name, VERDICT_OK, detail))

    def _refuse(self, name, reason, detail=""):
        self.checks.append((name, VERDICT_REFUSED, reason if not detail else
                            reason + ": " + detail))
        return BootError(reason, detail, self)


class _Source:
    # A reader over bytes-likes or file-like objects (readinto preferred, read accepted).

    def __init__(self, reader):
        if isinstance(reader, (bytes, bytearray, memoryview)):
            self._view = memoryview(reader)
            self._pos = 0
            self._reader = None
        else:
            self._view = None
            self._reader = reader
            self._readinto = getattr(reader, "readinto", None)
            if self._readinto is None and getattr(reader, "read", None) is None:
                raise ValueError("reader must be bytes or have readinto/read")

    def remaining(self):
        # Bytes from here to the end, or None when the reader cannot tell (a stream, a
        # flash reader without seek).  Leaves the position where it was.
        if self._view is not None:
            return len(self._view) - self._pos
        try:
            here = self._reader.tell()
            end = self._reader.seek(0, 2)
            if end is None:
                end = self._reader.tell()
            self._reader.seek(here)
        except (AttributeError, OSError, ValueError):
            return None
        return end - here

    def fill(self, view):
        # Fill `view` (a memoryview) completely; returns the byte count actually read.
        want = len(view)
        if self._view is not None:
            n = min(want, len(self._view) - self._pos)
            view[:n] = self._view[self._pos : self._pos + n]
            self._pos += n
            return n
        got = 0
        while got < want:
            if self._readinto is not None:
                n = self._readinto(view[got:])
            else:
                data = self._reader.read(want - got)
                n = len(data) if data else 0
                if n > want - got:
                    n = 0  # a reader that returns more than asked is broken: stop
                else:
                    view[got : got + n] = data
            if not n:
                break
            got += n
        return got


def _read_exact(source, view, report, what):
    if source.fill(view) != len(view):
        raise report._refuse("read", REASON_TRUNCATED, what)


def _parse_tlvs(area, protected, found, report):
    # Walk one TLV area (its info header already checked); fill `found`: type -> value.
    pos = _TLV_INFO_SIZE
    end = len(area)
    while pos < end:
        if pos + _TLV_INFO_SIZE > end:
            raise report._refuse("tlv", REASON_TLV, "TLV header past the area")
        tlv_type, length = struct.unpack_from(_TLV_INFO_FMT, area, pos)
        pos += _TLV_INFO_SIZE
        if pos + length > end:
            raise report._refuse("tlv", REASON_TLV, "TLV 0x%02x past the area" % tlv_type)
        value = bytes(area[pos : pos + length])
        pos += length
        signed_type = tlv_type == TLV_SEC_CNT
        trailer_type = tlv_type in (TLV_SHA256, TLV_KEYHASH, TLV_PUBKEY, TLV_ECDSASIG)
        if (signed_type and not protected) or (trailer_type and protected):
            raise report._refuse("tlv", REASON_TLV, "TLV 0x%02x in the wrong area" % tlv_type)
        if not (signed_type or trailer_type):
            continue  # unknown: signed if protected, irrelevant if not
        if tlv_type in found:
            raise report._refuse("tlv", REASON_TLV, "duplicate TLV 0x%02x" % tlv_type)
        found[tlv_type] = value


def _read_area(source, magic, size, report, what):
    # Read a TLV area of `size` bytes (info included) and check its info header.
    area = bytearray(size)
    _read_exact(source, memoryview(area), report, what)
    got_magic, total = struct.unpack_from(_TLV_INFO_FMT, area, 0)
    if got_magic != magic or total != size:
        raise report._refuse("tlv", REASON_TLV, what + " info header")
    return area


def check_image(se, reader, max_size=DEFAULT_MAX_SIZE, now=None, firmware_keys=None):
    """Check an MCUboot image: header, size, SHA-256, key, signature (in the SE), counter.

    Nothing is written to the SE: the counter only moves in confirm_boot().

    Params: se: SeSession (reads DATA_TRUST_FIRMWARE_KEY and COUNTER_FIRMWARE, VERIFY with
        the key's point).  reader: the image as bytes-like, or a file-like object with
        readinto(buf) or read(n), positioned at the header; read in CHUNK-byte pieces,
        never whole.  max_size: the slot size in bytes: the image (header to the end of
        its TLVs) and, when the reader can tell its length (bytes, a seekable file), the
        whole rest of the reader must fit, else REASON_OVERSIZED with both sizes.
        now: recorded in the report as checked_at (any value; not used for decisions).
        firmware_keys: optional object with points() -> [FirmwareKey] (device/fwkeys.py:
            firmware-signing certificates under the fleet root, revocable and rotatable);
            None: the bare DATA_TRUST_FIRMWARE_KEY point only, as before.
    Returns: BootReport with ok True (report.key_serial: the certificate serial of the
        key that signed, None for the bare point).
    Raises: BootError(reason) with the report so far (REASON_*); LinkError / ApduError
        other than the refusals named above when the SE cannot be reached or misbehaves;
        ValueError when `reader` is neither bytes nor readable.
    """
    if not isinstance(max_size, int) or max_size < _HEADER_SIZE:
        raise ValueError("max_size must be an int >= 32")
    report = BootReport(now)
    source = _Source(reader)
    # A file longer than the slot is refused even when the image inside would fit: what
    # is flashed is the file, and the bytes past the slot would land in the next one.
    report.file_size = source.remaining()
    if report.file_size is not None and report.file_size > max_size:
        raise report._refuse("size", REASON_OVERSIZED, "file %d B > slot %d B" % (
            report.file_size, max_size))
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    hdr_size, img_size, prot_size = _check_header(source, buf, view, report)
    image_hash, found = _hash_and_tlvs(source, buf, view, report, hdr_size, img_size,
                                       prot_size, max_size)
    _check_hash(found, image_hash, report)
    _check_signature(se, found, image_hash, report, firmware_keys)
    _check_counter(se, found, report)
    report.ok = True
    return report


def _check_header(source, buf, view, report):
    # The 32-byte header (read into buf): magic, sizes, flags, version.
    # Returns (hdr_size, img_size, protect_tlv_size).
    _read_exact(source, view[:_HEADER_SIZE], report, "header")
    (magic, load_addr, hdr_size, prot_size, img_size, flags, major, minor, revision,
     build, _) = struct.unpack_from(_HEADER_FMT, buf, 0)
    if magic != IMAGE_MAGIC:
        raise report._refuse("header", REASON_MAGIC, "0x%08x" % magic)
    if hdr_size < _HEADER_SIZE:
        raise report._refuse("header", REASON_HEADER, "hdr_size %d" % hdr_size)
    if prot_size and prot_size < _TLV_INFO_SIZE:
        raise report._refuse("header", REASON_HEADER, "protect_tlv_size %d" % prot_size)
    if prot_size > TLV_AREA_MAX:
        raise report._refuse("header", REASON_TLV, "protected area over %d" % TLV_AREA_MAX)
    if flags & (_F_ENCRYPTED | _F_NON_BOOTABLE | _F_COMPRESSED):
        raise report._refuse("header", REASON_FLAGS, "0x%08x" % flags)
    report.version = (major, minor, revision, build)
    report.load_addr = load_addr
    report.hdr_size = hdr_size
    report.img_size = img_size
    report.flags = flags
    report._pass("header", "version %s, %d B payload" % (report.version_string(), img_size))
    return hdr_size, img_size, prot_size


def _hash_and_tlvs(source, buf, view, report, hdr_size, img_size, prot_size, max_size):
    # Everything after the header: SHA-256 over the signed part (the header still in buf),
    # both TLV areas parsed, the sizes against the slot.  Returns (image_hash, found TLVs).
    # -- size: the signed part plus the smallest TLV area must fit the slot ------------
    signed_size = hdr_size + img_size + prot_size
    if signed_size + _TLV_INFO_SIZE > max_size:
        raise report._refuse("size", REASON_OVERSIZED, "%d B > slot %d B" % (
            signed_size + _TLV_INFO_SIZE, max_size))

    # -- stream [0, hdr_size + img_size) into SHA-256 -----------------------------------
    sha = hashlib.sha256()
    sha.update(view[:_HEADER_SIZE])
    left = hdr_size + img_size - _HEADER_SIZE
    while left:
        n = CHUNK if left > CHUNK else left
        _read_exact(source, view[:n], report, "payload")
        sha.update(view[:n])
        left -= n

    found = {}
    if prot_size:
        area = _read_area(source, TLV_PROT_INFO_MAGIC, prot_size, report, "protected TLVs")
        sha.update(area)
        _parse_tlvs(area, True, found, report)
        area = None
    image_hash = sha.digest()

    # -- unprotected TLV area ------------------------------------------------------------
    _read_exact(source, view[:_TLV_INFO_SIZE], report, "TLV info")
    got_magic, total = struct.unpack_from(_TLV_INFO_FMT, buf, 0)
    if got_magic != TLV_INFO_MAGIC or total < _TLV_INFO_SIZE:
        raise report._refuse("tlv", REASON_TLV, "TLV info header")
    if signed_size + total > max_size:
        raise report._refuse("size", REASON_OVERSIZED, "%d B > slot %d B" % (
            signed_size + total, max_size))
    if total > TLV_AREA_MAX:
        raise report._refuse("tlv", REASON_TLV, "TLV area over %d" % TLV_AREA_MAX)
    area = bytearray(total)
    area[:_TLV_INFO_SIZE] = view[:_TLV_INFO_SIZE]
    _read_exact(source, memoryview(area)[_TLV_INFO_SIZE:], report, "TLVs")
    _parse_tlvs(area, False, found, report)
    area = None
    report.total_size = signed_size + total
    report._pass("size", "%d B in a %d B slot" % (report.total_size, max_size))
    report._pass("tlv")
    return image_hash, found


def _check_hash(found, image_hash, report):
    expected = found.get(TLV_SHA256)
    if expected is None:
        raise report._refuse("hash", REASON_HASH, "no SHA256 TLV")
    if expected != image_hash:
        raise report._refuse("hash", REASON_HASH, "SHA-256 does not match")
    report.image_hash = image_hash
    report._pass("hash", "sha256")


def _check_signature(se, found, image_hash, report, firmware_keys):
    # -- key: the image names the SE's firmware-signing key ----------------------------
    signature = found.get(TLV_ECDSASIG)
    keyhash = found.get(TLV_KEYHASH)
    pubkey = found.get(TLV_PUBKEY)
    if signature is None or (keyhash is None and pubkey is None):
        raise report._refuse("key", REASON_UNSIGNED, "no signature or no key TLV")
    if keyhash is not None and pubkey is not None:
        raise report._refuse("key", REASON_TLV, "both KEYHASH and PUBKEY")
    if pubkey is not None:
        keyhash = hashlib.sha256(pubkey).digest()
    point = _signing_key(se, keyhash, firmware_keys, report)

    # -- signature, verified by the SE ---------------------------------------------------
    if not _SIG_MIN <= len(signature) <= _SIG_MAX:
        raise report._refuse("signature", REASON_SIGNATURE, "length %d" % len(signature))
    try:
        se.verify(image_hash, signature, point=point)
    except VerificationFailed:
        raise report._refuse("signature", REASON_SIGNATURE, "does not verify") from None
    except WrongData:
        raise report._refuse("signature", REASON_SIGNATURE, "malformed") from None
    report._pass("signature", "ECDSA P-256, verified in the SE")


def _signing_key(se, keyhash, firmware_keys, report):
    # The point of the accepted firmware-signing key whose SPKI hash is `keyhash`: the
    # SE's trust anchor, or one of `firmware_keys` (device/fwkeys.py).
    if firmware_keys is None:
        try:
            point = se.get_data(_DATA_TRUST_FIRMWARE_KEY, _POINT_LEN)
        except ReferenceNotFound:
            raise report._refuse("key", REASON_NO_TRUST_ANCHOR) from None
        spki_hash = hashlib.sha256(_SPKI_P256_PREFIX + point).digest()
        if keyhash != spki_hash:
            raise report._refuse("key", REASON_KEY, "not the SE's firmware-signing key")
        report._pass("key", "firmware-signing key in the SE")
    else:
        accepted = firmware_keys.points()
        if not accepted:
            raise report._refuse("key", REASON_NO_TRUST_ANCHOR)
        point = None
        for key in accepted:
            if hashlib.sha256(_SPKI_P256_PREFIX + key.point).digest() == keyhash:
                point = key.point
                report.key_serial = key.serial
                report.key_name = getattr(key, "name", None)
                break
        if point is None:
            raise report._refuse("key", REASON_KEY, "not an accepted firmware-signing key")
        report._pass("key", "firmware-signing key: %s" % (
            "certificate %x" % report.key_serial if report.key_serial is not None
            else "bare point"))
    return point


def _check_counter(se, found, report):
    # -- security counter: no rollback below the SE's monotonic counter ----------------
    sec_cnt = found.get(TLV_SEC_CNT)
    if sec_cnt is None:
        raise report._refuse("security_counter", REASON_NO_COUNTER)
    if len(sec_cnt) != 4:
        raise report._refuse("security_counter", REASON_TLV, "SEC_CNT length")
    report.security_counter = struct.unpack("<I", sec_cnt)[0]
    report.se_counter = se.counter_read(_COUNTER_FIRMWARE)
    if report.security_counter < report.se_counter:
        raise report._refuse("security_counter", REASON_ROLLBACK, "%d < SE counter %d" % (
            report.security_counter, report.se_counter))
    report._pass("security_counter", "%d >= SE counter %d" % (
        report.security_counter, report.se_counter))


def confirm_boot(se, report):
    """After the checked image has booted well: advance COUNTER_FIRMWARE to its SEC_CNT.

    Idempotent: a counter already at or above the image's value is left alone (a repeat
    after a power cut, or a newer image confirmed meanwhile), so it may be called again
    after any interruption.  The counter never decreases (the SE refuses that).

    Params: se: SeSession.  report: the BootReport check_image() returned for this image.
    Returns: the SE counter's value after (int).
    Raises: BootError(REASON_NOT_CHECKED) for a report that did not pass; LinkError /
        ApduError from the SE.
    """
    if not isinstance(report, BootReport) or not report.ok or report.security_counter is None:
        raise BootError(REASON_NOT_CHECKED, "confirm only an image that passed check_image")
    target = report.security_counter
    current = se.counter_read(_COUNTER_FIRMWARE)
    if current >= target:
        return current
    try:
        return se.counter_advance(_COUNTER_FIRMWARE, target)
    except WrongData:
        # The counter moved past `target` between the read and the advance.
        current = se.counter_read(_COUNTER_FIRMWARE)
        if current >= target:
            return current
        raise
