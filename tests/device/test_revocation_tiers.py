"""One revocation state behind every tier (cloud/revocation/service.py): a device revoked
through RevocationService (what `fleetid revoke` calls) is refused

  * by the verifier at once (the registry it reads per request),
  * by an OCSP-checking client at its next query,
  * by an intermittent device after its next reconnect (CRL cache refresh),
  * by an offline device after it receives the next compact set;

and a revoked batch refuses every device of the batch in every tier with one entry.
The event file makes the publishers re-read at once; without it they re-read within
poll_interval (the bounded fallback)."""

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from fleetid.cloud.revocation.service import (
    EventWatcher,
    RevocationService,
    read_event,
)
from fleetid.cloud.verifier.errors import AccessRefused
from fleetid.cloud.verifier.revoked_cas import RevokedCaFile, revoked_ca_map
from fleetid.common import revset
from fleetid.common.apdu import ApduProtocol
from fleetid.device.crl_cache import CrlCache
from fleetid.device.crl_cache import RevokedError as CrlRevoked
from fleetid.device.revset_cache import RevokedError as SetRevoked
from fleetid.device.revset_cache import RevsetCache
from fleetid.device.se import SeSession
from tests.cloud.cloud_support import Fleet
from tests.cloud.revset_support import revset_publisher, revocation_signer
from tests.cloud.crl_support import b42_publisher
from tests.cloud.ocsp_support import ocsp_responder
from tests.device.crl_support import MemoryStore, epoch, point_of


@pytest.fixture
def world(tmp_path, fabbed):
    fleet = Fleet(tmp_path / "fleet")
    fleet.devices = [fleet.provision("b42") for _ in range(3)] + [fleet.provision("b43")]
    cas_path = str(tmp_path / "revoked-cas.jsonl")
    events = str(tmp_path / "revocation.events")
    fleet.trust.revoked_ca_file = RevokedCaFile(cas_path)  # as cloud serve configures it
    crl = b42_publisher(fleet)
    compact = revset_publisher(fleet)
    compact.revoked_cas = lambda: list(revoked_ca_map(cas_path))
    watchers = [EventWatcher(events, crl.invalidate), EventWatcher(events, compact.invalidate)]
    service = RevocationService(fleet.registry, list(fleet.ca_certs.values()), cas_path,
                                events)
    responder = ocsp_responder(fleet, revoked_cas=lambda: revoked_ca_map(cas_path))
    session = SeSession(ApduProtocol(fabbed[1].process))
    session.select()
    try:
        yield fleet, service, crl, compact, watchers, responder, session, cas_path
    finally:
        fleet.close()


def _ocsp(responder, device):
    request = ocsp.OCSPRequestBuilder().add_certificate(
        device.identity_cert, device.fleet.ca_certs[device.batch], hashes.SHA1()).build()
    return ocsp.load_der_ocsp_response(responder.respond(
        request.public_bytes(serialization.Encoding.DER))).certificate_status


def _verifier_refuses(fleet, device):
    fleet.verifier._cache.clear()
    try:
        fleet.verifier.verify(device.identity_cert.public_bytes(serialization.Encoding.DER))
    except AccessRefused as exc:
        return exc.reason
    return None


def test_the_verifier_refuses_a_revoked_device_at_once(world):
    fleet, service, *_ = world
    device = fleet.devices[0]
    assert _verifier_refuses(fleet, device) is None
    service.revoke_device(device.serial, "keyCompromise", operator="alice")
    assert _verifier_refuses(fleet, device) is not None
    assert _verifier_refuses(fleet, fleet.devices[1]) is None
    assert read_event(service.events_path) == 1


def test_an_ocsp_client_refuses_it_at_its_next_query(world):
    fleet, service, _, _, _, responder, *_ = world
    device = fleet.devices[0]
    assert _ocsp(responder, device) == ocsp.OCSPCertStatus.GOOD
    service.revoke_device(device.serial, "keyCompromise")
    assert _ocsp(responder, device) == ocsp.OCSPCertStatus.REVOKED
    assert _ocsp(responder, fleet.devices[1]) == ocsp.OCSPCertStatus.GOOD


def test_an_intermittent_device_refuses_it_after_its_next_reconnect(world):
    fleet, service, crl, _, watchers, _, se, _ = world
    device = fleet.devices[0]
    ca = fleet.ca_certs["b42"]
    cache = CrlCache(se, MemoryStore(), point_of(ca.public_key()), ca.subject.public_bytes())
    now = epoch(fleet.clock()) + 1
    cache.refresh(lambda: crl.current_der("b42"), now)  # connected once
    cert = device.identity_cert
    assert cache.check_serial(cert.serial_number, now) is None
    service.revoke_device(device.serial, "keyCompromise")  # device offline meanwhile
    assert cache.check_serial(cert.serial_number, now) is None  # not yet: no reconnect
    fleet.clock.advance(seconds=1)
    for watcher in watchers:
        assert watcher.poll()  # the event: publishers re-read now, not after poll_interval
    cache.refresh(lambda: crl.current_der("b42"), now + 2)  # reconnect
    with pytest.raises(CrlRevoked):
        cache.check_serial(cert.serial_number, now + 2)
    assert cache.check_serial(fleet.devices[1].identity_cert.serial_number, now + 2) is None


def test_an_offline_device_refuses_it_after_the_next_compact_set(world):
    fleet, service, _, compact, watchers, _, se, _ = world
    device = fleet.devices[0]
    signer = revocation_signer(fleet)
    cache = RevsetCache(se, MemoryStore(), signer.point, signer.fleet_id)
    first = compact.current()
    now = revset.parse(first).this_update + 1
    cache.refresh(lambda: first, now)
    service.revoke_device(device.serial, "keyCompromise")
    assert cache.check_device(device.serial, None, now) is None  # the old set does not know
    fleet.clock.advance(seconds=1)
    for watcher in watchers:
        watcher.poll()
    cache.refresh(lambda: compact.current(), now + 1)  # the next set arrives
    with pytest.raises(SetRevoked):
        cache.check_device(device.serial, None, now + 1)
    assert cache.check_device(fleet.devices[1].serial, None, now + 1) is None


def test_without_an_event_the_publishers_catch_up_within_the_poll_interval(world):
    fleet, service, crl, compact, _, _, _, _ = world
    before = compact.current_number()
    fleet.registry.mark_revoked(fleet.devices[1].identity_cert.serial_number, "keyCompromise",
                                issuer=fleet.devices[1].identity_cert.issuer.rfc4514_string())
    fleet.clock.advance(seconds=1)
    assert compact.current_number() == before  # inside the interval: the old set
    compact.monotonic.now += compact.poll_interval
    assert compact.current_number() > before
    assert revset.parse(compact.current()).contains(fleet.devices[1].serial)


def test_a_revoked_batch_is_refused_in_every_tier_with_one_entry(world):
    fleet, service, _, compact, watchers, responder, se, cas_path = world
    from fleetid.cloud.revocation.revset_publisher import ca_key_id

    device = fleet.devices[3]  # b43
    entry, new = service.revoke_batch("b43", "cACompromise", operator="alice")
    assert new and entry["reason"] == "cACompromise"
    assert _verifier_refuses(fleet, device) == "ca_revoked"
    assert _ocsp(responder, device) == ocsp.OCSPCertStatus.REVOKED
    assert _ocsp(responder, fleet.devices[0]) == ocsp.OCSPCertStatus.GOOD
    for watcher in watchers:
        watcher.poll()
    wire = compact.current()
    info = revset.parse(wire)
    assert info.ca_count == 1 and info.count == 0  # one entry, not one per device
    signer = revocation_signer(fleet)
    cache = RevsetCache(se, MemoryStore(), signer.point, signer.fleet_id)
    cache.refresh(lambda: wire, info.this_update + 1)
    with pytest.raises(SetRevoked) as exc:
        cache.check_device(device.serial, ca_key_id(fleet.ca_certs["b43"]), info.this_update + 1)
    assert exc.value.batch
    assert len(fleet.registry.revoked_certificates(
        fleet.ca_certs["b43"].subject.rfc4514_string())) == 0  # no per-device entries


def test_both_caches_check_the_same_certificate_facts(world):
    # One portable facts reader (device/certinfo.py: serial, subject serialNumber, AKI)
    # feeds check(facts, now) on the CRL cache and the compact-set cache alike.
    from fleetid.cloud.revocation.revset_publisher import ca_key_id
    from fleetid.device.anchored_store import RevokedError
    from fleetid.device.certinfo import certificate_facts

    fleet, service, crl, compact, watchers, _, se, _ = world
    device, other = fleet.devices[0], fleet.devices[3]  # b42, b43
    ca = fleet.ca_certs["b42"]
    facts = certificate_facts(device.identity_cert.public_bytes(serialization.Encoding.DER))
    assert facts.serial == device.identity_cert.serial_number
    assert facts.authority_key_id == ca_key_id(ca)
    crl_cache = CrlCache(se, MemoryStore(), point_of(ca.public_key()), ca.subject.public_bytes())
    signer = revocation_signer(fleet)
    set_cache = RevsetCache(se, MemoryStore(), signer.point, signer.fleet_id)
    service.revoke_device(device.serial, "keyCompromise")
    service.revoke_batch("b43", "cACompromise")
    fleet.clock.advance(seconds=1)
    for watcher in watchers:
        watcher.poll()
    now = epoch(fleet.clock()) + 1
    crl_cache.refresh(lambda: crl.current_der("b42"), now)
    wire = compact.current()
    set_cache.refresh(lambda: wire, revset.parse(wire).this_update + 1)
    set_now = revset.parse(wire).this_update + 1
    for cache, at in ((crl_cache, now), (set_cache, set_now)):
        with pytest.raises(RevokedError) as revoked:  # the one shared class
            cache.check(facts, at)
        assert not revoked.value.batch
    batch_facts = certificate_facts(other.identity_cert.public_bytes(serialization.Encoding.DER))
    with pytest.raises(RevokedError) as revoked:
        set_cache.check(batch_facts, set_now)  # by its AKI: the batch's CA is revoked
    assert revoked.value.batch
