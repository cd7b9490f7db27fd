"""Firmware-signing keys as certificates under the fleet root.

A device's signed boot (device/boot.py with device/fwkeys.py) trusts a firmware-signing
key only through a certificate that the fleet root signed and that the device's CRL does
not list, so the key can be rotated (a new certificate installed over the air, both keys
accepted during the overlap) and retired (its certificate revoked: the root's CRL, then
removed from the SE).  MCUboot itself pins one key hash at build time; this is the
rotation its users have asked for since 2018.  `sign_firmware_image` signs an MCUboot image
with such a key inside the HSM, the image built by imgtool's library.

Profile (RFC 5280): subject CN = the key's name; keyUsage digitalSignature (critical);
extendedKeyUsage id-kp-codeSigning; basicConstraints CA:FALSE (critical); SKI, AKI;
ECDSA P-256 key, ecdsa-with-SHA256 signature.  The device checks the signature (through its
SE, with the fleet root's point), the validity when it has a clock, and revocation.

    cert = new_firmware_key(hsm, "fleet-root", root_cert, "firmware-2026", "Acme firmware 2026")
"""

import datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetid.cloud.pki.profiles import utc_now
from fleetid.cloud.pki.signing import sign_certificate
from fleetid.common.errors import FleetidError

DEFAULT_VALIDITY = datetime.timedelta(days=5 * 365 + 1)

# MCUboot images (sign_firmware_image): made by imgtool's library, PyPI imgtool pinned in
# constraints.txt, whose format device/boot.py checks.
IMAGE_HEADER_SIZE = 32  # struct image_header (bootutil/image.h), imgtool's minimum -H
DEFAULT_HEADER_SIZE = 0x200  # what the fleet's boards reserve (imgtool -H 0x200)


class ImageError(FleetidError, ValueError):
    """The image cannot be built as asked.  `reason`: "version", "security_counter",
    "header_size", "load_addr" or "oversized"; `detail`: short text.  Also a ValueError:
    parse_version() is a value parser and click option callbacks catch ValueError."""

    def __init__(self, reason, detail):
        super().__init__("%s: %s" % (reason, detail))
        self.reason = reason
        self.detail = detail


def parse_version(text):
    """An image version "MAJOR[.MINOR[.REVISION[+BUILD]]]" read by imgtool's own parser
    (imgtool.version.decode_version), within the header's field ranges (u8, u8, u16, u32),
    which imgtool leaves to struct.pack.

    Returns: imgtool's SemiSemVersion (a 4-tuple major, minor, revision, build).
    Raises: ImageError("version") when malformed or out of range."""
    from imgtool.version import decode_version

    text = str(text)
    try:
        if not text.isascii():  # imgtool's \d also takes other scripts' digits
            raise ValueError(text)
        version = decode_version(text)
    except ValueError:
        raise ImageError("version", "%r: expected MAJOR[.MINOR[.REVISION[+BUILD]]]"
                         % text) from None
    for field, value, limit in zip(version._fields, version,
                                   (0xFF, 0xFF, 0xFFFF, 0xFFFFFFFF)):
        if value > limit:
            raise ImageError("version", "%r: %s %r is not 0..%d"
                             % (text, field, str(value), limit))
    return version


def firmware_certificate_builder(public_key, issuer_cert, name, not_before, not_after,
                                 serial=None):
    """CertificateBuilder of a firmware-signing certificate (profile above)."""
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                     False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
    )


def certify_firmware_key(hsm, issuer_label, issuer_cert, key_label, name,
                         validity=DEFAULT_VALIDITY, now=None):
    """Certify the existing HSM signing key `key_label` as a firmware-signing key (e.g. the
    key the factory line installed as a bare point, so that it joins the rotation scheme).

    Returns: x509.Certificate, signed inside the HSM by `issuer_label`.
    Raises: KeyNotFound, PkiError, HsmError.
    """
    now = (now or utc_now()).replace(microsecond=0)
    builder = firmware_certificate_builder(hsm.public_key(key_label), issuer_cert, name,
                                           now - datetime.timedelta(minutes=5), now + validity)
    return sign_certificate(hsm, issuer_label, builder, issuer_cert.public_key())


def new_firmware_key(hsm, issuer_label, issuer_cert, key_label, name,
                     validity=DEFAULT_VALIDITY, now=None):
    """Generate a new firmware-signing key in the HSM (`key_label`) and certify it.

    Returns: x509.Certificate.  Raises: HsmError(EXISTS) when the label is taken, PkiError.
    """
    hsm.generate_signing_key(key_label)
    return certify_firmware_key(hsm, issuer_label, issuer_cert, key_label, name, validity,
                                now)


def certify_public_key(hsm, issuer_label, issuer_cert, public_key, name,
                       validity=DEFAULT_VALIDITY, now=None):
    """Certify a firmware-signing public key held elsewhere (an imgtool key file on a
    build server, another HSM).  Returns: x509.Certificate.  Raises: PkiError, HsmError."""
    now = (now or utc_now()).replace(microsecond=0)
    builder = firmware_certificate_builder(public_key, issuer_cert, name,
                                           now - datetime.timedelta(minutes=5), now + validity)
    return sign_certificate(hsm, issuer_label, builder, issuer_cert.public_key())


def sign_firmware_image(hsm, key_label, payload, version, security_counter,
                        header_size=None, load_addr=0, max_size=None, fw_cert=None):
    """A signed MCUboot image of `payload`, the bytes `imgtool sign --pad-header` writes,
    made by imgtool's own library (imgtool.image.Image) in its two-pass mode for external
    signers: imgtool exports the SHA-256 digest to sign (`--vector-to-sign digest`), the
    HSM signs it with the firmware-signing key `key_label` (the key never leaves), and
    imgtool writes the image with that fixed signature (`--fix-sig`, `--fix-sig-pubkey`)
    and the key's hash (KEYHASH).  The result is then checked by imgtool's `verify`.

    Params: hsm: HsmBackend.  key_label: the firmware-signing key's label (an ECDSA P-256
        key, e.g. from `fleetid pki new-fw-key`).  payload: the raw binary.  version:
        "MAJOR.MINOR.REVISION+BUILD" or a 4-tuple.  security_counter: int (SEC_CNT).
        header_size: bytes reserved for the header (imgtool -H; default 0x200).
        load_addr: u32 (imgtool --load-addr; 0: execute in place).  max_size: slot size
        or None: the whole image must fit.  fw_cert: optional x509.Certificate: the HSM
        key must be its key (images signed by a key the devices will not accept are not
        made).
    Returns: bytes of the image.
    Raises: ImageError (parameters, size), PkiError(KEY_MISMATCH / BAD_SIGNATURE /
        BAD_INPUT for a key that is not P-256), KeyNotFound / HsmError.
    """
    from cryptography.hazmat.primitives.asymmetric import ec
    from imgtool.keys import ECDSA256P1Public

    from fleetid.cloud.pki.errors import PkiError

    version = parse_version("%d.%d.%d+%d" % tuple(version) if isinstance(version, tuple)
                            else version)
    header_size = DEFAULT_HEADER_SIZE if header_size is None else header_size
    _check_image_parameters(security_counter, header_size, load_addr)
    payload = bytes(payload)
    if max_size is not None and header_size + len(payload) > max_size:
        raise ImageError("oversized", "image of %d B header + %d B payload > slot %d B"
                         % (header_size, len(payload), max_size))
    public_key = hsm.public_key(key_label)
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or \
            not isinstance(public_key.curve, ec.SECP256R1):
        raise PkiError(PkiError.BAD_INPUT, "HSM key %r is not ECDSA P-256" % key_label)
    if fw_cert is not None and fw_cert.public_key().public_numbers() != \
            public_key.public_numbers():
        raise PkiError(PkiError.KEY_MISMATCH, "HSM key %r is not the key of firmware "
                       "certificate %x" % (key_label, fw_cert.serial_number))
    image = _imgtool_two_pass(ECDSA256P1Public(public_key), payload, version,
                              security_counter, header_size, load_addr,
                              lambda digest: hsm.sign_digest(key_label, digest))
    if image is None:  # as sign_certificate does: a wrong backend is caught here
        raise PkiError(PkiError.BAD_SIGNATURE, "image signed by %r fails imgtool verify"
                       % key_label)
    if max_size is not None and len(image) > max_size:
        raise ImageError("oversized", "image %d B > slot %d B" % (len(image), max_size))
    return image


def _check_image_parameters(security_counter, header_size, load_addr):
    # imgtool leaves these ranges to struct.pack (header u16 / u32 fields, SEC_CNT u32)
    # and its -H check (>= the 32-byte header) to its click callback.
    if not isinstance(security_counter, int) or not 0 <= security_counter <= 0xFFFFFFFF:
        raise ImageError("security_counter", "%r is not 0..4294967295" % (security_counter,))
    if not isinstance(header_size, int) or not IMAGE_HEADER_SIZE <= header_size <= 0xFFFF \
            or header_size % 4:
        raise ImageError("header_size", "%r is not a multiple of 4 in 32..65535"
                         % (header_size,))
    if not isinstance(load_addr, int) or not 0 <= load_addr <= 0xFFFFFFFF:
        raise ImageError("load_addr", "%r is not a u32" % (load_addr,))


def _imgtool_two_pass(imgtool_key, payload, version, security_counter, header_size,
                      load_addr, sign_digest):
    """`imgtool sign --vector-to-sign digest`, `sign_digest(digest)`, then `imgtool sign
    --fix-sig SIG --fix-sig-pubkey KEY` and `imgtool verify -k KEY`, through imgtool's
    library (imgtool/main.py `sign` and `verify` make the same calls).  Returns the image
    bytes, or None when imgtool's verify does not accept the signature."""
    import contextlib
    import io
    import os
    import tempfile

    from imgtool.image import Image, VerifyResult

    with tempfile.TemporaryDirectory(prefix="fleetid-image-") as folder:
        source = os.path.join(folder, "payload.bin")  # not key material: the public binary
        with open(source, "wb") as writer:
            writer.write(payload)

        def create(**signing):
            image = Image(version=version, header_size=header_size, pad_header=True,
                          load_addr=load_addr, security_counter=security_counter)
            image.load(source)  # Image only loads from a file (Image.load, as imgtool sign)
            # imgtool prints progress ("image.py: export digest") on stdout; keep it off
            # the caller's output.
            with contextlib.redirect_stdout(io.StringIO()):
                image.create(None, "hash", None, pub_key=imgtool_key, **signing)
            return image

        # Pass 1: the digest of header, payload and protected TLVs (SEC_CNT), which the
        # ECDSASIG TLV signs (MCUboot docs/design.md "Image format").
        digest = bytes(create(vector_to_sign="digest").payload)
        signature = bytes(sign_digest(digest))
        # Pass 2: the same covered bytes, then SHA256, KEYHASH and the fixed ECDSASIG.
        signed = create(fixed_sig={"value": signature})
        target = os.path.join(folder, "image.bin")
        signed.save(target)
        result = Image.verify(target, imgtool_key)[0]
        if signed.image_hash != digest or result != VerifyResult.OK:
            return None
        with open(target, "rb") as reader:
            return reader.read()


def load_firmware_public_key(data, what="public key"):
    """The ECDSA P-256 public key in `data`: a PEM public key (`imgtool getpub -e pem`),
    its DER SubjectPublicKeyInfo (`imgtool getpub -e raw`), or the C / Rust byte array
    `imgtool getpub` prints by default.

    A private key is refused: only the public half is certified, so the private key never
    has to travel to the CA's operator.
    Returns: ec.EllipticCurvePublicKey.  Raises: PkiError(BAD_INPUT) naming `what`.
    """
    import re

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fleetid.cloud.pki.errors import PkiError

    data = bytes(data)
    if b"PRIVATE KEY-----" in data:
        raise PkiError(PkiError.BAD_INPUT, "%s is a private key: give its public half "
                       "(imgtool getpub -e pem -k KEY)" % what)
    if b"-----BEGIN" in data:
        loader, blob = serialization.load_pem_public_key, data
    else:
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            text = None
        array = re.search(r"=\s*&?[{\[]([^}\]]*)[}\]]", text) if text is not None else None
        if array is not None:  # imgtool getpub -e lang-c / lang-rust
            items = [item.strip() for item in array.group(1).split(",") if item.strip()]
            if not all(re.fullmatch(r"0x[0-9a-fA-F]{1,2}", item) for item in items):
                raise PkiError(PkiError.BAD_INPUT, "%s: a byte array with items that "
                               "are not 0xNN" % what)
            blob = bytes(int(item, 16) for item in items)
        else:
            blob = data
        loader = serialization.load_der_public_key
    try:
        key = loader(blob)
    except (ValueError, TypeError):
        raise PkiError(PkiError.BAD_INPUT, "%s: not a PEM or DER public key, nor an "
                       "imgtool getpub array" % what) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                        ec.SECP256R1):
        raise PkiError(PkiError.BAD_INPUT, "%s: not an ECDSA P-256 key (imgtool keygen "
                       "-t ecdsa-p256); the devices verify P-256 only" % what)
    return key
