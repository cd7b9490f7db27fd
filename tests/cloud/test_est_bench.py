"""Smoke test of bench/est.py: a tiny bounded run prints the attested/raw ratio, and the
HTTPS run against `fleetid cloud serve --workers 2` resumes the devices' TLS sessions."""

import re

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_est_bench_runs_and_prints_the_ratio():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "est.py"),
                             "--quick", "--count", "12", "--devices", "3",
                             "--workers-list", "2"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ratio attested/raw:" in result.stdout
    assert "CPU per certificate:" in result.stdout
    resumed = re.search(r"HTTPS, 2 workers\).*?(\d+)% resumed", result.stdout)
    assert resumed and int(resumed.group(1)) > 0, result.stdout


def test_est_bench_profile_prints_the_split_by_area():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "est.py"),
                             "--quick", "--count", "12", "--devices", "3",
                             "--workers-list", "", "--profile"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "profiled CPU ms per certificate by area" in result.stdout
    for area in ("registry (cloud/registry/", "issuing CA", "EST service"):
        assert area in result.stdout, result.stdout
