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

The throwaway key is generated once per process and never leaves it; nothing it signed is
ever released (its signature is cut off in step 2).  One key or one per call makes no
difference to what is released; one per process saves a key generation per certificate.

Hot path.  `CertificateSigner` is the same procedure for a CA that signs many
certificates (the EST CA): the HSM key is compared with the issuer's key once, at
construction, and the verify-after-sign of step 5 runs per `verify` policy:
  "always"  every certificate (what sign_certificate does; tests use it);
  "first"   the first certificate signed by this signer, then never: the key binding is
            already proven at construction and by that first signature, and an ECDSA
            verification costs twice the signature it checks.  A backend that returns a
            wrong signature later is still caught before harm, by the verifier's chain
            check on the certificate's first use (the device cannot authenticate with
            it); the certificate is never trusted unchecked.

Native signing.  A backend whose key objects live in this process (the software keystore,
fleetid.cloud.hsm.soft_backend) may define `sign_certificate(label, builder)`: it signs
the builder with its key directly, so steps 1-4 cost one signature, not two, and nothing
is re-parsed.  The key still never leaves the backend, the certificate bytes have the
same structure (cryptography writes the same outer SEQUENCE), and step 5 runs per the same
policy on the certificate's own TBS bytes and signature.  The PKCS#11 backend keeps
steps 1-4.
"""

import threading

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


_THROWAWAY = []
_THROWAWAY_LOCK = threading.Lock()


def _throwaway_key():
    # Created on first use; its signatures are always discarded (module docstring).
    if not _THROWAWAY:
        with _THROWAWAY_LOCK:
            if not _THROWAWAY:
                _THROWAWAY.append(ec.generate_private_key(ec.SECP256R1()))
    return _THROWAWAY[0]


def tbs_of(builder):
    """The exact TBSCertificate DER a CertificateBuilder describes (steps 1-2)."""
    return builder.sign(_throwaway_key(), hashes.SHA256()).tbs_certificate_bytes


VERIFY_POLICIES = ("always", "first")


class CertificateSigner:
    """Signs many certificates with one HSM key (the hot path; module docstring).

    CertificateSigner(hsm, label, issuer_public_key, verify="always")
    Raises: PkiError(KEY_MISMATCH) if the HSM key under `label` is not issuer_public_key,
        PkiError(BAD_INPUT) for an unknown verify policy; KeyNotFound / HsmError.
    Thread-safe.
    """

    def __init__(self, hsm, label, issuer_public_key, verify="always"):
        if verify not in VERIFY_POLICIES:
            raise PkiError(PkiError.BAD_INPUT, "verify must be one of %s" % (VERIFY_POLICIES,))
        self.hsm = hsm
        self.label = label
        self.verify = verify
        self._hsm_key = _check_issuer_key(hsm, label, issuer_public_key)
        self._verified_once = False
        # A backend holding its keys in this process signs the builder itself (module
        # docstring, "Native signing").  Looked up on the class: a wrapper that forwards
        # attributes (a counting or fault-injecting HSM) keeps the TBS route it wraps.
        self._native = callable(getattr(type(hsm), "sign_certificate", None))

    def sign(self, builder):
        """Sign a complete CertificateBuilder.  Returns x509.Certificate.
        Raises: PkiError(BAD_SIGNATURE), HsmError / KeyNotFound."""
        if self._native:
            certificate = self.hsm.sign_certificate(self.label, builder)
            tbs, signature = certificate.tbs_certificate_bytes, certificate.signature
        else:
            tbs = tbs_of(builder)
            signature = self.hsm.sign(self.label, tbs)
            certificate = x509.load_der_x509_certificate(assemble_signed(tbs, signature))
        if self.verify == "always" or not self._verified_once:
            try:
                self._hsm_key.verify(signature, tbs, ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                raise PkiError(PkiError.BAD_SIGNATURE,
                               "certificate signed by %r" % self.label) from None
            self._verified_once = True
        return certificate


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
    return CertificateSigner(hsm, label, issuer_public_key).sign(builder)


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
