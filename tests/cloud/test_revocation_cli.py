"""`fleetid revoke` and `fleetid revocation status`: the command writes the registry, the
audit chain and the event file; status shows per tier what is published, its number and
its age, fetched from a running revocation listener (CRL + OCSP + compact set)."""

import json
import os

import pytest
from click.testing import CliRunner

from fleetid.cli.main import cli
from fleetid.cloud.revocation import tiers
from fleetid.cloud.revocation.crl import CrlIssuer, CrlPublisher
from fleetid.cloud.server import CloudServer
from tests.cloud.cloud_support import Fleet, LoopThread, pem, revocation_config


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(tmp_path / "fleet")
    fleet.devices = [fleet.provision("b42"), fleet.provision("b42"), fleet.provision("b43")]
    yield fleet
    fleet.close()


def _run(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def test_revoke_serial_and_batch_write_registry_audit_and_event(fleet, tmp_path):
    config = revocation_config(fleet, tmp_path)
    head = fleet.registry.head()
    device = fleet.devices[0]
    result = _run("revoke", "--serial", str(device.serial), "--reason", "keyCompromise",
                  "--operator", "alice", "--config", config)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["event"] == 1 and len(out["revoked_certificates"]) == 1
    assert fleet.registry.get_device(device.serial).status == "revoked"
    assert fleet.registry.head() != head  # the audit chain grew
    result = _run("revoke", "--batch", "b43", "--reason", "cACompromise", "--config", config)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["event"] == 2
    assert os.path.exists(tmp_path / "state" / "revoked-cas.jsonl")
    for bad in (["revoke", "--config", config],
                ["revoke", "--serial", "1", "--batch", "b42", "--config", config],
                ["revoke", "--batch", "nope", "--config", config],
                ["revoke", "--serial", "999", "--config", config]):
        result = _run(*bad)
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        assert "Error" in result.output
    result = _run("revocation", "status", "--config", config)
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["verifier"]["event"] == 2
    assert len(status["verifier"]["revoked_cas"]) == 1


def test_status_shows_every_tier_of_a_running_listener_and_revoke_reaches_it(fleet, tmp_path):
    config = revocation_config(fleet, tmp_path)
    state = str(tmp_path / "state")
    issuers = [("ca-widget-" + b, fleet.ca_certs[b]) for b in ("b42", "b43")]
    assert tiers.load(fleet.hsm, fleet.registry, state, fleet.root, issuers,
                      str(tmp_path / "state" / "revoked-cas.jsonl")) is None
    tiers.init_keys(fleet.hsm, state, "fleet-root", fleet.root, issuers)
    crl = CrlPublisher(fleet.registry, [CrlIssuer(b, fleet.hsm, k, c) for (k, c), b in
                                        zip(issuers, ("b42", "b43"))])
    revocation = tiers.load(fleet.hsm, fleet.registry, state, fleet.root, issuers,
                            str(tmp_path / "state" / "revoked-cas.jsonl"), crl)
    revocation.tier("revset").publisher.poll_interval = 3600  # only the event can make it re-read
    server = CloudServer(fleet.verifier, fleet.est, fleet.server_cert, fleet.server_key,
                         fleet.trust.ca_bundle_pem(), verifier_port=0, est_port=0,
                         crl_publisher=crl, crl_port=0, revocation_tiers=revocation)
    loop = LoopThread()
    try:
        ports = loop.run(server.start())
        url = "http://127.0.0.1:%d" % ports["crl"]
        first = json.loads(_run("revocation", "status", "--config", config, "--url",
                                url).output)
        assert first["ocsp"]["response_status"] == "SUCCESSFUL"
        assert first["revset"]["revoked"] == 0
        assert set(first["crl"]) == {"b42", "b43"}
        assert all("number" in v for v in first["crl"].values())
        _run("revoke", "--serial", str(fleet.devices[1].serial), "--reason",
             "keyCompromise", "--config", config)
        second = json.loads(_run("revocation", "status", "--config", config, "--url",
                                 url).output)
        assert second["revset"]["revoked"] == 1  # the event, not the hour-long poll
        assert second["revset"]["number"] > first["revset"]["number"]
        assert second["crl"]["b42"]["revoked"] == 1
    finally:
        loop.run(server.stop())
        loop.close()


def test_the_verifier_staples_its_certificates_ocsp_response_on_every_answer(fleet, tmp_path):
    # No TLS stapling in Python's ssl server: the staple rides in a response header on the
    # same connection (cloud/revocation/staple.py) and at GET /ocsp/staple.
    import base64
    import http.client
    import ssl
    import urllib.request

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import ocsp

    from fleetid.cloud.revocation.staple import STAPLE_HEADER
    from fleetid.cloud.verifier.revoked_cas import append

    state = str(tmp_path / "state")
    cas_path = str(tmp_path / "state" / "revoked-cas.jsonl")
    issuers = [("ca-widget-b42", fleet.ca_certs["b42"])]
    tiers.init_keys(fleet.hsm, state, "fleet-root", fleet.root, issuers)
    with open(fleet.server_cert, "rb") as f:
        server_cert = x509.load_pem_x509_certificate(f.read())
    crl = CrlPublisher(fleet.registry, [CrlIssuer("b42", fleet.hsm, *issuers[0])])
    revocation = tiers.load(fleet.hsm, fleet.registry, state, fleet.root, issuers, cas_path,
                            crl, server_cert=server_cert)
    server = CloudServer(fleet.verifier, fleet.est, fleet.server_cert, fleet.server_key,
                         fleet.trust.ca_bundle_pem(), verifier_port=0, est_port=0,
                         crl_publisher=crl, crl_port=0, revocation_tiers=revocation)
    loop = LoopThread()
    try:
        ports = loop.run(server.start())
        context = ssl.create_default_context(cafile=fleet.root_file)
        context.load_cert_chain(*fleet.devices[0].files())
        conn = http.client.HTTPSConnection("127.0.0.1", ports["verifier"], timeout=20,
                                           context=context)
        conn.request("GET", "/v1/whoami")
        response = conn.getresponse()
        response.read()
        presented = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True))
        conn.close()
        assert response.status == 200
        staple = ocsp.load_der_ocsp_response(base64.b64decode(
            response.getheader(STAPLE_HEADER)))
        # What a device checks: the CertID names the certificate TLS presented, the
        # responder is delegated by its issuer, the signature verifies, the status is good.
        assert staple.serial_number == presented.serial_number
        assert staple.certificate_status == ocsp.OCSPCertStatus.GOOD
        responder = staple.certificates[0]
        responder.verify_directly_issued_by(fleet.root)
        responder.public_key().verify(staple.signature, staple.tbs_response_bytes,
                                      ec.ECDSA(hashes.SHA256()))
        url = "http://127.0.0.1:%d/ocsp/staple" % ports["crl"]
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.read() == base64.b64decode(response.getheader(STAPLE_HEADER))
        # The server certificate revoked (an entry in the revoked-CA file names any
        # certificate) + the event: the next staple says so.
        append(cas_path, server_cert, "keyCompromise")
        revocation.tier("staple").invalidate()
        with urllib.request.urlopen(url, timeout=10) as resp:
            again = ocsp.load_der_ocsp_response(resp.read())
        assert again.certificate_status == ocsp.OCSPCertStatus.REVOKED
    finally:
        loop.run(server.stop())
        loop.close()


def _closed_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once closed


def test_status_of_an_unreachable_listener_exits_1_naming_the_url_and_cause(fleet, tmp_path):
    config = revocation_config(fleet, tmp_path)
    url = "http://127.0.0.1:%d" % _closed_port()
    result = CliRunner().invoke(cli, ["revocation", "status", "--config", config, "--url",
                                      url])
    assert result.exit_code == 1, result.output
    assert "Error: revocation listener %s: Connection refused" % url in result.stderr, \
        result.stderr
    report = json.loads(result.stdout)
    assert report["revset"] == {"error": "URLError", "url": url + "/revset/current.frs",
                                 "cause": "Connection refused"}


def test_status_names_each_tier_a_listener_does_not_serve(fleet, tmp_path):
    from aiohttp import web

    from tests.cloud.ocsp_support import LoopbackServer

    config = revocation_config(fleet, tmp_path)
    with LoopbackServer(web.Application()) as server:  # answers 404 to everything
        result = CliRunner().invoke(cli, ["revocation", "status", "--config", config,
                                          "--url", server.url])
    assert result.exit_code == 1, result.output
    for path in ("/crl/b42.crl", "/crl/b43.crl", "/revset/current.frs"):
        assert "%s%s: HTTP 404 Not Found" % (server.url, path) in result.stderr, result.stderr
    assert "ocsp: %s/ocsp: HTTP 404 Not Found" % server.url in result.stderr, result.stderr


def test_revoke_server_cert_lists_the_clouds_own_certificate_on_the_root_crl(fleet, tmp_path):
    # `fleetid revoke --server-cert`: the one way to revoke the cloud's TLS certificate
    # (root-issued, in no registry); the root's CRL view then lists its serial.
    from cryptography import x509

    from fleetid.cloud.revocation.arl import RootCrlRegistry
    from fleetid.cloud.verifier import revoked_cas

    config = revocation_config(fleet, tmp_path)
    path = str(tmp_path / "state" / "revoked-cas.jsonl")
    device_pem = tmp_path / "device.pem"
    device_pem.write_bytes(pem(fleet.devices[0].identity_cert))
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(pem(fleet.ca_certs["b42"]))
    # Refused, nothing written: a device certificate, a CA (not serverAuth).
    for bad in (device_pem, ca_pem):
        result = _run("revoke", "--server-cert", str(bad), "--config", config)
        assert result.exit_code == 1 and "not a TLS server certificate" in result.output
        assert not os.path.exists(path)
    result = _run("revoke", "--server-cert", fleet.server_cert, "--reason", "keyCompromise",
                  "--operator", "alice", "--config", config)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["new"] and out["event"] == 1 and out["reason"] == "keyCompromise"
    with open(fleet.server_cert, "rb") as f:
        server = x509.load_pem_x509_certificate(f.read())
    listed = RootCrlRegistry(fleet.registry, path, fleet.root).revoked_certificates(
        fleet.root.subject.rfc4514_string())
    assert [r.cert_serial for r in listed] == ["%x" % server.serial_number]
    assert len(revoked_cas.load(path)[0]) == 1


def test_revoke_from_file_revokes_the_list_in_one_event_and_resumes(fleet, tmp_path):
    config = revocation_config(fleet, tmp_path)
    listed = tmp_path / "recall.txt"
    first, second, third = fleet.devices
    listed.write_text("# recall 2026-12\n%d\n\n%d  # the b43 one\n%d\n"
                      % (first.serial, third.serial, first.serial))
    result = CliRunner().invoke(cli, ["revoke", "--from-file", str(listed), "--reason",
                                      "keyCompromise", "--operator", "alice", "--config",
                                      config])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["devices"], out["revoked_certificates"], out["already_revoked"]) == (2, 2, 0)
    assert out["event"] == 1  # one event for the whole list: the tiers rebuild once
    assert "revoking" in result.stderr  # the progress bar, off stdout
    statuses = [fleet.registry.get_device(d.serial).status for d in fleet.devices]
    assert statuses == ["revoked", "committed", "revoked"]
    # Run again (as after a crash mid-list): the revoked are skipped, nothing fails.
    again = json.loads(CliRunner().invoke(cli, ["revoke", "--from-file", str(listed),
                                                "--config", config]).stdout)
    assert (again["revoked_certificates"], again["already_revoked"]) == (0, 2)


@pytest.mark.parametrize("bad_line, named", [("12x", "line 3: '12x' is not a device serial"),
                                             ("999", "line 3: device 999 is not in the "
                                                     "registry")])
def test_revoke_from_file_with_a_bad_line_names_it_and_revokes_nothing(fleet, tmp_path,
                                                                       bad_line, named):
    config = revocation_config(fleet, tmp_path)
    listed = tmp_path / "recall.txt"
    listed.write_text("%d\n%d\n%s\n" % (fleet.devices[0].serial, fleet.devices[1].serial,
                                        bad_line))
    head = fleet.registry.head()
    result = CliRunner().invoke(cli, ["revoke", "--from-file", str(listed), "--config",
                                      config])
    assert result.exit_code == 1 and named in result.output, result.output
    assert "nothing revoked" in result.output and "Traceback" not in result.output
    assert fleet.registry.head() == head
    assert {fleet.registry.get_device(d.serial).status for d in fleet.devices} == {"committed"}
    assert not os.path.exists(tiers.events_path(tmp_path / "state"))
