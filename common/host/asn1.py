"""ASN.1 definitions (asn1crypto) of the attestation structures, for CPython.

The portable core reads and writes the same bytes with its own tiny DER code
(`fleetid.common.attestation`); tests cross-check the two.

    AttestationStatement ::= SEQUENCE {
        version          INTEGER (0),
        seUid            OCTET STRING,          -- 16 bytes
        slot             INTEGER (0..255),
        subjectPublicKey SubjectPublicKeyInfo,   -- of the attested key
        keyPolicy        INTEGER (0..255),       -- POLICY_* flags of common/se_consts.py
        lifeCycle        INTEGER (0..255),       -- GP card life cycle, LC_*
        firmwareVersion  OCTET STRING,           -- 3 bytes: major, minor, patch
        nonce            OCTET STRING            -- 1..64 bytes, as given to ATTEST
    }

    SignedAttestation ::= SEQUENCE {
        statement           AttestationStatement,
        signatureAlgorithm  AlgorithmIdentifier, -- ecdsa-with-SHA256, no parameters
        signature           BIT STRING           -- DER ECDSA-Sig-Value by the MAK over DER(statement)
    }

    EvidenceBundle ::= SEQUENCE {               -- after draft-ietf-lamps-csr-attestation
        statements    SEQUENCE SIZE (1..MAX) OF SignedAttestation,
        certificates  SEQUENCE OF Certificate     -- MAK certificate first, then its chain
    }
"""

from asn1crypto import algos, core, keys, x509


class AttestationStatement(core.Sequence):
    _fields = [
        ("version", core.Integer),
        ("se_uid", core.OctetString),
        ("slot", core.Integer),
        ("subject_public_key", keys.PublicKeyInfo),
        ("key_policy", core.Integer),
        ("life_cycle", core.Integer),
        ("firmware_version", core.OctetString),
        ("nonce", core.OctetString),
    ]


class SignedAttestation(core.Sequence):
    _fields = [
        ("statement", AttestationStatement),
        ("signature_algorithm", algos.SignedDigestAlgorithm),
        ("signature", core.OctetBitString),
    ]


class SignedAttestations(core.SequenceOf):
    _child_spec = SignedAttestation


class Certificates(core.SequenceOf):
    _child_spec = x509.Certificate


class EvidenceBundle(core.Sequence):
    _fields = [
        ("statements", SignedAttestations),
        ("certificates", Certificates),
    ]
