"""The line work directory: `init_line` sets one up, `open_line` opens it as a `Line`
(HSM, registry, PKI material, issuance journal, audit checkpointer).

    line = init_line("/srv/line1")        # once: keys in the HSM, PKI, registry
    line = open_line("/srv/line1")
    resources = line.resources_for(lot_batch)   # what the stations share (resources.py)

Work directory (`init_line`):

    line.json            URIs and labels (no secrets)
    keystore.json        soft HSM keystore (when no --hsm is given), mode 0600; its
                         passphrase is never written here: it comes from
                         FLEETID_KEYSTORE_PASS (which the CLI fills from a prompt or a
                         file the user names), like an HSM PIN
    registry.db          SQLite registry (+ WAL), the audit chain inside it (or any
                         registry URI: postgresql://...)
    journal.jsonl        issuance journal (journal.py)
    witness/anchor.json  the witness's latest signed checkpoint (audit.AnchoringWitness;
                         another party's in production)
    vendor/              the SE vendor's root CA certificate (VENDOR_ROOT_FILE): the line
                         trusts it to attest chips; the CLI's demo puts the simulated
                         vendor's there before init_line
    pki/ceremony/        root key ceremony record + root.pem;  pki/ca.pem: the batch CA

HSM keys (labels in line.json): fleet root, issuing CA, SCP03 master, the audit line key,
the audit witness key and the firmware-signing key (its public point is the second trust
anchor the line stores in every SE).
"""

import datetime
import json
import os
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetid.cloud import audit
from fleetid.cloud.ca import IssuingCa
from fleetid.cloud.hsm import open_hsm
from fleetid.cloud.line.journal import IssuanceJournal
from fleetid.cloud.line.resources import LineConfig, LineResources
from fleetid.cloud.registry import open_registry
from fleetid.common.errors import FleetidError

CONFIG_FILE = "line.json"
WITNESS_ANCHOR = os.path.join("witness", "anchor.json")
VENDOR_ROOT_FILE = "vendor_root.pem"  # the name the SE vendor (sim.fab) publishes it under
PASS_ENV = "FLEETID_KEYSTORE_PASS"
FORMAT = "fleetid-line/1"
DEFAULT_SCOPE = {"product": "widget", "batch": "b1", "region": "eu"}


class LineConfigError(FleetidError):
    """A line work directory cannot be created or opened: `path` names the file or folder,
    `reason` says what is wrong with it (short, secret-free)."""

    def __init__(self, path, reason):
        super().__init__("%s: %s" % (path, reason))
        self.path = path
        self.reason = reason


_CONFIG_KEYS = ("hsm", "registry", "labels", "vendor_dir", "root_cert", "ca_cert", "journal")


def _read_config(workdir):
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise LineConfigError(path, "no line here (run `fleetid line init` first)") from None
    except OSError as exc:
        raise LineConfigError(path, exc.strerror or "unreadable") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise LineConfigError(path, "not valid JSON (corrupt %s)" % CONFIG_FILE) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise LineConfigError(path, "not a %s file" % FORMAT)
    for key in _CONFIG_KEYS:
        if key not in config:
            raise LineConfigError(path, "missing %r" % key)
    if not isinstance(config["labels"], dict) or not all(
            isinstance(config[k], str) for k in _CONFIG_KEYS if k != "labels"):
        raise LineConfigError(path, "malformed %s" % CONFIG_FILE)
    return config


# -- the work directory ----------------------------------------------------------------------


def init_line(workdir, hsm_uri=None, registry_uri=None, scope=None, operator="line-operator",
              serial_prefix="FID", scrypt_n=None, environ=None, now=None, master_key=None):
    """Set up a line work directory on the embedded defaults (soft keystore, SQLite) or on
    a given HSM / registry: root key ceremony, issuing CA, SCP03 master key,
    audit line and witness keys.  Idempotent for the files it finds (an existing
    line.json is refused).

    Params: workdir: folder.  hsm_uri / registry_uri: None for the defaults inside it.
        scope: {"product", "batch", "region"} of the issuing CA.  scrypt_n: keystore
        scrypt cost (tests pass 2**14).  environ: for the HSM secrets (default os.environ).
        master_key: a bytearray to import as the SCP03 master (a ceremony restore; wiped
        afterwards) instead of generating one inside the HSM.
    Returns: Line (opened; close it).
    Raises: FileExistsError if workdir already holds a line; LineConfigError if it cannot
        be created; HSM / PKI / registry errors.
    """
    from fleetid.cloud.hsm.soft_backend import SCRYPT_N_DEFAULT, SoftBackend
    from fleetid.cloud.pki import init_root, new_ca

    workdir = os.path.abspath(workdir)
    environ = dict(os.environ if environ is None else environ)
    if hsm_uri is None and not environ.get(PASS_ENV):
        # Refused before anything is created.  Never generated into a file beside the
        # keystore it unlocks.
        raise LineConfigError(os.path.join(workdir, "keystore.json"),
                              "the keystore needs a passphrase: set %s" % PASS_ENV)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as exc:
        raise LineConfigError(workdir, "cannot create the line directory: %s"
                              % (exc.strerror or exc)) from None
    if os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        raise FileExistsError(os.path.join(workdir, CONFIG_FILE))
    vendor_root = os.path.join(workdir, "vendor", VENDOR_ROOT_FILE)
    if not os.path.isfile(vendor_root):
        # The SE vendor's root is the vendor's, not the line's: never made here (the
        # CLI's demo puts the simulated vendor's there first: fleetid.sim.lot).
        raise LineConfigError(vendor_root, "no SE vendor root certificate: put the SE "
                              "vendor's root CA certificate (PEM) here")
    if hsm_uri is None:
        keystore = os.path.join(workdir, "keystore.json")
        hsm = SoftBackend(keystore, environ[PASS_ENV], scrypt_n=scrypt_n or SCRYPT_N_DEFAULT)
        hsm_uri = "soft:%s;pass-env=%s" % (keystore, PASS_ENV)
    else:
        hsm = open_hsm(hsm_uri, environ)
    registry_uri = registry_uri or "sqlite:" + os.path.join(workdir, "registry.db")
    labels = {"root": "fleet-root", "ca": "ca-line", "master": "scp03-master",
              "audit_line": "audit-line", "audit_witness": "audit-witness",
              "firmware": "firmware-signing"}
    try:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        pki_dir = os.path.join(workdir, "pki")
        os.makedirs(pki_dir, exist_ok=True)
        ceremony = os.path.join(pki_dir, "ceremony")
        root, _record = init_root(hsm, labels["root"], "CN=fleetid Fleet Root,O=fleetid demo",
                                  30, ceremony, [operator, "line-witness"],
                                  now=now - datetime.timedelta(minutes=10))
        ca_cert = new_ca(hsm, labels["root"], root, labels["ca"], scope or DEFAULT_SCOPE,
                         now=now - datetime.timedelta(minutes=5))
        with open(os.path.join(pki_dir, "ca.pem"), "wb") as f:
            f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
        if master_key is None:
            hsm.create_master_key(labels["master"])
        else:
            hsm.import_master_key(labels["master"], master_key)
        hsm.generate_signing_key(labels["audit_line"])
        hsm.generate_signing_key(labels["audit_witness"])
        hsm.generate_signing_key(labels["firmware"])
        for role in ("audit_line", "audit_witness", "firmware"):
            with open(os.path.join(pki_dir, role.replace("_", "-") + ".pub.pem"), "wb") as f:
                f.write(hsm.public_key(labels[role]).public_bytes(
                    serialization.Encoding.PEM,
                    serialization.PublicFormat.SubjectPublicKeyInfo))
        config = {"format": FORMAT, "hsm": hsm_uri, "registry": registry_uri,
                  "labels": labels, "operator": operator, "serial_prefix": serial_prefix,
                  "vendor_dir": "vendor", "root_cert": "pki/ceremony/root.pem",
                  "ca_cert": "pki/ca.pem", "journal": "journal.jsonl"}
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)
    finally:
        hsm.close()
    open_registry(registry_uri).close()  # creates the schema
    return open_line(workdir, environ=environ)


def open_line(workdir, hsm_uri=None, registry_uri=None, environ=None, max_sessions=None):
    """Open an initialised line work directory.

    Params: hsm_uri / registry_uri: override line.json.  environ: secrets by variable
        (default os.environ: FLEETID_KEYSTORE_PASS for the embedded soft keystore).
        max_sessions: HSM session pool bound (None: the URI's / default).
    Returns: Line.  Raises: LineConfigError (no, unreadable or corrupt line.json), HSM /
    registry errors.
    """
    workdir = os.path.abspath(workdir)
    config = _read_config(workdir)
    environ = dict(os.environ if environ is None else environ)
    uri = hsm_uri or config["hsm"]
    if max_sessions and "max-sessions=" not in uri:
        uri += ";max-sessions=%d" % max_sessions
    hsm = open_hsm(uri, environ)
    try:
        registry = open_registry(registry_uri or config["registry"])
    except Exception:
        hsm.close()
        raise
    return Line(workdir, config, hsm, registry)


def line_hsm_uri(workdir, hsm_uri=None):
    """The HSM URI a line in `workdir` opens (`hsm_uri` if given, else line.json's; for a
    folder without a line yet, the embedded soft keystore's).  Lets a caller find out
    which secret variable it must supply (hsm.secret_variable).
    Raises LineConfigError for an unreadable or corrupt line.json."""
    if hsm_uri:
        return hsm_uri
    if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        return "soft:%s;pass-env=%s" % (os.path.join(os.path.abspath(workdir),
                                                     "keystore.json"), PASS_ENV)
    return _read_config(os.path.abspath(workdir))["hsm"]


class Line:
    """An opened line: HSM, registry, PKI material.  `resources_for(batch)` gives the
    LineResources stations share.  Close it when done."""

    def __init__(self, workdir, config, hsm, registry):
        self.workdir = workdir
        self.config = config
        self.hsm = hsm
        self.registry = registry
        self.labels = config["labels"]
        self.vendor_dir = self._path(config["vendor_dir"])
        with open(os.path.join(self.vendor_dir, VENDOR_ROOT_FILE), "rb") as f:
            self.vendor_roots = x509.load_pem_x509_certificates(f.read())
        with open(self._path(config["root_cert"]), "rb") as f:
            self.root_cert = x509.load_pem_x509_certificate(f.read())
        with open(self._path(config["ca_cert"]), "rb") as f:
            self.ca_cert = x509.load_pem_x509_certificate(f.read())
        self.journal = IssuanceJournal(self._path(config["journal"]))
        self.issuing_ca = IssuingCa(hsm, self.labels["ca"], self.ca_cert, self.vendor_roots)
        # The witness keeps the latest checkpoint it signed (the anchor a truncated log
        # cannot fake: `fleetid audit verify --witness-anchor <line>/witness/anchor.json`).
        self.witness = audit.AnchoringWitness(
            audit.HsmSigner(hsm, self.labels["audit_witness"]), self._path(WITNESS_ANCHOR))
        self.checkpointer = audit.Checkpointer(
            registry, audit.HsmSigner(hsm, self.labels["audit_line"]), self.witness,
            every_entries=256)

    def _path(self, relative):
        return os.path.join(self.workdir, relative)

    def resources_for(self, batch, wall_clock=time.time):
        """LineResources for chips of transport batch `batch`."""
        firmware_point = None
        if "firmware" in self.labels:
            firmware_point = self.hsm.public_key(self.labels["firmware"]).public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        config = LineConfig(batch, self.root_cert.public_bytes(serialization.Encoding.DER),
                            master_label=self.labels["master"],
                            operator=self.config.get("operator", "line-operator"),
                            serial_prefix=self.config.get("serial_prefix", "FID"),
                            firmware_key_point=firmware_point)
        return LineResources(self.hsm, self.registry, self.issuing_ca, self.vendor_roots,
                             config, self.journal, checkpointer=self.checkpointer,
                             wall_clock=wall_clock)

    def public_keys(self):
        """(line public key, witness public key) of the audit checkpoints."""
        return (self.hsm.public_key(self.labels["audit_line"]),
                self.hsm.public_key(self.labels["audit_witness"]))

    def close(self):
        self.journal.close()
        self.registry.close()
        self.hsm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
