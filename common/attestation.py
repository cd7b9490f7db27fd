# SE attestation structures: AttestationStatement, SignedAttestation, EvidenceBundle.
# Portable: CPython and MicroPython.
#
# The normative ASN.1 is in common/host/asn1.py (asn1crypto classes for CPython); this
# module reads and writes the same DER with fleetid.common.der, and tests check that
# both sides produce and accept identical bytes.
#
#     AttestationStatement ::= SEQUENCE {
#         version INTEGER (0), seUid OCTET STRING (16), slot INTEGER (0..255),
#         subjectPublicKey SubjectPublicKeyInfo, keyPolicy INTEGER (0..255),
#         lifeCycle INTEGER (0..255), firmwareVersion OCTET STRING (3),
#         nonce OCTET STRING (1..64) }
#     SignedAttestation ::= SEQUENCE {
#         statement AttestationStatement, signatureAlgorithm AlgorithmIdentifier
#         (ecdsa-with-SHA256, no parameters), signature BIT STRING (DER ECDSA-Sig-Value) }
#     EvidenceBundle ::= SEQUENCE {
#         statements SEQUENCE SIZE (1..MAX) OF SignedAttestation,
#         certificates SEQUENCE OF Certificate }   -- MAK certificate first, then its chain
#
# The MAK signs SHA-256 over the exact DER of the statement; decoders keep those bytes
# (`statement_der`) so a verifier checks the signature over what was signed, never over
# a re-encoding.  Certificates are carried opaque (one complete DER SEQUENCE each): the
# device has no X.509 parser; the verifier parses them with `cryptography`.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.der import (
    REASON_RANGE,
    TAG_SEQUENCE,
    DerReader,
    ecdsa_der_to_raw,
    ecdsa_with_sha256_algorithm,
    encode_bit_string,
    encode_integer,
    encode_octet_string,
    encode_p256_spki,
    encode_sequence,
    read_ecdsa_with_sha256_algorithm,
    read_p256_spki,
)
from fleetid.common.errors import DerError
from fleetid.common.oids import OID_ATTR_EVIDENCE

STATEMENT_VERSION = const(0)
SE_UID_LEN = const(16)
FIRMWARE_VERSION_LEN = const(3)  # major, minor, patch
NONCE_MIN = const(1)
NONCE_MAX = const(64)  # se_consts.ATTEST_NONCE_MAX


def _check_len(name, value, low, high):
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise DerError(REASON_RANGE, name + " must be bytes")
    if len(value) < low or len(value) > high:
        raise DerError(REASON_RANGE, "%s length %d..%d" % (name, low, high))
    return bytes(value)


def _check_octet(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > 255:
        raise DerError(REASON_RANGE, name + " must be 0..255")
    return value


class AttestationStatement:
    """A decoded AttestationStatement.

    Attributes: version, se_uid (16 B), slot, public_point (65 B uncompressed P-256),
    spki_der, key_policy, life_cycle, firmware_version (3 B), nonce, statement_der (the
    exact DER the MAK signed).
    """

    def __init__(
        self,
        version,
        se_uid,
        slot,
        public_point,
        spki_der,
        key_policy,
        life_cycle,
        firmware_version,
        nonce,
        statement_der,
    ):
        self.version = version
        self.se_uid = se_uid
        self.slot = slot
        self.public_point = public_point
        self.spki_der = spki_der
        self.key_policy = key_policy
        self.life_cycle = life_cycle
        self.firmware_version = firmware_version
        self.nonce = nonce
        self.statement_der = statement_der

    def as_dict(self):
        """The fields as a plain dict (for logs, reports and JSON after hex-encoding)."""
        return {
            "version": self.version,
            "se_uid": self.se_uid,
            "slot": self.slot,
            "public_point": self.public_point,
            "spki_der": self.spki_der,
            "key_policy": self.key_policy,
            "life_cycle": self.life_cycle,
            "firmware_version": self.firmware_version,
            "nonce": self.nonce,
        }


class SignedAttestation:
    """A decoded SignedAttestation.

    Attributes: statement (AttestationStatement), statement_der (signed bytes),
    signature_der (DER ECDSA-Sig-Value, already checked strict), der (whole element).
    """

    def __init__(self, statement, signature_der, der):
        self.statement = statement
        self.statement_der = statement.statement_der
        self.signature_der = signature_der
        self.der = der

    @property
    def signature_raw(self):
        """The signature as raw r || s (64 bytes)."""
        return ecdsa_der_to_raw(self.signature_der)


class EvidenceBundle:
    """A decoded EvidenceBundle.

    Attributes: statements (list of SignedAttestation, at least one), certificates
    (list of DER certificates, MAK certificate first), der (whole element).
    """

    def __init__(self, statements, certificates, der):
        self.statements = statements
        self.certificates = certificates
        self.der = der


# ---------------------------------------------------------------------------------------
# Statement


def encode_statement(
    se_uid, slot, public_point, key_policy, life_cycle, firmware_version, nonce, version=0
):
    """DER AttestationStatement (the bytes the MAK signs).

    Params: se_uid: 16 bytes.  slot, key_policy, life_cycle: 0..255.  public_point:
        65-byte uncompressed P-256 point of the attested key.  firmware_version: 3 bytes.
        nonce: 1..64 bytes.  version: must be 0.
    Returns: bytes.
    Raises: DerError (REASON_RANGE for out-of-range fields, REASON_POINT for a bad point).
    """
    if version != STATEMENT_VERSION:
        raise DerError(REASON_RANGE, "version must be 0")
    return encode_sequence(
        [
            encode_integer(STATEMENT_VERSION),
            encode_octet_string(_check_len("se_uid", se_uid, SE_UID_LEN, SE_UID_LEN)),
            encode_integer(_check_octet("slot", slot)),
            encode_p256_spki(public_point),
            encode_integer(_check_octet("key_policy", key_policy)),
            encode_integer(_check_octet("life_cycle", life_cycle)),
            encode_octet_string(
                _check_len(
                    "firmware_version", firmware_version, FIRMWARE_VERSION_LEN, FIRMWARE_VERSION_LEN
                )
            ),
            encode_octet_string(_check_len("nonce", nonce, NONCE_MIN, NONCE_MAX)),
        ]
    )


def _read_statement(reader):
    statement_der = reader.read_raw(TAG_SEQUENCE)
    seq = DerReader(statement_der).read_sequence()
    version = seq.read_integer()
    if version != STATEMENT_VERSION:
        raise DerError(REASON_RANGE, "unknown statement version")
    se_uid = _check_len("se_uid", seq.read_octet_string(), SE_UID_LEN, SE_UID_LEN)
    slot = seq.read_small_integer(0, 255)
    # Keep the SPKI bytes exactly as encoded (read_raw), and the checked point.
    spki_der = seq.read_raw(TAG_SEQUENCE)
    spki_reader = DerReader(spki_der)
    public_point = read_p256_spki(spki_reader)
    spki_reader.finish()
    key_policy = seq.read_small_integer(0, 255)
    life_cycle = seq.read_small_integer(0, 255)
    firmware_version = _check_len(
        "firmware_version", seq.read_octet_string(), FIRMWARE_VERSION_LEN, FIRMWARE_VERSION_LEN
    )
    nonce = _check_len("nonce", seq.read_octet_string(), NONCE_MIN, NONCE_MAX)
    seq.finish()
    return AttestationStatement(
        version,
        se_uid,
        slot,
        public_point,
        spki_der,
        key_policy,
        life_cycle,
        firmware_version,
        nonce,
        statement_der,
    )


def decode_statement(statement_der):
    """Parse a DER AttestationStatement strictly.

    Returns: AttestationStatement.
    Raises: DerError (malformed DER, trailing bytes, out-of-range field, bad key).
    """
    reader = DerReader(statement_der)
    statement = _read_statement(reader)
    reader.finish()
    return statement


# ---------------------------------------------------------------------------------------
# SignedAttestation


def encode_signed_attestation(statement_der, signature_der):
    """DER SignedAttestation from a statement and the MAK's DER ECDSA signature over
    sha256(statement_der).

    Raises: DerError if the statement or the signature is not strict DER of its type.
    """
    decode_statement(statement_der)
    ecdsa_der_to_raw(signature_der)
    return encode_sequence(
        [bytes(statement_der), ecdsa_with_sha256_algorithm(), encode_bit_string(signature_der)]
    )


def _read_signed_attestation(reader):
    der = reader.read_raw(TAG_SEQUENCE)
    seq = DerReader(der).read_sequence()
    statement = _read_statement(seq)
    read_ecdsa_with_sha256_algorithm(seq)
    signature_der = seq.read_bit_string()
    seq.finish()
    ecdsa_der_to_raw(signature_der)  # strict: refuse BER or out-of-range signatures here
    return SignedAttestation(statement, signature_der, der)


def decode_signed_attestation(der):
    """Parse a DER SignedAttestation strictly (the signature is parsed, not verified).

    Returns: SignedAttestation.
    Raises: DerError.
    """
    reader = DerReader(der)
    signed = _read_signed_attestation(reader)
    reader.finish()
    return signed


# ---------------------------------------------------------------------------------------
# EvidenceBundle


def encode_evidence_bundle(signed_attestations, certificates):
    """DER EvidenceBundle.

    Params: signed_attestations: non-empty list of DER SignedAttestation, or of
            SignedAttestation objects (decode_signed_attestation() output: already
            parsed strictly, so not parsed again).
        certificates: list of DER certificates (MAK certificate first).
    Returns: bytes.
    Raises: DerError (empty statements, malformed element).
    """
    if not signed_attestations:
        raise DerError(REASON_RANGE, "at least one statement")
    elements = []
    for element in signed_attestations:
        if isinstance(element, SignedAttestation):
            elements.append(element.der)
        else:
            decode_signed_attestation(element)
            elements.append(element)
    checked_certs = []
    for cert in certificates:
        reader = DerReader(cert)
        checked_certs.append(reader.read_raw(TAG_SEQUENCE))
        reader.finish()
    return encode_sequence(
        [
            encode_sequence([bytes(e) for e in elements]),
            encode_sequence(checked_certs),
        ]
    )


def decode_evidence_bundle(der):
    """Parse a DER EvidenceBundle strictly.

    Returns: EvidenceBundle (certificates are returned as DER, not parsed).
    Raises: DerError.
    """
    outer = DerReader(der)
    whole = outer.read_raw(TAG_SEQUENCE)
    outer.finish()
    seq = DerReader(whole).read_sequence()
    statements_reader = seq.read_sequence()
    statements = []
    while not statements_reader.at_end():
        statements.append(_read_signed_attestation(statements_reader))
    if not statements:
        raise DerError(REASON_RANGE, "at least one statement")
    certs_reader = seq.read_sequence()
    certificates = []
    while not certs_reader.at_end():
        certificates.append(certs_reader.read_raw(TAG_SEQUENCE))
    seq.finish()
    return EvidenceBundle(statements, certificates, whole)


def build_evidence_attribute(bundle_der, checked=False):
    """The PKCS#10 attribute carrying an evidence bundle, for csr.info_parts().

    Params: checked: True when bundle_der is encode_evidence_bundle()'s output, which
        is well-formed by construction (skips parsing it again).
    Returns: (OID_ATTR_EVIDENCE, [bundle_der]).
    Raises: DerError if bundle_der is not a well-formed EvidenceBundle.
    """
    if not checked:
        decode_evidence_bundle(bundle_der)
    return (OID_ATTR_EVIDENCE, [bytes(bundle_der)])
