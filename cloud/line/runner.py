"""Parallel stations over emulated chips, the line work directory, and the line report.

    line = init_line("/srv/line1")                 # once: keys in the HSM, PKI, registry
    line = open_line("/srv/line1")
    lot = make_lot(line, 100, "lot-2026-11-23a")   # chips from the SE vendor + transport keys
    summary = run_line(line.resources_for(lot.batch), lot.chips, stations=8)
    write_report([summary], "/srv/line1/report.html")

Work directory (`init_line`):

    line.json            URIs and labels (no secrets)
    keystore.json        soft HSM keystore (when no --hsm is given), mode 0600; its
                         passphrase is never written here: it comes from
                         FLEETID_KEYSTORE_PASS (which the CLI fills from a prompt or a
                         file the user names), like an HSM PIN
    registry.db          SQLite registry (+ WAL), the audit chain inside it
    journal.jsonl        issuance journal (station.py)
    witness/anchor.json  the witness's latest signed checkpoint (audit.AnchoringWitness;
                         another party's in production)
    vendor/              the simulated SE vendor's root CA (the vendor's, not the line's)
    pki/ceremony/        root key ceremony record + root.pem;  pki/ca.pem: the batch CA

HSM keys (labels in line.json): fleet root, issuing CA, SCP03 master, the audit line key,
the audit witness key and the firmware-signing key (its public point is the second trust
anchor the line stores in every SE).  The witness key belongs to another party in production (its
own HSM or a remote signer); here it sits in the same HSM so the demo writes no private
key file.

Measurements per device (`DeviceRun`): cycle time (wall, station clock); SE time = what the
latency profile charges for the APDUs the device executed (op + NVM write time) plus the
I2C transfer time of the bytes that crossed the bus, i.e. the time the same steps would
take if the host were infinitely fast; emulator time = wall time spent below the Bus
interface (endpoint, SE-side T=1', applet, and the modelled bus sleeps): host CPU spent
pretending to be the SE, not line cost.  Host cost = cycle time minus emulator time.
"""

import datetime
import html
import json
import math
import os
import queue
import secrets
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetid.cloud import audit
from fleetid.cloud.ca import IssuingCa
from fleetid.cloud.hsm import open_hsm
from fleetid.cloud.line.station import (
    IssuanceJournal,
    LineConfig,
    LineResources,
    Station,
)
from fleetid.cloud.registry import open_registry
from fleetid.common import se_consts as C
from fleetid.common.errors import FleetidError
from fleetid.sim import chip as chip_mod
from fleetid.sim import fab, profiles
from fleetid.sim.endpoint import BusEndpoint
from fleetid.sim.nvm import Nvm, remove_stale_temp_files

CONFIG_FILE = "line.json"
WITNESS_ANCHOR = os.path.join("witness", "anchor.json")
PASS_ENV = "FLEETID_KEYSTORE_PASS"
FORMAT = "fleetid-line/1"
DEFAULT_SCOPE = {"product": "widget", "batch": "b1", "region": "eu"}
FIRMWARE_VERSION = b"\x01\x00\x00"


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
    a given HSM / registry: vendor CA, root key ceremony, issuing CA, SCP03 master key,
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
        vendor_dir = os.path.join(workdir, "vendor")
        fab.load_or_create_vendor_ca(vendor_dir, now=now)
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
        self.vendor = fab.load_or_create_vendor_ca(self._path(config["vendor_dir"]))
        with open(self._path(config["root_cert"]), "rb") as f:
            self.root_cert = x509.load_pem_x509_certificate(f.read())
        with open(self._path(config["ca_cert"]), "rb") as f:
            self.ca_cert = x509.load_pem_x509_certificate(f.read())
        self.journal = IssuanceJournal(self._path(config["journal"]))
        self.issuing_ca = IssuingCa(hsm, self.labels["ca"], self.ca_cert, [self.vendor.cert])
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
        return LineResources(self.hsm, self.registry, self.issuing_ca, [self.vendor.cert],
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


# -- chips from the vendor -------------------------------------------------------------------


class EmulatedChip:
    """One emulated SE from a lot: `uid`, `chip` (sim.chip.Chip), `nvm`."""

    __slots__ = ("uid", "chip", "nvm")

    def __init__(self, uid, chip, nvm):
        self.uid = uid
        self.chip = chip
        self.nvm = nvm


class ChipLot:
    """Chips of one vendor lot sharing one transport key set (`batch` in the HSM)."""

    def __init__(self, batch, chips):
        self.batch = batch
        self.chips = chips

    def by_uid(self):
        return {c.uid: c for c in self.chips}


def fab_in_memory(vendor, transport_keys, se_uid=None, nvm_path=None, rng=os.urandom):
    """Make one chip the way sim.fab does, without writing a fab record (the record would
    hold the transport keys in plaintext; here the vendor hands them to the HSM only).
    Returns: EmulatedChip."""
    se_uid = se_uid or rng(16)
    nvm = Nvm(nvm_path)
    enc, mac, dek = transport_keys
    point = chip_mod.fab_initialise(nvm, se_uid, FIRMWARE_VERSION,
                                    (enc, mac, dek, C.SCP03_KVN_TRANSPORT), rng=rng)
    mak_cert = fab.issue_mak_certificate(vendor, se_uid, point)
    chip_mod.fab_store_attestation_chain(nvm, [mak_cert, vendor.cert_der])
    return EmulatedChip(se_uid, chip_mod.Chip(nvm, rng=rng), nvm)


def new_batch_name():
    """A fresh lot name: "lot-<UTC time>-<4 hex>"."""
    return "lot-" + datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y%m%dT%H%M%S") + "-" + secrets.token_hex(2)


def make_lot(line_or_hsm, count, batch=None, vendor=None, chip_dir=None, rng=os.urandom):
    """A vendor lot: fresh transport keys (imported into the HSM under `batch`, the
    caller's copies wiped) and `count` chips holding them.

    Params: line_or_hsm: Line, or an HsmBackend (then `vendor` is required).
        chip_dir: keep each chip's NVM in "<chip_dir>/se-<uid>.nvm" (None: in memory).
    Returns: ChipLot.
    """
    hsm = getattr(line_or_hsm, "hsm", line_or_hsm)
    vendor = vendor or line_or_hsm.vendor
    batch = batch or new_batch_name()
    keys = [bytearray(rng(16)) for _ in range(3)]
    chips = []
    if chip_dir:
        os.makedirs(chip_dir, exist_ok=True)
    for _ in range(count):
        uid = rng(16)
        path = os.path.join(chip_dir, "se-%s.nvm" % uid.hex()) if chip_dir else None
        chips.append(fab_in_memory(vendor, tuple(bytes(k) for k in keys), uid, path, rng))
    hsm.import_transport_keys(batch, keys[0], keys[1], keys[2])  # wipes the bytearrays
    return ChipLot(batch, chips)


def remove_stale_chip_files(chips_root):
    """Recovery after a killed run: delete the NVM temp files (key scalars of commits that
    never reached their atomic point) in every lot folder under `chips_root`
    (<line>/chips).  Returns the removed paths.  Raises NvmError."""
    removed = []
    if not os.path.isdir(chips_root):
        return removed
    for lot in sorted(os.listdir(chips_root)):
        if os.path.isdir(os.path.join(chips_root, lot)):
            removed += remove_stale_temp_files(os.path.join(chips_root, lot))
    return removed


def load_chips(chip_dir):
    """Re-open chips kept in `chip_dir` (make_lot(chip_dir=...)), after deleting the temp
    files a killed run left there.  Returns {uid: EmulatedChip}."""
    out = {}
    if not chip_dir or not os.path.isdir(chip_dir):
        return out
    remove_stale_temp_files(chip_dir)
    for name in sorted(os.listdir(chip_dir)):
        if name.startswith("se-") and name.endswith(".nvm"):
            nvm = Nvm(os.path.join(chip_dir, name))
            uid = bytes(nvm.get("uid", b""))
            out[uid] = EmulatedChip(uid, chip_mod.Chip(nvm), nvm)
    return out


# -- metering ---------------------------------------------------------------------------------


class MeteredChip:
    """Wraps a Chip: adds up the SE time the latency profile charges for the APDUs it
    executes (operation + NVM write time)."""

    def __init__(self, chip, latency):
        self.chip = chip
        self.latency = latency
        self.se_ms = 0.0
        self.apdus = 0

    @property
    def last_nvm_write_bytes(self):
        return self.chip.last_nvm_write_bytes

    def process(self, apdu):
        try:
            return self.chip.process(apdu)
        finally:
            self.apdus += 1
            op = C.INS_NAMES.get(apdu[1]) if len(apdu) >= 2 else None
            if op is not None:
                self.se_ms += self.latency.op_ms(op)
            written = self.chip.last_nvm_write_bytes or 0
            if written:
                self.se_ms += self.latency.nvm_write_ms(written)

    def power_loss(self):
        self.chip.power_loss()


class MeteredBus:
    """Wraps a Bus: counts the bytes of transactions that went through (not NACKs), for
    the I2C share of the SE-only time, and the wall / CPU time spent below the Bus
    interface (the emulator: endpoint, SE-side T=1', applet), which is not line cost."""

    def __init__(self, bus):
        self.bus = bus
        self.bytes = 0
        self.transactions = 0
        self.emulator_s = 0.0
        self.emulator_cpu_s = 0.0

    def write(self, frame):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            self.bus.write(frame)
        finally:
            self.emulator_s += time.perf_counter() - wall
            self.emulator_cpu_s += time.thread_time() - cpu
        self.bytes += len(frame)
        self.transactions += 1

    def read(self, n):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            data = self.bus.read(n)
        finally:
            self.emulator_s += time.perf_counter() - wall
            self.emulator_cpu_s += time.thread_time() - cpu
        self.bytes += n
        self.transactions += 1
        return data

    def reset(self):
        self.bus.reset()

    def close(self):
        self.bus.close()

    def bus_ms(self, bus_hz):
        """Transfer time at `bus_hz`: 9 clocks per byte plus the address byte."""
        if not bus_hz:
            return 0.0
        return (self.bytes + self.transactions) * 9 * 1000.0 / bus_hz


# -- parallel stations ------------------------------------------------------------------------


class DeviceRun:
    """One device's run: the station's DeviceResult plus cycle / SE / emulator times (ms)."""

    __slots__ = ("result", "cycle_ms", "se_ms", "emulator_ms", "host_cpu_ms", "apdus")

    def __init__(self, result, cycle_ms, se_ms, emulator_ms, host_cpu_ms, apdus):
        self.result = result
        self.cycle_ms = cycle_ms
        self.se_ms = se_ms
        self.emulator_ms = emulator_ms
        self.host_cpu_ms = host_cpu_ms
        self.apdus = apdus


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a list; 0.0 for an empty list."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, int(math.ceil(p / 100.0 * len(ordered))))
    return ordered[min(rank, len(ordered)) - 1]


class RunSummary:
    """What one run of K stations over N chips did.

    Attributes: stations, devices, profile, runs (list of DeviceRun), wall_s, audit_bytes
    (bytes the audit chain grew by), pool (HSM pool stats at the end), batch.
    """

    def __init__(self, stations, profile, runs, wall_s, audit_bytes, audit_entries, pool,
                 batch):
        self.stations = stations
        self.profile = profile
        self.runs = runs
        self.devices = len(runs)
        self.wall_s = wall_s
        self.audit_bytes = audit_bytes
        self.audit_entries = audit_entries
        self.pool = pool
        self.batch = batch

    @property
    def ok(self):
        return [r for r in self.runs if r.result.ok]

    @property
    def yield_pct(self):
        return 100.0 * len(self.ok) / self.devices if self.devices else 0.0

    @property
    def throughput(self):
        """Committed devices per second of wall time."""
        return len(self.ok) / self.wall_s if self.wall_s > 0 else 0.0

    def cycle_ms(self, p):
        return percentile([r.cycle_ms for r in self.ok], p)

    def failures(self):
        """{cause: count} of failed devices, most frequent first."""
        counts = {}
        for run in self.runs:
            if not run.result.ok:
                counts[run.result.cause] = counts.get(run.result.cause, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def mean(self, attr, ok_only=True):
        runs = self.ok if ok_only else self.runs
        return sum(getattr(r, attr) for r in runs) / len(runs) if runs else 0.0

    def step_means_ms(self):
        """{step: mean ms} over committed devices."""
        sums = {}
        for run in self.ok:
            for step, seconds in run.result.timings.items():
                sums[step] = sums.get(step, 0.0) + seconds * 1000.0
        n = len(self.ok) or 1
        return {step: total / n for step, total in sums.items()}

    def as_dict(self):
        return {
            "stations": self.stations, "devices": self.devices, "profile": self.profile,
            "batch": self.batch, "committed": len(self.ok), "yield_pct": self.yield_pct,
            "wall_s": self.wall_s, "throughput_per_s": self.throughput,
            "cycle_ms": {"p50": self.cycle_ms(50), "p95": self.cycle_ms(95),
                         "p99": self.cycle_ms(99), "mean": self.mean("cycle_ms")},
            "se_ms_mean": self.mean("se_ms"), "emulator_ms_mean": self.mean("emulator_ms"),
            "host_cpu_ms_mean": self.mean("host_cpu_ms"),
            "failures": self.failures(), "steps_ms": self.step_means_ms(),
            "audit_bytes_per_device": (self.audit_bytes / len(self.ok)) if self.ok else 0.0,
            "hsm_pool": self.pool,
        }


def _audit_size(registry):
    count, _head = registry.head()
    total = 0
    for line in registry.iter_audit_lines(0):
        total += len(line) + (0 if line.endswith(b"\n") else 1)
    return count, total


def run_line(resources, chips, stations=1, profile="none", progress=None, link_clock=None,
             step_hook=None, endpoint_kwargs=None, measure_audit=True):
    """Provision `chips` on `stations` parallel stations (threads) sharing `resources`.

    Params: resources: LineResources.  chips: list of EmulatedChip.  stations: K >= 1.
        profile: latency profile name (sim.profiles) or a LatencyProfile.
        progress: optional callable(done, total, DeviceRun) (called from station threads).
        link_clock: T=1' clock (default SystemClock: real waits).  step_hook: passed to
        every Station (fault injection).  endpoint_kwargs: extra BusEndpoint arguments.
    Returns: RunSummary.
    """
    latency = profiles.get(profile) if isinstance(profile, str) else profile
    work = queue.Queue()
    for item in chips:
        work.put(item)
    runs = []
    lock = threading.Lock()
    total = len(chips)
    errors = []
    audit_before = _audit_size(resources.registry) if measure_audit else (0, 0)

    stopping = threading.Event()

    def station_loop(index):
        station = Station("st-%02d" % (index + 1), resources, step_hook=step_hook,
                          link_clock=link_clock)
        while not stopping.is_set():
            try:
                item = work.get_nowait()
            except queue.Empty:
                return
            metered = MeteredChip(item.chip, latency)
            kwargs = dict(endpoint_kwargs or {})
            kwargs.setdefault("clock", link_clock)
            endpoint = BusEndpoint(metered, latency=latency, **kwargs)
            bus = MeteredBus(endpoint)
            cpu0 = time.thread_time()
            result = station.provision(bus)
            cpu = time.thread_time() - cpu0
            run = DeviceRun(result, result.cycle_s * 1000.0,
                            metered.se_ms + bus.bus_ms(latency.bus_hz),
                            bus.emulator_s * 1000.0,
                            max(0.0, cpu - bus.emulator_cpu_s) * 1000.0, metered.apdus)
            with lock:
                runs.append(run)
                done = len(runs)
            if progress is not None:
                progress(done, total, run)

    running = [max(1, stations)]
    all_stopped = threading.Event()

    def guarded(index):
        try:
            station_loop(index)
        except BaseException as exc:  # noqa: BLE001 - reported after join
            errors.append(exc)
        finally:
            with lock:
                running[0] -= 1
                if not running[0]:
                    all_stopped.set()

    started = time.perf_counter()
    threads = [threading.Thread(target=guarded, args=(i,), name="station-%d" % (i + 1),
                                daemon=True) for i in range(max(1, stations))]
    # Shutdown (the end of the lot, an error, Ctrl-C or SIGTERM turned into
    # KeyboardInterrupt / SystemExit): stations finish the device in hand and take no
    # more, then one signed checkpoint covers everything this run appended.  Only a
    # SIGKILL skips it; `fleetid line reconcile` checkpoints after that.
    # (Waiting on an Event, not Thread.join: a join interrupted by a signal can leave
    # is_alive() False for a thread still running, and the last checkpoint must come
    # after the last station's last entry.)
    for thread in threads:
        thread.start()
    try:
        all_stopped.wait()
    except BaseException:
        stopping.set()
        all_stopped.wait()
        if resources.checkpointer is not None:
            try:
                resources.checkpointer.checkpoint()
            except Exception:  # noqa: BLE001, S110 - the interruption is what the caller sees
                pass
        raise
    for thread in threads:
        thread.join()
    if resources.checkpointer is not None:
        resources.checkpointer.checkpoint()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    audit_after = _audit_size(resources.registry) if measure_audit else (0, 0)
    return RunSummary(stations, latency.name, runs, wall, audit_after[1] - audit_before[1],
                      audit_after[0] - audit_before[0], resources.hsm.pool_stats(),
                      resources.config.batch)


# -- the report ---------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:72em}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right} th{background:#f3f3f3} td.l,th.l{text-align:left}
.bad{color:#b00;font-weight:bold} .ok{color:#070}
.kpi{display:inline-block;margin:0 2em .5em 0} .kpi b{font-size:1.6em;display:block}
"""


def _svg_histogram(values, width=640, height=220, bins=30, label="cycle time (ms)"):
    if not values:
        return "<p>no committed devices</p>"
    low, high = min(values), max(values)
    if high <= low:
        high = low + 1.0
    step = (high - low) / bins
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / step))] += 1
    top = max(counts)
    pad_l, pad_b, pad_t = 40, 30, 10
    plot_w, plot_h = width - pad_l - 10, height - pad_b - pad_t
    bar_w = plot_w / float(bins)
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" role="img" '
             'aria-label="%s histogram">' % (width, height, html.escape(label))]
    for i, count in enumerate(counts):
        h = plot_h * count / float(top)
        parts.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="#4a7bd0">'
                     '<title>%.1f-%.1f ms: %d</title></rect>'
                     % (pad_l + i * bar_w + 0.5, pad_t + plot_h - h, max(bar_w - 1, 1), h,
                        low + i * step, low + (i + 1) * step, count))
    parts.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>'
                 % (pad_l, pad_t + plot_h, pad_l + plot_w, pad_t + plot_h))
    parts.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>'
                 % (pad_l, pad_t, pad_l, pad_t + plot_h))
    for frac in (0.0, 0.5, 1.0):
        x = pad_l + frac * plot_w
        parts.append('<text x="%.1f" y="%d" font-size="11" text-anchor="middle">%.1f</text>'
                     % (x, height - 12, low + frac * (high - low)))
    parts.append('<text x="%d" y="%d" font-size="11" text-anchor="end">%d</text>'
                 % (pad_l - 4, pad_t + 10, top))
    parts.append('<text x="%.1f" y="%d" font-size="11" text-anchor="middle">%s</text>'
                 % (pad_l + plot_w / 2, height - 1, html.escape(label)))
    for p, colour in ((50, "#080"), (95, "#c80"), (99, "#c00")):
        x = pad_l + (percentile(values, p) - low) / (high - low) * plot_w
        parts.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" '
                     'stroke-dasharray="4 3"><title>p%d</title></line>'
                     % (x, pad_t, x, pad_t + plot_h, colour, p))
    parts.append("</svg>")
    return "".join(parts)


def _svg_scaling(points, width=640, height=240):
    """Stations vs throughput, with the linear projection from the smallest K."""
    if not points:
        return ""
    base_k, base_t = points[0]
    per_station = base_t / base_k if base_k else 0.0
    max_k = max(k for k, _ in points)
    max_t = max(max(t for _, t in points), per_station * max_k) or 1.0
    pad_l, pad_b, pad_t, pad_r = 50, 32, 10, 10
    plot_w, plot_h = width - pad_l - pad_r, height - pad_b - pad_t

    def xy(k, t):
        return (pad_l + plot_w * k / float(max_k), pad_t + plot_h - plot_h * t / max_t)

    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" role="img" '
             'aria-label="stations versus throughput">' % (width, height)]
    parts.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>'
                 % (pad_l, pad_t + plot_h, pad_l + plot_w, pad_t + plot_h))
    parts.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>'
                 % (pad_l, pad_t, pad_l, pad_t + plot_h))
    x0, y0 = xy(0, 0)
    x1, y1 = xy(max_k, per_station * max_k)
    parts.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#999" '
                 'stroke-dasharray="5 4"><title>linear</title></line>' % (x0, y0, x1, y1))
    coords = [xy(k, t) for k, t in points]
    parts.append('<polyline fill="none" stroke="#4a7bd0" stroke-width="2" points="%s"/>'
                 % " ".join("%.1f,%.1f" % c for c in coords))
    for (k, t), (x, y) in zip(points, coords):
        parts.append('<circle cx="%.1f" cy="%.1f" r="4" fill="#4a7bd0"><title>%d stations: '
                     '%.2f devices/s</title></circle>' % (x, y, k, t))
        parts.append('<text x="%.1f" y="%d" font-size="11" text-anchor="middle">%d</text>'
                     % (x, height - 16, k))
    parts.append('<text x="%d" y="%d" font-size="11" text-anchor="end">%.1f/s</text>'
                 % (pad_l - 4, pad_t + 10, max_t))
    parts.append('<text x="%.1f" y="%d" font-size="11" text-anchor="middle">stations '
                 '(dashed: linear from %d)</text>' % (pad_l + plot_w / 2, height - 2, base_k))
    parts.append("</svg>")
    return "".join(parts)


def report_html(summaries, title="fleetid factory line report"):
    """The line report (one HTML page, inline SVG, no external resources).

    Params: summaries: list of RunSummary (one per station count; the last is detailed).
    Returns: str.
    """
    esc = html.escape
    main = summaries[-1]
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>%s</title><style>%s"
           "</style></head><body>" % (esc(title), _CSS), "<h1>%s</h1>" % esc(title)]
    out.append("<p>%s &middot; batch <code>%s</code> &middot; SE profile <code>%s</code>"
               "</p>" % (esc(datetime.datetime.now(datetime.timezone.utc)
                             .strftime("%Y-%m-%d %H:%M UTC")), esc(main.batch),
                         esc(main.profile)))
    yield_cls = "ok" if main.yield_pct >= 99.5 else "bad"
    kpis = [("devices", "%d" % main.devices), ("stations", "%d" % main.stations),
            ("yield", "<span class='%s'>%.2f %%</span>" % (yield_cls, main.yield_pct)),
            ("throughput", "%.2f /s" % main.throughput),
            ("cycle p50 / p95 / p99", "%.0f / %.0f / %.0f ms"
             % (main.cycle_ms(50), main.cycle_ms(95), main.cycle_ms(99))),
            ("audit / device", "%.0f B" % main.as_dict()["audit_bytes_per_device"])]
    out.append("".join("<span class='kpi'>%s<b>%s</b></span>" % (esc(k), v) for k, v in kpis))
    if main.yield_pct < 99.5:
        out.append("<p class='bad'>Yield loss %.2f %% is above the 0.5 %% of a stable line: "
                   "see the failure causes below (HSM sessions, programmer link, key "
                   "wrapping are the usual suspects).</p>" % (100.0 - main.yield_pct))
    out.append("<h2>Cycle time per committed device</h2>")
    out.append(_svg_histogram([r.cycle_ms for r in main.ok]))
    if main.mean("se_ms") > 0:
        out.append("<p>Mean SE time (what the %s profile charges for the same APDUs, bus "
                   "included): %.1f ms; mean cycle %.1f ms: the line adds %.1f %%.</p>"
                   % (esc(main.profile), main.mean("se_ms"), main.mean("cycle_ms"),
                      100.0 * (main.mean("cycle_ms") / main.mean("se_ms") - 1.0)))
    else:
        out.append("<p>Zero-latency SE profile: the cycle time is host cost plus the "
                   "emulator's own CPU time (mean %.1f ms of %.1f ms).</p>"
                   % (main.mean("emulator_ms"), main.mean("cycle_ms")))
    out.append("<h2>Stations vs throughput</h2>")
    points = sorted((s.stations, s.throughput) for s in summaries)
    base_k, base_t = points[0]
    out.append("<table><tr><th>stations</th><th>devices</th><th>devices/s</th>"
               "<th>vs linear</th><th>cycle p50 ms</th><th>cycle p99 ms</th>"
               "<th>yield %</th></tr>")
    for s in sorted(summaries, key=lambda s: s.stations):
        linear = base_t / base_k * s.stations if base_k else 0.0
        out.append("<tr><td>%d</td><td>%d</td><td>%.2f</td><td>%.2f</td><td>%.1f</td>"
                   "<td>%.1f</td><td>%.2f</td></tr>"
                   % (s.stations, s.devices, s.throughput,
                      s.throughput / linear if linear else 0.0, s.cycle_ms(50),
                      s.cycle_ms(99), s.yield_pct))
    out.append("</table>")
    out.append(_svg_scaling(points))
    out.append("<h2>Failures by cause</h2>")
    failures = main.failures()
    if failures:
        out.append("<table><tr><th class='l'>cause</th><th>devices</th><th>%</th></tr>")
        for cause, count in failures.items():
            out.append("<tr><td class='l'><code>%s</code></td><td>%d</td><td>%.2f</td></tr>"
                       % (esc(cause), count, 100.0 * count / main.devices))
        out.append("</table>")
    else:
        out.append("<p class='ok'>none</p>")
    out.append("<h2>Mean time per step (committed devices)</h2><table>"
               "<tr><th class='l'>step</th><th>ms</th></tr>")
    for step, ms in main.step_means_ms().items():
        out.append("<tr><td class='l'>%s</td><td>%.2f</td></tr>" % (esc(step), ms))
    out.append("</table><h2>HSM session pool</h2><table>")
    for key, value in sorted((main.pool or {}).items()):
        out.append("<tr><td class='l'>%s</td><td>%s</td></tr>" % (esc(key), esc(str(value))))
    out.append("</table></body></html>")
    return "\n".join(out)


def write_report(summaries, path):
    """Write report_html(summaries) and a JSON summary beside it ("<path>.json")."""
    with open(path, "w") as f:
        f.write(report_html(summaries))
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump([s.as_dict() for s in summaries], f, indent=1, sort_keys=True)
    return path
