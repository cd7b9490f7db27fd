"""The root key ceremony and its signed, offline-verifiable record.

`init_root` generates the root key inside the HSM, self-signs the root certificate through
the HSM, and writes two files into the ceremony directory:

    root.pem        the root certificate (PEM)
    ceremony.json   {"record": {...}, "signature_algorithm": "ecdsa-with-SHA256",
                     "signature": base64(DER ECDSA-Sig-Value)}

The signature is made by the root key (in the HSM) over the canonical JSON of "record":
UTF-8, keys sorted, separators "," and ":" , no whitespace (`canonical_json`).  The record
says who (operators), when (started/completed, UTC), with what (HSM backend kind and key
label: never a PIN, passphrase or URI secret), and what came out (root subject, serial,
validity, SHA-256 fingerprint of the certificate DER, the public key as PEM and the
SHA-256 of its SubjectPublicKeyInfo).

`verify_ceremony` needs nothing but the directory (and, to be meaningful, the root
fingerprint the auditor already trusts): it checks that the certificate is self-signed,
that the record describes this certificate and key, and that the root key signed the
record.
"""

import base64
import datetime
import hashlib
import json
import os

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.pki.errors import PkiError
from fleetid.cloud.pki.profiles import root_builder, to_utc_seconds, utc_now
from fleetid.cloud.pki.signing import sign_certificate

RECORD_FILE = "ceremony.json"
ROOT_CERT_FILE = "root.pem"
RECORD_KIND = "fleetid-root-key-ceremony"
RECORD_VERSION = 1
SIGNATURE_ALGORITHM = "ecdsa-with-SHA256"


def canonical_json(value):
    """The exact bytes a ceremony signature covers (sorted keys, no whitespace, UTF-8)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def fingerprint(certificate):
    """SHA-256 of a certificate's DER, lower-case hex."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def _spki(public_key):
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _iso(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _name(subject):
    if isinstance(subject, x509.Name):
        return subject
    if not isinstance(subject, str) or not subject.strip():
        raise PkiError(PkiError.BAD_INPUT, "subject must be an x509.Name or an RFC 4514 string")
    try:
        name = x509.Name.from_rfc4514_string(subject)
    except ValueError as exc:
        raise PkiError(PkiError.BAD_INPUT, "subject: %s" % exc) from None
    if not name.rdns:
        raise PkiError(PkiError.BAD_INPUT, "empty subject")
    return name


def _write_new(path, data, mode=0o644):
    # O_EXCL: a ceremony never overwrites an earlier one's files.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def init_root(hsm, label, subject, validity_years, ceremony_dir, operators, now=None):
    """Run the root key ceremony.

    Params: hsm: HsmBackend.  label: the new root key's label (must not exist).
        subject: x509.Name or RFC 4514 string ("CN=Acme Fleet Root,O=Acme").
        validity_years: int 1..50.  ceremony_dir: directory for root.pem and
        ceremony.json (created if missing; must not hold a record already).
        operators: names of the people present (at least one; two or more for dual
        control).  now: aware datetime (default: the current UTC time).
    Returns: (root certificate, record dict).
    Raises: PkiError(BAD_INPUT / EXISTS / BAD_SIGNATURE), HsmError(EXISTS) if the label
        is taken.
    """
    operators = _ceremony_operators(operators)
    if not isinstance(validity_years, int) or not 1 <= validity_years <= 50:
        raise PkiError(PkiError.BAD_INPUT, "validity_years must be 1..50")
    subject = _name(subject)
    os.makedirs(ceremony_dir, exist_ok=True)
    record_path = os.path.join(ceremony_dir, RECORD_FILE)
    cert_path = os.path.join(ceremony_dir, ROOT_CERT_FILE)
    for path in (record_path, cert_path):
        if os.path.exists(path):
            raise PkiError(PkiError.EXISTS, path)

    started = to_utc_seconds(now) if now is not None else utc_now()
    public_key = hsm.generate_signing_key(label)
    not_after = started + datetime.timedelta(days=365 * validity_years + validity_years // 4 + 1)
    certificate = sign_certificate(
        hsm, label, root_builder(subject, public_key, started, not_after), public_key
    )
    completed = utc_now() if now is None else started
    record = _ceremony_record(hsm, label, operators, started, completed, certificate)
    signature = hsm.sign(label, canonical_json(record))
    try:
        public_key.verify(signature, canonical_json(record), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PkiError(PkiError.BAD_SIGNATURE, "ceremony record") from None
    signed = {
        "record": record,
        "signature_algorithm": SIGNATURE_ALGORITHM,
        "signature": base64.b64encode(signature).decode(),
    }
    _write_new(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    _write_new(record_path, json.dumps(signed, indent=2, sort_keys=True).encode() + b"\n")
    return certificate, record


def _ceremony_operators(operators):
    """The operators' names, stripped; at least one, each named, no one twice."""
    operators = [str(name).strip() for name in (operators or ())]
    if not operators or not all(operators):
        raise PkiError(PkiError.BAD_INPUT, "a ceremony needs named operators")
    if len(set(operators)) != len(operators):
        raise PkiError(PkiError.BAD_INPUT, "operators must be distinct people")
    return operators


def _ceremony_record(hsm, label, operators, started, completed, certificate):
    """The ceremony record (signed by the root key, then written as ceremony.json)."""
    public_key = certificate.public_key()
    return {
        "kind": RECORD_KIND,
        "version": RECORD_VERSION,
        "operators": operators,
        "started_at": _iso(started),
        "completed_at": _iso(completed),
        "hsm": {"backend": type(hsm).__name__, "key_label": label},
        "root": {
            "subject": certificate.subject.rfc4514_string(),
            "serial_number": "%x" % certificate.serial_number,
            "not_before": _iso(certificate.not_valid_before_utc),
            "not_after": _iso(certificate.not_valid_after_utc),
            "fingerprint_sha256": fingerprint(certificate),
            "spki_sha256": hashlib.sha256(_spki(public_key)).hexdigest(),
            "public_key_pem": public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode(),
        },
    }


def _fail(detail):
    raise PkiError(PkiError.CEREMONY, detail)


def verify_ceremony(ceremony_dir, expected_fingerprint=None):
    """Verify a ceremony directory offline.

    Checks: both files parse; the root certificate is a self-signed CA whose signature
    verifies; the record's fingerprint, SPKI hash, public key, subject and serial are
    those of this certificate; the record's signature verifies under the root key; and,
    if `expected_fingerprint` (hex SHA-256 of the root DER, the value the auditor trusts)
    is given, that the certificate is that root.  Without it the check only proves the
    directory is self-consistent.
    Returns: (root certificate, record dict).
    Raises: PkiError(CEREMONY) naming the first check that failed.
    """
    signed, certificate = _read_ceremony(ceremony_dir)
    if not isinstance(signed, dict) or set(signed) != {"record", "signature",
                                                       "signature_algorithm"}:
        _fail("malformed record file")
    record = signed["record"]
    if not isinstance(record, dict) or record.get("kind") != RECORD_KIND:
        _fail("not a fleetid ceremony record")
    if (record.get("version") != RECORD_VERSION
            or signed["signature_algorithm"] != SIGNATURE_ALGORITHM):
        _fail("unsupported record version or algorithm")
    public_key = _check_root_certificate(certificate)
    root = record.get("root")
    if not isinstance(root, dict):
        _fail("record has no root section")
    expected = {
        "fingerprint_sha256": fingerprint(certificate),
        "spki_sha256": hashlib.sha256(_spki(public_key)).hexdigest(),
        "subject": certificate.subject.rfc4514_string(),
        "serial_number": "%x" % certificate.serial_number,
    }
    for key, value in expected.items():
        if root.get(key) != value:
            _fail("record %s does not match the root certificate" % key)
    try:
        recorded_key = serialization.load_pem_public_key(root.get("public_key_pem", "").encode())
    except ValueError:
        _fail("record public key unreadable")
    if _spki(recorded_key) != _spki(public_key):
        _fail("record public key is not the root key")
    try:
        signature = base64.b64decode(signed["signature"], validate=True)
        public_key.verify(signature, canonical_json(record), ec.ECDSA(hashes.SHA256()))
    except (ValueError, TypeError, InvalidSignature):
        _fail("record signature does not verify under the root key")
    if expected_fingerprint is not None:
        wanted = expected_fingerprint.lower().replace(":", "")
        if wanted != expected["fingerprint_sha256"]:
            _fail("root is not the expected root (fingerprint differs)")
    return certificate, record


def _read_ceremony(ceremony_dir):
    """(the signed record as parsed JSON, the root certificate) from a ceremony directory."""
    path = os.path.join(ceremony_dir, RECORD_FILE)
    try:
        with open(path, "rb") as f:
            signed = json.loads(f.read().decode())
        path = os.path.join(ceremony_dir, ROOT_CERT_FILE)
        with open(path, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
    except OSError as exc:
        _fail("cannot read %s: %s" % (path, exc.strerror or exc.__class__.__name__))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a bad PEM
        _fail("%s is malformed (%s)" % (path, exc.__class__.__name__))
    return signed, certificate


def _check_root_certificate(certificate):
    """The root's public key, once the certificate is a validly self-signed P-256 CA."""
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        _fail("root key is not P-256")
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        _fail("root certificate is not validly self-signed")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.value.ca:
        _fail("root certificate is not a CA")
    return public_key
