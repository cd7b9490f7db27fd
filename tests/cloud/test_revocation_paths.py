"""Every revoke path reaches every tier within one request after the write, not after the
publishers' poll interval: each `fleetid revoke` form and each `fleetid cloud revoke*`
alias writes through RevocationService, whose event makes a running listener invalidate
every tier (tiers.TIERS) on its next request.

The publishers' poll interval is an hour here, and each tier is asked once before the
write (so it holds the old answer): only the event can make the next answer new.  The
staple tier speaks of the server's own certificate, which none of these paths revokes.
"""

import urllib.request

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from fleetid.cli.main import cli
from fleetid.cloud.revocation import tiers
from fleetid.cloud.revocation.revset_publisher import CURRENT_PATH, ca_key_id
from fleetid.cloud.revocation.crl import CrlIssuer, CrlPublisher, crl_path
from fleetid.common import revset
from tests.cloud.cloud_support import Fleet, RunningCloud, pem, revocation_config

HOUR = 3600.0

# (what is revoked, the command's words; {cert}, {serial}, {hex}, {ca} filled in).
PATHS = [
    ("device", ["revoke", "--serial", "{serial}"]),
    ("device", ["revoke", "--cert", "{cert}"]),
    ("device", ["revoke", "--cert-serial", "{hex}"]),
    ("device", ["cloud", "revoke", "--cert", "{cert}"]),
    ("device", ["cloud", "revoke", "--serial", "{hex}"]),
    ("device", ["cloud", "revoke-device", "--serial", "{serial}"]),
    ("batch", ["revoke", "--batch", "b43"]),
    ("batch", ["revoke", "--cert", "{ca}"]),
    ("batch", ["cloud", "revoke-ca", "--cert", "{ca}"]),
]


@pytest.fixture
def served(tmp_path):
    fleet = Fleet(tmp_path / "fleet")
    device, other = fleet.provision("b42"), fleet.provision("b43")
    config = revocation_config(fleet, tmp_path,
                               'revoked_cas_file = "%s"\n' % fleet.revoked_cas_path)
    state = str(tmp_path / "state")
    issuers = [("ca-widget-" + b, fleet.ca_certs[b]) for b in ("b42", "b43")]
    tiers.init_keys(fleet.hsm, state, "fleet-root", fleet.root, issuers)
    registry_view, crl_issuers = tiers.with_root_crl(
        fleet.hsm, fleet.registry, [fleet.root],
        [CrlIssuer(b, fleet.hsm, k, c) for (k, c), b in zip(issuers, ("b42", "b43"))],
        fleet.revoked_cas_path)
    crl = CrlPublisher(registry_view, crl_issuers, poll_interval=HOUR)
    revocation = tiers.load(fleet.hsm, fleet.registry, state, fleet.root, issuers,
                            fleet.revoked_cas_path, crl)
    revocation.tier("revset").publisher.poll_interval = HOUR
    try:
        with RunningCloud(fleet, crl_publisher=crl, crl_port=0,
                          revocation_tiers=revocation) as cloud:
            yield fleet, device, other, config, tmp_path, cloud
    finally:
        fleet.close()


def _get(url, data=None, content_type=None):
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=20) as resp:
        return resp.read()


def _whoami(cloud, device):
    return cloud.request("verifier", "GET", "/v1/whoami", files=device.files())[0]


def _tiers_say(cloud, device, batch):
    """What each tier answers about `device` now, one request each: the verifier's status,
    whether the CRL (the batch CA's, or the root's for a revoked CA) lists it, OCSP's
    status, whether the compact set holds it."""
    fleet = cloud.fleet
    base = "http://127.0.0.1:%d" % cloud.ports["crl"]
    cert = device.identity_cert
    ca = fleet.ca_certs[device.batch]
    if batch:
        listed = x509.load_der_x509_crl(_get(base + crl_path("root")))
        in_crl = listed.get_revoked_certificate_by_serial_number(ca.serial_number)
    else:
        listed = x509.load_der_x509_crl(_get(base + crl_path(device.batch)))
        in_crl = listed.get_revoked_certificate_by_serial_number(cert.serial_number)
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, ca, hashes.SHA1()).build()
    answer = ocsp.load_der_ocsp_response(_get(
        base + "/ocsp", request.public_bytes(serialization.Encoding.DER),
        "application/ocsp-request"))
    the_set = revset.parse(_get(base + CURRENT_PATH))
    in_set = the_set.ca_revoked(ca_key_id(ca)) if batch else the_set.contains(device.serial)
    return {"verifier": _whoami(cloud, device), "crl": in_crl is not None,
            "ocsp": answer.certificate_status.name, "revset": bool(in_set)}


@pytest.mark.parametrize("what, words", PATHS,
                         ids=["%s: %s" % (k, " ".join(w[:-1])) for k, w in PATHS])
def test_every_revoke_path_reaches_every_tier_on_the_next_request(served, what, words):
    fleet, device, other, config, folder, cloud = served
    target = other if what == "batch" else device
    bystander = device if what == "batch" else other
    good = {"verifier": 200, "crl": False, "ocsp": "GOOD", "revset": False}
    assert _tiers_say(cloud, target, what == "batch") == good  # the old answers
    cert_file = folder / "target.pem"
    cert_file.write_bytes(pem(target.identity_cert))
    fill = {"{serial}": str(target.serial), "{cert}": str(cert_file),
            "{hex}": "%X" % target.identity_cert.serial_number,
            "{ca}": str(folder / "b43.pem")}
    args = [fill.get(w, w) for w in words] + ["--reason", "keyCompromise", "--config", config]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    said = _tiers_say(cloud, target, what == "batch")
    assert said["verifier"] == 403 and said["crl"] and said["ocsp"] == "REVOKED" \
        and said["revset"], said
    assert _whoami(cloud, bystander) == 200  # the other one is untouched
    assert set(t.name for t in tiers.TIERS) == {"crl", "staple", "ocsp", "revset"}
