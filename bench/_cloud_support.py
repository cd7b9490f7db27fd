"""A whole fleet for the EST and verifier tests: HSM (software keystore), root and two
batch CAs, an SE vendor, a registry, provisioned devices, and the cloud servers running
in a background event loop on 127.0.0.1.

Device keys.  A device's private keys live in its SE; Python's `ssl` cannot sign a TLS
CertificateVerify with an SE-held key, so the TLS clients in these tests use the software
key the test vendor (attestation_support.SoftVendor) generated "inside the chip" and
wrote to a 0600 PEM file beside the certificate.  The attestation the cloud checks is
the same either way; the SE-held-key TLS client is a later issue.

It imports fleetid and the runtime dependencies only (never tests/, pytest or hypothesis):
bench/est.py, mtls.py and revocation.py run on it from `bash scripts/setup.sh` alone, and
tests/cloud/cloud_support.py re-exports it for the tests.
"""

import asyncio
import datetime
import http.client
import os
import pathlib
import ssl
import threading

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud import audit
from fleetid.cloud.ca import IssuingCa
from fleetid.cloud.est.service import EstLabel, EstService
from fleetid.cloud.hsm.soft_backend import SoftBackend
from fleetid.cloud.pki import init_root, new_ca
from fleetid.cloud.pki.profiles import server_certificate_builder
from fleetid.cloud.pki.signing import sign_certificate
from fleetid.cloud.registry import IdentityRecord
from fleetid.cloud.registry.memory import MemoryRegistry
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
from fleetid.cloud.server import CloudServer, event_loop_factory
from fleetid.cloud.revocation.service import RevocationService
from fleetid.cloud.verifier.revoked_cas import RevokedCaFile
from fleetid.cloud.verifier.service import FleetTrust, FleetVerifier
from bench._attestation_support import CountingHsm, SoftVendor, enrolment, make_csr, new_key
from bench._support import KEYSTORE_PASS, SCRYPT_N

NOW = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
PEM = serialization.Encoding.PEM


class Clock:
    """The fleet's wall clock: real time plus an offset tests can move."""

    def __init__(self):
        self.offset = datetime.timedelta(0)

    def __call__(self):
        return datetime.datetime.now(datetime.timezone.utc) + self.offset

    def advance(self, **delta):
        self.offset += datetime.timedelta(**delta)


class LoopThread:
    """An asyncio loop on a daemon thread: run(coro) waits (bounded) for its result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def read_http_answers(sock, count=1, head_only=False):
    """`count` HTTP/1.1 answers read off one connection (a socket or TLS socket):
    [(status, headers with lower-case names, body)] (head_only: answers to HEAD, which
    announce a length and send no body).  Raises ConnectionError when the connection
    closes first."""
    data = b""
    answers = []
    while len(answers) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            head = data[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = 0 if head_only else int(headers.get("content-length", 0))
            if len(data) >= end + 4 + length:
                answers.append((int(head[0].split()[1]), headers,
                                data[end + 4:end + 4 + length]))
                data = data[end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed after %d answers" % len(answers))
        data += chunk
    return answers


def revocation_config(fleet, folder, extra=""):
    """A cloud TOML in `folder` on the fleet's PKI and registry (labels b42, b43; state
    under folder/state), `extra` appended to its [cloud] table.  Returns its path."""
    folder = pathlib.Path(folder)
    for name, cert in (("root", fleet.root), ("b42", fleet.ca_certs["b42"]),
                       ("b43", fleet.ca_certs["b43"]), ("vendor", fleet.vendor.root)):
        (folder / (name + ".pem")).write_bytes(pem(cert))
    config = folder / "cloud.toml"
    config.write_text(
        '[cloud]\nstate_dir = "state"\nroots = ["root.pem"]\n'
        'intermediates = ["b42.pem", "b43.pem"]\nvendor_roots = ["vendor.pem"]\n'
        'registry = "sqlite:%s"\n' % os.path.join(fleet.dir, "registry.db") + extra
        + '[[cloud.labels]]\nname = "b42"\nca_key = "ca-widget-b42"\nca_cert = "b42.pem"\n'
        'default = true\n'
        '[[cloud.labels]]\nname = "b43"\nca_key = "ca-widget-b43"\nca_cert = "b43.pem"\n')
    return str(config)


def pem(cert):
    return cert.public_bytes(PEM)


def key_pem(key):
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def der(cert):
    return cert.public_bytes(serialization.Encoding.DER)


class Device:
    """A provisioned device: registry serial, chip, identity key/cert, and the current
    operational key/cert once enrolled."""

    def __init__(self, fleet, serial, chip, batch, key, cert):
        self.fleet = fleet
        self.serial = serial
        self.name = str(serial)
        self.chip = chip
        self.batch = batch
        self.identity_key, self.identity_cert = key, cert
        self.key, self.cert = key, cert

    def files(self, cert=None, key=None):
        """(cert path, key path) PEM files for a TLS client (key file mode 0600)."""
        cert = cert or self.cert
        key = key or self.key
        base = os.path.join(self.fleet.dir, "dev-%s-%s" % (self.name, der(cert)[-8:].hex()))
        with open(base + ".pem", "wb") as f:
            f.write(pem(cert))
        fd = os.open(base + ".key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem(key))
        return base + ".pem", base + ".key"

    def csr(self, label="b42", nonce=None, **fields):
        """(new key, attested CSR DER) for this device, with a fresh nonce of `label`'s CA."""
        nonce = nonce or self.fleet.cas[self.fleet.label_batch(label)].issue_nonce()
        return enrolment(self.chip, nonce, self.name, **fields)


class Fleet:
    """Everything of one fleet, in `directory`.  `registry_kind`: "sqlite" / "memory" or
    a Registry instance.  verify_signatures: the issuing CAs' policy ("always" in tests:
    every HSM signature checked; the benchmarks use the EST server's "first").  hsm: an
    opened HSM backend to hold the fleet's keys (default: a soft keystore in `directory`)."""

    def __init__(self, directory, registry_kind="sqlite", overlap=datetime.timedelta(days=7),
                 verify_signatures="always", hsm=None):
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.clock = Clock()
        self.hsm = CountingHsm(hsm or SoftBackend(os.path.join(self.dir, "keystore.json"),
                                                  KEYSTORE_PASS, scrypt_n=SCRYPT_N))
        self.root, _ = init_root(self.hsm, "fleet-root", "CN=Test Fleet Root,O=Acme", 30,
                                 os.path.join(self.dir, "ceremony"), ["alice", "bob"],
                                 now=NOW - datetime.timedelta(days=400))
        self.ca_certs = {}
        self.cas = {}
        self.vendor = SoftVendor(not_before=NOW - datetime.timedelta(days=800))
        for batch in ("b42", "b43"):
            cert = new_ca(self.hsm, "fleet-root", self.root, "ca-widget-" + batch,
                          {"product": "widget", "batch": batch, "region": "eu"},
                          now=NOW - datetime.timedelta(days=300))
            self.ca_certs[batch] = cert
            self.cas[batch] = IssuingCa(self.hsm, "ca-widget-" + batch, cert,
                                        [self.vendor.root], clock=self.clock,
                                        verify_signatures=verify_signatures)
        if registry_kind == "sqlite":
            self.registry = SqliteRegistry(os.path.join(self.dir, "registry.db"))
        elif registry_kind == "memory":
            self.registry = MemoryRegistry()
        else:
            self.registry = registry_kind
        self.revoked_cas_path = os.path.join(self.dir, "revoked-cas.jsonl")
        self.trust = FleetTrust([self.root], list(self.ca_certs.values()), [self.vendor.root],
                                revoked_ca_file=RevokedCaFile(self.revoked_cas_path))
        self.labels = [
            EstLabel("b42", self.cas["b42"], [self.ca_certs["b42"], self.root]),
            EstLabel("b43", self.cas["b43"], [self.ca_certs["b43"], self.root]),
            EstLabel("b42-approval", self.cas["b42"], [self.ca_certs["b42"], self.root],
                     require_approval=True, retry_after=30),
        ]
        self.est = EstService(self.labels, self.registry, self.trust, default_label="b42",
                              overlap=overlap, clock=self.clock)
        self.verifier = FleetVerifier(self.trust, self.registry, clock=self.clock)
        self.revocation = RevocationService(
            self.registry, list(self.ca_certs.values()), self.revoked_cas_path,
            os.path.join(self.dir, "revocation.events"), listeners=[self.verifier.invalidate])
        self._server_files()

    def revoke_certificate(self, certificate, reason, operator=""):
        """Revoke `certificate` through the one writer (RevocationService), as `fleetid
        revoke --cert` does.  Returns its CertificateRecord."""
        return self.revocation.revoke_certificate(
            certificate.serial_number, reason, operator=operator,
            issuer=certificate.issuer.rfc4514_string())

    def label_batch(self, label):
        return {"b42": "b42", "b43": "b43", "b42-approval": "b42"}.get(label, "b42")

    def _server_files(self):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = server_certificate_builder(key.public_key(), self.root,
                                             ["localhost", "127.0.0.1"], NOW)
        cert = sign_certificate(self.hsm, "fleet-root", builder, self.root.public_key())
        self.server_cert = os.path.join(self.dir, "server.pem")
        self.server_key = os.path.join(self.dir, "server.key")
        self.root_file = os.path.join(self.dir, "root.pem")
        with open(self.server_cert, "wb") as f:
            f.write(pem(cert))
        with open(self.server_key, "wb") as f:
            f.write(key_pem(key))
        with open(self.root_file, "wb") as f:
            f.write(pem(self.root))
        self.signatures_at_start = self.hsm.signatures

    # -- the factory line, condensed ---------------------------------------------------------

    def provision(self, batch="b42", chip=None, now=None):
        """Run the line's essentials for one chip: intent, attested identity certificate,
        commit (record + audit entry).  Returns Device."""
        chip = chip or self.vendor.make_chip()
        ca = self.cas[batch]
        serial = self.registry.allocate_serial()
        self.registry.write_intent(serial, chip.se_uid, "line-1/st-1", operator="op-1",
                                   batch=batch, hsm_session="pool/1")
        nonce = ca.issue_nonce(now=now)
        key, csr = enrolment(chip, nonce, str(serial))
        cert = ca.issue(csr, chip.se_uid, str(serial), "identity", now=now)
        cert_der = der(cert)
        record = IdentityRecord(serial=serial, se_uid=chip.se_uid, identity_cert_der=cert_der,
                                slot=2, aid=bytes.fromhex("a000000620466c656574"),
                                batch=batch, station="line-1/st-1", operator="op-1",
                                hsm_session="pool/1",
                                attestation_hash=audit.attestation_hash(csr))
        facts = audit.certificate_facts(cert_der)
        entry = audit.injection_entry(
            serial=serial, se_uid=chip.se_uid, slot=2, aid=record.aid,
            cert_serial=facts["cert_serial"], cert_fingerprint=facts["cert_fingerprint"],
            issuing_ca=facts["issuing_ca"], batch=batch, station=record.station,
            operator=record.operator, hsm_session=record.hsm_session,
            attestation_hash=record.attestation_hash, when=self.clock())
        self.registry.commit_identity(record, entry)
        return Device(self, serial, chip, batch, key, cert)

    def enrol(self, device, label="b42"):
        """simpleenroll through the service; the device then uses the new certificate."""
        key, csr = device.csr(label)
        cert = self.est.enroll(label, der(device.identity_cert), csr)
        device.key, device.cert = key, cert
        return cert

    def snapshot(self):
        """Everything a refusal must leave unchanged: the audit head, every device row and
        certificate row, and the number of HSM signatures."""
        rows = []
        serial = 1
        while True:
            try:
                device = self.registry.get_device(serial)
            except Exception:  # noqa: BLE001 - past the last device
                break
            rows.append((device, tuple(self.registry.certificates(serial))))
            serial += 1
        return self.registry.head(), rows, self.hsm.signatures

    def close(self):
        self.registry.close()


class RunningCloud:
    """CloudServer (verifier + EST) in a background thread's event loop (event_loop:
    "asyncio", "uvloop" or "auto", as fleetid.cloud.server.event_loop_factory)."""

    def __init__(self, fleet, metrics_port=0, event_loop="asyncio", **server_kwargs):
        self.fleet = fleet
        self.server = CloudServer(fleet.verifier, fleet.est, fleet.server_cert,
                                  fleet.server_key, fleet.trust.ca_bundle_pem(),
                                  verifier_port=0, est_port=0, metrics_port=metrics_port,
                                  **server_kwargs)
        self.loop = event_loop_factory(event_loop)()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        self.ports = self.server.ports
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        return False

    def client_context(self, files=None, tls13=True):
        context = ssl.create_default_context(cafile=self.fleet.root_file)
        if not tls13:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        if files:
            context.load_cert_chain(*files)
        return context

    def request(self, service, method, path, files=None, body=None, headers=None,
                tls13=True):
        """One HTTPS request.  Returns (status, headers dict, body bytes)."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.ports[service], timeout=20,
                                           context=self.client_context(files, tls13))
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


def rogue_certificate(fleet, device, extension=None, key=None, batch="b42"):
    """A certificate for `device`'s serial signed by the fleet CA *directly* with the HSM
    (the careless insider: no attestation check), optionally with an attestation
    extension of the attacker's choosing; recorded in the registry as the insider would.
    Returns (key, certificate)."""
    from fleetid.cloud.pki import profiles

    key = key or new_key()
    extra = [(extension, False)] if extension is not None else []
    builder = profiles.device_builder("operational", device.name, key.public_key(),
                                      fleet.ca_certs[batch], fleet.clock(),
                                      extra_extensions=extra)
    cert = sign_certificate(fleet.hsm, "ca-widget-" + batch, builder)
    fleet.registry.add_certificate(device.serial, der(cert), "operational")
    return key, cert


__all__ = ["Fleet", "Device", "RunningCloud", "Clock", "rogue_certificate", "make_csr",
           "new_key", "NOW", "der", "pem"]
