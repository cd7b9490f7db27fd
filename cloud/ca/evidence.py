"""Verification of SE attestation evidence, shared by the issuing CA (CSR attribute) and
every offline verifier (certificate extension).

Evidence = an EvidenceBundle (fleetid.common.attestation): signed statements + the MAK
certificate chain.  Checks, in order, each with its reason code (errors.py):

    decode the bundle (strict DER)                          bad_evidence
    MAK certificate parses, P-256, not a CA                 bad_evidence
    MAK chain validates to a trusted SE vendor root         unknown_vendor
    every statement is signed by that MAK                   bad_statement_signature
      -- from here on the statements are authentic --
    a statement attests the key being certified             key_mismatch
    its policy: generated on chip, non-exportable, sign;
      not the MAK itself; chip not locked / terminated      policy
    its SE UID is the expected one                          se_uid_mismatch

Why `cryptography.x509.verification` for the vendor chain: it does path building, validity
periods, signatures and basicConstraints / keyUsage of the CAs, and it is the validator the
rest of the cloud uses (the verifier must not hand-write path validation).  Its
end-entity defaults are the Web PKI's (a SAN is required, EKU checked), which SE vendor
MAK certificates do not follow (no SAN, no EKU), so the MAK certificate is checked with
`ExtensionPolicy.permit_all()` plus our own checks (P-256 key, not a CA) while the vendor
CA certificates keep `webpki_defaults_ca()` (CA:true critical, keyCertSign).  A vendor
whose CA certificates break those rules needs its own `ca_policy` (constructor argument),
which is a reviewed, per-vendor decision, not a default.

Chain cache.  A chip's MAK chain never changes, and path validation is the costly part of
authenticating evidence.  EvidenceVerifier keeps, per exact tuple of certificate DERs
offered in a bundle (bounded LRU), the parsed certificates and the validated chain with
the window in which that validation holds (the latest notBefore and earliest notAfter of
the chain): a lookup at a time outside the window validates again.  The verifier's trust
store is fixed at construction, so nothing else can change the verdict.  Statement
signatures are checked on every call (they differ per request).
"""

import collections
import datetime
import hmac
import threading

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from fleetid.cloud.ca import errors
from fleetid.cloud.ca.errors import AttestationError
from fleetid.common import attestation, der, se_consts
from fleetid.common.errors import DerError
from fleetid.common.oids import OID_EXT_ATTESTATION

# The key policy a certified key must have (common/se_consts.py POLICY_*).
REQUIRED_POLICY = (
    se_consts.POLICY_GENERATED_ON_CHIP | se_consts.POLICY_NON_EXPORTABLE | se_consts.POLICY_SIGN
)
# The MAK (ATTEST policy) is the chip's vendor identity, never a fleet identity key.
FORBIDDEN_POLICY = se_consts.POLICY_ATTEST
REFUSED_LIFE_CYCLES = (se_consts.LC_CARD_LOCKED, se_consts.LC_TERMINATED)
MAX_VENDOR_CHAIN_DEPTH = 4  # MAK + up to 2 vendor intermediates + root
DEFAULT_CHAIN_CACHE = 4096  # distinct MAK chains remembered (one per chip)

ATTESTATION_EXTENSION_OID = x509.ObjectIdentifier(OID_EXT_ATTESTATION)


def public_point(public_key):
    """65-byte uncompressed point of a P-256 public key.  Raises ValueError for any other
    key type or curve."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise ValueError("not a P-256 key")
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


class AuthenticatedEvidence:
    """Evidence whose statements are proven to come from a genuine SE's MAK.

    Attributes: bundle (attestation.EvidenceBundle), statements (list of
    SignedAttestation, all MAK-signed), mak_certificate (x509.Certificate),
    vendor_chain (list of x509.Certificate: MAK first, trusted root last).
    """

    def __init__(self, bundle, mak_certificate, vendor_chain, below_root_der=None):
        self.bundle = bundle
        self.statements = bundle.statements
        self.mak_certificate = mak_certificate
        self.vendor_chain = vendor_chain
        self._below_root_der = below_root_der

    def nonces(self):
        """The nonces of every statement (authentic: signed by the MAK)."""
        return [signed.statement.nonce for signed in self.statements]

    def statement_for(self, public_key):
        """The SignedAttestation attesting `public_key`.

        Raises: AttestationError(key_mismatch) if no statement attests it."""
        try:
            wanted = public_point(public_key)
        except ValueError:
            raise AttestationError(errors.KEY_MISMATCH, "not a P-256 key") from None
        return self.statement_for_point(wanted)

    def statement_for_point(self, point):
        """The SignedAttestation attesting the P-256 key whose uncompressed point
        (public_point) is `point`.  Raises: AttestationError(key_mismatch)."""
        for signed in self.statements:
            if hmac.compare_digest(signed.statement.public_point, point):
                return signed
        raise AttestationError(errors.KEY_MISMATCH)

    def minimal_bundle(self, signed):
        """DER EvidenceBundle with only `signed` and the certificates below the trusted
        root (MAK + vendor intermediates): what goes into the issued certificate, enough
        for an offline re-check against the vendor roots, and small enough for the SE's
        certificate slot (se_consts.CERT_MAX)."""
        below_root = self._below_root_der
        if below_root is None:
            below_root = [
                c.public_bytes(serialization.Encoding.DER) for c in self.vendor_chain[:-1]
            ]
        # The parts were decoded strictly (statement) and validated (chain) already:
        # encode the EvidenceBundle directly (common/attestation.py layout).
        return der.encode_sequence(
            [der.encode_sequence([bytes(signed.der)]), der.encode_sequence(list(below_root))]
        )


def check_statement(signed, expected_se_uid=None):
    """Policy and SE UID checks on an authenticated statement.

    Raises: AttestationError(policy / se_uid_mismatch)."""
    statement = signed.statement
    if statement.key_policy & REQUIRED_POLICY != REQUIRED_POLICY:
        raise AttestationError(errors.POLICY, "key policy 0x%02X" % statement.key_policy)
    if statement.key_policy & FORBIDDEN_POLICY:
        raise AttestationError(errors.POLICY, "attestation key")
    if statement.life_cycle in REFUSED_LIFE_CYCLES:
        raise AttestationError(errors.POLICY, "life cycle 0x%02X" % statement.life_cycle)
    if expected_se_uid is not None and not hmac.compare_digest(
        statement.se_uid, bytes(expected_se_uid)
    ):
        raise AttestationError(errors.SE_UID_MISMATCH)


class _ValidatedChain:
    """A MAK chain validated to a vendor root, and the window that validation holds in."""

    __slots__ = ("mak_certificate", "mak_key", "chain", "below_root_der", "not_before",
                 "not_after")

    def __init__(self, mak_certificate, mak_key, chain):
        self.mak_certificate = mak_certificate
        self.mak_key = mak_key
        self.chain = chain
        self.below_root_der = [c.public_bytes(serialization.Encoding.DER) for c in chain[:-1]]
        self.not_before = max(c.not_valid_before_utc for c in chain)
        self.not_after = min(c.not_valid_after_utc for c in chain)


class EvidenceVerifier:
    """Authenticates evidence bundles against a fixed set of trusted SE vendor roots.

    Immutable after construction; safe to share between threads.
    """

    def __init__(self, vendor_roots, ca_policy=None, chain_cache_size=DEFAULT_CHAIN_CACHE):
        """Params: vendor_roots: iterable of x509.Certificate (trusted SE vendor roots).
        ca_policy: cryptography ExtensionPolicy for vendor CA certificates (default
        webpki_defaults_ca(); see the module docstring before changing it).
        chain_cache_size: validated MAK chains kept (0: no cache)."""
        self._chains = collections.OrderedDict()  # cert DER tuple -> _ValidatedChain
        self._chain_cache_size = chain_cache_size
        self._chains_lock = threading.Lock()
        self.chain_cache_hits = 0
        self.vendor_roots = list(vendor_roots)
        self._store = verification.Store(self.vendor_roots) if self.vendor_roots else None
        self._ca_policy = ca_policy or verification.ExtensionPolicy.webpki_defaults_ca()
        self._ee_policy = verification.ExtensionPolicy.permit_all()

    def _validate_chain(self, mak_certificate, intermediates, at):
        if self._store is None:
            raise AttestationError(errors.UNKNOWN_VENDOR, "no trusted vendor roots")
        verifier = (
            verification.PolicyBuilder()
            .store(self._store)
            .time(at)
            .max_chain_depth(MAX_VENDOR_CHAIN_DEPTH)
            .extension_policies(ca_policy=self._ca_policy, ee_policy=self._ee_policy)
            .build_client_verifier()
        )
        try:
            return list(verifier.verify(mak_certificate, intermediates).chain)
        except Exception:  # noqa: BLE001 - VerificationError, or a malformed vendor
            # certificate failing deeper in path building: both mean "not trusted".
            raise AttestationError(errors.UNKNOWN_VENDOR) from None

    def authenticate(self, bundle_der, at):
        """Decode a bundle, validate its MAK chain at time `at` (aware datetime), and check
        every statement's MAK signature.

        Returns: AuthenticatedEvidence.
        Raises: AttestationError(bad_evidence / unknown_vendor / bad_statement_signature).
        """
        try:
            bundle = attestation.decode_evidence_bundle(bytes(bundle_der))
        except DerError:
            raise AttestationError(errors.BAD_EVIDENCE, "malformed bundle") from None
        if not bundle.certificates:
            raise AttestationError(errors.BAD_EVIDENCE, "no MAK certificate")
        validated = self._validated_chain(tuple(bundle.certificates), at)
        mak_key = validated.mak_key
        for signed in bundle.statements:
            try:
                mak_key.verify(
                    signed.signature_der, signed.statement_der, ec.ECDSA(hashes.SHA256())
                )
            except InvalidSignature:
                raise AttestationError(errors.BAD_STATEMENT_SIGNATURE) from None
        return AuthenticatedEvidence(bundle, validated.mak_certificate, validated.chain,
                                     validated.below_root_der)

    def validated_mak(self, cert_ders, at):
        """The MAK certificate of a chain (MAK first, DER) that validates to a trusted
        vendor root at `at`: the check authenticate() makes, through the same chain
        cache, so a caller that checks a chip's chain before its evidence arrives (the
        factory line's counterfeit check) leaves the later authenticate() a cache hit.
        Returns: x509.Certificate.  Raises AttestationError(bad_evidence /
        unknown_vendor)."""
        return self._validated_chain(tuple(bytes(c) for c in cert_ders), at).mak_certificate

    def _validated_chain(self, cert_ders, at):
        """_ValidatedChain for the bundle's certificates at `at` (cached, module
        docstring).  Raises AttestationError(bad_evidence / unknown_vendor)."""
        with self._chains_lock:
            entry = self._chains.get(cert_ders)
            if entry is not None:
                self._chains.move_to_end(cert_ders)
        if entry is not None and entry.not_before <= at <= entry.not_after:
            self.chain_cache_hits += 1
            return entry
        try:
            certificates = [x509.load_der_x509_certificate(c) for c in cert_ders]
            mak_certificate = certificates[0]
            mak_key = mak_certificate.public_key()
            public_point(mak_key)
            constraints = mak_certificate.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value
        except x509.ExtensionNotFound:
            constraints = None
        except Exception:  # noqa: BLE001 - untrusted DER: cryptography raises ValueError,
            # InvalidVersion, UnsupportedAlgorithm, ...; every one of them is a refusal.
            raise AttestationError(errors.BAD_EVIDENCE, "MAK certificate") from None
        if constraints is not None and constraints.ca:
            raise AttestationError(errors.BAD_EVIDENCE, "MAK certificate is a CA")
        chain = self._validate_chain(mak_certificate, certificates[1:], at)
        entry = _ValidatedChain(mak_certificate, mak_key, chain)
        if self._chain_cache_size > 0:
            with self._chains_lock:
                self._chains[cert_ders] = entry
                while len(self._chains) > self._chain_cache_size:
                    self._chains.popitem(last=False)
        return entry


    def verify_certificate(self, certificate, expected_se_uid=None, at=None):
        """Re-check, offline, the attestation extension of an issued certificate.

        Checks everything the CA checked except the nonce (its freshness was the CA's
        business at issuance): the evidence chains to a trusted SE vendor root, the
        statement is MAK-signed, it attests this certificate's key, the policy flags are
        right, and (if given) the SE UID is the registry's UID for the device.
        Params: certificate: x509.Certificate.  expected_se_uid: bytes or None.
            at: when the vendor chain must have been valid (default: the certificate's
            notBefore, i.e. issuance time: a MAK certificate that expires later does not
            make old evidence false).
        Returns: the verified attestation.AttestationStatement.
        Raises: AttestationError (no_evidence if the extension is missing).
        """
        try:
            extension = certificate.extensions.get_extension_for_oid(ATTESTATION_EXTENSION_OID)
        except x509.ExtensionNotFound:
            raise AttestationError(errors.NO_EVIDENCE) from None
        if extension.critical:
            raise AttestationError(errors.BAD_EVIDENCE, "extension must be non-critical")
        value = extension.value
        bundle_der = getattr(value, "value", None)
        if not isinstance(bundle_der, bytes):
            raise AttestationError(errors.BAD_EVIDENCE, "extension value")
        if at is None:
            at = certificate.not_valid_before_utc
        evidence = self.authenticate(bundle_der, at)
        signed = evidence.statement_for(certificate.public_key())
        check_statement(signed, expected_se_uid)
        return signed.statement


def verify_attestation_extension(cert, vendor_roots, expected_se_uid=None, at=None):
    """Re-check a certificate's attestation extension offline (see
    EvidenceVerifier.verify_certificate; build one EvidenceVerifier and reuse it when
    checking many certificates).

    Params: cert: x509.Certificate.  vendor_roots: iterable of x509.Certificate.
        expected_se_uid: bytes or None.  at: aware datetime or None.
    Returns: attestation.AttestationStatement.
    Raises: AttestationError(reason) with reason in fleetid.cloud.ca.errors.REASONS.
    """
    return EvidenceVerifier(vendor_roots).verify_certificate(cert, expected_se_uid, at)


def attestation_extension(bundle_der):
    """The non-critical certificate extension (OID_EXT_ATTESTATION) whose extnValue is
    the DER EvidenceBundle."""
    return x509.UnrecognizedExtension(ATTESTATION_EXTENSION_OID, bytes(bundle_der))


def utc(moment):
    """`moment` as an aware UTC datetime (naive datetimes are refused)."""
    if not isinstance(moment, datetime.datetime) or moment.tzinfo is None:
        raise ValueError("times must be timezone-aware datetimes")
    return moment.astimezone(datetime.timezone.utc)
