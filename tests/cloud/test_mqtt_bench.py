"""bench/mqtt.py runs (a small configuration): telemetry through the broker to the cloud,
and a retained CRL to subscribed devices, with its figures printed."""

import subprocess
import sys

import pytest

from tests.cloud.mqtt_support import ROOT_DIR, require_mosquitto

pytestmark = pytest.mark.timeout(300)


def test_bench_mqtt_small_run_prints_its_figures():
    require_mosquitto()
    proc = subprocess.run([sys.executable, str(ROOT_DIR / "bench" / "mqtt.py"), "--devices",
                           "20", "--publishers", "2", "--seconds", "1"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "msg/s" in proc.stdout and "replays refused 0" in proc.stdout
    assert "to 20 subscribed devices" in proc.stdout
