"""Power cuts at every NVM commit of a clean personalisation-and-use run (MCUboot
simulator style): after power-up the chip holds the state from just before or just after
the cut commit, never a mix, and works normally."""

import shutil

import pytest

from fleetid.common import se_consts as C
from fleetid.sim.chip import Chip
from fleetid.sim.nvm import Nvm, PowerLoss
from tests.sim.chip_support import (
    counting_rng,
    fab_test_chip,
    open_scp,
    select_applet,
    send,
    send_secure,
)
from tests.sim.test_chip_scp03 import DEVICE_KEYS, _dgi, _firmware_point, put_key_payload

FIRMWARE_POINT = _firmware_point()


def scenario(chip, record):
    """A clean run touching every NVM-writing command; asserts 9000 at each step."""

    def ok(result):
        assert result[1] == C.SW_OK, "SW %04X" % result[1]
        return result[0]

    ok(send(chip, C.INS_GENERATE_KEY, 1, C.CURVE_P256, b"\x03", 256))
    ok(send(chip, C.INS_PUT_CERT, 1, 0, record.chain_der[1], extended=True))
    ok(send(chip, C.INS_COUNTER, 0, C.COUNTER_INCREMENT, le=4))
    ok(send(chip, C.INS_COUNTER, 0, C.COUNTER_ADVANCE, b"\x00\x00\x01\x00", 4))
    ok(send(chip, C.INS_WRITE_DATA_OBJECT, 0, 0, b"a" * 300, extended=True))
    ok(send(chip, C.INS_WRITE_DATA_OBJECT, 0, 0, b"b" * 700, extended=True))
    transport = record.static_keys()
    host = open_scp(chip, transport)  # INITIALIZE UPDATE persists the sequence counter
    payload = put_key_payload(transport.dek, C.SCP03_KVN_DEVICE, DEVICE_KEYS)
    ok(send_secure(host, C.INS_PUT_KEY, C.SCP03_KVN_TRANSPORT, 0x81, payload, 256))
    ok(send_secure(host, C.INS_STORE_DATA, 0x80, 0, _dgi(C.DGI_FIRMWARE_KEY, FIRMWARE_POINT)))
    ok(send_secure(host, C.INS_SET_STATUS, 0x80, C.LC_SECURED))
    ok(send(chip, C.INS_DELETE_KEY, 1, 0))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One fabbed chip, copied for each run, and the snapshots of a clean run."""
    folder = tmp_path_factory.mktemp("power")
    _, record = fab_test_chip(folder, rng=counting_rng(3), select=False)
    clean = folder / "clean.nvm"
    shutil.copy(record.nvm_path, clean)
    nvm = Nvm(clean)
    snapshots = [nvm.snapshot()]
    original_commit = nvm.commit

    def recording_commit(changes):
        count = nvm.write_count
        written = original_commit(changes)
        if nvm.write_count != count:  # empty transactions are not commits
            snapshots.append(nvm.snapshot())
        return written

    nvm.commit = recording_commit
    chip = Chip(nvm, rng=counting_rng(99))
    select_applet(chip)
    scenario(chip, record)
    assert nvm.write_count == len(snapshots) - 1
    return record, snapshots


def test_clean_run_writes_once_per_state_changing_command(template):
    _, snapshots = template
    assert len(snapshots) - 1 == 11


@pytest.mark.parametrize("after_atomic", [False, True], ids=["before", "after"])
def test_chip_survives_power_cut_at_every_commit(template, tmp_path, after_atomic):
    record, snapshots = template
    commits = len(snapshots) - 1
    for k in range(1, commits + 1):
        path = tmp_path / ("run%d.nvm" % k)
        shutil.copy(record.nvm_path, path)
        nvm = Nvm(path)
        chip = Chip(nvm, rng=counting_rng(99))
        select_applet(chip)
        nvm.cut_power_at(k, after_atomic=after_atomic)
        with pytest.raises(PowerLoss):
            scenario(chip, record)
        assert not chip.selected  # RAM state went with the power
        # Power-up: a new chip object over the file.
        reborn = Chip(Nvm(path), rng=counting_rng(5))
        expected = snapshots[k] if after_atomic else snapshots[k - 1]
        assert reborn.nvm.snapshot() == expected, "cut at commit %d" % k
        select_applet(reborn)
        data, sw = send(reborn, C.INS_GET_DATA, 0x01, 0x01, le=16)
        assert (data, sw) == (record.se_uid, C.SW_OK)
        obj, sw = send(reborn, C.INS_READ_DATA_OBJECT, 0, 0, le=65536, extended=True)
        assert sw == C.SW_REF_NOT_FOUND or obj in (b"a" * 300, b"b" * 700)
