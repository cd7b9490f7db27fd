"""Chip fab: what the SE vendor does before a chip ships.

Per chip: a random 16-byte UID; the manufacturer attestation key (MAK) generated inside
the chip (slot 0); a MAK certificate issued by the SE vendor's root CA (separate from any
fleet PKI); SCP03 transport keys (random AES-128 ENC/MAC/DEK under KVN
SCP03_KVN_TRANSPORT); the firmware version; the GP life cycle OP_READY (the factory line
moves the chip to SECURED).

Outputs: the chip's NVM file and, beside it, a JSON fab record "<nvm path without
suffix>.json" (mode 0600): UID, MAK certificate chain, firmware, life cycle and the KVN of
its transport key set, but no key: the record travels with the chip to the factory line,
and plaintext SCP03 keys there would open every chip of the lot.  The transport keys stay
with the SE vendor, in "<vendor_dir>/transport-keys/<uid hex>.json" (mode 0600); the
vendor ships them to a line wrapped for the line's HSM (sim/ship.py, `fleetid sim ship`),
never in plaintext.  `load_fab_record(path, vendor_dir)` joins the two for the vendor's
own tools (`fleetid se scp03-check --vendor-dir`).

Vendor CA files in `vendor_dir`: vendor_root.pem (certificate), vendor_root.key.pem
(PKCS#8 private key, mode 0600).  A line gets the certificate only
(`publish_vendor_root`); `vendor_dir` is never inside a line's folder.
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
from fleetid.sim.nvm import Nvm, discard_stale_temp, remove_stale_temp_files

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
    root), transport_keys (dict: kvn int, enc/mac/dek bytes; None when the record was
    loaded without the vendor's key store), firmware_version (3 bytes), life_cycle,
    nvm_path, record_path.
    """

    def __init__(self, se_uid, chain_der, transport_keys, firmware_version, life_cycle,
                 nvm_path, record_path, kvn=None):
        self.se_uid = bytes(se_uid)
        self.chain_der = [bytes(c) for c in chain_der]
        self.mak_cert_der = self.chain_der[0]
        self.transport_keys = None if transport_keys is None else dict(transport_keys)
        self.kvn = kvn if transport_keys is None else self.transport_keys["kvn"]
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
        """The transport keys as fleetid.common.scp03.StaticKeys.
        Raises ValueError when they are not loaded (they stay with the SE vendor)."""
        from fleetid.common.scp03 import StaticKeys

        t = self.transport_keys
        if t is None:
            raise ValueError("the fab record carries no transport keys (they stay with the "
                             "SE vendor): load it with the vendor's folder")
        return StaticKeys(t["enc"], t["mac"], t["dek"], t["kvn"])

    def to_json(self):
        """The JSON fab record (str): no key material (module docstring)."""
        return json.dumps(
            {
                "format": FAB_RECORD_FORMAT,
                "uid": self.se_uid.hex(),
                "mak_cert_chain_der": [c.hex() for c in self.chain_der],
                "transport_key_set": {
                    "kvn": self.kvn,
                    "held_by": "se-vendor",
                    "vendor_file": transport_key_file_name(self.se_uid),
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


FAB_RECORD_FORMAT = "fleetid-fab-record/2"
TRANSPORT_KEY_DIR = "transport-keys"


def transport_key_file_name(se_uid):
    """Where the vendor keeps a chip's transport keys, relative to its vendor_dir."""
    return os.path.join(TRANSPORT_KEY_DIR, "%s.json" % bytes(se_uid).hex())


def _write_transport_keys(vendor_dir, se_uid, keys):
    directory = os.path.join(vendor_dir, TRANSPORT_KEY_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    remove_stale_temp_files(directory, suffixes=(".json",))
    _write_private(os.path.join(vendor_dir, transport_key_file_name(se_uid)), json.dumps(
        {"uid": bytes(se_uid).hex(), "kvn": keys["kvn"], "enc": keys["enc"].hex(),
         "mac": keys["mac"].hex(), "dek": keys["dek"].hex()}).encode())


def load_transport_keys(vendor_dir, se_uid):
    """The vendor's transport keys of chip `se_uid`: dict kvn, enc, mac, dek.
    Raises OSError (no such file), ValueError (malformed, or for another chip)."""
    with open(os.path.join(vendor_dir, transport_key_file_name(se_uid))) as f:
        data = json.load(f)
    try:
        if data["uid"] != bytes(se_uid).hex():
            raise ValueError("for another chip")
        keys = {"kvn": int(data["kvn"])}
        for name in ("enc", "mac", "dek"):
            keys[name] = bytes.fromhex(data[name])
            if len(keys[name]) != 16:
                raise ValueError("%s is not an AES-128 key" % name)
        return keys
    except (KeyError, TypeError) as exc:
        raise ValueError("malformed transport key file: %s" % exc) from None


def load_fab_record(record_path, vendor_dir=None):
    """Read a JSON fab record written by fab_chip().

    Params: vendor_dir: the SE vendor's folder; when given, the chip's transport keys are
        loaded from the vendor's key store (the record itself holds none).
    Returns: FabRecord (transport_keys None without vendor_dir).
    Raises: ValueError for a malformed record or key file; OSError.
    """
    with open(record_path) as f:
        data = json.load(f)
    try:
        if data.get("format") != FAB_RECORD_FORMAT:
            raise ValueError("format %r" % (data.get("format"),))
        key_set = data["transport_key_set"]
        kvn = int(key_set["kvn"])
        se_uid = bytes.fromhex(data["uid"])
        names = dict((v, k) for k, v in C.LC_NAMES.items())
        nvm_name = data.get("nvm")
        nvm_path = os.path.join(os.path.dirname(record_path), nvm_name) if nvm_name else None
        keys = None
        if vendor_dir is not None:
            keys = load_transport_keys(vendor_dir, se_uid)
            if keys["kvn"] != kvn:
                raise ValueError("the vendor's key set has another KVN")
        record = FabRecord(
            se_uid,
            [bytes.fromhex(c) for c in data["mak_cert_chain_der"]],
            keys,
            bytes(int(p) for p in data["firmware_version"].split(".")),
            names[data["life_cycle"]],
            nvm_path,
            record_path,
            kvn=kvn,
        )
        return record
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
        cert = _vendor_root_certificate(key, now)
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


def _vendor_root_certificate(key, now):
    """The vendor root CA's self-signed certificate for `key` (path length 0: it signs
    the MAK certificates directly), valid from a day before `now`."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, VENDOR_ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, "fleetid SE vendor root CA"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
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


def publish_vendor_root(vendor_dir, trust_dir, now=None):
    """What the SE vendor gives a factory line to trust: its root certificate only.

    Loads (or creates) the vendor CA in `vendor_dir` and writes the certificate, never the
    key, to "<trust_dir>/vendor_root.pem" (a line's vendor/ folder).
    Returns: VendorCa.  Raises: OSError, ValueError; ValueError too when `trust_dir` is
    `vendor_dir` or inside it (the line's folder must not hold the vendor's key).
    """
    vendor_real = os.path.realpath(vendor_dir)
    trust_real = os.path.realpath(trust_dir)
    if trust_real == vendor_real or trust_real.startswith(vendor_real + os.sep) or \
            vendor_real.startswith(trust_real + os.sep):
        raise ValueError("the SE vendor's folder %s and the line's trust folder %s must be "
                         "apart (the vendor's key stays with the vendor)" % (vendor_dir,
                                                                             trust_dir))
    vendor_ca = load_or_create_vendor_ca(vendor_dir, now=now)
    os.makedirs(trust_dir, exist_ok=True)
    _write_public(os.path.join(trust_dir, VENDOR_CERT_FILE),
                  vendor_ca.cert.public_bytes(serialization.Encoding.PEM))
    return vendor_ca


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
    # A killed earlier attempt at this chip: its temp files hold key scalars.
    discard_stale_temp(nvm_path)
    discard_stale_temp(record_path_for(nvm_path))
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
    # The keys to the vendor's own store first, then the key-free record beside the chip.
    _write_transport_keys(vendor_dir, se_uid, record.transport_keys)
    _write_private(record_path, record.to_json().encode())
    return record


def fab_batch(vendor_dir, out_dir, count, progress=None, firmware_version=(1, 0, 0),
              life_cycle=C.LC_OP_READY, rng=None):
    """Make `count` chips in `out_dir` ("se-<uid hex>.nvm" + ".json" each).

    Params: progress: optional callable progress(done, count, record) after each chip.
    Returns: list of FabRecord.
    """
    os.makedirs(out_dir, exist_ok=True)
    # Recovery from a killed batch: chips it never finished leave temp files with keys.
    remove_stale_temp_files(out_dir, suffixes=(".nvm", ".json"))
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
