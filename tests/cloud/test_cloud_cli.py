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


def test_check_cert_names_a_missing_subject_alt_name_not_a_broken_chain(fleet, tmp_path):
    from tests.cloud.test_verifier import ca_signed_without_san

    config = _config(fleet, tmp_path)
    device = fleet.provision()
    key, cert = ca_signed_without_san(fleet, device)
    cert_file, _ = device.files(cert, key)
    result = _check(config, cert_file)
    assert result.exit_code == 1
    chain = [line for line in result.output.splitlines() if line.startswith("chain")]
    assert len(chain) == 1 and " FAIL " in chain[0], result.output
    assert "subjectAltName" in chain[0] and "does not chain" not in chain[0]


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


def test_config_beside_the_state_dir_is_found_without_config(tmp_path, monkeypatch):
    # `fleetid line cloud-config --out var/cloud` writes var/cloud/cloud.toml: every cloud
    # command run from the same folder reads it without --config (README examples).
    monkeypatch.chdir(tmp_path)
    assert load_config(None, environ={}).verifier_port != 9300  # nothing there yet
    (tmp_path / "var" / "cloud").mkdir(parents=True)
    (tmp_path / "var" / "cloud" / "cloud.toml").write_text("[cloud]\nverifier_port = 9300\n")
    assert load_config(None, environ={}).verifier_port == 9300
    other = tmp_path / "other"
    other.mkdir()
    (other / "cloud.toml").write_text("[cloud]\nverifier_port = 9400\n")
    assert load_config(None, environ={"FLEETID_CLOUD_STATE_DIR": str(other)}).verifier_port \
        == 9400
    named = tmp_path / "named.toml"
    named.write_text("[cloud]\nverifier_port = 9500\n")
    assert load_config(str(named), environ={}).verifier_port == 9500  # --config wins


@pytest.mark.parametrize("named", ["tls_key", "tls_cert", "tls_key and a missing tls_cert"])
def test_serve_refuses_a_tls_key_without_its_certificate_and_keeps_the_key(tmp_path, named,
                                                                          monkeypatch):
    def serve_forever(*_args, **_kwargs):  # a regression must fail here, not serve forever
        raise AssertionError("cloud serve started")

    monkeypatch.setattr("fleetid.cloud.server.serve_forever", serve_forever)
    key = tmp_path / "operator.key.pem"
    key.write_bytes(b"the operator's key\n")
    lines = ['[cloud]', 'state_dir = "state"']
    if named != "tls_cert":
        lines.append('tls_key = "%s"' % key)
    if named != "tls_key":
        lines.append('tls_cert = "%s"' % (tmp_path / "missing.pem"))
    if named == "tls_cert":
        key.unlink()
    (tmp_path / "cloud.toml").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(cli, ["cloud", "serve", "--config",
                                      str(tmp_path / "cloud.toml"), "--verifier-port", "0",
                                      "--est-port", "0", "--metrics-port", "0"],
                                env={"FLEETID_KEYSTORE_PASS": "test-pass"})
    assert result.exit_code == 1
    assert "ConfigError" in result.output
    assert ("tls_cert" if named == "tls_key" else "tls_key") in result.output
    if named != "tls_cert":
        assert key.read_bytes() == b"the operator's key\n"  # not overwritten
    assert not (tmp_path / "missing.pem").exists()


def test_serve_refuses_a_configured_tls_pair_that_does_not_exist_and_writes_nothing(
        tmp_path, monkeypatch):
    def serve_forever(*_args, **_kwargs):
        raise AssertionError("cloud serve started")

    monkeypatch.setattr("fleetid.cloud.server.serve_forever", serve_forever)
    cert, key = tmp_path / "tls" / "server.pem", tmp_path / "tls" / "server.key.pem"
    (tmp_path / "cloud.toml").write_text(
        '[cloud]\nstate_dir = "state"\ntls_cert = "%s"\ntls_key = "%s"\n' % (cert, key))
    result = CliRunner().invoke(cli, ["cloud", "serve", "--config",
                                      str(tmp_path / "cloud.toml"), "--verifier-port", "0",
                                      "--est-port", "0", "--metrics-port", "0"],
                                env={"FLEETID_KEYSTORE_PASS": "test-pass"})
    assert result.exit_code == 1, result.output
    assert "tls_cert %s does not exist" % cert in result.output, result.output
    assert "never generated" in result.output
    assert not (tmp_path / "tls").exists()  # no key pair made where the operator pointed


def test_serve_on_a_busy_port_exits_1_with_one_line_naming_the_port(tmp_path):
    import socket

    env = dict(os.environ, FLEETID_KEYSTORE_PASS="test-pass")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "fleetid.cli.main", "cloud", "serve", "--state-dir",
             str(tmp_path / "state"), "--verifier-port", str(port), "--est-port", "0",
             "--metrics-port", "0"], stdin=subprocess.DEVNULL, capture_output=True,
            env=env, cwd=str(tmp_path), timeout=120, check=False)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1] == ("Error: cannot listen on 127.0.0.1:%d (verifier): "
                                    "Address already in use" % port), err
    for line in err.splitlines()[:-1]:  # before it, only the JSON log of the key set-up
        json.loads(line)


def test_serve_runs_verifier_and_est_on_the_embedded_defaults(tmp_path):
    env = dict(os.environ)
    env.pop("FLEETID_KEYSTORE_PASS", None)
    # No passphrase anywhere (and no terminal to prompt): refused with one line.
    refused = subprocess.run(
        [sys.executable, "-m", "fleetid.cli.main", "cloud", "serve", "--state-dir",
         str(tmp_path / "state")], stdin=subprocess.DEVNULL, capture_output=True, env=env,
        cwd=str(tmp_path), timeout=60, check=False)
    assert refused.returncode == 1 and b"FLEETID_KEYSTORE_PASS" in refused.stderr
    assert not (tmp_path / "state" / "keystore.json").exists()
    # The passphrase from a file the operator names.
    (tmp_path / "operator.pass").write_text("correct horse battery staple\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetid.cli.main", "cloud", "serve", "--state-dir",
         str(tmp_path / "state"), "--verifier-port", "0", "--est-port", "0",
         "--metrics-port", "0", "--keystore-pass-file", str(tmp_path / "operator.pass")],
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
        # The keystore is there; its passphrase is not stored beside it.
        assert (tmp_path / "state" / "keystore.json").exists()
        # The embedded set-up's audit checkpoint keys (the server checkpoints what it
        # records while it runs and at shutdown).
        assert (tmp_path / "state" / "audit" / "audit-line.pub.pem").exists()
        assert (tmp_path / "state" / "audit" / "audit-witness.pub.pem").exists()
        assert sorted(p.name for p in (tmp_path / "state").rglob("*pass*")) == []
        with pytest.raises(Exception):  # the verifier port requires a client certificate
            urllib.request.urlopen("https://127.0.0.1:%d/v1/whoami" % ports["verifier"],
                                   context=context, timeout=10).read()
        # An oversized header line (aiohttp's LineTooLong): answered 400, logged as JSON.
        import urllib.error

        request = urllib.request.Request(url, headers={"X-Big": "a" * 20000})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, context=context, timeout=10)
        assert refused.value.code in (400, 431)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    assert process.returncode == 0
    log_lines = process.stderr.read().decode().splitlines()
    # Every line of the server log is one JSON object (no plain-text traceback).
    records = [json.loads(line) for line in log_lines]
    assert any("LineTooLong" in json.dumps(r) or "Got more than" in json.dumps(r)
               for r in records), log_lines
    time.sleep(0)


def _cli(*args):
    return CliRunner().invoke(cli, ["cloud"] + list(args), catch_exceptions=False)


def test_revoke_by_cert_and_by_serial_reaches_the_running_verifier(fleet, tmp_path):
    from tests.cloud.cloud_support import RunningCloud

    config = _config(fleet, tmp_path)
    device, other = fleet.provision(), fleet.provision()
    fleet.enrol(device)
    fleet.enrol(other)
    with RunningCloud(fleet) as cloud:
        files = device.files()
        assert cloud.request("verifier", "GET", "/v1/whoami", files=files)[0] == 200
        result = _cli("revoke", "--cert", files[0], "--reason", "keyCompromise",
                      "--operator", "alice", "--config", config)
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["reason"] == "keyCompromise" and report["device"] == device.serial
        status, _, body = cloud.request("verifier", "GET", "/v1/whoami", files=files)
        assert status == 403 and body.startswith(b"revoked")
        # The other device is untouched; its identity certificate revoked by serial (hex,
        # as openssl prints it) revokes the device itself.
        assert cloud.request("verifier", "GET", "/v1/whoami", files=other.files())[0] == 200
        serial_hex = "%X" % other.identity_cert.serial_number
        result = _cli("revoke", "--serial", serial_hex, "--config", config)
        assert result.exit_code == 0, result.output
        assert fleet.registry.get_device(other.serial).status == "revoked"
        status, _, body = cloud.request("verifier", "GET", "/v1/whoami", files=other.files())
        assert status == 403 and body.startswith(b"device_status")
    # Revoking twice is refused with the registry's reason, nothing written.
    head = fleet.registry.head()
    result = CliRunner().invoke(cli, ["cloud", "revoke", "--cert", files[0], "--config",
                                      config])
    assert result.exit_code != 0 and "already revoked" in result.output
    assert fleet.registry.head() == head
    result = CliRunner().invoke(cli, ["cloud", "revoke", "--config", config])
    assert result.exit_code != 0 and "exactly one of --serial and --cert" in result.output


def test_revoke_ca_is_persisted_and_refuses_the_batch_in_a_running_verifier(fleet,
                                                                           tmp_path):
    from fleetid.cloud.config import load_config
    from fleetid.cloud.verifier.revoked_cas import RevokedCaFile, ca_fingerprint, load
    from tests.cloud.cloud_support import RunningCloud

    config = _config(fleet, tmp_path)
    revoked_file = load_config(config, environ={}).revoked_cas_file
    assert revoked_file == str(tmp_path / "state" / "revoked-cas.jsonl")
    # The running server watches the same file `cloud serve` would (build_context).
    fleet.trust.revoked_ca_file = RevokedCaFile(revoked_file)
    in_b42, in_b43 = fleet.provision("b42"), fleet.provision("b43")
    with RunningCloud(fleet) as cloud:
        assert cloud.request("verifier", "GET", "/v1/whoami",
                             files=in_b42.files())[0] == 200
        b42_file = tmp_path / "b42.pem"
        result = _cli("revoke-ca", "--cert", str(b42_file), "--reason", "cACompromise",
                      "--operator", "alice", "--config", config)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["fingerprint"] == ca_fingerprint(fleet.ca_certs["b42"])
        status, _, body = cloud.request("verifier", "GET", "/v1/whoami", files=in_b42.files())
        assert status == 403 and body.startswith(b"ca_revoked")
        assert cloud.request("verifier", "GET", "/v1/whoami",
                             files=in_b43.files())[0] == 200
    entries, skipped = load(revoked_file)
    assert [e["reason"] for e in entries] == ["cACompromise"] and skipped == 0
    # Idempotent; and check-cert (a fresh process's view) reports it from the file.
    assert _cli("revoke-ca", "--cert", str(b42_file), "--config", config).exit_code == 0
    assert len(load(revoked_file)[0]) == 1
    cert_file, _ = in_b42.files()
    result = _check(config, cert_file)
    assert result.exit_code == 1 and "ca_revocation  FAIL  ca_revoked" in result.output
    # Not for roots, not for device certificates.
    result = CliRunner().invoke(cli, ["cloud", "revoke-ca", "--cert",
                                      str(tmp_path / "root.pem"), "--config", config])
    assert result.exit_code != 0 and "fleet root" in result.output
    result = CliRunner().invoke(cli, ["cloud", "revoke-ca", "--cert", cert_file, "--config",
                                      config])
    assert result.exit_code != 0 and "not a CA certificate" in result.output


def test_revoked_ca_file_keeps_revocations_when_the_file_is_lost_or_corrupt(fleet,
                                                                           tmp_path):
    from fleetid.cloud.verifier.revoked_cas import RevokedCaFile, append, ca_fingerprint

    path = str(tmp_path / "revoked.jsonl")
    watcher = RevokedCaFile(path)
    assert watcher.fingerprints() == frozenset()
    append(path, fleet.ca_certs["b42"], "superseded")
    b42 = ca_fingerprint(fleet.ca_certs["b42"])
    assert watcher.fingerprints() == {b42}
    with open(path, "ab") as f:
        f.write(b"{not json\n")
    append(path, fleet.ca_certs["b43"])
    assert watcher.fingerprints() == {b42, ca_fingerprint(fleet.ca_certs["b43"])}
    assert watcher.skipped == 1
    os.remove(path)
    assert b42 in watcher.fingerprints()
    with pytest.raises(ValueError):
        append(path, fleet.ca_certs["b42"], "removeFromCRL")


def test_event_loop_setting_is_validated_and_resolved(tmp_path):
    import asyncio

    from fleetid.cloud.server import event_loop_factory

    assert load_config(None, environ={}).event_loop == "auto"
    config = load_config(None, environ={"FLEETID_CLOUD_EVENT_LOOP": "asyncio"})
    assert event_loop_factory(config.event_loop) is asyncio.new_event_loop
    with pytest.raises(ConfigError, match="event_loop"):
        load_config(None, environ={"FLEETID_CLOUD_EVENT_LOOP": "trio"})
    loop = event_loop_factory("auto")()
    try:
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()


def test_rotation_deadline_round_trips_and_refuses_other_shapes():
    import datetime

    from fleetid.cloud.registry.rotation import format_deadline, parse_deadline

    moment = datetime.datetime(2027, 3, 4, 5, 6, 7, tzinfo=datetime.timezone.utc)
    assert parse_deadline(format_deadline(moment)) == moment
    for text in ("2027-03-04 05:06:07Z", "2027-03-04T05:06:07", "2027-03-04T05:06:07+00:00",
                 "2027-13-04T05:06:07Z", ""):
        with pytest.raises(ValueError):
            parse_deadline(text)
