"""kill -9 of a process doing concurrent EST re-enrolments / parallel line stations over
the group-committed registry (cloud/registry/group_commit.py), at random moments and
just before / just after a batch's COMMIT; then the promises are checked on what is on
disk: every certificate a device was handed has its record (with its audit entry), no
record names a certificate that is not stored, the audit chain verifies, and after
`line reconcile` nothing is in flight and every journaled certificate is a committed
identity or revoked.  The child process: group_commit_child.py."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.line import workdir
from fleetid.cloud.line.reconcile import reconcile
from fleetid.cloud.registry import COMMITTED, verify_registry_log
from fleetid.cloud.registry.rotation import RotationState
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
from tests.cloud.group_commit_child import KEYSTORE_ENV
from tests.cloud.line_support import init_demo_line

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY_TIMEOUT_S = 120
# (kill at the N-th commit of the concurrent part, after it?) or None: a random moment.
KILLS = [None, (3, False), (4, True)]


def _run_and_kill(mode, directory, kill, seed):
    """Start the child, wait for "ready", then SIGKILL it (at a random moment, or let its
    commit hook do it).  Returns the words of its "ready" line.  Every wait is bounded."""
    argv = [sys.executable, "-m", "tests.cloud.group_commit_child", mode, str(directory)]
    if kill is not None:
        argv += ["--kill-at-commit", str(kill[0])] + (["--after"] if kill[1] else [])
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=KEYSTORE_ENV)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        line = b""
        while not line.startswith(b"ready") and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line and child.poll() is not None:
                break
        assert line.startswith(b"ready"), child.stderr.read()[-2000:]
        if kill is None:
            time.sleep(random.Random(seed).uniform(0.05, 0.6))
            child.send_signal(signal.SIGKILL)
        child.wait(60)
        assert child.returncode == -signal.SIGKILL, (child.returncode,
                                                     child.stderr.read()[-2000:])
        return line.decode().split()[1:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
        child.stderr.close()


def _dummy_keys():
    # No checkpoint in a fleet registry: the verification needs keys but uses none.
    return (ec.generate_private_key(ec.SECP256R1()).public_key(),
            ec.generate_private_key(ec.SECP256R1()).public_key())


def _check_est_invariants(directory):
    issued = {}
    path = os.path.join(directory, "issued.txt")
    with open(path) as f:
        for text in f.read().splitlines():
            serial, fingerprint = text.split()
            issued.setdefault(int(serial), set()).add(fingerprint)
    registry = SqliteRegistry(os.path.join(directory, "registry.db"), group_commit=False)
    try:
        serial = 1
        while True:
            try:
                device = registry.get_device(serial)
            except Exception:  # noqa: BLE001 - past the last device
                break
            stored = {c.fingerprint for c in registry.certificates(serial)}
            # Every certificate a device was handed has its record ...
            assert issued.get(serial, set()) <= stored
            # ... no record names a certificate that is not stored ...
            state = RotationState.parse(device.rotation_state)
            assert {fp for fp in (state.old, state.new) if fp} <= stored
            # ... and every stored certificate came with its audit entry (one transaction).
            entries = [e.type for e in registry.audit_entries_for(serial)]
            assert len(stored) == entries.count("injection") + entries.count("issuance")
            serial += 1
        verify_registry_log(registry, *_dummy_keys())
        return sum(len(v) for v in issued.values())
    finally:
        registry.close()


@pytest.mark.parametrize("kill", KILLS, ids=["random", "before-commit", "after-commit"])
def test_kill_9_during_concurrent_reenrolments_loses_no_issued_certificate(tmp_path, kill):
    _run_and_kill("est", tmp_path, kill, seed=len(str(tmp_path)))
    issued = _check_est_invariants(str(tmp_path))
    if kill is not None and kill[1]:
        assert issued > 0  # killed after a commit: the batches before it were handed out


def _check_line_invariants(line):
    registry = line.registry
    assert registry.list_in_flight() == []
    for serial, _uid, cert_der in line.journal.entries():
        device = registry.get_device(serial)
        fingerprint = hashlib.sha256(cert_der).hexdigest()
        if device.status == COMMITTED and device.identity_fingerprint == fingerprint:
            continue
        found = [c for c in registry.certificates(serial) if c.fingerprint == fingerprint]
        assert found and found[0].revoked, "journaled certificate of %s not revoked" % serial
    serial, committed = 1, 0
    while True:
        try:
            device = registry.get_device(serial)
        except Exception:  # noqa: BLE001 - past the last device
            break
        if device.status == COMMITTED:  # a committed record has its certificate
            committed += 1
            assert device.identity_fingerprint in {
                c.fingerprint for c in registry.certificates(serial)}
        serial += 1
    verify_registry_log(registry, *line.public_keys())
    return committed


def test_kill_9_during_parallel_line_stations_then_reconcile(tmp_path):
    init_demo_line(str(tmp_path / "line"), scrypt_n=2**14, environ=KEYSTORE_ENV).close()
    for n, kill in enumerate(KILLS):
        batch = _run_and_kill("line", tmp_path, kill, seed=n)[0]
        line = workdir.open_line(str(tmp_path / "line"), environ=KEYSTORE_ENV)
        try:
            reconcile(line.resources_for(batch), chip_bus=None)
            _check_line_invariants(line)
        finally:
            line.close()
