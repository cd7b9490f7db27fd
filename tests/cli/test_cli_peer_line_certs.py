"""The device-facing peer and certificate commands on the certificates the system really
issues: the line's identity certificates (subject serialNumber FID-000000042) and the
operational certificate EST issues at the agent's enrolment (same subject), not
hand-made look-alikes with numeric serials.

  * `fleetid agent check-peer-offline` (compact set): the line's FID-… serial maps to the
    registry serial the set holds (cloud/revocation/revset_publisher.py keys devices by it); a
    revoked device is refused whichever of its certificates it shows;
  * `fleetid agent check-peer` (the issuing CA's CRL, fetched from the CRL listener);
  * `fleetid cloud check-cert` (the verifier's checks, one by one).
"""

import os

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fleetid.cli.main import cli
from fleetid.cloud.http.revocation_app import make_revocation_app
from fleetid.cloud.revocation.revset_publisher import (
    RevsetPublisher,
    RevocationSigner,
    new_revocation_signer,
)
from fleetid.cloud.revocation.crl import CrlIssuer, CrlPublisher, CrlTier
from fleetid.common import se_consts as C
from fleetid.device.revset_cache import RevsetCacheError, device_number
from tests.cloud.crl_support import FakeMonotonic
from tests.cloud.ocsp_support import LoopbackServer
from tests.device.agent_support import Fleet, run_until_settled

PEM = serialization.Encoding.PEM


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from fleetid.common import t1
    from fleetid.sim import profiles
    from fleetid.sim.chip import Chip
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.fab import fab_chip
    from fleetid.sim.nvm import Nvm
    from fleetid.sim.server import serve_in_thread

    tmp_path = tmp_path_factory.mktemp("peerline")
    fleet = Fleet(tmp_path / "fleet", devices=2)
    run_until_settled(fleet, 0)  # device 0 enrols: EST issues its operational certificate
    slot = fleet.settled(0)
    cloud, line = fleet.cloud, fleet.cloud.line
    certs = {}
    for index in (0, 1):
        se = cloud.session(index)
        certs["line%d" % index] = x509.load_der_x509_certificate(
            bytes(se.get_cert(C.SLOT_IDENTITY)))
    certs["est0"] = x509.load_der_x509_certificate(bytes(cloud.session(0).get_cert(slot)))
    for name, cert in certs.items():
        (tmp_path / (name + ".pem")).write_bytes(cert.public_bytes(PEM))
    serials = [cloud.device(cloud.session(i))[0].serial for i in (0, 1)]
    # The revocation material of the line's cloud, made in the line's HSM.
    signer_cert = new_revocation_signer(line.hsm, line.labels["root"], line.root_cert,
                                        "revocation-set")
    signer = RevocationSigner(line.hsm, "revocation-set", signer_cert, line.root_cert)
    compact = RevsetPublisher(line.registry, signer, [line.ca_cert],
                               monotonic=FakeMonotonic())
    crls = CrlPublisher(line.registry, [CrlIssuer("ca", line.hsm, line.labels["ca"],
                                                  line.ca_cert)],
                        monotonic=FakeMonotonic())
    for name, cert in (("root", line.root_cert), ("ca", line.ca_cert),
                       ("signer", signer_cert)):
        (tmp_path / (name + ".pem")).write_bytes(cert.public_bytes(PEM))
    vendor = [str(tmp_path / ("vendor%d.pem" % i)) for i in range(len(line.vendor_roots))]
    for path, cert in zip(vendor, line.vendor_roots):
        with open(path, "wb") as f:
            f.write(cert.public_bytes(PEM))
    (tmp_path / "cloud.toml").write_text(
        '[cloud]\nstate_dir = "%s"\nroots = ["%s"]\nintermediates = ["%s"]\n'
        'vendor_roots = [%s]\nregistry = "%s"\n' % (
            tmp_path / "state", tmp_path / "root.pem", tmp_path / "ca.pem",
            ", ".join('"%s"' % p for p in vendor), line.config["registry"]))
    # The checking device's own SE: another emulated chip on a Unix socket.
    fab_chip(str(tmp_path / "vendor"), str(tmp_path / "checker.nvm"))
    server = serve_in_thread(BusEndpoint(Chip(Nvm(str(tmp_path / "checker.nvm"))),
                                         profile=t1.PROFILE_GP, latency=profiles.get("none")),
                             "unix:" + str(tmp_path / "se.sock"), idle_timeout_s=60)
    crl_listener = LoopbackServer(make_revocation_app([CrlTier(crls)])).__enter__()
    try:
        yield {"dir": tmp_path, "fleet": fleet, "certs": certs, "serials": serials,
               "compact": compact, "crls": crls, "bus": server.bus_uri,
               "crl_url": crl_listener.url + "/crl/ca.crl"}
    finally:
        crl_listener.__exit__(None, None, None)
        server.stop()
        fleet.close()


def _run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _offline(world, name, load=None):
    d = world["dir"]
    args = ["agent", "check-peer-offline", str(d / (name + ".pem")), "--bus", world["bus"],
            "--root", str(d / "root.pem"), "--signer", str(d / "signer.pem"),
            "--cache", str(d / "cache.frs")]
    if load is not None:
        (d / "received.frs").write_bytes(load)
        args += ["--load", str(d / "received.frs")]
    return _run(*args)


def _crl(world, name):
    d = world["dir"]
    return _run("agent", "check-peer", str(d / (name + ".pem")), "--bus", world["bus"],
                "--crl-issuer", str(d / "ca.pem"), "--crl-cache", str(d / "crl.der"),
                "--refresh-from", world["crl_url"])


def _check_cert(world, name):
    d = world["dir"]
    return _run("cloud", "check-cert", str(d / (name + ".pem")), "--config",
                str(d / "cloud.toml"))


def _revoke(world, name):
    cert = world["certs"][name]
    world["fleet"].cloud.line.registry.mark_revoked(
        cert.serial_number, "keyCompromise", issuer=cert.issuer.rfc4514_string())
    world["compact"].invalidate()
    world["crls"].invalidate()


def test_the_line_and_est_write_the_fid_serial_the_compact_set_keys_by_number(world):
    certs, serials = world["certs"], world["serials"]
    for name, index in (("line0", 0), ("est0", 0), ("line1", 1)):
        serial_number = certs[name].subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        assert serial_number[0].value == "FID-%09d" % serials[index]
        assert device_number(serial_number[0].value) == serials[index]
    assert certs["est0"].subject == certs["line0"].subject  # EST keeps the subject
    assert certs["est0"].serial_number != certs["line0"].serial_number


@pytest.mark.parametrize("text", ["FID-", "-42", "FID-4²", "FID-0x2A", "FID-00000000",
                                  "FID-" + "9" * 20, "", "FID-42 "])
def test_a_serial_that_is_not_prefix_digits_is_refused_with_a_reason(text):
    with pytest.raises(RevsetCacheError) as refused:
        device_number(text)
    assert refused.value.reason == "serial"


def test_every_peer_and_cert_command_on_line_and_est_certificates(world):
    serials = world["serials"]
    first = world["compact"].current()
    # Nothing revoked: every command accepts every real certificate.
    for name, index in (("line0", 0), ("est0", 0), ("line1", 1)):
        result = _offline(world, name, first if name == "line0" else None)
        assert result.exit_code == 0, result.output
        assert "peer device %d: not revoked" % serials[index] in result.output
        result = _crl(world, name)
        assert result.exit_code == 0 and "not revoked" in result.output, result.output
    for name in ("line0", "est0", "line1"):
        result = _check_cert(world, name)
        assert result.exit_code == 0 and "verdict: ACCEPTED" in result.output, result.output

    # Device 1's identity is revoked: every tier refuses it, device 0 is untouched.
    _revoke(world, "line1")
    second = world["compact"].current()
    result = _offline(world, "line1", second)
    assert result.exit_code == 1, result.output
    assert "peer device %d: REFUSED" % serials[1] in result.output
    assert _offline(world, "line0").exit_code == 0
    assert _offline(world, "est0").exit_code == 0
    result = _crl(world, "line1")
    assert result.exit_code == 1 and "REFUSED" in result.output, result.output
    assert _crl(world, "est0").exit_code == 0
    result = _check_cert(world, "line1")
    assert result.exit_code == 1 and "verdict: REFUSED" in result.output, result.output

    # Device 0's EST certificate is revoked (key compromise): offline, the device is
    # refused whichever certificate it shows; the CRL names that certificate.
    _revoke(world, "est0")
    third = world["compact"].current()
    for name in ("est0", "line0"):
        result = _offline(world, name, third if name == "est0" else None)
        assert result.exit_code == 1, result.output
        assert "peer device %d: REFUSED" % serials[0] in result.output
    result = _crl(world, "est0")
    assert result.exit_code == 1 and "REFUSED" in result.output, result.output
    assert _check_cert(world, "est0").exit_code == 1


def test_check_peer_offline_names_a_certificate_without_a_device_serial(world, tmp_path):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet-cloud")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(world["certs"]["line0"].not_valid_before_utc)
            .not_valid_after(world["certs"]["line0"].not_valid_after_utc)
            .sign(key, hashes.SHA256()))
    path = world["dir"] / "stranger.pem"
    path.write_bytes(cert.public_bytes(PEM))
    result = _offline(world, "stranger")
    assert result.exit_code == 1
    assert "stranger.pem: the subject's device serial 'fleet-cloud' (serialNumber, else " \
        "CN) is not PREFIX-<digits>" in result.output, result.output
    assert os.path.exists(path)
