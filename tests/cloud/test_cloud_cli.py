"""`fleetid cloud check-cert` (a verdict per check) and `fleetid cloud serve` (verifier +
EST on the embedded defaults with one command), plus the configuration loader."""

import base64
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import pkcs7

from fleetid.cli.main import cli
from fleetid.cloud.config import ConfigError, load_config
from tests.cloud.cloud_support import Fleet, pem, rogue_certificate


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(tmp_path / "fleet")
    yield fleet
    fleet.close()


def _config(fleet, tmp_path):
    paths = {}
    for name, cert in (("root", fleet.root), ("b42", fleet.ca_certs["b42"]),
                       ("b43", fleet.ca_certs["b43"]), ("vendor", fleet.vendor.root)):
        paths[name] = tmp_path / (name + ".pem")
        paths[name].write_bytes(pem(cert))
    config = tmp_path / "cloud.toml"
    config.write_text(
        '[cloud]\nstate_dir = "state"\nroots = ["root.pem"]\n'
        'intermediates = ["b42.pem", "b43.pem"]\nvendor_roots = ["vendor.pem"]\n'
        'registry = "sqlite:%s"\n' % os.path.join(fleet.dir, "registry.db"))
    return str(config)


def _check(config, cert, *extra):
    return CliRunner().invoke(cli, ["cloud", "check-cert", str(cert), "--config", config]
                              + list(extra), catch_exceptions=False)


def test_check_cert_explains_every_check_with_a_verdict(fleet, tmp_path):
    config = _config(fleet, tmp_path)
    device = fleet.provision()
    cert_file, _ = device.files()
    result = _check(config, cert_file)
    assert result.exit_code == 0, result.output
    for name in ("certificate", "validity", "eku", "chain", "ca_revocation", "registry",
                 "revocation", "device_status", "attestation", "overlap"):
        assert any(line.startswith(name) and " PASS " in line
                   for line in result.output.splitlines()), name
    assert result.output.strip().endswith("verdict: ACCEPTED")

    key, rogue = rogue_certificate(fleet, device)
    rogue_file, _ = device.files(rogue, key)
    result = _check(config, rogue_file, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    verdicts = {c["check"]: (c["verdict"], c["detail"]) for c in report["checks"]}
    assert verdicts["attestation"] == ("FAIL", "attestation: no_evidence")
    assert verdicts["chain"][0] == "PASS" and not report["accepted"]


def test_check_cert_on_a_stranger_and_an_expired_time(fleet, tmp_path):
    config = _config(fleet, tmp_path)
    other = Fleet(tmp_path / "other")
    try:
        stranger = other.provision()
        cert_file, _ = stranger.files()
        result = _check(config, cert_file)
        assert result.exit_code == 1
        assert "chain" in result.output and "does not chain to a fleet root" in result.output
        assert "ca_revocation  SKIP  not run: chain failed" in result.output
    finally:
        other.close()
    device = fleet.provision()
    fleet.enrol(device)
    cert_file, _ = device.files()
    result = _check(config, cert_file, "--at", "2099-01-01T00:00:00Z")
    assert result.exit_code == 1 and "validity" in result.output and "expired at" in \
        result.output


def test_config_file_and_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[cloud]\nverifier_port = 9000\nvendor_roots = ["v.pem"]\n'
                    'state_dir = "s"\n')
    config = load_config(str(path), environ={"FLEETID_CLOUD_VERIFIER_PORT": "9100",
                                             "FLEETID_CLOUD_ACCEPT_IDENTITY": "false"})
    assert config.verifier_port == 9100 and config.accept_identity is False
    assert config.vendor_roots == [str(tmp_path / "v.pem")]
    assert config.registry == "sqlite:" + str(tmp_path / "s" / "registry.db")
    path.write_text('[cloud]\nverifier_prot = 1\n')
    with pytest.raises(ConfigError, match="verifier_prot"):
        load_config(str(path), environ={})
    with pytest.raises(ConfigError):
        load_config(None, environ={"FLEETID_CLOUD_EST_PORT": "many"})


def test_serve_runs_verifier_and_est_on_the_embedded_defaults(tmp_path):
    env = dict(os.environ)
    env.pop("FLEETID_KEYSTORE_PASS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetid.cli.main", "cloud", "serve", "--state-dir",
         str(tmp_path / "state"), "--verifier-port", "0", "--est-port", "0",
         "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)
        assert ready, "serve did not start"
        line = process.stdout.readline()
        assert line, process.stderr.read().decode()[-2000:]
        info = json.loads(line)
        ports = info["listening"]
        assert info["labels"] == ["default"]
        import ssl
        import urllib.request

        context = ssl.create_default_context(cafile=info["root"])
        url = "https://127.0.0.1:%d/.well-known/est/cacerts" % ports["est"]
        body = urllib.request.urlopen(url, context=context, timeout=10).read()
        certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
        assert len(certs) == 2
        assert oct(os.stat(tmp_path / "state" / "keystore.pass").st_mode & 0o777) == "0o600"
        with pytest.raises(Exception):  # the verifier port requires a client certificate
            urllib.request.urlopen("https://127.0.0.1:%d/v1/whoami" % ports["verifier"],
                                   context=context, timeout=10).read()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    assert process.returncode == 0
    time.sleep(0)
