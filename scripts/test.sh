#!/usr/bin/env bash
# Set up and run the whole test suite.  This is the README's test command; .ci/run calls it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k t1 -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# Two pytest-xdist workers, one test file at a time each (about 6 minutes on 2 cores; one
# process takes about 12).  Extra arguments come after these: `scripts/test.sh -n 0` runs
# in one process, `-n 4` in four.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "$@"
