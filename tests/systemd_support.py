"""What the systemd unit tests share (tests/device/test_agent_systemd_unit.py for the
board's agent, tests/cloud/test_deploy_units.py for the cloud): reading unit and
environment files, and an install.sh run for real into a temporary root (DESTDIR) from
a wheel of this checkout, with the host's unit files beside it so targets resolve."""

import functools
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from tests.conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_UNITS = ("/usr/lib/systemd/system", "/lib/systemd/system")


def unit_entries(path):
    """{key: [values]} of a unit file (systemd allows a key more than once)."""
    entries = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";", "[")):
                continue
            key, _, value = line.partition("=")
            entries.setdefault(key, []).append(value)
    return entries


def env_file(path):
    """{name: value} of an EnvironmentFile (comments and blank lines skipped)."""
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key] = value
    return env


@functools.lru_cache(maxsize=None)
def _wheel():
    # One wheel of this checkout per test session (building it takes a while).
    wheels = pathlib.Path(tempfile.mkdtemp(prefix="fleetid-wheel-"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), ROOT],
                   check=True, timeout=300, capture_output=True)
    return next(wheels.glob("fleetid-*.whl"))


def install_root(base, install_sh):
    """Run `install_sh WHEEL` with DESTDIR=<base>/root (the venv installed with --no-deps
    --no-index from a wheel of this checkout), copy the host's unit files into the root.
    Returns (root, wheel, env).  Skips (fails under CI) without systemd's tools."""
    require(shutil.which("systemd-analyze"), "systemd-analyze (Debian package systemd)")
    require(shutil.which("systemd-sysusers"), "systemd-sysusers (Debian package systemd)")
    units = next((d for d in SYSTEM_UNITS if os.path.isdir(d)), None)
    require(units, "the host's systemd unit files (/usr/lib/systemd/system)")
    wheel = _wheel()
    root = base / "root"
    env = dict(os.environ, DESTDIR=str(root), FLEETID_PIP_OPTS="--no-deps --no-index",
               PYTHON=sys.executable)
    run = subprocess.run(["sh", install_sh, str(wheel)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    shutil.copytree(units, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    return root, wheel, env
