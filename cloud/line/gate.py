"""The line's two checks on the chip itself: the counterfeit check of step 1 (the MAK
chain validates to a trusted SE vendor root and names the chip) and the confirmation gate
of step 7, which reconcile also runs to resume a device.  Every check is positive: a
value is compared or a signature verified; no error is not enough."""

import datetime
import hashlib
import os

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from fleetid.cloud.ca import errors as ca_errors
from fleetid.cloud.ca.errors import AttestationError
from fleetid.cloud.line.steps import CONFIRM, IDENTIFY, LineFailure
from fleetid.common import scp03
from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.device.se import SeSession

# Domain separation of the confirmation challenge: the SE signs SHA-256(domain || 32 random
# bytes || serial), so the signature cannot be replayed as anything else.
CONFIRM_DOMAIN = b"fleetid/line-confirm/v1\n"
CHALLENGE_BYTES = 32


def check_vendor_chain(resources, chain_der, se_uid):
    """Step 1's counterfeit check: the chip's MAK chain validates to a trusted SE vendor
    root, and the MAK certificate names this UID when it carries a serialNumber.

    Raises LineFailure("counterfeit:<why>")."""
    if not chain_der:
        raise LineFailure("counterfeit:no_chain", IDENTIFY)
    if getattr(resources, "chain_verifier", None) is not None:
        mak = _validated_mak(resources, chain_der)
    else:
        mak = _verified_mak(resources, chain_der)
    names = mak.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)
    if names and names[0].value.lower() != se_uid.hex():
        raise LineFailure("counterfeit:uid_mismatch", IDENTIFY,
                          "MAK certificate names another SE")
    return mak


def _validated_mak(resources, chain_der):
    """The chain validated by the issuing CA's evidence verifier (same trust store; its
    chain cache then serves the CA's check at step 5), at the line's wall-clock time."""
    at = datetime.datetime.fromtimestamp(resources.wall_clock(), datetime.timezone.utc)
    try:
        return resources.chain_verifier.validated_mak(chain_der, at)
    except AttestationError as exc:
        if exc.reason == ca_errors.BAD_EVIDENCE:
            raise LineFailure("counterfeit:bad_chain", IDENTIFY) from None
        raise LineFailure("counterfeit:unknown_vendor", IDENTIFY) from None


def _verified_mak(resources, chain_der):
    try:
        certificates = [x509.load_der_x509_certificate(c) for c in chain_der]
    except ValueError:
        raise LineFailure("counterfeit:bad_chain", IDENTIFY) from None
    mak = certificates[0]
    try:
        resources.vendor_verifier().verify(mak, certificates[1:])
    except LineFailure:
        raise
    except Exception:  # noqa: BLE001 - VerificationError or a malformed certificate
        raise LineFailure("counterfeit:unknown_vendor", IDENTIFY) from None
    return mak


def confirm_device(resources, link, se_uid, device_keys, cert, device_serial, slot,
                   cert_der=None):
    """The confirmation gate (step 7), also used by reconcile to resume a device.

    Opens a fresh SCP03 session with the per-device keys (the card cryptogram, checked in
    constant time by Scp03Host.open, proves the card holds them), reads back the life cycle
    (must be SECURED) and the certificate (must be `cert`), and has the SE sign a fresh
    challenge that must verify under the certificate's key.  cert_der: `cert`'s DER when
    the caller has it already (the station: not encoded again).
    Returns: None.  Raises LineFailure("confirmation:<what>") or link / SE errors.
    """
    hsm = resources.hsm
    host = scp03.Scp03Host(
        link.transceive, resources.prims,
        lambda h, c, _ki: hsm.scp03_session_keys(device_keys, h, c),
        level=resources.config.scp_level, kvn=device_keys.kvn)
    host.open()
    try:  # the session (its prepared session keys) is dropped whatever the outcome
        _confirm_checks(host, device_keys, cert, device_serial, slot, cert_der)
    finally:
        host.close()


def _confirm_checks(host, device_keys, cert, device_serial, slot, cert_der):
    if host.key_info is None or host.key_info[0] != device_keys.kvn:
        raise LineFailure("confirmation:kvn", CONFIRM, "the card used another key set")
    se = SeSession(ApduProtocol(host.transceive))
    if se.life_cycle() != C.LC_SECURED:
        raise LineFailure("confirmation:life_cycle", CONFIRM)
    if cert_der is None:
        cert_der = cert.public_bytes(serialization.Encoding.DER)
    if se.get_cert(slot) != cert_der:
        raise LineFailure("confirmation:certificate", CONFIRM, "SE holds another certificate")
    challenge = os.urandom(CHALLENGE_BYTES)
    digest = hashlib.sha256(CONFIRM_DOMAIN + challenge + device_serial.encode()).digest()
    signature = se.sign(slot, digest)
    try:
        cert.public_key().verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature:
        raise LineFailure("confirmation:possession", CONFIRM,
                          "challenge signature does not verify") from None
