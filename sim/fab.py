"""Chip fab: what the SE vendor does before a chip ships.

Per chip: a random 16-byte UID; the manufacturer attestation key (MAK) generated inside
the chip (slot 0); a MAK certificate issued by the SE vendor's root CA (separate from any
fleet PKI); SCP03 transport keys (random AES-128 ENC/MAC/DEK under KVN
SCP03_KVN_TRANSPORT); the firmware version; the GP life cycle OP_READY (the factory line
moves the chip to SECURED).

Outputs: the chip's NVM file and, beside it, a JSON fab record "<nvm path without
suffix>.json" (mode 0600): UID, MAK certificate chain, transport keys.  The record stands
for the vendor's key-delivery file: it holds the transport keys, never a private key.

Vendor CA files in `vendor_dir`: vendor_root.pem (certificate), vendor_root.key.pem
(PKCS#8 private key, mode 0600).
"""

import datetime
import fcntl
import json
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetid.common import se_consts as C
from fleetid.sim import chip as chip_mod
from fleetid.sim.nvm import Nvm

VENDOR_CERT_FILE = "vendor_root.pem"
VENDOR_KEY_FILE = "vendor_root.key.pem"
_LOCK_FILE = ".vendor.lock"
VENDOR_ORG = "fleetid simulated SE vendor"
# RFC 5280 4.1.2.5: 99991231235959Z = no well-defined expiration (the MAK never rotates).
_NO_EXPIRY = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
_VENDOR_ROOT_YEARS = 40


class VendorCa:
    """The SE vendor's root CA.

    Attributes: cert (x509.Certificate), key (EllipticCurvePrivateKey), cert_der, cert_path,
    key_path.  Unpacks as (cert, key).
    """

    def __init__(self, cert, key, cert_path, key_path):
        self.cert = cert
        self.key = key
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.cert_path = cert_path
        self.key_path = key_path

    def __iter__(self):
        return iter((self.cert, self.key))

    def __repr__(self):
        return "VendorCa(%s)" % self.cert.subject.rfc4514_string()


class FabRecord:
    """What fab knows about one chip.

    Attributes: se_uid (16 bytes), mak_cert_der, chain_der (list: MAK certificate, vendor
    root), transport_keys (dict: kvn int, enc/mac/dek bytes), firmware_version (3 bytes),
    life_cycle, nvm_path, record_path.
    """

    def __init__(self, se_uid, chain_der, transport_keys, firmware_version, life_cycle,
                 nvm_path, record_path):
        self.se_uid = bytes(se_uid)
        self.chain_der = [bytes(c) for c in chain_der]
        self.mak_cert_der = self.chain_der[0]
        self.transport_keys = dict(transport_keys)
        self.firmware_version = bytes(firmware_version)
        self.life_cycle = life_cycle
        self.nvm_path = nvm_path
        self.record_path = record_path

    @property
    def uid(self):
        """The SE UID (16 bytes); same as se_uid."""
        return self.se_uid

    def chain_pem(self):
        """The MAK certificate chain as PEM text (MAK certificate first)."""
        return "".join(
            x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM).decode()
            for c in self.chain_der
        )

    @property
    def uid_hex(self):
        return self.se_uid.hex()

    def static_keys(self):
        """The transport keys as fleetid.common.scp03.StaticKeys."""
        from fleetid.common.scp03 import StaticKeys

        t = self.transport_keys
        return StaticKeys(t["enc"], t["mac"], t["dek"], t["kvn"])

    def to_json(self):
        """The JSON fab record (str)."""
        t = self.transport_keys
        return json.dumps(
            {
                "format": "fleetid-fab-record/1",
                "uid": self.se_uid.hex(),
                "mak_cert_chain_der": [c.hex() for c in self.chain_der],
                "transport_keys": {
                    "kvn": t["kvn"],
                    "enc": t["enc"].hex(),
                    "mac": t["mac"].hex(),
                    "dek": t["dek"].hex(),
                },
                "firmware_version": ".".join(str(b) for b in self.firmware_version),
                "life_cycle": C.LC_NAMES.get(self.life_cycle, "%02X" % self.life_cycle),
                "nvm": os.path.basename(self.nvm_path) if self.nvm_path else None,
            },
            indent=2,
        )

    def __repr__(self):
        # Never show the transport keys.
        return "FabRecord(uid=%s)" % self.se_uid.hex()


def load_fab_record(record_path):
    """Read a JSON fab record written by fab_chip().

    Returns: FabRecord.  Raises: ValueError for a malformed record; OSError.
    """
    with open(record_path) as f:
        data = json.load(f)
    try:
        t = data["transport_keys"]
        names = dict((v, k) for k, v in C.LC_NAMES.items())
        nvm_name = data.get("nvm")
        nvm_path = os.path.join(os.path.dirname(record_path), nvm_name) if nvm_name else None
        return FabRecord(
            bytes.fromhex(data["uid"]),
            [bytes.fromhex(c) for c in data["mak_cert_chain_der"]],
            {
                "kvn": int(t["kvn"]),
                "enc": bytes.fromhex(t["enc"]),
                "mac": bytes.fromhex(t["mac"]),
                "dek": bytes.fromhex(t["dek"]),
            },
            bytes(int(p) for p in data["firmware_version"].split(".")),
            names[data["life_cycle"]],
            nvm_path,
            record_path,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("malformed fab record: %s" % exc) from None


def _write_private(path, data):
    # Create with 0600 from the start (no window with wider permissions), then rename.
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_public(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_or_create_vendor_ca(vendor_dir, now=None):
    """Load the SE vendor root CA from `vendor_dir`, creating it on first use.

    Safe against concurrent callers (a lock file serialises creation).
    Params: vendor_dir: folder (created mode 0700 if absent).  now: aware datetime for
        a new certificate's validity (default: the current time).
    Returns: VendorCa.
    Raises: OSError; ValueError if the files exist but do not match each other.
    """
    os.makedirs(vendor_dir, mode=0o700, exist_ok=True)
    cert_path = os.path.join(vendor_dir, VENDOR_CERT_FILE)
    key_path = os.path.join(vendor_dir, VENDOR_KEY_FILE)
    lock_fd = os.open(os.path.join(vendor_dir, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if os.path.exists(cert_path) and os.path.exists(key_path):
            with open(cert_path, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
            with open(key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
            if cert.public_key().public_numbers() != key.public_key().public_numbers():
                raise ValueError("vendor CA certificate and key do not match")
            return VendorCa(cert, key, cert_path, key_path)
        key = ec.generate_private_key(ec.SECP256R1())
        now = now or datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, VENDOR_ORG),
                x509.NameAttribute(NameOID.COMMON_NAME, "fleetid SE vendor root CA"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365 * _VENDOR_ROOT_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return VendorCa(cert, key, cert_path, key_path)
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)


def issue_mak_certificate(vendor_ca, se_uid, mak_point, now=None):
    """The MAK certificate: subject CN "fleetid SE <uid hex>", serialNumber = UID hex.

    Returns: DER bytes.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), mak_point)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, VENDOR_ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, "fleetid SE " + se_uid.hex()),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, se_uid.hex()),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(vendor_ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(_NO_EXPIRY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(vendor_ca.key.public_key()),
            critical=False,
        )
        .sign(vendor_ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def record_path_for(nvm_path):
    """"<nvm path without suffix>.json"."""
    return os.path.splitext(os.fspath(nvm_path))[0] + ".json"


def fab_chip(vendor_dir, nvm_path, firmware_version=(1, 0, 0), life_cycle=C.LC_OP_READY,
             se_uid=None, transport_keys=None, rng=None, vendor_ca=None, now=None):
    """Make one chip: NVM file at `nvm_path` plus its JSON fab record.

    Params: vendor_dir: the SE vendor CA folder (see load_or_create_vendor_ca).
        nvm_path: the chip's NVM file (must not exist).  firmware_version: 3 ints.
        life_cycle: LC_* the chip leaves fab in.  se_uid: 16 bytes (default random).
        transport_keys: (enc, mac, dek) AES-128 keys (default random).  rng: `rng(n)`
        (default os.urandom).  vendor_ca: an already loaded VendorCa (batch speed-up).
        now: aware datetime for the certificate.
    Returns: FabRecord.
    Raises: FileExistsError if `nvm_path` exists; ValueError for bad parameters.
    """
    rng = rng or os.urandom
    nvm_path = os.fspath(nvm_path)
    if os.path.exists(nvm_path):
        raise FileExistsError(nvm_path)
    parent = os.path.dirname(os.path.abspath(nvm_path))
    os.makedirs(parent, exist_ok=True)
    vendor_ca = vendor_ca or load_or_create_vendor_ca(vendor_dir, now=now)
    se_uid = bytes(se_uid) if se_uid is not None else rng(16)
    fw = bytes(firmware_version)
    if transport_keys is None:
        transport_keys = (rng(16), rng(16), rng(16))
    enc, mac, dek = (bytes(k) for k in transport_keys)
    kvn = C.SCP03_KVN_TRANSPORT
    record_path = record_path_for(nvm_path)

    nvm = Nvm(nvm_path)
    mak_point = chip_mod.fab_initialise(nvm, se_uid, fw, (enc, mac, dek, kvn), life_cycle, rng)
    mak_cert = issue_mak_certificate(vendor_ca, se_uid, mak_point, now=now)
    chain = [mak_cert, vendor_ca.cert_der]
    chip_mod.fab_store_attestation_chain(nvm, chain)
    record = FabRecord(
        se_uid, chain, {"kvn": kvn, "enc": enc, "mac": mac, "dek": dek}, fw, life_cycle,
        nvm_path, record_path,
    )
    _write_private(record_path, record.to_json().encode())
    return record


def fab_batch(vendor_dir, out_dir, count, progress=None, firmware_version=(1, 0, 0),
              life_cycle=C.LC_OP_READY, rng=None):
    """Make `count` chips in `out_dir` ("se-<uid hex>.nvm" + ".json" each).

    Params: progress: optional callable progress(done, count, record) after each chip.
    Returns: list of FabRecord.
    """
    os.makedirs(out_dir, exist_ok=True)
    vendor_ca = load_or_create_vendor_ca(vendor_dir)
    rng = rng or os.urandom
    records = []
    for i in range(count):
        se_uid = rng(16)
        nvm_path = os.path.join(out_dir, "se-%s.nvm" % se_uid.hex())
        record = fab_chip(
            vendor_dir, nvm_path, firmware_version=firmware_version, life_cycle=life_cycle,
            se_uid=se_uid, rng=rng, vendor_ca=vendor_ca,
        )
        records.append(record)
        if progress is not None:
            progress(i + 1, count, record)
    return records
