"""Smoke test of bench/mtls.py: a tiny bounded run against nginx prints both ratios."""

import os
import shutil
import subprocess
import sys

from tests.conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_mtls_bench_runs_against_nginx_and_prints_ratios():
    require(shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"),
            "nginx (apt-get install nginx-light)")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "mtls.py"),
                             "--quick", "--connections", "30", "--devices", "3"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert " 0 errors" in result.stdout
    assert "ratio fleetid/nginx, full handshakes:" in result.stdout
    assert "ratio fleetid/nginx, resumed handshakes:" in result.stdout
    assert "ratio fleetid/nginx-sc, full handshakes:" in result.stdout
