"""Sign X.509 certificates and CRLs with a key that never leaves the HSM.

`cryptography` builders can only sign with a private key object they hold.  The CA keys
live in the HSM (`HsmBackend.sign`), so we:

1. let the builder produce the to-be-signed structure by signing once with a throwaway
   P-256 key (same algorithm, ecdsa-with-SHA256, so the TBS names the right algorithm);
2. take the exact TBS bytes (`tbs_certificate_bytes` / `tbs_certlist_bytes`);
3. have the HSM sign those bytes (ECDSA P-256, SHA-256 computed on the host: the TBS is
   public);
4. assemble the outer structure, identical for both (RFC 5280 4.1 and 5.1):

       Certificate / CertificateList ::= SEQUENCE {
           tbs                 TBSCertificate / TBSCertList,   -- bytes from step 2, verbatim
           signatureAlgorithm  AlgorithmIdentifier,            -- ecdsa-with-SHA256, no params
           signatureValue      BIT STRING }                    -- DER ECDSA-Sig-Value, 0 unused bits

5. load the result with `cryptography` and verify its signature with the HSM's public key,
   so a wrong label or a broken backend is caught here, not by a device in the field.

The throwaway key is generated per call and dropped; nothing it signed is ever released.
"""

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.pki.errors import PkiError
from fleetid.common.der import ecdsa_with_sha256_algorithm, encode_bit_string, encode_sequence


def assemble_signed(tbs_der, signature_der):
    """DER SEQUENCE { tbs, ecdsa-with-SHA256, BIT STRING signature } (RFC 5280 4.1.1).

    Params: tbs_der: the exact TBS bytes.  signature_der: DER ECDSA-Sig-Value.
    Returns: bytes.
    """
    return encode_sequence(
        [bytes(tbs_der), ecdsa_with_sha256_algorithm(), encode_bit_string(bytes(signature_der))]
    )


def _throwaway_key():
    return ec.generate_private_key(ec.SECP256R1())


def _check_issuer_key(hsm, label, public_key):
    hsm_key = hsm.public_key(label)
    if public_key is not None and hsm_key.public_numbers() != public_key.public_numbers():
        raise PkiError(PkiError.KEY_MISMATCH, "HSM key %r is not the issuer's key" % label)
    return hsm_key


def sign_certificate(hsm, label, builder, issuer_public_key=None):
    """Sign a CertificateBuilder with the HSM key `label` (ECDSA P-256 / SHA-256).

    Params: hsm: HsmBackend.  label: the CA signing key's label.  builder: a complete
        x509.CertificateBuilder (subject, issuer, key, serial, validity, extensions).
        issuer_public_key: if given, the HSM key must be this key (refuses to sign with
        the wrong CA key).
    Returns: x509.Certificate, its signature checked with the HSM's public key.
    Raises: PkiError(KEY_MISMATCH / BAD_SIGNATURE), KeyNotFound / HsmError from the HSM.
    """
    hsm_key = _check_issuer_key(hsm, label, issuer_public_key)
    draft = builder.sign(_throwaway_key(), hashes.SHA256())
    tbs = draft.tbs_certificate_bytes
    certificate = x509.load_der_x509_certificate(assemble_signed(tbs, hsm.sign(label, tbs)))
    try:
        hsm_key.verify(certificate.signature, tbs, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PkiError(PkiError.BAD_SIGNATURE, "certificate signed by %r" % label) from None
    return certificate


def sign_crl(hsm, label, builder, issuer_public_key=None):
    """Sign a CertificateRevocationListBuilder with the HSM key `label`.

    Same contract as sign_certificate (RFC 5280 5.1: CertificateList has the same outer
    shape as Certificate).
    Returns: x509.CertificateRevocationList, signature checked.
    Raises: PkiError(KEY_MISMATCH / BAD_SIGNATURE), KeyNotFound / HsmError.
    """
    hsm_key = _check_issuer_key(hsm, label, issuer_public_key)
    draft = builder.sign(_throwaway_key(), hashes.SHA256())
    tbs = draft.tbs_certlist_bytes
    crl = x509.load_der_x509_crl(assemble_signed(tbs, hsm.sign(label, tbs)))
    if not crl.is_signature_valid(hsm_key):
        raise PkiError(PkiError.BAD_SIGNATURE, "CRL signed by %r" % label)
    return crl
