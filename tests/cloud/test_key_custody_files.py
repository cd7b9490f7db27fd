"""Every secret file the embedded defaults write is private (mode 0600), whatever the
umask and even when the file was there before with wider permissions (issue 16 item 20;
README "Key custody" lists them).  The files come from the real commands: `fleetid sim
fab`, `fleetid line init` / `line run`, `fleetid mqtt broker --write-only`, `fleetid line
cloud-config` and the embedded `fleetid cloud serve` set-up."""

import os

import pytest
from click.testing import CliRunner

from fleetid.cli.main import cli
from tests.cloud.hsm_support import KEYSTORE_PASS
from tests.cloud.line_support import files_under

ENV = {"FLEETID_KEYSTORE_PASS": KEYSTORE_PASS}


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _is_secret(path):
    """A file holding key material: a PEM private key, an (encrypted) keystore, the
    vendor's transport keys, a chip's NVM (the emulated SE's own keys), a fab record."""
    name = os.path.basename(path)
    if name.endswith((".nvm", "keystore.json")) or os.sep + "transport-keys" + os.sep in path:
        return True
    with open(path, "rb") as f:
        return b"PRIVATE KEY" in f.read()


@pytest.fixture
def open_umask():
    previous = os.umask(0)  # the modes must come from the code, not from the umask
    yield
    os.umask(previous)


def test_every_private_key_file_of_the_embedded_defaults_is_0600(tmp_path, open_umask):
    from fleetid.cloud.config import load_config
    from fleetid.cloud.server import build_context

    run = CliRunner().invoke
    line = str(tmp_path / "line")
    _ok(run(cli, ["sim", "fab", "--vendor-dir", str(tmp_path / "vendor"), "--out",
                  str(tmp_path / "chips"), "--count", "2"]))
    _ok(run(cli, ["line", "init", line], env=ENV))
    _ok(run(cli, ["line", "run", "--devices", "2", "--stations", "1", "--keep-chips",
                  "--out", line], env=ENV))
    _ok(run(cli, ["mqtt", "broker", "--line", line, "--write-only"], env=ENV))
    cloud_config = str(tmp_path / "cloud-config")
    _ok(run(cli, ["line", "cloud-config", "--line", line, "--out", cloud_config], env=ENV))
    state = str(tmp_path / "cloud")
    context = build_context(load_config(None, environ={"FLEETID_CLOUD_STATE_DIR": state}),
                            dict(os.environ, **ENV))
    context.close()

    written = files_under(str(tmp_path))
    secrets = [p for p in written if _is_secret(p)]
    expected = [os.path.join(tmp_path, p) for p in (
        "vendor/vendor_root.key.pem", "line.se-vendor/vendor_root.key.pem",
        "line/keystore.json", "line/witness/keystore.json", "line/mqtt/server.key",
        "line/mqtt/cloud.key", "cloud-config/tls/server.key.pem", "cloud/keystore.json",
        "cloud/witness/keystore.json", "cloud/tls/server.key.pem")]
    assert set(expected) <= set(secrets)
    assert sum("transport-keys" in p for p in secrets) == 2
    loose = {p: oct(os.stat(p).st_mode & 0o777) for p in secrets
             if os.stat(p).st_mode & 0o077}
    assert loose == {}
    # No private key beside the line's inputs other than its own TLS material for MQTT.
    in_line = [p for p in secrets if p.startswith(line + os.sep)]
    assert all(p.endswith(("keystore.json", ".key", ".nvm")) for p in in_line), in_line


def test_a_rewritten_private_key_file_is_0600_even_if_it_was_wider(tmp_path, open_umask):
    line = str(tmp_path / "line")
    run = CliRunner().invoke
    _ok(run(cli, ["line", "init", line], env=ENV))
    _ok(run(cli, ["mqtt", "broker", "--line", line, "--write-only"], env=ENV))
    keys = [os.path.join(line, "mqtt", n) for n in ("server.key", "cloud.key")]
    tls = tmp_path / "cloud-config" / "tls"
    tls.mkdir(parents=True)
    (tls / "server.key.pem").write_bytes(b"")
    keys.append(str(tls / "server.key.pem"))
    for path in keys:
        os.chmod(path, 0o644)
    _ok(run(cli, ["mqtt", "broker", "--line", line, "--write-only"], env=ENV))
    _ok(run(cli, ["line", "cloud-config", "--line", line, "--out",
                  str(tmp_path / "cloud-config")], env=ENV))
    for path in keys:
        with open(path, "rb") as f:
            assert b"PRIVATE KEY" in f.read()
        assert os.stat(path).st_mode & 0o777 == 0o600, path
