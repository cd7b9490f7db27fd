"""CRLs per issuing CA (cloud/revocation/): built from the registry's revocation state,
signed through the HSM, accepted by `openssl crl -verify`, re-published with a higher
CRL number when revocation changes, and served over HTTP at the distribution point URL
that issued certificates name."""

import datetime
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetid.cloud.revocation import crl_url
from fleetid.cloud.revocation.crl import CRL_CONTENT_TYPE
from fleetid.cloud.server import CloudServer
from tests.cloud.cloud_support import LoopThread
from tests.cloud.crl_support import FakeMonotonic, b42_publisher
from tests.conftest import require


@pytest.fixture
def revoked_fleet(fleet):
    """Three b42 devices and one b43; the first b42 device's certificate revoked."""
    devices = [fleet.provision("b42") for _ in range(3)] + [fleet.provision("b43")]
    fleet.registry.mark_revoked(devices[0].identity_cert.serial_number, "keyCompromise",
                                issuer=devices[0].identity_cert.issuer.rfc4514_string())
    return fleet, devices


def test_crl_lists_the_revoked_serial_and_is_signed_by_the_issuing_ca(revoked_fleet):
    fleet, devices = revoked_fleet
    crl = b42_publisher(fleet).current("b42")
    ca = fleet.ca_certs["b42"]
    assert crl.is_signature_valid(ca.public_key())
    assert crl.issuer == ca.subject
    entry = crl.get_revoked_certificate_by_serial_number(devices[0].identity_cert.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.key_compromise
    for device in devices[1:3]:
        assert crl.get_revoked_certificate_by_serial_number(
            device.identity_cert.serial_number) is None
    assert len(crl) == 1
    assert crl.next_update_utc - crl.last_update_utc == datetime.timedelta(hours=24)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > 0
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    # The b43 CA's CRL does not list b42's revocation.
    assert len(b42_publisher(fleet).current("b43")) == 0


def test_openssl_verifies_the_crl_against_the_issuing_ca(revoked_fleet, tmp_path):
    require(shutil.which("openssl") is not None, "openssl")
    fleet, devices = revoked_fleet
    der = b42_publisher(fleet).current_der("b42")
    (tmp_path / "b42.crl").write_bytes(der)
    (tmp_path / "issuing.pem").write_bytes(
        fleet.ca_certs["b42"].public_bytes(serialization.Encoding.PEM))
    proc = subprocess.run(["openssl", "crl", "-verify", "-CAfile", str(tmp_path / "issuing.pem"),
                           "-inform", "DER", "-in", str(tmp_path / "b42.crl"), "-noout",
                           "-text"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "verify OK" in proc.stderr + proc.stdout
    listed = [line.split(":", 1)[1].strip().lstrip("0") for line in proc.stdout.splitlines()
              if "Serial Number:" in line]
    assert listed == ["%X" % devices[0].identity_cert.serial_number]
    assert "Key Compromise" in proc.stdout
    # A CRL signed by the other batch's CA does not verify against b42's certificate.
    (tmp_path / "b43.crl").write_bytes(b42_publisher(fleet).current_der("b43"))
    proc = subprocess.run(["openssl", "crl", "-verify", "-CAfile", str(tmp_path / "issuing.pem"),
                           "-inform", "DER", "-in", str(tmp_path / "b43.crl"), "-noout"],
                          capture_output=True, text=True, timeout=30)
    assert "verify OK" not in proc.stderr + proc.stdout


def test_revocation_change_is_republished_with_a_higher_number(revoked_fleet):
    fleet, devices = revoked_fleet
    tick = FakeMonotonic()
    publisher = b42_publisher(fleet, monotonic=tick)
    first = publisher.current("b42")
    number = lambda crl: crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number  # noqa: E731
    fleet.registry.mark_revoked(devices[1].identity_cert.serial_number, "superseded",
                                issuer=devices[1].identity_cert.issuer.rfc4514_string())
    assert publisher.current("b42") is first  # within the poll interval: same CRL
    tick.now += 5.0
    second = publisher.current("b42")
    assert number(second) > number(first) and len(second) == 2
    tick.now += 5.0
    assert publisher.current("b42") is second  # nothing changed: no new CRL
    fleet.clock.advance(hours=12)  # half the validity: re-published, higher number
    third = publisher.current("b42")
    assert number(third) > number(second) and len(third) == 2
    assert third.last_update_utc > second.last_update_utc
    publisher.invalidate("b42")
    assert number(publisher.current("b42")) > number(third)


def _device_cache(tmp_path, fleet):
    # A device's CRL cache for the b42 CA over an emulated SE (device/crl_cache.py).
    from fleetid.common.apdu import ApduProtocol
    from fleetid.device.crl_cache import CrlCache
    from fleetid.device.se import SeSession
    from fleetid.sim.chip import Chip
    from fleetid.sim.fab import fab_chip
    from fleetid.sim.nvm import Nvm
    from tests.device.crl_support import MemoryStore, point_of

    fab_chip(str(tmp_path / "vendor"), str(tmp_path / "chip.nvm"))
    se = SeSession(ApduProtocol(Chip(Nvm(str(tmp_path / "chip.nvm"))).process))
    se.select()
    ca = fleet.ca_certs["b42"]
    return CrlCache(se, MemoryStore(), point_of(ca.public_key()), ca.subject.public_bytes())


def test_crl_is_served_at_the_distribution_point_the_certificates_name(fleet, tmp_path):
    publisher = b42_publisher(fleet)
    server = CloudServer(fleet.verifier, fleet.est, fleet.server_cert, fleet.server_key,
                         fleet.trust.ca_bundle_pem(), verifier_port=0, est_port=0,
                         crl_publisher=publisher, crl_port=0)
    loop = LoopThread()
    try:
        ports = loop.run(server.start())
        base = "http://127.0.0.1:%d" % ports["crl"]
        fleet.cas["b42"].crl_url = crl_url(base, "b42")  # as build_context configures it
        device = fleet.provision("b42")
        points = device.identity_cert.extensions.get_extension_for_class(
            x509.CRLDistributionPoints).value
        url = points[0].full_name[0].value
        assert url == base + "/crl/b42.crl"
        fleet.registry.mark_revoked(device.identity_cert.serial_number, "keyCompromise",
                                    issuer=device.identity_cert.issuer.rfc4514_string())
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == CRL_CONTENT_TYPE
            assert "max-age=" in response.headers["Cache-Control"]
            crl = x509.load_der_x509_crl(response.read())
        assert crl.get_revoked_certificate_by_serial_number(
            device.identity_cert.serial_number) is not None
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + "/crl/nope.crl", timeout=10)
        assert info.value.code == 404

        # A device fetches it from the URL in its certificate and verifies it in its SE.
        from fleetid.device.crl_cache import RevokedError

        def fetch():
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read()

        cache = _device_cache(tmp_path, fleet)
        now = int(crl.last_update_utc.timestamp()) + 1
        assert cache.refresh(fetch, now) == "updated"
        with pytest.raises(RevokedError):
            cache.check_serial(device.identity_cert.serial_number, now)
    finally:
        loop.run(server.stop())
        loop.close()


def test_config_names_the_crl_url_only_when_crl_publishing_is_on(tmp_path):
    from fleetid.cloud.config import load_config

    assert load_config(None, {}).crl_base_url is None
    config = load_config(None, {"FLEETID_CLOUD_CRL_PORT": "8446"})
    assert config.crl_port == 8446 and config.crl_base_url == "http://127.0.0.1:8446"
    assert crl_url(config.crl_base_url, "b42") == "http://127.0.0.1:8446/crl/b42.crl"


def test_memory_registry_gives_the_same_revoked_set(tmp_path):
    from tests.cloud.cloud_support import Fleet

    fleet = Fleet(tmp_path / "mem", registry_kind="memory")
    try:
        kept, revoked = fleet.provision("b42"), fleet.provision("b42")
        issuer = revoked.identity_cert.issuer.rfc4514_string()
        fleet.registry.mark_revoked(revoked.identity_cert.serial_number, "keyCompromise",
                                    issuer=issuer)
        records = fleet.registry.revoked_certificates(issuer)
        assert [int(r.cert_serial, 16) for r in records] == [
            revoked.identity_cert.serial_number]
        crl = b42_publisher(fleet).current("b42")
        assert crl.get_revoked_certificate_by_serial_number(
            kept.identity_cert.serial_number) is None
        assert len(crl) == 1
    finally:
        fleet.close()


def test_cloud_context_names_each_labels_crl_url_and_composes_the_crl_listener(tmp_path):
    from fleetid.cloud.config import load_config
    from fleetid.cloud.server import build_context

    config = load_config(None, {"FLEETID_CLOUD_STATE_DIR": str(tmp_path / "state"),
                                "FLEETID_CLOUD_CRL_PORT": "18446",
                                "FLEETID_KEYSTORE_PASS": "test-pass"})
    context = build_context(config, environ={"FLEETID_KEYSTORE_PASS": "test-pass"})
    try:
        label = context.labels[0]
        assert label.ca.crl_url == "http://127.0.0.1:18446/crl/%s.crl" % label.name
        assert [i.label for i in context.crl_issuers] == [label.name]
        server = CloudServer.from_context(context, verifier_port=0, est_port=0)
        plan = dict((name, port) for name, _, port, _ in server._plan)
        assert plan["crl"] == 18446
        crl = server.crl_publisher.current(label.name)
        assert crl.issuer == context.crl_issuers[0].ca_certificate.subject
    finally:
        context.close()
