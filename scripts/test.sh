#!/usr/bin/env bash
# Set up and run the whole test suite.  This is the README's test command; .ci/run calls it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k t1 -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# Two pytest workers (pytest-xdist), one test file at a time each (--dist loadfile: a
# file's module fixtures, e.g. its PostgreSQL cluster, and its order stay in one process);
# every server a test starts is on a free port, so two files never collide.  On 2 cores
# this is about 6 minutes instead of 12 in one process.  `scripts/test.sh -n 0` runs
# everything in one process.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "$@"
