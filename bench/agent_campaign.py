"""Randomized rotation campaign of the device agent: 1,000+ rotations through the real
EST CA and verifier (in one process, TLS over loopback with the client key in an emulated
SE), under seeded random link drops, server 5xx, lost answers, 202 + Retry-After,
process kills and SE power cuts at random NVM writes.  Every failed cycle is followed by
a check that the verifier accepts the credential the journal designates; every rotation
must end settled (journal final, no spare key, certificate matches its key).  Prints the
counts.

    .venv/bin/python bench/agent_campaign.py [--quick] [--rotations N] [--seed S]
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._support import Fleet, campaign  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 rotations")
    parser.add_argument("--rotations", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fault-rate", type=float, default=0.12,
                        help="probability of a fault at each network call")
    parser.add_argument("--cut-rate", type=float, default=0.25,
                        help="probability of an SE power cut per rotation")
    args = parser.parse_args(argv)
    rotations = args.rotations or (100 if args.quick else 1000)
    with tempfile.TemporaryDirectory() as work:
        fleet = Fleet(work, devices=1)
        try:
            started = time.perf_counter()
            counts = campaign(fleet, rotations, args.seed, fault_rate=args.fault_rate,
                              cut_rate=args.cut_rate)
            elapsed = time.perf_counter() - started
        finally:
            fleet.close()
    result = counts.as_dict()
    print("agent campaign: %d rotations, seed %d, %.1f s (%.0f ms per rotation)"
          % (counts.rotations, args.seed, elapsed, 1000 * elapsed / max(1, counts.rotations)))
    print("| count | value |")
    print("|---|---|")
    for name in counts.FIELDS:
        print("| %s | %d |" % (name, result[name]))
    print(json.dumps(result))
    return 0 if counts.refused_credentials == 0 and counts.rotations == rotations else 1


if __name__ == "__main__":
    sys.exit(main())
