"""A real `openssl s_server` (TLS 1.3 only) for the SE-keyed TLS 1.3 client, on the
line's PKI (no tests in this module; used by bench/tls.py and, through
tests/device/tls13_openssl_support.py, by tests/device/test_tls13_*.py).  Imports only
fleetid, so the bench runs from `scripts/setup.sh` alone.

`SServer(directory, cert_pem, key_pem, ca_pem, *options)` starts s_server on a free
127.0.0.1 port, waits (bounded) until it accepts, collects its output in a thread, and
takes interactive commands (`command("K")`: a TLS 1.3 KeyUpdate requesting ours).
`LineServerCerts(line_and_cloud)` issues server certificates under the line's fleet
root through the line's HSM (valid, expired, not yet valid) and one under a foreign root.
`counting_session(chip)` is a SeSession over the chip that counts APDUs per instruction.
"""

import collections
import datetime
import os
import shutil
import socket
import subprocess
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.mtls import free_port  # noqa: F401 - re-exported (its benches and tests)
from fleetid.cloud.pki.profiles import server_certificate_builder
from fleetid.cloud.pki.signing import sign_certificate
from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.device.se import SeSession

PEM = serialization.Encoding.PEM
OPENSSL = shutil.which("openssl")
START_TIMEOUT_S = 10.0


class SServer:
    """One `openssl s_server -tls1_3` process; close() stops it."""

    def __init__(self, directory, cert_pem, key_pem, ca_pem, *options, verify_client=True):
        self.port = free_port()
        args = [OPENSSL, "s_server", "-accept", "127.0.0.1:%d" % self.port, "-cert", cert_pem,
                "-key", key_pem, "-CAfile", ca_pem, "-naccept", "100"]
        if "-tls1_2" not in options:
            args.append("-tls1_3")
        if verify_client:
            args += ["-Verify", "4"]
        args += list(options)
        self.lines = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=str(directory))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("s_server did not start: %s" % self.output())
                time.sleep(0.05)

    def _read(self):
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.decode(errors="replace"))

    def output(self):
        with self._lock:
            return "".join(self.lines)

    def wait_for(self, text, timeout=10.0):
        """Wait (bounded) until `text` appears in the server's output.  Returns bool."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            time.sleep(0.02)
        return False

    def command(self, line):
        """A line on s_server's stdin (data for the client, or a command letter)."""
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def _write_key(path, key):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


class LineServerCerts:
    """Server certificates for s_server, written as PEM files in `directory`.

    Params: env: tests.device.device_cloud_support.LineAndCloud.
    Each method returns (cert_pem_path, key_pem_path).
    """

    def __init__(self, env, directory):
        self.env = env
        self.dir = str(directory)
        self.ca_pem = os.path.join(self.dir, "client-cas.pem")
        bundle = env.trust.ca_bundle_pem()
        with open(self.ca_pem, "wb") as f:
            f.write(bundle if isinstance(bundle, bytes) else bundle.encode())

    def _write(self, name, cert, key):
        cert_path = os.path.join(self.dir, name + ".pem")
        key_path = os.path.join(self.dir, name + ".key")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(PEM))
        _write_key(key_path, key)
        return cert_path, key_path

    def client(self, name="software-client"):
        """A clientAuth certificate under the fleet root with its key in a file (for
        `openssl s_client`, the software-key baseline of bench/tls.py)."""
        from fleetid.cloud.pki.profiles import tls_certificate_builder

        line = self.env.line
        key = ec.generate_private_key(ec.SECP256R1())
        builder = tls_certificate_builder(key.public_key(), line.root_cert, name,
                                          datetime.datetime.now(datetime.timezone.utc))
        cert = sign_certificate(line.hsm, line.labels["root"], builder,
                                line.root_cert.public_key())
        return self._write(name, cert, key)

    def root_pem(self):
        path = os.path.join(self.dir, "fleet-root.pem")
        with open(path, "wb") as f:
            f.write(self.env.line.root_cert.public_bytes(PEM))
        return path

    def fleet(self, name="server", hosts=("localhost", "127.0.0.1"), not_before=None, days=30):
        """A serverAuth certificate the fleet root signs (through the line's HSM)."""
        line = self.env.line
        key = ec.generate_private_key(ec.SECP256R1())
        now = not_before or datetime.datetime.now(datetime.timezone.utc)
        builder = server_certificate_builder(key.public_key(), line.root_cert, list(hosts),
                                             now, days=days)
        cert = sign_certificate(line.hsm, line.labels["root"], builder,
                                line.root_cert.public_key())
        return self._write(name, cert, key)

    def foreign(self, name="foreign"):
        """A serverAuth certificate for localhost under a root the device does not hold."""
        root_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign Root")])
        now = datetime.datetime.now(datetime.timezone.utc)
        root = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()),
                               critical=False)
                .sign(root_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        builder = server_certificate_builder(key.public_key(), root, ["localhost", "127.0.0.1"],
                                             now)
        return self._write(name, builder.sign(root_key, hashes.SHA256()), key)


class CountingChip:
    """chip.process with a count of APDUs per instruction name (se_consts.INS_NAMES)."""

    def __init__(self, chip):
        self.chip = chip
        self.counts = collections.Counter()

    def process(self, apdu):
        self.counts[C.INS_NAMES.get(apdu[1], "%02X" % apdu[1])] += 1
        return self.chip.process(apdu)

    def reset(self):
        self.counts.clear()

    def __getattr__(self, name):  # power_loss(), last_nvm_write_bytes, nvm: the chip's
        return getattr(self.chip, name)


def counting_session(made):
    """(SeSession, CountingChip) over a fresh boot of the line's chip `made`."""
    made.chip.power_loss()
    counting = CountingChip(made.chip)
    se = SeSession(ApduProtocol(counting.process))
    se.select()
    return se, counting
