"""The process test_group_commit_crash.py kills with SIGKILL (no tests in this module).

    python -m tests.cloud.group_commit_child est  DIR [--kill-at-commit N [--after]]
    python -m tests.cloud.group_commit_child line DIR [--kill-at-commit N [--after]]

est:  a fleet in DIR (bench/_cloud_support.Fleet: soft keystore, SQLite registry with
      group commit), devices provisioned and enrolled, then concurrent re-enrolments from
      several threads, each appending the fingerprint of the certificate it was handed to
      DIR/issued.txt (what the devices hold: "issued").
line: the line in DIR/line (initialised by the test), fresh lots one after the other,
      run_line with several stations on the emulated chips (zero latency).

Prints "ready" once the concurrent part starts.  --kill-at-commit N: the process kills
itself (SIGKILL) at the registry's N-th COMMIT of that part, just before it (the batch is
written into the transaction, not committed) or, with --after, just after it (committed,
no caller woken yet): the fault hook of this test, in this script, not in the library.
Without it the test kills the process at a random moment.
"""

import argparse
import hashlib
import os
import signal
import sys
import threading

from fleetid.cloud.line import runner
from fleetid.cloud.line import workdir as workdir_mod
from fleetid.sim import lot as lot_mod
from fleetid.sim.metering import EmulatedBuses

KEYSTORE_ENV = dict(os.environ, FLEETID_KEYSTORE_PASS="group-commit-crash-pass")
CALLERS = 6
ROUNDS = 400  # bound on the re-enrolments (the test kills the process long before)
LOTS = 40  # bound on the line's lots (likewise)


def kill_at_commit(registry, n, after):
    """Make registry's n-th COMMIT from now on kill this process (before / after it)."""
    original = registry._commit
    count = [0]

    def commit(conn):
        count[0] += 1
        if count[0] == n and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        original(conn)
        if count[0] == n and after:
            os.kill(os.getpid(), signal.SIGKILL)

    registry._commit = commit


def run_est(directory, args):
    from bench._cloud_support import Fleet, der

    fleet = Fleet(directory)
    devices = []
    for _ in range(CALLERS):
        device = fleet.provision()
        fleet.enrol(device)
        devices.append(device)
    issued = open(os.path.join(directory, "issued.txt"), "a")
    lock = threading.Lock()
    if args.kill_at_commit:
        kill_at_commit(fleet.registry, args.kill_at_commit, args.after)

    def device_loop(device):
        for _ in range(ROUNDS):
            key, csr = device.csr()
            cert = fleet.est.enroll("b42", der(device.cert), csr, reenroll=True)
            device.key, device.cert = key, cert
            with lock:  # the device holds it now: "issued"
                issued.write("%d %s\n" % (device.serial, hashlib.sha256(der(cert)).hexdigest()))
                issued.flush()

    threads = [threading.Thread(target=device_loop, args=(d,), daemon=True) for d in devices]
    print("ready", flush=True)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


def run_line(directory, args):
    line = workdir_mod.open_line(os.path.join(directory, "line"), environ=KEYSTORE_ENV)
    lot = lot_mod.make_lot(line, 16)
    if args.kill_at_commit:
        kill_at_commit(line.registry, args.kill_at_commit, args.after)
    print("ready", lot.batch, flush=True)
    for _ in range(LOTS):  # lot after lot until killed (bounded)
        runner.run_line(line.resources_for(lot.batch), lot.chips, EmulatedBuses("none"),
                        stations=4, measure_audit=False)
        lot = lot_mod.make_lot(line, 16)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("est", "line"))
    parser.add_argument("directory")
    parser.add_argument("--kill-at-commit", type=int, default=0)
    parser.add_argument("--after", action="store_true")
    args = parser.parse_args(argv)
    (run_est if args.mode == "est" else run_line)(args.directory, args)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
