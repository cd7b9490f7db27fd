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
    witness/keystore.json  demo only: the witness's own soft keystore (its key is never
                         in the line's HSM; with --hsm, --witness-hsm names its token)
    vendor/              the SE vendor's root CA certificate (VENDOR_ROOT_FILE), nothing
                         else: the line trusts it to attest chips and to check shipments;
                         the CLI's demo publishes the simulated vendor's certificate there
                         before init_line (the vendor's key stays in its own folder)
    shipments/<lot>.json the chip vendor's transport-key shipments, as received: every
                         key wrapped for the line's HSM (format: fleetid.sim.ship); the
                         HSM unwraps them inside, one chip at a time (shipment.py)
    pki/                 demo: ceremony/ (root key ceremony record + root.pem) and ca.pem;
                         adopted: root.pem and ca-<label>.pem, copies of what
                         `fleetid pki init-root` / `new-ca` made; *.pub.pem: audit keys;
                         transport-wrap.pub.pem: the HSM's transport wrapping key, which
                         the line gives its chip vendors

HSM keys (labels in line.json): fleet root and issuing CAs (adopted, or made on the demo
path), SCP03 master, the audit line key, the firmware-signing key (its public point is
the second trust anchor the line stores in every SE), the transport wrapping key (RSA,
unwrap-only) and one key-encryption key per received shipment ("transport-kek:<lot>").  The audit witness key: line.json's
"witness" (its HSM URI and label).
"""

import datetime
import json
import os
import time

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from fleetid.cloud import audit
from fleetid.cloud.ca import IssuingCa
from fleetid.cloud.hsm import open_hsm
from fleetid.cloud.line.journal import IssuanceJournal
from fleetid.cloud.line.resources import LineConfig, LineResources
from fleetid.cloud.line.shipment import ShipmentError, TransportShipment, recipient_id
from fleetid.cloud.registry import open_registry
from fleetid.common.errors import FleetidError

CONFIG_FILE = "line.json"
WITNESS_ANCHOR = os.path.join("witness", "anchor.json")
VENDOR_ROOT_FILE = "vendor_root.pem"  # the name the SE vendor (sim.fab) publishes it under
PASS_ENV = "FLEETID_KEYSTORE_PASS"
FORMAT = "fleetid-line/1"
DEFAULT_SCOPE = {"product": "widget", "batch": "b1", "region": "eu"}
WITNESS_LABEL = "audit-witness"
TRANSPORT_WRAP_LABEL = "transport-wrap"
TRANSPORT_WRAP_PUB = os.path.join("pki", "transport-wrap.pub.pem")
SHIPMENTS_DIR = "shipments"
_KEK_PREFIX = "transport-kek:"


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
              serial_prefix="FID", scrypt_n=None, environ=None, now=None, master_key=None,
              root=None, cas=(), witness_hsm_uri=None):
    """Set up a line work directory: its PKI, SCP03 master key, audit line key,
    firmware-signing key and the audit witness key (in its own keystore or token).

    Key custody: the fleet root and the issuing CAs are ADOPTED when `root` is given (as
    `fleetid pki init-root` / `fleetid pki new-ca` made them: their keys in the HSM,
    checked against the certificates).  They are created here only on the embedded demo
    path (no hsm_uri, no root): a soft keystore in workdir, a root key ceremony and one
    issuing CA for `scope`.  An HSM line without `root` is refused.

    Params: workdir: folder; <workdir>/vendor/VENDOR_ROOT_FILE must hold the SE vendor's
        root certificate.  hsm_uri / registry_uri: None for the defaults inside it.
        scope: {"product", "batch", "region"} of the demo's issuing CA.  root: (HSM label,
        root certificate PEM path) to adopt.  cas: [(HSM label, CA certificate PEM path)]
        to adopt with the root, one per product/batch/region (the first is the default;
        the line chooses by batch: Line.resources_for(ca_batch=...)).
        witness_hsm_uri: the audit witness's keystore or token (never the line's HSM);
        None on the demo path: a soft keystore of its own in <workdir>/witness/.
        scrypt_n: soft keystore scrypt cost (tests pass 2**14).  environ: the HSM secrets
        (default os.environ).  master_key: a bytearray to import as the SCP03 master (a
        ceremony restore; wiped afterwards) instead of generating one inside the HSM.
    Returns: Line (opened; close it).
    Raises: FileExistsError if workdir already holds a line; LineConfigError if it cannot
        be created or the custody arguments do not fit; HSM / PKI / registry errors.
    """
    workdir = os.path.abspath(workdir)
    environ = dict(os.environ if environ is None else environ)
    _check_new_line(workdir, hsm_uri, environ)
    hsm, hsm_uri = _open_custody_checked_hsm(workdir, hsm_uri, environ, scrypt_n, root, cas,
                                             witness_hsm_uri)
    registry_uri = registry_uri or "sqlite:" + os.path.join(workdir, "registry.db")
    labels = {"master": "scp03-master", "audit_line": "audit-line",
              "firmware": "firmware-signing"}
    try:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        pki_dir = os.path.join(workdir, "pki")
        os.makedirs(pki_dir, exist_ok=True)
        if root is None:
            pki = _demo_pki(hsm, pki_dir, scope or DEFAULT_SCOPE, operator, now)
        else:
            pki = _adopt_pki(hsm, pki_dir, root, cas)
        labels.update(root=pki["root_label"], ca=pki["cas"][0]["label"])
        _make_line_keys(hsm, workdir, pki_dir, labels, master_key)
        witness = _make_witness_key(workdir, witness_hsm_uri, environ, scrypt_n, pki_dir)
        config = {"format": FORMAT, "hsm": hsm_uri, "registry": registry_uri,
                  "labels": labels, "operator": operator, "serial_prefix": serial_prefix,
                  "vendor_dir": "vendor", "root_cert": pki["root_cert"],
                  "ca_cert": pki["cas"][0]["cert"], "cas": pki["cas"], "witness": witness,
                  "journal": "journal.jsonl"}
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)
    finally:
        hsm.close()
    open_registry(registry_uri).close()  # creates the schema
    return open_line(workdir, environ=environ)


def _open_custody_checked_hsm(workdir, hsm_uri, environ, scrypt_n, root, cas,
                              witness_hsm_uri):
    """(HSM, its URI as opened) once the custody arguments fit: on the demo path checked
    before its keystore is created, on an HSM after its URI has been parsed (so a bad URI
    is named as such)."""
    if hsm_uri is None:
        _check_custody(workdir, None, root, cas, witness_hsm_uri)
    hsm, opened_uri = _open_line_hsm(workdir, hsm_uri, environ, scrypt_n)
    if hsm_uri is not None:
        try:
            _check_custody(workdir, hsm_uri, root, cas, witness_hsm_uri)
        except LineConfigError:
            hsm.close()
            raise
    return hsm, opened_uri


def _make_line_keys(hsm, workdir, pki_dir, labels, master_key):
    """The line's own keys in its HSM: the SCP03 master (made inside, or imported from a
    ceremony restore), the audit line and firmware-signing keys (their public keys written
    to pki_dir) and the transport wrapping key (its public key in TRANSPORT_WRAP_PUB)."""
    if master_key is None:
        hsm.create_master_key(labels["master"])
    else:
        hsm.import_master_key(labels["master"], master_key)
    for role in ("audit_line", "firmware"):
        hsm.generate_signing_key(labels[role])
        _write_public_key(hsm, labels[role], pki_dir, role)
    labels["transport_wrap"] = TRANSPORT_WRAP_LABEL
    wrapping = hsm.create_transport_wrapping_key(TRANSPORT_WRAP_LABEL)
    with open(os.path.join(workdir, TRANSPORT_WRAP_PUB), "wb") as f:
        f.write(wrapping.public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo))


def _check_new_line(workdir, hsm_uri, environ):
    """What init_line refuses before anything is created."""
    if hsm_uri is None and not environ.get(PASS_ENV):
        # Never generated into a file beside the keystore it unlocks.
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


def _check_custody(workdir, hsm_uri, root, cas, witness_hsm_uri):
    """The key custody init_line accepts: adopt a root with its CAs (any HSM), or create
    them on the demo path (the embedded soft keystore: no `hsm_uri`)."""
    demo = hsm_uri is None
    if root is None and (not demo or cas):
        raise LineConfigError(workdir, "an HSM line adopts its fleet root and issuing CAs "
                              "(root certificate + label, CA certificates + labels, as "
                              "`fleetid pki init-root` / `fleetid pki new-ca` made them)")
    if root is not None and not cas:
        raise LineConfigError(workdir, "adopting a root needs its issuing CAs (made by "
                              "`fleetid pki new-ca`)")
    if not demo and (not witness_hsm_uri or witness_hsm_uri == hsm_uri):
        raise LineConfigError(workdir, "the audit witness key needs its own keystore or "
                              "token (a witness HSM URI other than the line's)")


def _soft_keystore(path, environ, scrypt_n):
    from fleetid.cloud.hsm.soft_backend import SCRYPT_N_DEFAULT, SoftBackend

    os.makedirs(os.path.dirname(path), exist_ok=True)
    hsm = SoftBackend(path, environ[PASS_ENV], scrypt_n=scrypt_n or SCRYPT_N_DEFAULT)
    return hsm, "soft:%s;pass-env=%s" % (path, PASS_ENV)


def _open_line_hsm(workdir, hsm_uri, environ, scrypt_n):
    """(HSM, its URI): the given one, or the demo's soft keystore in workdir."""
    if hsm_uri is None:
        return _soft_keystore(os.path.join(workdir, "keystore.json"), environ, scrypt_n)
    return open_hsm(hsm_uri, environ), hsm_uri


def _write_public_key(hsm, label, pki_dir, role):
    with open(os.path.join(pki_dir, role.replace("_", "-") + ".pub.pem"), "wb") as f:
        f.write(hsm.public_key(label).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _ca_entry(cert, label, relative):
    from fleetid.cloud.pki.profiles import ca_scope

    return {"label": label, "cert": relative, "scope": ca_scope(cert)}


def _demo_pki(hsm, pki_dir, scope, operator, now):
    """The embedded demo's PKI, created here: root key ceremony + one issuing CA."""
    from fleetid.cloud.pki import init_root, new_ca

    root_label, ca_label = "fleet-root", "ca-line"
    root, _record = init_root(hsm, root_label, "CN=fleetid Fleet Root,O=fleetid demo", 30,
                              os.path.join(pki_dir, "ceremony"), [operator, "line-witness"],
                              now=now - datetime.timedelta(minutes=10))
    ca_cert = new_ca(hsm, root_label, root, ca_label, scope,
                     now=now - datetime.timedelta(minutes=5))
    with open(os.path.join(pki_dir, "ca.pem"), "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    return {"root_label": root_label, "root_cert": "pki/ceremony/root.pem",
            "cas": [_ca_entry(ca_cert, ca_label, "pki/ca.pem")]}


def _adopt_pki(hsm, pki_dir, root, cas):
    """Adopt an existing root and its issuing CAs: each certificate's key must be the HSM
    key under its label, each CA directly issued by the root.  Copies the certificates
    into pki/ (root.pem, ca-<label>.pem)."""
    root_label, root_path = root
    root_cert = _load_cert(root_path)
    _check_hsm_key(hsm, root_label, root_cert, root_path)
    pem = serialization.Encoding.PEM
    with open(os.path.join(pki_dir, "root.pem"), "wb") as f:
        f.write(root_cert.public_bytes(pem))
    entries = []
    for label, path in cas:
        cert = _load_cert(path)
        _check_hsm_key(hsm, label, cert, path)
        try:
            cert.verify_directly_issued_by(root_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise LineConfigError(path, "not issued by the adopted root") from None
        relative = "pki/ca-%s.pem" % "".join(c if c.isalnum() or c in "-_." else "_"
                                              for c in label)
        with open(os.path.join(pki_dir, os.path.basename(relative)), "wb") as f:
            f.write(cert.public_bytes(pem))
        entries.append(_ca_entry(cert, label, relative))
        if entries[-1]["scope"] is None:
            raise LineConfigError(path, "no product/batch/region scope in its subject (make "
                                  "issuing CAs with `fleetid pki new-ca`)")
    batches = [e["scope"]["batch"] for e in entries]
    if len(set(batches)) != len(batches):
        raise LineConfigError(pki_dir, "two adopted CAs for one batch")
    return {"root_label": root_label, "root_cert": "pki/root.pem", "cas": entries}


def _load_cert(path):
    try:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificate(f.read())
    except OSError as exc:
        raise LineConfigError(path, exc.strerror or "unreadable") from None
    except ValueError:
        raise LineConfigError(path, "not a PEM certificate") from None


def _check_hsm_key(hsm, label, cert, path):
    if hsm.public_key(label).public_numbers() != cert.public_key().public_numbers():
        raise LineConfigError(path, "the HSM key %r is not this certificate's key" % label)


def _make_witness_key(workdir, witness_hsm_uri, environ, scrypt_n, pki_dir):
    """The audit witness's key, in its own keystore or token: the given one (its key
    generated under WITNESS_LABEL unless it is there already), or on the demo path a soft
    keystore of its own in <workdir>/witness/.  Returns line.json's "witness" entry."""
    from fleetid.cloud.hsm.errors import KeyNotFound

    if witness_hsm_uri is None:
        hsm, witness_hsm_uri = _soft_keystore(
            os.path.join(workdir, "witness", "keystore.json"), environ, scrypt_n)
    else:
        hsm = open_hsm(witness_hsm_uri, environ)
    try:
        try:
            hsm.public_key(WITNESS_LABEL)
        except KeyNotFound:
            hsm.generate_signing_key(WITNESS_LABEL)
        _write_public_key(hsm, WITNESS_LABEL, pki_dir, "audit_witness")
    finally:
        hsm.close()
    return {"hsm": witness_hsm_uri, "label": WITNESS_LABEL}


def open_line(workdir, hsm_uri=None, registry_uri=None, environ=None, max_sessions=None):
    """Open an initialised line work directory.

    Params: hsm_uri / registry_uri: override line.json.  environ: secrets by variable
        (default os.environ: FLEETID_KEYSTORE_PASS for the embedded soft keystores, the
        line's and the witness's).  max_sessions: HSM session pool bound (None: the
        URI's / default).
    Returns: Line.  Raises: LineConfigError (no, unreadable or corrupt line.json), HSM /
    registry errors.
    """
    workdir = os.path.abspath(workdir)
    config = _read_config(workdir)
    environ = dict(os.environ if environ is None else environ)
    uri = hsm_uri or config["hsm"]
    if max_sessions and "max-sessions=" not in uri:
        uri += ";max-sessions=%d" % max_sessions
    opened = []
    try:
        opened.append(open_hsm(uri, environ))
        witness = config.get("witness")
        # A line.json from before the witness had its own keystore: the line's HSM.
        opened.append(open_hsm(witness["hsm"], environ) if witness else opened[0])
        registry = open_registry(registry_uri or config["registry"])
    except Exception:
        for hsm in {id(h): h for h in opened}.values():
            hsm.close()
        raise
    return Line(workdir, config, opened[0], registry, witness_hsm=opened[1])


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


def line_witness_hsm_uri(workdir):
    """The audit witness's HSM URI of the line in `workdir` (None: no line there yet, or
    a line whose witness key is in the line's own HSM)."""
    if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        return None
    return (_read_config(os.path.abspath(workdir)).get("witness") or {}).get("hsm")


class Line:
    """An opened line: HSM, registry, PKI material, the witness's HSM.
    `resources_for(batch, ca_batch)` gives the LineResources stations share.  Close it
    when done.

    Attributes: ca_cert / issuing_ca: the default issuing CA (the first of line.json's
    "cas"); issuing_cas: {scope batch: IssuingCa}, one per adopted CA."""

    def __init__(self, workdir, config, hsm, registry, witness_hsm=None):
        self.workdir = workdir
        self.config = config
        self.hsm = hsm
        self.witness_hsm = witness_hsm if witness_hsm is not None else hsm
        self.registry = registry
        self.labels = config["labels"]
        self.vendor_dir = self._path(config["vendor_dir"])
        with open(os.path.join(self.vendor_dir, VENDOR_ROOT_FILE), "rb") as f:
            self.vendor_roots = x509.load_pem_x509_certificates(f.read())
        with open(self._path(config["root_cert"]), "rb") as f:
            self.root_cert = x509.load_pem_x509_certificate(f.read())
        self.issuing_cas = {}
        for entry in config.get("cas") or [{"label": self.labels["ca"],
                                           "cert": config["ca_cert"]}]:
            with open(self._path(entry["cert"]), "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
            ca = IssuingCa(hsm, entry["label"], cert, self.vendor_roots)
            self.issuing_cas[(entry.get("scope") or {}).get("batch")] = ca
            if entry["label"] == self.labels["ca"]:
                self.issuing_ca, self.ca_cert = ca, cert
        self.journal = IssuanceJournal(self._path(config["journal"]))
        witness = config.get("witness") or {"label": self.labels.get("audit_witness")}
        self.witness_label = witness["label"]
        # The witness keeps the latest checkpoint it signed (the anchor a truncated log
        # cannot fake: `fleetid audit verify --witness-anchor <line>/witness/anchor.json`).
        self.witness = audit.AnchoringWitness(
            audit.HsmSigner(self.witness_hsm, self.witness_label), self._path(WITNESS_ANCHOR))
        self.checkpointer = audit.Checkpointer(
            registry, audit.HsmSigner(hsm, self.labels["audit_line"]), self.witness,
            every_entries=256)

    def _path(self, relative):
        return os.path.join(self.workdir, relative)

    def issuing_ca_for(self, ca_batch=None):
        """The issuing CA whose scope names batch `ca_batch` (None: the default CA).
        Raises LineConfigError when the line has no CA for that batch."""
        if ca_batch is None:
            return self.issuing_ca
        try:
            return self.issuing_cas[ca_batch]
        except KeyError:
            raise LineConfigError(self._path(CONFIG_FILE), "no issuing CA for batch %r "
                                  "(the line has: %s)" % (ca_batch, ", ".join(
                                      sorted(str(b) for b in self.issuing_cas)))) from None

    def transport_wrapping_key(self):
        """The public half of the HSM's transport wrapping key (what chip vendors wrap a
        shipment's KEK for), or None for a line made before it had one."""
        label = self.labels.get("transport_wrap")
        return None if label is None else self.hsm.transport_wrapping_public_key(label)

    def _shipment_path(self, lot):
        if not isinstance(lot, str) or not lot or lot.startswith(".") or \
                any(not (c.isalnum() or c in "-_.") for c in lot):
            raise ShipmentError("malformed", "lot name %r" % (lot,))
        return self._path(os.path.join(SHIPMENTS_DIR, lot + ".json"))

    def receive_shipment(self, doc):
        """Accept a chip vendor's transport-key shipment (a parsed JSON document, format
        fleetid.sim.ship): it must be wrapped for this line's key and name a trusted SE
        vendor; its KEK is unwrapped into the HSM ("transport-kek:<lot>") and the
        document kept as <workdir>/shipments/<lot>.json (it holds wrapped keys only).
        Chip entries are verified one by one when a station reaches the chip.
        Returns: the lot name (resources_for(lot) then uses the shipment).
        Raises: ShipmentError (nothing kept), HsmError (EXISTS: lot received already;
        WRAPPED_KEY_INVALID: the KEK does not unwrap).
        """
        shipment = TransportShipment(doc)
        wrapping = self.transport_wrapping_key()
        if wrapping is None:
            raise ShipmentError("recipient", "this line has no transport wrapping key")
        shipment.check_recipient(recipient_id(wrapping))
        shipment.check_vendor(self.vendor_roots)
        path = self._shipment_path(shipment.lot)
        if os.path.exists(path):
            raise ShipmentError("received", "lot %s was received already" % shipment.lot)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        try:  # the KEK first: a refused one leaves no shipment file behind
            self.hsm.import_transport_kek(_KEK_PREFIX + shipment.lot,
                                          self.labels["transport_wrap"], shipment.wrapped_kek)
        except BaseException:
            os.unlink(tmp)
            raise
        os.replace(tmp, path)
        return shipment.lot

    def resources_for(self, batch, wall_clock=time.time, ca_batch=None):
        """LineResources for chips of transport batch `batch`, issued by the CA for
        product batch `ca_batch` (None: the default CA).  When a shipment was received
        for lot `batch` (receive_shipment), each chip's transport keys come from it,
        unwrapped inside the HSM; otherwise from the HSM's batch key set."""
        issuing_ca = self.issuing_ca_for(ca_batch)
        shipment = None
        try:
            path = self._shipment_path(batch)
        except ShipmentError:
            path = None
        if path is not None and os.path.exists(path):
            shipment = TransportShipment.load(path)
        firmware_point = None
        if "firmware" in self.labels:
            firmware_point = self.hsm.public_key(self.labels["firmware"]).public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        config = LineConfig(batch, self.root_cert.public_bytes(serialization.Encoding.DER),
                            master_label=self.labels["master"],
                            operator=self.config.get("operator", "line-operator"),
                            serial_prefix=self.config.get("serial_prefix", "FID"),
                            firmware_key_point=firmware_point)
        return LineResources(self.hsm, self.registry, issuing_ca, self.vendor_roots,
                             config, self.journal, checkpointer=self.checkpointer,
                             wall_clock=wall_clock, shipment=shipment,
                             kek_label=_KEK_PREFIX + batch if shipment else None)

    def public_keys(self):
        """(line public key, witness public key) of the audit checkpoints."""
        return (self.hsm.public_key(self.labels["audit_line"]),
                self.witness_hsm.public_key(self.witness_label))

    def close(self):
        self.journal.close()
        self.registry.close()
        if self.witness_hsm is not self.hsm:
            self.witness_hsm.close()
        self.hsm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
