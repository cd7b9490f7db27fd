"""The boards' one agent entry point (fleetid.device.board.run, what boards/*/main.py call)
under the real MicroPython interpreter (unix port), against the emulator over its socket,
with a fake `board_net` module beside it as a board has its own: two agent cycles with the
signed-boot check and the CRL cache switched on, as a board's constants would.  The image
(signed by imgtool) is checked once and confirmed after the first accepted connection, the
CRL fetched through board_net is verified in the SE and cached in a file, and the loop
sleeps until the next cycle.  CPython then reads the SE's firmware counter, the journal and
the cache file.  (tests/device/test_board.py runs the same entry point on CPython.)

Heap: the script runs at its budget in tests/micropython/budgets.py ("run_board").
"""

import pytest

from fleetid.common import se_consts as C
from fleetid.device import rotation_journal as rj
from tests.device.board_support import IMAGE_COUNTER, IMAGE_MAX_SIZE, BoardWorld
from tests.micropython.budgets import WORKFLOWS
from tests.micropython.support import Stage, parse

pytestmark = pytest.mark.micropython

SCRIPT = r"""
import gc

for name in MODULES:
    __import__(name)
    gc.collect()
from fleetid.device.board import run


def log(text):
    print("log", text)


report = run(BUS, "gp", 3600, net_module="board_net", boot_image=IMAGE,
             boot_max_size=MAX_SIZE, crl_issuer=ISSUER, crl_cache_path=CACHE, log=log,
             cycles=2)
print("report", report.slot, report.serial, report.not_after, report.boot.security_counter)
print("revocation", report.revocation)
print("done", gc.mem_free())
"""


@pytest.fixture
def world(tmp_path):
    world = BoardWorld(tmp_path / "world")
    yield world
    world.close()


def test_board_entry_point_runs_the_agent_under_micropython(tmp_path, world):
    stage = Stage(tmp_path / "mp", opt=3)
    net = stage.folder / "board_net.py"
    net.write_text(world.board_net_source())
    stage.compile(net, stage.folder / "board_net.mpy")
    net.unlink()
    header = "MODULES = %r\nBUS = %r\nIMAGE = %r\nMAX_SIZE = %d\nISSUER = %r\nCACHE = %r\n" % (
        WORKFLOWS["run_board"][1], world.bus_uri + "?timeout_ms=10000", world.image,
        IMAGE_MAX_SIZE, world.issuer, world.cache)
    out = parse(stage.run("run_board", header + SCRIPT))
    assert out["net"] == ["whoami 2", "fetch_revocation 2"] * 2
    assert out["sleep"] == ["3600"]  # none after the last cycle
    logged = out["log"]
    assert logged.index("boot checked") < logged.index("connected with slot 2") < \
        logged.index("boot confirmed")
    assert sum(line.startswith("signed boot: image 1.2.3+0, security counter 5")
               for line in logged) == 1
    assert out["report"] == ["2 %d %d %d" % (world.serial, world.t1, IMAGE_COUNTER)]
    assert out["revocation"][0].startswith("CRL #7 ")
    with open(world.cache, "rb") as f:
        assert f.read() == world.crl_der
    se = world.se()
    assert se.counter_read(C.COUNTER_FIRMWARE) == IMAGE_COUNTER
    last = rj.RotationJournal(se).load()
    assert (last.kind, last.cur, last.t1) == (rj.BASE, 2, world.t1)
