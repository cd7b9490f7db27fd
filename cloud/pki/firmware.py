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
