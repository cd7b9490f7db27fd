# The attested CSR, built in one place for the factory line (cloud/line/station.py) and the
# device agent (device/agent.py, device/host/est_client.py).  Portable: CPython and
# MicroPython.  Workflow layer: it calls SE verbs and the portable codecs only (no APDU,
# no frame, no crypto of its own: the key is generated, attested and used inside the SE).
#
#     point, signed = new_attested_key(se, slot, nonce)       # GENERATE KEY + ATTEST
#     csr_der = attested_csr(se, slot, point, signed, chain, common_name, serial_number)
#
# or both at once with build_attested_csr().  The CSR (RFC 2986) carries:
#     subject CN=<common_name>[, serialNumber=<serial_number>]
#     SubjectPublicKeyInfo of the SE's new P-256 key
#     the evidence attribute (common/attestation.py): SignedAttestation of the new key by
#         the manufacturer attestation key, over the CA's nonce, + the MAK chain
#     an extensionRequest with the URI SAN urn:fleetid:device:<common_name>
# and is signed by the new key inside the SE (proof of possession).

from fleetid.common.errors import ReferenceNotFound

# common/attestation, common/der and common/csr are imported inside the functions that
# build: a device that only resumes a rotation (clear_slot) does not load them
# (MicroPython heap).

POLICY_SIGN = 0x01  # se_consts.POLICY_SIGN; the SE adds NON_EXPORTABLE, GENERATED_ON_CHIP
DEVICE_URI_PREFIX = "urn:fleetid:device:"


def clear_slot(se, slot):
    """Delete the key (and with it the certificate) in `slot` if there is one.

    Returns: True when a key was deleted.  Idempotent.
    Raises: ApduError other than ReferenceNotFound, LinkError.
    """
    try:
        se.public_key(slot)
    except ReferenceNotFound:
        return False
    try:
        se.delete_key(slot)
    except ReferenceNotFound:  # deleted by an earlier attempt whose answer was lost
        return False
    return True


def new_attested_key(se, slot, nonce, policy=POLICY_SIGN, replace=False):
    """GENERATE KEY in `slot`, then ATTEST it with the verifier's `nonce`.

    Params: replace: delete a key already in the slot first (an abandoned attempt's key
        that was never certified); False lets the SE refuse (AlreadyExists).
    Returns: (65-byte public point, SignedAttestation, strictly parsed).
    Raises: ApduError (AlreadyExists, ...), LinkError, DerError.
    """
    from fleetid.common import attestation

    if replace:
        clear_slot(se, slot)
    point = se.generate_key(slot, policy)
    signed = attestation.decode_signed_attestation(se.attest(slot, nonce))
    return point, signed


def attested_csr(se, slot, point, signed, chain, common_name, serial_number=None,
                 out=None):
    """The DER PKCS#10 CSR for the attested key in `slot`, signed inside the SE.

    Params: point, signed: new_attested_key()'s answer.  chain: the SE's attestation
        chain (list of DER, MAK certificate first; SeSession.attestation_chain()).
        common_name, serial_number: the subject (str; serial_number may be None).
        out: a bytearray to write the CSR into (csr_size_max() bytes, allocated early:
        see build_attested_csr), or None for one allocated here.
    Returns: the DER CertificationRequest: bytes (on MicroPython a bytearray, the buffer
        it was written into, not copied).
    Raises: ApduError, LinkError, DerError.
    """
    from fleetid.common import csr, der
    from fleetid.common.oids import OID_ATTR_EVIDENCE

    # Built as parts (headers + the statement and chain certificates referenced, not
    # copied), hashed part by part for the SE's SIGN and written once into a buffer
    # allocated before SIGN: the heap holds the CSR once instead of the bundle, the
    # attribute, the info and the CSR side by side (common/csr.py).
    info = csr.info_parts(
        common_name, serial_number, der.encode_p256_spki(point),
        [(OID_ATTR_EVIDENCE, [csr.evidence_bundle_parts([signed], chain)]),
         csr.uri_san_extension_request(DEVICE_URI_PREFIX + common_name)])
    if out is None:
        out = csr.buffer_for(info)  # before SIGN, while the heap has the contiguous room
    return csr.finish(info, se.sign(slot, csr.signing_digest(info)), out)


def build_attested_csr(se, slot, nonce, common_name, serial_number=None, chain=None,
                       policy=POLICY_SIGN, replace=True):
    """new_attested_key() then attested_csr() (chain read from the SE when None).

    Returns: (point, SignedAttestation, CSR DER).
    """
    if chain is None:
        chain = se.attestation_chain()
    # The CSR's buffer first: the exchanges with the SE and the parsed attestation leave
    # small objects all over a small heap, after which a block of the CSR's size (about
    # 1.6 KB) may only be found by growing the heap by as much (MicroPython, measured:
    # bench/micropython.py run_agent_csr).
    out = bytearray(csr_size_max(chain, common_name, serial_number, nonce))
    point, signed = new_attested_key(se, slot, nonce, policy, replace)
    return point, signed, attested_csr(se, slot, point, signed, chain, common_name,
                                       serial_number, out)


# What a CSR holds besides the chain, the subject (CN twice: name and URI SAN, serial
# number) and the nonce, at most: version, SubjectPublicKeyInfo, the evidence and
# extensionRequest attributes' OIDs and headers, the statement's other fields and
# signature, the CSR's signature algorithm and signature; every length in its longest
# form up to 64 KB, every signature 72 bytes (tests/device/test_enrol_size.py).
_CSR_FIXED_MAX = 540


def csr_size_max(chain, common_name, serial_number, nonce):
    """An upper bound on attested_csr()'s length for this chain, subject and nonce
    (before the key exists), to allocate its buffer early."""
    size = _CSR_FIXED_MAX + 2 * len(common_name) + len(nonce)
    if serial_number is not None:
        size += len(serial_number)
    for cert in chain:
        size += len(cert)
    return size
