#!/usr/bin/env bash
# Set up a virtual environment with fleetid installed (editable) and, with --test, the test
# extras and the Debian packages the test suite needs.  Idempotent; safe to re-run.
# Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

# Debian packages: Python 3.11+ with venv for the core; openssl and curl for the demo; with
# --test, the services the suite starts itself (SoftHSM2, PostgreSQL, nginx).
apt_pkgs=()
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_pkgs+=(python3-venv)
if [ $want_test = 1 ]; then
    # SoftHSM2: the PKCS#11 token the HSM backend is tested against.
    [ -e /usr/lib/softhsm/libsofthsm2.so ] || apt_pkgs+=(softhsm2)
    # PostgreSQL: the scale-out registry backend (tests start a throwaway server).
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_pkgs+=(postgresql)
    # nginx: the mTLS baseline of bench/mtls.py and its smoke test.
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || apt_pkgs+=(nginx-light)
    # systemd: systemd-analyze verify / systemd-sysusers check the agent's unit (boards/).
    command -v systemd-analyze >/dev/null 2>&1 || apt_pkgs+=(systemd)
fi
# mosquitto: the MQTT broker the demo's MQTT step, the MQTT tests and bench/mqtt.py start.
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || apt_pkgs+=(mosquitto)
# openssl and curl: the independent EST and mTLS clients of the demo and the interop tests.
command -v openssl >/dev/null 2>&1 || apt_pkgs+=(openssl)
command -v curl >/dev/null 2>&1 || apt_pkgs+=(curl)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    echo "setup: installing Debian packages: ${apt_pkgs[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit("fleetid needs Python 3.11 or newer; this is " + sys.version.split()[0])
PY

[ -x .venv/bin/python ] || python3 -m venv .venv
# Every Python package at the exact version in constraints.txt (the toolchain CI last passed
# with); the build backend too (--build-constraint, once pip itself is at its pinned version).
.venv/bin/python -m pip install -q -c constraints.txt pip setuptools wheel
pin=(-c constraints.txt --build-constraint constraints.txt)
# setuptools warns on every editable install that a folder named like the package could
# shadow it; the package-dir mapping in pyproject.toml is what makes that safe here.
export PYTHONWARNINGS="ignore:Editable installation"
if [ $want_test = 1 ]; then
    # yubikey-manager is only used for its yubikit SCP03 host (an independent SCP03
    # implementation to test against); its pyscard dependency needs PC/SC, which the
    # tests do not use, so it is installed without dependencies.
    .venv/bin/python -m pip install -q "${pin[@]}" -e '.[test]'
    .venv/bin/python -m pip install -q "${pin[@]}" --no-deps yubikey-manager
    # micropython-lib's umqtt.simple for the unix-port MQTT tests, pinned by version and
    # sha256 (PyPI's uploads have no setup.py, so pip cannot fetch them; see the script).
    .venv/bin/python scripts/fetch_micropython_lib.py
else
    .venv/bin/python -m pip install -q "${pin[@]}" -e .
fi
echo "setup: ready ($(.venv/bin/python --version), fleetid at .venv/bin/fleetid)"
