"""Shared set-up and checks for the factory-line tests (no tests in this module).

A line work directory on a known SCP03 master key, lots of emulated chips with known
transport keys (so the checks can recompute every per-device key independently, from the
documented diversification scheme), the invariants the line must keep after any fault,
and a scanner that looks for secret bytes in everything a run wrote.
"""

import base64
import datetime
import hashlib
import os

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetid.cloud.hsm import open_hsm
from fleetid.cloud.line import workdir as workdir_mod
from fleetid.cloud.pki import init_root, new_ca
from fleetid.cloud.registry import COMMITTED, INTENT, verify_registry_log
from fleetid.common import se_consts as C
from fleetid.sim import fab
from fleetid.sim import lot as lot_mod
from fleetid.sim.chip import Chip
from fleetid.sim.endpoint import BusEndpoint
from bench._support import init_demo_line  # noqa: F401 (re-exported: the tests import it from here)
from tests.cloud.hsm_support import (
    KEYSTORE_PASS,
    MASTER_KEY,
    SOFTHSM_MODULE,
    TEST_SCRYPT_N,
    TOKEN_LABEL,
    USER_PIN,
    init_softhsm_token,
    reference_device_keys,
)


# The soft keystore's passphrase, as an operator would supply it (by environment).
LINE_ENV = dict(os.environ, FLEETID_KEYSTORE_PASS=KEYSTORE_PASS)


class SimulatedKill(BaseException):
    """A process kill at a step boundary: not an Exception, so no station code handles it
    (only `finally` blocks run, as the OS would not even run those)."""


def _pki_on_token(hsm_uri, environ, tmp_path):
    """A fleet root and one issuing CA in the HSM, as `fleetid pki init-root` and
    `fleetid pki new-ca` make them.  Returns (root, cas) for workdir.init_line."""
    hsm = open_hsm(hsm_uri, environ)
    try:
        now = datetime.datetime.now(datetime.timezone.utc)
        root, _record = init_root(hsm, "fleet-root", "CN=fleetid Fleet Root,O=fleetid test",
                                  30, str(tmp_path / "ceremony"), ["operator", "witness"],
                                  now=now - datetime.timedelta(minutes=10))
        ca = new_ca(hsm, "fleet-root", root, "ca-line", workdir_mod.DEFAULT_SCOPE,
                    now=now - datetime.timedelta(minutes=5))
    finally:
        hsm.close()
    ca_path = tmp_path / "ca-line.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ("fleet-root", str(tmp_path / "ceremony" / "root.pem")), [("ca-line", str(ca_path))]


def make_line(tmp_path, kind="soft", monkeypatch=None):
    """An initialised, opened line in tmp_path/"line" on the soft keystore or a throwaway
    SoftHSM2 token; the SCP03 master is hsm_support.MASTER_KEY."""
    workdir = tmp_path / "line"
    if kind == "pkcs11":
        init_softhsm_token(tmp_path, monkeypatch)
        environ = dict(os.environ, FLEETID_HSM_PIN=USER_PIN)
        uri = "pkcs11:module=%s;token=%s;pin-env=FLEETID_HSM_PIN" % (SOFTHSM_MODULE,
                                                                      TOKEN_LABEL)
        # An HSM line adopts its root and issuing CA (made on the token as `fleetid pki
        # init-root` / `new-ca` make them); its audit witness key has a keystore of its own.
        environ[workdir_mod.PASS_ENV] = KEYSTORE_PASS
        root, cas = _pki_on_token(uri, environ, tmp_path)
        witness = "soft:%s;pass-env=%s" % (tmp_path / "witness-keystore.json",
                                           workdir_mod.PASS_ENV)
        return init_demo_line(str(workdir), hsm_uri=uri, environ=environ,
                              master_key=bytearray(MASTER_KEY), root=root, cas=cas,
                              witness_hsm_uri=witness)
    return init_demo_line(str(workdir), scrypt_n=TEST_SCRYPT_N,
                            master_key=bytearray(MASTER_KEY), environ=LINE_ENV)


def known_lot(line, count, chip_cls=Chip, vendor=None, batch="lot-test", import_keys=True):
    """A lot whose transport keys the test knows.  Returns (ChipLot, (enc, mac, dek))."""
    keys = tuple(os.urandom(16) for _ in range(3))
    chips = []
    for _ in range(count):
        made = lot_mod.fab_in_memory(vendor or lot_mod.vendor_for(line), keys)
        made.chip = chip_cls(made.nvm)
        chips.append(made)
    if import_keys:
        line.hsm.import_transport_keys(batch, *(bytearray(k) for k in keys))
    return lot_mod.ChipLot(batch, chips), keys


def chip_bus_factory(chips, clock=None):
    """reconcile()'s chip access: a fresh endpoint to the chip with that UID."""
    by_uid = {c.uid: c for c in chips}

    def chip_bus(se_uid):
        made = by_uid.get(bytes(se_uid))
        if made is None:
            return None
        made.chip.power_loss()  # re-seated on the programmer: a power cycle
        return BusEndpoint(made.chip, clock=clock)

    return chip_bus


def _slot_scalar(nvm, slot):
    record = nvm.get("key/%d" % slot)
    return None if record is None else bytes(record[1:33])


def secret_values(line, chips, transport_keys):
    """Every secret the line must never write: per-device SCP03 keys (recomputed from the
    master), transport keys, the master, chip private keys (identity + MAK), and, for the
    soft backend, every private scalar in the keystore (test-only access)."""
    found = [MASTER_KEY] + list(transport_keys)
    for made in chips:
        found.extend(reference_device_keys(MASTER_KEY, made.uid))
        for slot in (C.SLOT_MAK, C.SLOT_IDENTITY):
            scalar = _slot_scalar(made.nvm, slot)
            if scalar is not None:
                found.append(scalar)
    entry = getattr(line.hsm, "_entry", None)
    if entry is not None:
        for role, label in line.labels.items():
            if role == "transport_wrap":  # RSA: its primes and private exponent
                private = serialization.load_der_private_key(
                    bytes(entry(label, "rsa-unwrap")[1]), password=None).private_numbers()
                found.extend(n.to_bytes((n.bit_length() + 7) // 8, "big")
                             for n in (private.p, private.q, private.d))
                continue
            kind = "aes-master" if label == line.labels["master"] else "ec-p256"
            found.append(bytes(entry(label, kind)[1]))
        for label, stored in line.hsm._doc["keys"].items():  # the shipments' KEKs
            if stored["kind"] == "aes-kek":
                found.append(bytes(entry(label, "aes-kek")[1]))
    witness_entry = getattr(line.witness_hsm, "_entry", None)
    if witness_entry is not None:
        found.append(bytes(witness_entry(line.witness_label, "ec-p256")[1]))
    return found


def encodings(secret):
    """The forms a secret could be written in: raw, hex (both cases), base64."""
    hexed = secret.hex()
    return [secret, hexed.encode(), hexed.upper().encode(), base64.b64encode(secret),
            base64.b64encode(secret).rstrip(b"=")]


def files_under(directory):
    out = []
    for root, _dirs, names in os.walk(directory):
        for name in names:
            out.append(os.path.join(root, name))
    return sorted(out)


def scan(paths, secrets, texts=()):
    """[(path, secret index)] of every secret found in any file or text."""
    hits = []
    blobs = []
    for path in paths:
        with open(path, "rb") as f:
            blobs.append((path, f.read()))
    for i, text in enumerate(texts):
        blobs.append(("text#%d" % i, text.encode() if isinstance(text, str) else text))
    for index, secret in enumerate(secrets):
        for form in encodings(secret):
            for name, blob in blobs:
                if form in blob:
                    hits.append((name, index))
    return hits


def check_invariants(line, chips, allow_in_flight=False):
    """The line's promises after any fault (and a reconcile):

    - every certificate on a chip is a committed identity or revoked in the registry;
    - every committed device went through a confirmed injection: its chip is SECURED,
      holds the committed certificate and the diversified key set (and no transport set),
      and the certificate's key is the chip's identity key;
    - every journaled certificate is committed or revoked;
    - serials are unique and never reused; one committed identity per chip;
    - nothing left in flight (unless allowed); the audit chain verifies.
    Returns: (committed count, held count).
    """
    registry = line.registry
    committed = held = 0
    seen_serials = set()
    for made in chips:
        nvm = made.nvm
        devices = registry.find_by_se_uid(made.uid)
        live = [d for d in devices if d.status == COMMITTED]
        assert len(live) <= 1, "two committed identities for one chip"
        for device in devices:
            assert device.serial not in seen_serials, "serial %s reused" % device.serial
            seen_serials.add(device.serial)
            if device.status == INTENT:
                assert allow_in_flight, "device %s still in flight" % device.serial
            elif device.status != COMMITTED:
                held += 1
        chip_cert = nvm.get("cert/%d" % C.SLOT_IDENTITY)
        if chip_cert is not None:
            on_chip = x509.load_der_x509_certificate(bytes(chip_cert))
            if not (live and live[0].identity_fingerprint == _fp(chip_cert)):
                status = registry.certificate_status(on_chip.serial_number,
                                                     issuer=on_chip.issuer.rfc4514_string())
                assert status.revoked, "certificate on chip neither committed nor revoked"
        if live:
            committed += 1
            device = live[0]
            assert nvm.get("lc") == bytes((C.LC_SECURED,))
            assert chip_cert is not None and _fp(chip_cert) == device.identity_fingerprint
            enc, mac, dek = reference_device_keys(MASTER_KEY, made.uid)
            assert nvm.get("scp/%02x" % C.SCP03_KVN_DEVICE) == enc + mac + dek
            assert nvm.get("scp/%02x" % C.SCP03_KVN_TRANSPORT) is None
            record = nvm.get("key/%d" % C.SLOT_IDENTITY)
            cert = x509.load_der_x509_certificate(bytes(chip_cert))
            point = cert.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
            assert bytes(record[33:98]) == point
    for serial, _uid, cert_der in line.journal.entries():
        device = registry.get_device(serial)
        if device.status == COMMITTED and device.identity_fingerprint == _fp(cert_der):
            continue
        cert = x509.load_der_x509_certificate(cert_der)
        status = registry.certificate_status(cert.serial_number,
                                             issuer=cert.issuer.rfc4514_string())
        assert status.revoked, "journaled certificate of %s not revoked" % serial
    if not allow_in_flight:
        assert registry.list_in_flight() == []
    verify_registry_log(registry, *line.public_keys())
    return committed, held


def _fp(der):
    return hashlib.sha256(bytes(der)).hexdigest()
