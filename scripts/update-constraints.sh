#!/usr/bin/env bash
# Re-resolve constraints.txt: install fleetid with its test extras into a throwaway venv
# with no constraints (so every unpinned dependency takes its newest release), then freeze.
# Afterwards re-check what the pins protect (README, "Pinned toolchain"):
#   CI=true bash .ci/run                   the whole suite on the new versions
#   .venv/bin/python bench/micropython.py  heap minimums vs the budgets the tests enforce
# Usage: scripts/update-constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$tmp/venv/bin/python" -m pip install -q '.[test]'
"$tmp/venv/bin/python" -m pip install -q --no-deps yubikey-manager
{
    sed -n '1,/^$/{/^#/p}' constraints.txt
    for tool in pip setuptools wheel; do
        echo "$tool==$("$tmp/venv/bin/python" -m pip show "$tool" | sed -n 's/^Version: //p')"
    done
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^fleetid=='
} > constraints.txt.new
mv constraints.txt.new constraints.txt
git --no-pager diff --stat -- constraints.txt || true
echo "constraints.txt re-resolved; now run: CI=true bash .ci/run && .venv/bin/python bench/micropython.py"
