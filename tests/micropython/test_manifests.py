"""The board freeze manifests stage the portable core under the CPython import names.

boards/esp32/manifest.py and boards/rp2040/manifest.py are run the way MicroPython's
makemanifest.py runs them (exec with the manifest's folder as the current directory and
include/package/module provided as functions), against a temporary copy of the tree, so
the test sees exactly which files a firmware would freeze and under which names.  Every
staged file must compile with mpy-cross and must not import CPython-only code.
"""

import os
import re
import shutil
import subprocess

import pytest

from tests.micropython.support import ROOT, ManifestRecorder, mpy_cross_only

pytestmark = pytest.mark.micropython


@pytest.fixture
def tree(tmp_path):
    # A copy of what the manifests read: common/, device/ and boards/.
    for folder in ("common", "device", "boards"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize("board", ["esp32", "rp2040"])
def test_board_manifest_freezes_common_and_device_as_fleetid(tree, board):
    rec = ManifestRecorder()
    rec.run(tree / "boards" / board / "manifest.py")
    assert rec.port_includes == ["$(PORT_DIR)/boards/manifest.py"]
    assert rec.packages == [("fleetid", str(tree / "var" / "mp-freeze"), 3)]
    assert rec.requires == ["umqtt.simple"]  # micropython-lib's MQTT client, never copied

    stage = tree / "var" / "mp-freeze"
    staged = sorted(str(p.relative_to(stage)) for p in stage.rglob("*.py"))
    expected = ["fleetid/__init__.py"]
    for folder in ("common", "device"):
        for source in sorted((ROOT / folder).glob("*.py")):
            expected.append("fleetid/%s/%s" % (folder, source.name))
    assert staged == sorted(expected)
    assert "fleetid/device/se.py" in staged and "fleetid/common/t1link.py" in staged
    assert "fleetid/device/board.py" in staged  # the one agent entry point of main.py
    assert not any("host" in name or "bus_linux" in name for name in staged)


def test_shared_manifest_has_no_hand_written_exclude_list():
    # CPython-only code stays out because it lives in the host/ sub-packages, not because
    # the manifest names files: nothing CPython-only sits directly in common/ or device/.
    text = (ROOT / "boards" / "fleetid_manifest.py").read_text()
    assert "EXCLUDE" not in text and "bus_linux" not in text
    assert not (ROOT / "device" / "bus_linux.py").exists()
    assert (ROOT / "device" / "host" / "bus_linux.py").exists()


def test_staged_core_compiles_for_micropython_and_stays_portable(tree):
    mpy_cross = mpy_cross_only()
    ManifestRecorder().run(tree / "boards" / "esp32" / "manifest.py")
    stage = tree / "var" / "mp-freeze"
    cpython_only = re.compile(r"^\s*(from|import)\s+(cryptography|asn1crypto|fcntl|ctypes|"
                              r"fleetid\.common\.host|fleetid\.sim|fleetid\.cloud|click)\b",
                              re.M)
    for source in stage.rglob("*.py"):
        text = source.read_text()
        assert not cpython_only.search(text), source
        subprocess.run([mpy_cross, "-O3", "-o", os.devnull, str(source)], check=True,
                       timeout=60)
