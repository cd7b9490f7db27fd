#!/usr/bin/env bash
# Set up and run the whole test suite.  This is the README's test command; .ci/run calls it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k t1 -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# -n is not used: the suite is sized for 2 cores and runs its servers itself.
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
