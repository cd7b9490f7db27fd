"""deploy/: the cloud's systemd units are deployable as installed by deploy/install.sh.

As tests/device/test_agent_systemd_unit.py does for the board's agent: install.sh runs for
real with DESTDIR=<temp root> (a venv at <root>/opt/fleetid with fleetid from a wheel of
this checkout, the sysusers.d entry applied with `systemd-sysusers --root`, the units, the
backup script, cloud.toml and cloud.env), the host's unit files are copied into the root
so targets resolve, and `systemd-analyze verify --root=<root>` checks every unit
unmodified.  Then each ExecStart, with the example settings substituted as systemd would,
is parsed by the real click command, and the example cloud.toml loads with the real
configuration loader.

systemd-analyze is in Debian's `systemd` package (scripts/setup.sh --test installs it);
without it the tests that need it skip locally and fail under CI=true.
"""

import os
import shlex
import shutil
import subprocess

import pytest

from tests.systemd_support import env_file, install_root, unit_entries

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
SERVICES = ("fleetid-cloud.service", "fleetid-mqtt-broker.service",
            "fleetid-mqtt-cloud.service", "fleetid-backup.service")
UNITS = SERVICES + ("fleetid-backup.timer",)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A root that deploy/install.sh filled (DESTDIR), with the host's units beside it."""
    return install_root(tmp_path_factory.mktemp("cloud-units"), os.path.join(DEPLOY, "install.sh"))


def _verify(root, *units):
    return subprocess.run(["systemd-analyze", "verify", "--root=" + str(root), "--man=no"]
                          + list(units), capture_output=True, text=True, timeout=120)


def test_installed_units_pass_systemd_analyze_verify_with_no_warning(installed):
    root, _wheel, _env = installed
    assert os.access(root / "opt" / "fleetid" / "bin" / "fleetid", os.X_OK)
    assert os.access(root / "opt" / "fleetid" / "libexec" / "fleetid-backup", os.X_OK)
    result = _verify(root, *UNITS)
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings (exit 0): none is allowed either.
    assert result.stderr == "" and result.stdout == ""


def test_verify_really_checks_execstart_in_the_root(installed, tmp_path):
    # The control: without the installed command, verification fails for every service.
    root, _wheel, _env = installed
    bare = tmp_path / "bare"
    shutil.copytree(root, bare, symlinks=True)
    os.unlink(bare / "opt" / "fleetid" / "bin" / "fleetid")
    result = _verify(bare, "fleetid-cloud.service")
    assert result.returncode != 0
    assert "/opt/fleetid/bin/fleetid" in result.stderr


def test_install_creates_the_service_user_and_keeps_site_settings(installed):
    root, wheel, env = installed
    with open(root / "etc" / "passwd") as f:
        users = {line.split(":")[0]: line.split(":") for line in f}
    assert users["fleetid"][5] == "/var/lib/fleetid"
    assert users["fleetid"][6].strip() in ("/usr/sbin/nologin", "/sbin/nologin")
    assert oct(os.stat(root / "etc" / "fleetid" / "cloud.env").st_mode & 0o777) == "0o600"
    site = root / "etc" / "fleetid" / "cloud.toml"
    site.write_text("[cloud]\nverifier_port = 9443\n")
    run = subprocess.run(["sh", os.path.join(DEPLOY, "install.sh"), str(wheel)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert site.read_text() == "[cloud]\nverifier_port = 9443\n"


@pytest.mark.parametrize("unit", SERVICES)
def test_every_service_runs_as_the_service_user_in_its_state_directory_hardened(unit):
    entries = unit_entries(os.path.join(DEPLOY, unit))
    for key, value in [("User", "fleetid"), ("StateDirectory", "fleetid"),
                       ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("PrivateDevices", "yes"), ("CapabilityBoundingSet", ""),
                       ("EnvironmentFile", "/etc/fleetid/cloud.env")]:
        assert value in entries.get(key, []), (unit, key)


def _argv(unit, env):
    """The ExecStart argv as systemd runs it: %S -> /var/lib, ${VAR} one word, $VAR split."""
    entries = unit_entries(os.path.join(DEPLOY, unit))
    args = []
    for word in shlex.split(entries["ExecStart"][0]):
        if word.startswith("${") and word.endswith("}"):
            args.append(env[word[2:-1]])
        elif word.startswith("$"):
            args.extend(env.get(word[1:], "").split())
        else:
            args.append(word.replace("%S", "/var/lib"))
    return args


@pytest.mark.parametrize("unit,path", [
    ("fleetid-cloud.service", ("cloud", "serve")),
    ("fleetid-mqtt-broker.service", ("mqtt", "broker")),
    ("fleetid-mqtt-cloud.service", ("mqtt", "cloud")),
])
def test_execstart_with_the_example_settings_parses_with_the_real_command(unit, path):
    from fleetid.cli.main import cli
    from tests.cli import examples

    env = env_file(os.path.join(DEPLOY, "cloud.env.example"))
    argv = _argv(unit, env)
    assert argv[0] == "/opt/fleetid/bin/fleetid" and tuple(argv[1:3]) == path
    assert examples.parse(cli, argv[1:]) is None, argv


def test_the_example_configuration_loads_with_the_example_environment():
    from fleetid.cloud.config import load_config

    env = env_file(os.path.join(DEPLOY, "cloud.env.example"))
    config = load_config(os.path.join(DEPLOY, "cloud.toml.example"), env)
    assert config.registry.startswith("postgresql://")
    assert config.state_dir == "/var/lib/fleetid/cloud"
    assert "pin-env=FLEETID_HSM_PIN" in config.hsm and "FLEETID_HSM_PIN" in env
    assert config.labels and config.crl_port == 8446
