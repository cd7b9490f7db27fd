"""`fleetid line init / run / reconcile` through click's test runner."""

import os

import pytest
from click.testing import CliRunner

from fleetid.cli.main import cli
from fleetid.cloud.line import reconcile as reconcile_mod
from fleetid.cloud.line import workdir
from fleetid.cloud.line.station import Station
from fleetid.cloud.registry import COMMITTED, HELD, INTENT
from fleetid.sim import lot as lot_mod
from fleetid.sim.endpoint import BusEndpoint
from tests.cloud.hsm_support import KEYSTORE_PASS
from tests.cloud.line_support import SimulatedKill, init_demo_line


def _env():
    return {"FLEETID_KEYSTORE_PASS": KEYSTORE_PASS}


def test_run_initialises_a_line_prints_a_summary_and_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETID_KEYSTORE_PASS", KEYSTORE_PASS)
    out = str(tmp_path / "line")
    result = CliRunner().invoke(cli, ["line", "run", "--devices", "4", "--stations", "1,2",
                                      "--keep-chips", "--out", out], env=_env())
    assert result.exit_code == 0, result.output
    assert "factory line, SE profile none" in result.output and "100.00" in result.output
    reports = [n for n in os.listdir(out) if n.startswith("report-") and n.endswith(".html")]
    assert len(reports) == 1
    with open(os.path.join(out, reports[0])) as f:
        page = f.read()
    assert page.count("<svg") == 2 and "<td>1</td>" in page and "<td>2</td>" in page
    assert len(os.listdir(os.path.join(out, "chips"))) == 2  # one kept lot per station count

    again = CliRunner().invoke(cli, ["line", "reconcile", "--out", out], env=_env())
    assert again.exit_code == 0 and "nothing in flight" in again.output
    # init refuses an existing line
    refused = CliRunner().invoke(cli, ["line", "init", out], env=_env())
    assert refused.exit_code != 0 and "already holds a line" in refused.output


def test_reconcile_resumes_a_device_killed_before_commit_and_run_refuses_before(
        tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETID_KEYSTORE_PASS", KEYSTORE_PASS)
    out = str(tmp_path / "line")
    line = init_demo_line(out, scrypt_n=2**14)
    try:
        batch = lot_mod.new_batch_name()
        lot = lot_mod.make_lot(line, 2, batch=batch, chip_dir=os.path.join(out, "chips", batch))
        resources = line.resources_for(lot.batch)

        def kill(step):
            if step == "commit":
                raise SimulatedKill(step)

        first, second = lot.chips
        try:
            Station("st-01", resources, step_hook=kill).provision(BusEndpoint(first.chip))
        except SimulatedKill:
            pass

        def kill_early(step):
            if step == "attest":
                raise SimulatedKill(step)

        try:
            Station("st-02", resources, step_hook=kill_early).provision(
                BusEndpoint(second.chip))
        except SimulatedKill:
            pass
        assert reconcile_mod.in_flight_count(line.registry) == 2
    finally:
        line.close()

    refused = CliRunner().invoke(cli, ["line", "run", "--devices", "1", "--out", out],
                                 env=_env())
    assert refused.exit_code != 0 and "in flight" in refused.output

    result = CliRunner().invoke(cli, ["line", "reconcile", "--out", out], env=_env())
    assert result.exit_code == 0, result.output
    assert "device 1: resumed" in result.output
    assert "device 2: no-certificate" in result.output
    line = workdir.open_line(out)
    try:
        assert line.registry.get_device(1).status == COMMITTED
        assert line.registry.get_device(2).status == HELD
        assert line.registry.list_in_flight() == []
        assert INTENT not in {line.registry.get_device(s).status for s in (1, 2)}
    finally:
        line.close()


def test_the_keystore_passphrase_never_lands_in_the_line_directory(tmp_path, monkeypatch):
    """Issue 9, defect 4: from the environment, a file the user names, or a prompt."""
    monkeypatch.delenv("FLEETID_KEYSTORE_PASS", raising=False)
    out = tmp_path / "line"
    refused = CliRunner().invoke(cli, ["line", "init", str(out)])
    assert refused.exit_code == 1 and "FLEETID_KEYSTORE_PASS" in refused.output
    assert not (out / "keystore.json").exists()
    secret_file = tmp_path / "operator-secrets" / "line.pass"
    secret_file.parent.mkdir()
    secret_file.write_text(KEYSTORE_PASS + "\n")
    named = ["--keystore-pass-file", str(secret_file)]
    result = CliRunner().invoke(cli, ["line", "init", str(out), *named])
    assert result.exit_code == 0, result.output
    refused = CliRunner().invoke(cli, ["line", "run", "--devices", "1", "--out", str(out)])
    assert refused.exit_code == 1 and "FLEETID_KEYSTORE_PASS" in refused.output
    result = CliRunner().invoke(cli, ["line", "run", "--devices", "1", "--out", str(out),
                                      *named])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["line", "reconcile", "--out", str(out)], env=_env())
    assert result.exit_code == 0, result.output
    wrong = CliRunner().invoke(cli, ["line", "reconcile", "--out", str(out)],
                               env={"FLEETID_KEYSTORE_PASS": "not it"})
    assert wrong.exit_code == 1 and "wrong keystore passphrase" in wrong.output
    for path in out.rglob("*"):
        assert "pass" not in path.name
        if path.is_file():
            assert KEYSTORE_PASS.encode() not in path.read_bytes(), path


def test_the_secret_is_prompted_for_on_a_terminal(monkeypatch):
    import click

    from fleetid.cli import hsm_secret

    asked = []

    class Terminal:
        def isatty(self):
            return True

    def prompt(text, hide_input, confirmation_prompt, err):
        asked.append((hide_input, confirmation_prompt))
        return "typed secret"

    monkeypatch.setattr(hsm_secret.sys, "stdin", Terminal())
    monkeypatch.setattr(click, "prompt", prompt)
    environ = hsm_secret.environ_with_secret("FLEETID_X", creating=True, environ={})
    assert environ == {"FLEETID_X": "typed secret"} and asked == [(True, True)]
    # Already in the environment: no prompt.
    assert hsm_secret.environ_with_secret("FLEETID_X", environ={"FLEETID_X": "e"}) == \
        {"FLEETID_X": "e"}
    assert len(asked) == 1


def test_reconcile_removes_chip_temp_files_a_killed_run_left(tmp_path, monkeypatch):
    """Issue 9, defect 4: a kill mid-commit leaves "<chip>.nvm.tmp" holding key scalars."""
    from fleetid.sim.nvm import Nvm, PowerLoss

    monkeypatch.setenv("FLEETID_KEYSTORE_PASS", KEYSTORE_PASS)
    out = str(tmp_path / "line")
    init_demo_line(out, scrypt_n=2**14).close()
    lot_dir = tmp_path / "line" / "chips" / "lot-killed"
    lot_dir.mkdir(parents=True)
    chip = Nvm(lot_dir / "se-0102.nvm")
    chip.commit({"uid": b"\x01\x02"})
    chip.cut_power_at(1)  # the kill: the next commit never reaches its atomic point
    with pytest.raises(PowerLoss):
        chip.commit({"key/2": b"\x01" + b"\x5a" * 32})
    orphan = lot_dir / "se-0304.nvm.tmp"  # a chip whose first commit never finished
    orphan.write_bytes(b"FIDNVM01 torn image with \x5a\x5a key bytes")
    assert (lot_dir / "se-0102.nvm.tmp").exists()
    result = CliRunner().invoke(cli, ["line", "reconcile", "--out", out, "--no-chips"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in lot_dir.iterdir()) == ["se-0102.nvm"]
    assert "removed a stale chip temp file" in result.output


def test_init_line_without_a_passphrase_creates_nothing(tmp_path):
    with pytest.raises(workdir.LineConfigError, match="FLEETID_KEYSTORE_PASS"):
        workdir.init_line(str(tmp_path / "line"), environ={})
    assert not (tmp_path / "line").exists()
