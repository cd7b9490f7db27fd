"""`fleetid agent boot-check` (cli/agent_boot.py) through click's CliRunner on the command
object, against an emulated SE served on a Unix socket and holding the firmware key."""

import pytest
from click.testing import CliRunner

from fleetid.cli.agent_boot import boot_check
from fleetid.common import se_consts as C
from tests.device.boot_support import ImgtoolKeys, provision_firmware_key, sign_image

PAYLOAD = b"\x5a" * 3000


@pytest.fixture
def served(tmp_path):
    """(bus uri, good image path, other-key image path, older image path, chip)."""
    from fleetid.common import t1
    from fleetid.sim import profiles
    from fleetid.sim.chip import Chip
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.fab import fab_chip
    from fleetid.sim.nvm import Nvm
    from fleetid.sim.server import serve_in_thread
    from tests.sim.chip_support import select_applet

    keys = ImgtoolKeys(tmp_path)
    paths = {}
    for name, key, counter in (("good", keys.a, 4), ("other", keys.b, 4), ("older", keys.a, 2)):
        path = tmp_path / (name + ".img")
        path.write_bytes(sign_image(tmp_path, key, PAYLOAD, name, "2.0.1", counter))
        paths[name] = str(path)
    nvm_path = str(tmp_path / "chip.nvm")
    record = fab_chip(str(tmp_path / "vendor"), nvm_path)
    chip = Chip(Nvm(nvm_path))
    select_applet(chip)
    provision_firmware_key(chip, record, keys.a_point)
    chip.power_loss()
    server = serve_in_thread(BusEndpoint(chip, profile=t1.PROFILE_GP,
                                         latency=profiles.get("none")),
                             "unix:%s" % (tmp_path / "se.sock"))
    try:
        yield server.bus_uri, paths, chip
    finally:
        server.stop()


def test_boot_check_prints_each_check_and_confirms_on_request(served):
    bus, paths, chip = served
    runner = CliRunner()
    result = runner.invoke(boot_check, [paths["good"], "--bus", bus])
    assert result.exit_code == 0, result.output
    for name in ("header", "size", "tlv", "hash", "key", "signature", "security_counter"):
        assert any(line.split()[:2] == [name, "ok"] for line in result.output.splitlines()
                   if line.startswith("  ")), name
    assert "security counter 4 (SE counter 0)" in result.output
    assert "accepted" in result.output and "confirmed" not in result.output
    assert chip.nvm.get("ctr/%d" % C.COUNTER_FIRMWARE) is None  # nothing written

    result = runner.invoke(boot_check, [paths["good"], "--bus", bus, "--confirm"])
    assert result.exit_code == 0, result.output
    assert "confirmed: SE firmware counter now 4" in result.output

    result = runner.invoke(boot_check, [paths["older"], "--bus", bus])
    assert result.exit_code == 1
    assert "security_counter  refused  rollback" in result.output
    assert "Error: refused: rollback" in result.output


def test_boot_check_refuses_another_key_and_an_oversized_image(served):
    bus, paths, _ = served
    runner = CliRunner()
    result = runner.invoke(boot_check, [paths["other"], "--bus", bus])
    assert result.exit_code == 1
    assert "key               refused  key_mismatch" in result.output
    assert "hash              ok" in result.output
    result = runner.invoke(boot_check, [paths["good"], "--bus", bus, "--max-size", "1024"])
    assert result.exit_code == 1 and "refused: oversized" in result.output


def test_boot_check_reports_an_unreachable_bus_in_one_line(tmp_path):
    image = tmp_path / "x.img"
    image.write_bytes(b"\x00" * 64)
    result = CliRunner().invoke(boot_check, [str(image), "--bus",
                                             "sim:unix:%s" % (tmp_path / "none.sock")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "Error:" in result.output


def test_boot_check_refuses_a_file_longer_than_the_slot_even_when_the_image_fits(served,
                                                                                 tmp_path):
    bus, paths, chip = served
    with open(paths["good"], "rb") as f:
        image = f.read()
    slot = len(image) + 64
    padded = tmp_path / "padded.img"
    padded.write_bytes(image + b"\xff" * 65)  # erased flash past the image, one byte too many
    runner = CliRunner()
    result = runner.invoke(boot_check, [str(padded), "--bus", bus, "--max-size", str(slot),
                                        "--confirm"])
    assert result.exit_code == 1, result.output
    assert "size              refused  oversized: file %d B > slot %d B" % (slot + 1, slot) \
        in result.output
    assert "Error: refused: oversized: file %d B > slot %d B" % (slot + 1, slot) \
        in result.output
    assert chip.nvm.get("ctr/%d" % C.COUNTER_FIRMWARE) is None  # nothing confirmed
    padded.write_bytes(image + b"\xff" * 64)  # the same image in a file that fits
    result = runner.invoke(boot_check, [str(padded), "--bus", bus, "--max-size", str(slot)])
    assert result.exit_code == 0, result.output
    assert "verified by the factory firmware key" in result.output
