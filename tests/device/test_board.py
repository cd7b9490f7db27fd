"""device/board.run, the one agent entry point of the MicroPython boards, on CPython against
the emulator: with the options a board's main.py can switch on (signed boot, the CRL
cache) it checks the image before any network call, confirms it after the first accepted
connection, keeps the CRL it fetched and checks its own certificate against it; with
everything off it is the bare agent loop.  tests/micropython/test_board_micropython.py
runs the same entry point under the real MicroPython interpreter."""

import types

import pytest

from fleetid.common import se_consts as C
from fleetid.device import board
from fleetid.device import rotation_journal as rj
from tests.device.board_support import IMAGE_COUNTER, IMAGE_MAX_SIZE, BoardWorld


@pytest.fixture
def world(tmp_path):
    world = BoardWorld(tmp_path)
    yield world
    world.close()


@pytest.fixture
def revoked_world(tmp_path):
    world = BoardWorld(tmp_path, revoke_slot2=True)
    yield world
    world.close()


def _board_net(world):
    module = types.ModuleType("board_net")
    exec(compile(world.board_net_source(), "board_net.py", "exec"), module.__dict__)
    return module


def _run(world, log, **options):
    return board.run(world.bus_uri, "gp", 3600, net_module=_board_net(world), log=log.append,
                     cycles=2, **options)


def test_everything_off_is_the_bare_agent_loop(world, capsys):
    log = []
    report = _run(world, log)
    out = capsys.readouterr().out.splitlines()
    # No wait after the last cycle (`fleetid agent run --runtime micropython --once`).
    assert out == ["net whoami 2", "sleep 3600", "net whoami 2"]
    assert (report.slot, report.serial, report.not_after) == (2, world.serial, world.t1)
    assert report.boot is None and report.revocation is None
    assert log.count("connected with slot 2") == 2


def test_signed_boot_and_crl_cache_from_the_board_constants(world, capsys):
    # As boards/<board>/main.py hands them over: its globals(), run_constants(globals()).
    log = []
    report = board.run_constants({
        "__name__": "__main__", "run_constants": board.run_constants,
        "BUS": world.bus_uri, "T1_PROFILE": "gp", "INTERVAL_S": 3600,
        "NET_MODULE": _board_net(world), "LOG": log.append, "CYCLES": 2,
        "BOOT_IMAGE": world.image, "BOOT_MAX_SIZE": IMAGE_MAX_SIZE,
        "CRL_ISSUER": world.issuer, "CRL_CACHE_PATH": world.cache})
    out = capsys.readouterr().out.splitlines()
    assert out + ["sleep 3600"] == ["net whoami 2", "net fetch_revocation 2", "sleep 3600"] * 2
    assert log.index("boot checked") < log.index("connected with slot 2") < log.index(
        "boot confirmed")
    # The image is read and checked once per process, not per cycle.
    assert sum(line.startswith("signed boot: image 1.2.3+0, security counter 5")
               for line in log) == 1
    assert report.boot.security_counter == IMAGE_COUNTER
    assert report.revocation.startswith("CRL #7 ")
    with open(world.cache, "rb") as f:
        assert f.read() == world.crl_der
    se = world.se()
    assert se.counter_read(C.COUNTER_FIRMWARE) == IMAGE_COUNTER
    last = rj.RotationJournal(se).load()
    assert (last.kind, last.cur) == (rj.BASE, 2)


def test_a_foreign_image_stops_every_cycle_before_the_network(world, capsys):
    log = []
    assert _run(world, log, boot_image=world.foreign, boot_max_size=IMAGE_MAX_SIZE) is None
    assert capsys.readouterr().out.splitlines() == ["sleep 3600"]
    assert sum(line.startswith("cycle failed: boot") for line in log) == 2, log
    assert world.se().counter_read(C.COUNTER_FIRMWARE) == 0


def test_a_crl_listing_the_devices_certificate_is_reported(revoked_world, capsys):
    report = _run(revoked_world, [], crl_issuer=revoked_world.issuer,
                  crl_cache_path=revoked_world.cache)
    assert report.revocation.startswith("RevokedError")


def test_a_misspelt_board_constant_is_refused_before_the_se_is_opened(world):
    with pytest.raises(TypeError):
        board.run_constants({"BUS": "unix:/nonexistent", "CRL_CACHE": world.cache})


def test_crl_issuer_and_cache_go_together(world):
    with pytest.raises(ValueError):
        _run(world, [], crl_issuer=world.issuer)
