"""Firmware-signing keys as certificates under the fleet root.

A device's signed boot (device/boot.py with device/fwkeys.py) trusts a firmware-signing
key only through a certificate that the fleet root signed and that the device's CRL does
not list, so the key can be rotated (a new certificate installed over the air, both keys
accepted during the overlap) and retired (its certificate revoked: the root's CRL, then
removed from the SE).  MCUboot itself pins one key hash at build time; this is the
rotation its users have asked for since 2018.

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

DEFAULT_VALIDITY = datetime.timedelta(days=5 * 365 + 1)


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
    """A signed MCUboot image of `payload` (cloud/pki/mcuboot_image.py), its signature
    made inside the HSM by the firmware-signing key `key_label`; the key never leaves.

    Params: hsm: HsmBackend.  key_label: the firmware-signing key's label (an ECDSA P-256
        key, e.g. from `fleetid pki new-fw-key`).  payload: the raw binary.  version:
        "MAJOR.MINOR.REVISION+BUILD".  security_counter: int.  header_size: bytes reserved
        for the header (default 0x200).  load_addr: u32.  max_size: slot size or None.
        fw_cert: optional x509.Certificate: the HSM key must be its key (images signed by
        a key the devices will not accept are not made).
    Returns: bytes of the image; its signature checked with the HSM key's public key.
    Raises: ImageError (parameters, size), PkiError(KEY_MISMATCH / BAD_SIGNATURE /
        BAD_INPUT for a key that is not P-256), KeyNotFound / HsmError.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fleetid.cloud.pki import mcuboot_image
    from fleetid.cloud.pki.errors import PkiError

    public_key = hsm.public_key(key_label)
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or \
            not isinstance(public_key.curve, ec.SECP256R1):
        raise PkiError(PkiError.BAD_INPUT, "HSM key %r is not ECDSA P-256" % key_label)
    if fw_cert is not None and fw_cert.public_key().public_numbers() != \
            public_key.public_numbers():
        raise PkiError(PkiError.KEY_MISMATCH, "HSM key %r is not the key of firmware "
                       "certificate %x" % (key_label, fw_cert.serial_number))
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    signed = {}

    def sign(message):
        signed["message"] = message
        signed["signature"] = hsm.sign(key_label, message)
        return signed["signature"]

    image = mcuboot_image.build_image(
        payload, version, security_counter, spki, sign, load_addr=load_addr,
        header_size=mcuboot_image.DEFAULT_HEADER_SIZE if header_size is None else header_size,
        max_size=max_size)
    try:  # as sign_certificate does: a wrong backend is caught here, not by a device
        public_key.verify(signed["signature"], signed["message"], ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PkiError(PkiError.BAD_SIGNATURE, "image signed by %r" % key_label) from None
    return image


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
