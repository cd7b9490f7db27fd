"""The board agent's servers are checked against its CRL cache: device/board.server_revocation
is the revocation hook of the TLS client (common/tls13_cert.py) that device/board.run gives
board_net's HTTPS and the MQTT session when the board keeps a CRL.  A listed server is
refused with certificate_revoked, even from a stale CRL; no fresh CRL refuses no server,
whatever the policy for peers (the CRL is fetched over these very connections and carries
its own signature: refusing would lock the board out of its refresh).  The CRL cache
verifies every CRL through the emulated SE."""

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from fleetid.common import tls13 as T
from fleetid.common.apdu import ApduProtocol
from fleetid.common.errors import TlsCertificateError
from fleetid.device import board
from fleetid.device.crl_cache import CrlCache, CrlPolicy
from fleetid.device.se import SeSession
from tests.common.tls13_support import NOW, FakeServer, TestPki, client_config, full_handshake
from tests.device.crl_support import MemoryStore, point_of


@pytest.fixture
def se(fabbed):
    session = SeSession(ApduProtocol(fabbed[1].process))
    session.select()
    return session


@pytest.fixture
def pki():
    return TestPki()


def _crl(pki, number, revoked, hours_left=23):
    at = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(pki.root.subject)
               .last_update(at - datetime.timedelta(hours=1))
               .next_update(at + datetime.timedelta(hours=hours_left))
               .add_extension(x509.CRLNumber(number), critical=False))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(
                at - datetime.timedelta(minutes=30)).build())
    return builder.sign(pki.root_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _cache(se, pki, fail_open=False):
    return CrlCache(se, MemoryStore(), point_of(pki.root_key.public_key()),
                    pki.root.subject.public_bytes(), CrlPolicy(grace_s=0, fail_open=fail_open))


def _refused(pki, hook):
    client = T.Tls13Client(client_config(pki, revocation=hook))
    server = FakeServer(pki)
    client.receive(server.server_hello(client.start()))
    with pytest.raises(TlsCertificateError) as caught:
        client.receive(server.protect(b"".join(server.flight())))
    return caught.value


def _verdict(pki, hook):
    events = full_handshake(T.Tls13Client(client_config(pki, revocation=hook)), FakeServer(pki))
    return dict(events[0][1].chain_report)["revocation"]


def test_a_server_listed_on_the_boards_crl_is_refused_as_certificate_revoked(se, pki):
    cache = _cache(se, pki)
    cache.refresh(lambda: _crl(pki, 1, []), NOW)
    hook = board.server_revocation(cache, lambda: NOW)
    assert _verdict(pki, hook) == "not revoked"
    serial = x509.load_der_x509_certificate(pki.server).serial_number
    cache.refresh(lambda: _crl(pki, 2, [serial]), NOW)
    error = _refused(pki, hook)
    assert (error.check, error.alert) == ("revocation", 44) and "RevokedError" in error.detail
    # Still refused once that CRL is stale (a day later, no grace).
    error = _refused(pki, board.server_revocation(cache, lambda: NOW + 2 * 86400))
    assert (error.check, error.alert) == ("revocation", 44)


def test_no_fresh_crl_refuses_no_server_even_when_peers_fail_closed(se, pki):
    from fleetid.device.anchored_store import StaleRevocationError

    cache = _cache(se, pki, fail_open=False)
    cache.refresh(lambda: _crl(pki, 1, []), NOW)
    later = NOW + 2 * 86400  # past nextUpdate, no grace: stale
    with pytest.raises(StaleRevocationError):  # a peer device is refused ...
        cache.check_serial(12345, later)
    # ... the server the refresh goes through is not.
    assert _verdict(pki, board.server_revocation(cache, lambda: later)) == "not revoked"


def test_the_hook_checks_every_cache_it_is_given_the_roots_among_them(se, pki):
    # The agents pass [issuing CA's cache, root's cache]: the server (issued by the root)
    # is refused by the root's CRL; a cache of another issuer, even empty, says nothing.
    other = CrlCache(se, MemoryStore(), point_of(pki.root_key.public_key()),
                     x509.Name.from_rfc4514_string("CN=Another CA").public_bytes(),
                     CrlPolicy(grace_s=0, object_id=5))
    root = _cache(se, pki)
    serial = x509.load_der_x509_certificate(pki.server).serial_number
    root.refresh(lambda: _crl(pki, 1, [serial]), NOW)
    error = _refused(pki, board.server_revocation([other, root], lambda: NOW))
    assert (error.check, error.alert) == ("revocation", 44)
    assert _verdict(pki, board.server_revocation([other], lambda: NOW)) == "not revoked"
