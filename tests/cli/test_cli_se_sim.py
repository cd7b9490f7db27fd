"""`fleetid sim` and `fleetid se` through click's CliRunner, against an emulator served
in-process on a Unix socket, plus one run of the real commands as processes."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import click
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from fleetid.cli.main import cli

DIGEST = hashlib.sha256(b"fleetid cli").hexdigest()


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def chip(tmp_path, runner):
    """A chip fabbed with `fleetid sim fab` and served in-process; yields (bus uri, record)."""
    from fleetid.common import t1
    from fleetid.sim import profiles
    from fleetid.sim.chip import Chip
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.nvm import Nvm
    from fleetid.sim.server import serve_in_thread

    nvm = tmp_path / "chip.nvm"
    result = runner.invoke(cli, ["sim", "fab", "--vendor-dir", str(tmp_path / "vendor"),
                                 "--out", str(nvm)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "chip.json").read_text())
    endpoint = BusEndpoint(Chip(Nvm(str(nvm))), profile=t1.PROFILE_GP,
                           latency=profiles.get("none"))
    server = serve_in_thread(endpoint, "unix:%s" % (tmp_path / "se.sock"))
    try:
        yield server.bus_uri, record
    finally:
        server.stop()


def se(runner, bus, *args):
    return runner.invoke(cli, ["se", "--bus", bus] + list(args))


def test_info_prints_uid_firmware_life_cycle_slots_and_chain_subjects(runner, chip):
    bus, record = chip
    result = se(runner, bus, "info")
    assert result.exit_code == 0, result.output
    assert "UID:          %s" % record["uid"] in result.output
    assert "firmware:     1.0.0" in result.output
    assert "life cycle:   OP_READY (0x01)" in result.output
    assert "free slots:   15" in result.output
    assert "[0] 2.5.4.5=%s" % record["uid"] in result.output  # MAK certificate subject
    assert "[1] CN=fleetid SE vendor root CA" in result.output


def test_genkey_sign_verify_attest_round_trip(runner, chip, tmp_path):
    bus, record = chip
    result = se(runner, bus, "genkey", "--slot", "2", "--usage", "sign")
    assert result.exit_code == 0, result.output
    point = bytes.fromhex(result.output.strip())
    result = se(runner, bus, "sign", "--slot", "2", "--digest", DIGEST)
    assert result.exit_code == 0, result.output
    signature = result.output.strip()
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    key.verify(bytes.fromhex(signature), bytes.fromhex(DIGEST), ec.ECDSA(Prehashed(hashes.SHA256())))

    result = se(runner, bus, "verify", "--slot", "2", "--digest", DIGEST, "--signature", signature)
    assert result.exit_code == 0 and "signature valid" in result.output
    other = hashlib.sha256(b"other").hexdigest()
    result = se(runner, bus, "verify", "--pubkey", point.hex(), "--digest", other,
                "--signature", signature)
    assert result.exit_code == 1 and "does NOT verify" in result.output

    out = tmp_path / "att.der"
    result = se(runner, bus, "attest", "--slot", "2", "--nonce", "00112233", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "nonce:        00112233" in result.output
    assert "public key:   %s" % point.hex() in result.output
    assert "chain:        verified up to CN=fleetid SE vendor root CA" in result.output
    from fleetid.common import attestation

    assert attestation.decode_signed_attestation(out.read_bytes()).statement.slot == 2

    result = se(runner, bus, "pubkey", "--slot", "2")
    assert "policy: 0xC1 (sign, non-exportable, generated-on-chip)" in result.output
    result = se(runner, bus, "pubkey", "--slot", "2", "--pem")
    assert result.output.startswith("-----BEGIN PUBLIC KEY-----")
    assert se(runner, bus, "delkey", "--slot", "2").exit_code == 0
    result = se(runner, bus, "sign", "--slot", "2", "--digest", DIGEST)
    assert result.exit_code == 1
    assert "SW 6A88" in result.output and "Traceback" not in result.output


def test_counters_data_objects_random_and_ecdh(runner, chip, tmp_path):
    bus, _ = chip
    assert se(runner, bus, "counter", "increment", "--id", "0").output.strip() == "1"
    assert se(runner, bus, "counter", "advance", "--id", "0", "--to", "41").output.strip() == "41"
    assert se(runner, bus, "counter", "read", "--id", "0").output.strip() == "41"
    result = se(runner, bus, "counter", "advance", "--id", "0", "--to", "3")
    assert result.exit_code == 1 and "SW 6A80" in result.output
    assert se(runner, bus, "data", "write", "--id", "1", "--hex", "c0ffee").exit_code == 0
    assert se(runner, bus, "data", "read", "--id", "1").output.strip() == "c0ffee"
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(range(200)))
    assert se(runner, bus, "data", "write", "--id", "2", "--file", str(blob)).exit_code == 0
    out = tmp_path / "back"
    assert se(runner, bus, "data", "read", "--id", "2", "--out", str(out)).exit_code == 0
    assert out.read_bytes() == bytes(range(200))
    assert len(bytes.fromhex(se(runner, bus, "random", "--count", "16").output.strip())) == 16

    point = bytes.fromhex(se(runner, bus, "genkey", "--slot", "3", "--usage", "ecdh").output)
    peer = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import serialization

    peer_point = peer.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)
    shared = se(runner, bus, "ecdh", "--slot", "3", "--peer", peer_point.hex()).output.strip()
    own = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    assert bytes.fromhex(shared) == peer.exchange(ec.ECDH(), own)


@pytest.mark.parametrize("level", ["0x01", "0x03", "0x13", "0x33"])
def test_scp03_check_opens_a_channel_with_the_fab_record_keys(runner, chip, tmp_path, level):
    bus, record = chip
    result = se(runner, bus, "scp03-check", "--fab-record", str(tmp_path / "chip.json"),
                "--vendor-dir", str(tmp_path / "vendor"), "--level", level)
    assert result.exit_code == 0, result.output
    assert "security level 0x%02X" % int(level, 16) in result.output
    assert "wrapped GET DATA (UID) ok: %s" % record["uid"] in result.output


def test_scp03_check_with_wrong_keys_fails_cleanly(runner, chip, tmp_path):
    import shutil

    bus, record = chip
    # A vendor key store holding another MAC key for this chip.
    shutil.copytree(tmp_path / "vendor", tmp_path / "bad-vendor")
    key_file = tmp_path / "bad-vendor" / "transport-keys" / ("%s.json" % record["uid"])
    keys = json.loads(key_file.read_text())
    keys["mac"] = "00" * 16
    key_file.write_text(json.dumps(keys))
    fab_record = str(tmp_path / "chip.json")
    bad = ["--vendor-dir", str(tmp_path / "bad-vendor")]
    result = se(runner, bus, "scp03-check", "--fab-record", fab_record, *bad)
    assert result.exit_code == 1
    assert "SCP03 failed (card_cryptogram)" in result.output
    assert "Traceback" not in result.output
    result = se(runner, bus, "scp03-check", "--fab-record", fab_record, *bad, "--level",
                "0x07")
    assert result.exit_code == 2 and "one of 0x01" in result.output


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--bus", "sim:unix:/nonexistent/se.sock", "info"], 1, "cannot reach the SE"),
        (["--bus", "sim:tcp:127.0.0.1:1", "info"], 1, "cannot reach the SE"),
        (["--bus", "bogus", "info"], 1, "bad bus URI"),
        (["--bus", "linux:i2c:/dev/i2c-1:0x05", "info"], 1, "address"),
        (["--bus", "sim:unix:/x", "sign", "--slot", "2", "--digest", "abcd"], 2, "32 bytes"),
        (["--bus", "sim:unix:/x", "genkey", "--slot", "0"], 2, "--slot"),
        (["--bus", "sim:unix:/x", "verify", "--digest", DIGEST, "--signature", "30"], 2,
         "exactly one of --slot, --pubkey"),
    ],
)
def test_user_errors_are_one_line_messages_without_tracebacks(runner, args, code, message):
    result = runner.invoke(cli, ["se"] + args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_fab_batch_makes_count_chips_with_records(runner, tmp_path):
    out = tmp_path / "chips"
    result = runner.invoke(cli, ["sim", "fab", "--vendor-dir", str(tmp_path / "v"), "--out",
                                 str(out) + os.sep, "--count", "3"])
    assert result.exit_code == 0, result.output
    assert "3 chips in" in result.output
    nvms = sorted(p for p in out.iterdir() if p.suffix == ".nvm")
    records = sorted(p for p in out.iterdir() if p.suffix == ".json")
    assert len(nvms) == 3 and len(records) == 3
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in records)


def test_fab_never_overwrites_a_chip(runner, tmp_path):
    args = ["sim", "fab", "--vendor-dir", str(tmp_path / "v"), "--out", str(tmp_path / "c.nvm")]
    assert runner.invoke(cli, args).exit_code == 0
    result = runner.invoke(cli, args)
    assert result.exit_code == 1 and "never overwrites" in result.output


def _walk(group, path=()):
    yield path, group
    if isinstance(group, click.Group):
        for name, command in group.commands.items():
            yield from _walk(command, path + (name,))


@pytest.mark.parametrize("area", ["sim", "se"])
def test_every_command_has_help_with_examples(runner, area):
    for path, command in _walk(cli.commands[area], (area,)):
        result = runner.invoke(cli, list(path) + ["--help"])
        assert result.exit_code == 0, path
        assert "Example" in result.output, path
        assert "fleetid " + area in result.output, path


def _fleetid():
    return [sys.executable, "-m", "fleetid.cli.main"]


def test_real_processes_fab_serve_and_info(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    nvm = tmp_path / "chip.nvm"
    sock = tmp_path / "se.sock"
    subprocess.run(_fleetid() + ["sim", "fab", "--vendor-dir", str(tmp_path / "v"), "--out",
                                 str(nvm)], check=True, timeout=60, env=env)
    server = subprocess.Popen(
        _fleetid() + ["sim", "serve", "--nvm", str(nvm), "--listen", "unix:%s" % sock,
                      "--latency", "se050"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)
        info = subprocess.run(_fleetid() + ["se", "--bus", "sim:unix:%s" % sock, "info"],
                              capture_output=True, text=True, timeout=60, env=env)
        assert info.returncode == 0, info.stderr
        record = json.loads((tmp_path / "chip.json").read_text())
        assert "UID:          %s" % record["uid"] in info.stdout
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0  # clean shutdown on SIGTERM
        assert "stopped after 1 clients" in server.stderr.read().decode()
        assert not sock.exists()  # the socket file is removed
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)


def test_serve_refuses_a_corrupt_nvm_and_a_bad_listen_address(runner, tmp_path):
    bad = tmp_path / "bad.nvm"
    bad.write_bytes(b"not an nvm image")
    result = runner.invoke(cli, ["sim", "serve", "--nvm", str(bad), "--listen",
                                 "unix:%s" % (tmp_path / "s.sock")])
    assert result.exit_code == 1 and "cannot load the chip's NVM" in result.output
    args = ["sim", "fab", "--vendor-dir", str(tmp_path / "v"), "--out", str(tmp_path / "c.nvm")]
    assert runner.invoke(cli, args).exit_code == 0
    result = runner.invoke(cli, ["sim", "serve", "--nvm", str(tmp_path / "c.nvm"), "--listen",
                                 "tcp:10.1.2.3:7050"])
    assert result.exit_code == 2 and "non-loopback" in result.output
    assert "Traceback" not in result.output


def test_real_processes_name_a_profile_mismatch_and_log_the_power_cut(tmp_path):
    """`sim serve --t1-profile se05x --cut-power-at 1`: a host on the GP profile is told
    which profile to try; the first NVM commit (genkey) is cut and the server says so."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    nvm = tmp_path / "chip.nvm"
    sock = tmp_path / "se.sock"
    subprocess.run(_fleetid() + ["sim", "fab", "--vendor-dir", str(tmp_path / "v"), "--out",
                                 str(nvm)], check=True, timeout=60, env=env)
    server = subprocess.Popen(
        _fleetid() + ["sim", "serve", "--nvm", str(nvm), "--listen", "unix:%s" % sock,
                      "--t1-profile", "se05x", "--cut-power-at", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)
        bus = "sim:unix:%s" % sock
        wrong = subprocess.run(_fleetid() + ["se", "--bus", bus, "info"],
                               capture_output=True, text=True, timeout=60, env=env)
        assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
        assert "T=1' profile mismatch? try --t1-profile se05x" in wrong.stderr
        cut = subprocess.run(_fleetid() + ["se", "--bus", bus, "--t1-profile", "se05x",
                                           "--timeout-ms", "2000", "genkey", "--slot", "2",
                                           "--usage", "sign"],
                             capture_output=True, text=True, timeout=120, env=env)
        assert cut.returncode != 0, cut.stdout
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
        log = server.stderr.read().decode()
        assert "power cut (--cut-power-at): power lost at commit" in log, log
        assert "before the atomic point" in log and "the commit was lost" in log
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
