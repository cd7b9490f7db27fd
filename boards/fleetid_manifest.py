# MicroPython manifest fragment: freeze the portable core as `fleetid.common` and
# `fleetid.device`, the same import names as on CPython.  Included by the board manifests
# (boards/esp32/manifest.py, boards/rp2040/manifest.py); see boards/README.md.
#
# The source folders are `common/` and `device/`, but a frozen module's import name is its
# path under base_path, so they are first staged as var/mp-freeze/fleetid/{common,device}
# (var/ is git-ignored).  makemanifest.py runs a manifest with its folder as the current
# directory, so the repository root is "..".
#
# Not frozen: the sub-packages common/host/ and device/host/, where every CPython-only
# module lives (`cryptography`/asn1crypto helpers, the TLS and EST clients, the i2c-dev /
# spidev backend on fcntl/ctypes).  Only the .py files directly in common/ and device/ are
# staged, so nothing needs to be listed here.

import os
import shutil

_REPO = os.path.abspath("..")
_STAGE = os.path.join(_REPO, "var", "mp-freeze")


def _stage_fleetid():
    root = os.path.join(_STAGE, "fleetid")
    if os.path.isdir(root):
        shutil.rmtree(root)
    os.makedirs(root)
    with open(os.path.join(root, "__init__.py"), "w") as f:
        f.write("")
    staged = []
    for folder in ("common", "device"):
        os.makedirs(os.path.join(root, folder))
        for name in sorted(os.listdir(os.path.join(_REPO, folder))):
            rel = folder + "/" + name
            if not name.endswith(".py"):
                continue  # sub-packages (common/host, device/host) and non-Python files
            shutil.copyfile(os.path.join(_REPO, folder, name), os.path.join(root, folder, name))
            staged.append("fleetid/" + rel)
    return staged


FLEETID_FROZEN = _stage_fleetid()
# MQTT on the board: micropython-lib's MQTT 3.1.1 client, resolved by the firmware build
# from its micropython-lib checkout (fleetid.device.mqtt.UmqttTransport imports it).
require("umqtt.simple")
# opt=3: strip asserts and line numbers, as on a production image (inputs are never
# validated with assert in fleetid, so nothing is lost).
package("fleetid", base_path=_STAGE, opt=3)
