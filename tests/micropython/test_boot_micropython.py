"""Signed boot (device/boot.py) under the real MicroPython interpreter, against the
emulator over its Unix socket: an image signed by imgtool is streamed from a file, checked
(hash, KEYHASH against the SE's firmware key, signature verified in the SE, SEC_CNT
against COUNTER_FIRMWARE) and confirmed; an image signed with another key and a rolled
back one are refused with their reasons.  CPython then reads the counter the run left.

Heap: the script runs at its budget from tests/micropython/budgets.py ("run_boot": the
minimum bench/micropython.py bisected, plus 25 %).  On the unix port imported bytecode
lives in the heap (firmware keeps it in flash), so most of the minimum is code, not data:
device/boot.py holds about 8 KB once imported, and the 40 KiB image is streamed through
one 512-byte buffer.
"""

import pytest

from fleetid.common import se_consts as C
from fleetid.common import t1
from fleetid.common.apdu import ApduProtocol
from fleetid.common.t1link import T1Link
from fleetid.device.bus import open_bus
from fleetid.device.se import SeSession
from tests.device.boot_support import ImgtoolKeys, provision_firmware_key, sign_image
from tests.micropython.support import PRELUDE, Stage, open_se_script, parse, serve_chip

pytestmark = pytest.mark.micropython

SCRIPT = PRELUDE + open_se_script("fleetid.device.boot") + r"""
from fleetid.device.boot import BootError
from fleetid.device import boot


def attempt(path):
    f = open(path, "rb")
    try:
        return boot.check_image(se, f, MAX_SIZE)
    except BootError as exc:
        print("refused", exc.reason)
    finally:
        f.close()


report = attempt(GOOD)
for name, verdict, detail in report.checks:
    print("check", name, verdict)
print("version", report.version_string(), report.security_counter, report.se_counter)
show("hash", report.image_hash)
report = None
gc.collect()
attempt(OTHER)
gc.collect()
report = attempt(GOOD)
print("confirmed", boot.confirm_boot(se, report))
report = None
attempt(OLDER)
link.close()
bus.close()
print("free", gc.mem_free())
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fleetid.sim.chip import Chip
    from fleetid.sim.fab import fab_chip
    from fleetid.sim.nvm import Nvm
    from tests.sim.chip_support import select_applet

    folder = tmp_path_factory.mktemp("mpboot")
    keys = ImgtoolKeys(folder)
    payload = bytes(range(256)) * 160  # 40 KiB: far larger than any buffer the check keeps
    images = {}
    for name, key, counter in (("good", keys.a, 6), ("other", keys.b, 6),
                               ("older", keys.a, 5)):
        path = folder / (name + ".img")
        path.write_bytes(sign_image(folder, key, payload, name, "3.1.4+15", counter))
        images[name] = str(path)
    nvm_path = str(folder / "chip.nvm")
    record = fab_chip(str(folder / "vendor"), nvm_path)
    chip = Chip(Nvm(nvm_path))
    select_applet(chip)
    provision_firmware_key(chip, record, keys.a_point)
    chip.power_loss()
    server, sock = serve_chip(chip, folder)
    stage = Stage(folder / "mp", opt=3)
    header = "SOCK = %r\nGOOD = %r\nOTHER = %r\nOLDER = %r\nMAX_SIZE = %d\n" % (
        sock, images["good"], images["other"], images["older"], 0x20000)
    try:
        yield stage, header, server, chip
    finally:
        server.stop()


def test_boot_check_under_micropython_over_the_emulator_socket(setup):
    stage, header, server, _ = setup
    out = parse(stage.run("run_boot", header + SCRIPT))
    assert out["check"] == ["header ok", "size ok", "tlv ok", "hash ok", "key ok",
                            "signature ok", "security_counter ok"]
    assert out["version"] == ["3.1.4+15 6 0"]
    assert out["refused"] == ["key_mismatch", "rollback"]
    assert out["confirmed"] == ["6"]
    bus = open_bus(server.bus_uri)
    link = T1Link(bus, profile=t1.PROFILE_GP)
    try:
        link.open()
        se = SeSession(ApduProtocol(link))
        se.select()
        assert se.counter_read(C.COUNTER_FIRMWARE) == 6
    finally:
        link.close()
        bus.close()
