"""The MQTT options added for issue 16 refuse bad input with one clear line naming it:
`fleetid agent run --mqtt-revset-signer/--mqtt-revset-cache` (both or neither; a
certificate that is not a revocation-set signer) and `fleetid mqtt broker --service-port`
(must differ from --port)."""

import datetime

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetid.cli.main import cli


def _not_a_signer(path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a signer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


AGENT = ["agent", "run", "--bus", "sim:unix:/nonexistent/se.sock", "--cloud",
         "https://127.0.0.1:1", "--once", "--mqtt", "mqtts://127.0.0.1:1"]


@pytest.mark.parametrize("extra, names", [
    (["--mqtt-revset-cache", "{dir}/r.frs"], "--mqtt-revset-signer and --mqtt-revset-cache"),
    (["--mqtt-revset-signer", "{signer}"], "--mqtt-revset-signer and --mqtt-revset-cache"),
    (["--mqtt-revset-signer", "{signer}", "--mqtt-revset-cache", "{dir}/r.frs"],
     "is not a revocation-set signer"),
])
def test_agent_revset_options_refuse_bad_input(tmp_path, extra, names):
    signer = _not_a_signer(tmp_path / "signer.pem")
    argv = AGENT + [a.format(dir=tmp_path, signer=signer) for a in extra]
    result = CliRunner().invoke(cli, argv)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and names in errors[0], result.output


@pytest.mark.parametrize("extra, names", [
    (["--port", "65535"], "--port 65535: give --service-port"),
    (["--port", "9000", "--service-port", "9000"], "--service-port 9000"),
])
def test_broker_service_port_must_differ(tmp_path, extra, names):
    result = CliRunner().invoke(cli, ["mqtt", "broker", "--line", str(tmp_path)] + extra)
    assert result.exit_code == 2, result.output
    assert names in result.output and "Traceback" not in result.output
