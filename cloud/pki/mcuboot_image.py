"""Build a signed MCUboot image around a raw payload, the signature made by a callable (the
fleet's HSM), the same bytes `imgtool sign --pad-header` writes.  Sans-I/O: bytes in,
bytes out; the signer is injected (MCUboot's own "signer protocol" idea, so the key never
has to be a file).

Layout (MCUboot docs/design.md "Image format"; device/boot.py has the full field diagram
and checks exactly this).  Little-endian, imgtool's default:

    0          header, 32 B "<IIHHIIBBHII": magic 0x96f3b83d, load_addr, hdr_size,
               protect_tlv_size, img_size, flags (0), version major u8, minor u8,
               revision u16, build u32, pad u32 (0); 0xff bytes up to hdr_size
    hdr_size   payload, img_size bytes
               protected TLVs: info "<HH" 0x6908, total; SEC_CNT (0x50) u32
               -- SHA-256 and the signature cover everything above this line --
               TLVs: info "<HH" 0x6907, total; SHA256 (0x10) 32 B; KEYHASH (0x01) =
               SHA-256 of the key's SubjectPublicKeyInfo DER; ECDSASIG (0x22) = DER
               ECDSA-Sig-Value over SHA-256 of the covered part

Each TLV is "<BBH" type, 0, length (imgtool image.py TLV.add).

    image = build_image(payload, "1.2.3+4", 5, spki_der, sign=lambda m: hsm.sign(label, m))
"""

import hashlib
import struct

IMAGE_MAGIC = 0x96F3B83D
TLV_INFO_MAGIC = 0x6907
TLV_PROT_INFO_MAGIC = 0x6908
TLV_KEYHASH = 0x01
TLV_SHA256 = 0x10
TLV_ECDSASIG = 0x22
TLV_SEC_CNT = 0x50

HEADER_FMT = "<IIHHIIBBHII"  # struct image_header (bootutil/image.h)
HEADER_SIZE = 32
DEFAULT_HEADER_SIZE = 0x200  # what the fleet's boards reserve (imgtool -H 0x200)


class ImageError(ValueError):
    """The image cannot be built as asked.  `reason`: "version", "security_counter",
    "header_size", "load_addr", "oversized" or "signature"; `detail`: short text."""

    def __init__(self, reason, detail):
        super().__init__("%s: %s" % (reason, detail))
        self.reason = reason
        self.detail = detail


def parse_version(text):
    """imgtool's version "MAJOR.MINOR.REVISION+BUILD" (missing parts 0) as a 4-tuple.

    Raises: ImageError("version") when malformed or out of the header's field ranges
    (u8, u8, u16, u32)."""
    main, plus, build = str(text).partition("+")
    parts = main.split(".")
    if not 1 <= len(parts) <= 3 or (plus and not build):
        raise ImageError("version", "%r: expected MAJOR[.MINOR[.REVISION]][+BUILD]" % text)
    parts += ["0"] * (3 - len(parts))
    values = []
    for part, limit in zip(parts + [build or "0"], (0xFF, 0xFF, 0xFFFF, 0xFFFFFFFF)):
        if not (part.isascii() and part.isdigit()) or int(part) > limit:
            raise ImageError("version", "%r: %r is not a number 0..%d" % (text, part, limit))
        values.append(int(part))
    return tuple(values)


def _tlv_area(magic, tlvs):
    body = b"".join(struct.pack("<BBH", kind, 0, len(value)) + value for kind, value in tlvs)
    return struct.pack("<HH", magic, 4 + len(body)) + body


def build_image(payload, version, security_counter, spki_der, sign,
                header_size=DEFAULT_HEADER_SIZE, load_addr=0, max_size=None):
    """A signed MCUboot image of `payload`.

    Params: payload: the raw application binary (bytes).  version: "1.2.3+4" or a
        4-tuple.  security_counter: int 0..2**32-1 (the device's anti-rollback counter
        must not exceed it).  spki_der: the signing key's SubjectPublicKeyInfo DER
        (hashed into KEYHASH).  sign: fn(message bytes) -> DER ECDSA-Sig-Value over
        SHA-256(message) (HsmBackend.sign with the key's label).  header_size: bytes
        reserved for the header (>= 32, a multiple of 4; imgtool -H).  load_addr: u32
        (0: execute in place).  max_size: the slot size, or None.
    Returns: bytes of the whole image.
    Raises: ImageError (bad parameter, or the image exceeds max_size); what `sign` raises.
    """
    if not isinstance(version, tuple):
        version = parse_version(version)
    if not isinstance(security_counter, int) or not 0 <= security_counter <= 0xFFFFFFFF:
        raise ImageError("security_counter", "%r is not 0..4294967295" % (security_counter,))
    if not isinstance(header_size, int) or not HEADER_SIZE <= header_size <= 0xFFFF \
            or header_size % 4:
        raise ImageError("header_size", "%r is not a multiple of 4 in 32..65535"
                         % (header_size,))
    if not isinstance(load_addr, int) or not 0 <= load_addr <= 0xFFFFFFFF:
        raise ImageError("load_addr", "%r is not a u32" % (load_addr,))
    payload = bytes(payload)
    protected = _tlv_area(TLV_PROT_INFO_MAGIC,
                          [(TLV_SEC_CNT, struct.pack("<I", security_counter))])
    header = struct.pack(HEADER_FMT, IMAGE_MAGIC, load_addr, header_size, len(protected),
                         len(payload), 0, version[0], version[1], version[2], version[3], 0)
    # The header's reserve is filled with the erased value 0xff, as imgtool --pad-header
    # does (--erased-val default), so the covered bytes equal imgtool's.
    covered = header + b"\xff" * (header_size - HEADER_SIZE) + payload + protected
    signature = bytes(sign(covered))
    image = covered + _tlv_area(TLV_INFO_MAGIC, [
        (TLV_SHA256, hashlib.sha256(covered).digest()),
        (TLV_KEYHASH, hashlib.sha256(bytes(spki_der)).digest()),
        (TLV_ECDSASIG, signature)])
    if max_size is not None and len(image) > max_size:
        raise ImageError("oversized", "image %d B > slot %d B" % (len(image), max_size))
    return image
