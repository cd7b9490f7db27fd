"""Batch revocation in the CRL tier (cloud/revocation/arl.py): `fleetid revoke --batch`
puts the issuing CA's certificate on the root's CRL, one entry; an intermittent device
holding the root's CRL beside its peer CA's refuses every device of the batch after its
next reconnect, and nothing else."""

import pytest

from fleetid.cloud.revocation.arl import RootCrlRegistry
from fleetid.cloud.revocation.crl import CrlIssuer, CrlPublisher
from fleetid.cloud.revocation.service import RevocationService
from fleetid.common.apdu import ApduProtocol
from fleetid.device.crl_cache import CrlCache, CrlPolicy, RevokedError
from fleetid.device.se import SeSession
from tests.cloud.cloud_support import Fleet
from tests.cloud.crl_support import FakeMonotonic
from tests.device.crl_support import MemoryStore, epoch, point_of


def test_a_revoked_batch_is_one_entry_on_the_roots_crl_and_the_device_refuses_it(
        tmp_path, fabbed):
    fleet = Fleet(tmp_path / "fleet")
    try:
        cas_path = str(tmp_path / "revoked-cas.jsonl")
        service = RevocationService(fleet.registry, list(fleet.ca_certs.values()), cas_path,
                                    str(tmp_path / "revocation.events"))
        publisher = CrlPublisher(
            RootCrlRegistry(fleet.registry, cas_path, fleet.root),
            [CrlIssuer("root", fleet.hsm, "fleet-root", fleet.root),
             CrlIssuer("b43", fleet.hsm, "ca-widget-b43", fleet.ca_certs["b43"])],
            clock=fleet.clock, monotonic=FakeMonotonic())
        service.listeners.append(publisher.invalidate)
        se = SeSession(ApduProtocol(fabbed[1].process))
        se.select()
        root_cache = CrlCache(se, MemoryStore(), point_of(fleet.root.public_key()),
                              fleet.root.subject.public_bytes(), CrlPolicy(object_id=4))
        now = epoch(fleet.clock()) + 1
        assert root_cache.refresh(lambda: publisher.current_der("root"), now) == "updated"
        b42, b43 = fleet.ca_certs["b42"], fleet.ca_certs["b43"]
        assert root_cache.check_serial(b43.serial_number, now) is None
        device = fleet.provision("b43")
        service.revoke_batch("b43", "cACompromise", operator="alice")
        fleet.clock.advance(seconds=1)
        root_crl = publisher.current("root")
        assert len(root_crl) == 1  # one entry for the whole batch
        assert root_cache.refresh(lambda: publisher.current_der("root"), now + 1) == "updated"
        with pytest.raises(RevokedError) as info:
            root_cache.check_serial(b43.serial_number, now + 1)  # the peer's issuing CA
        assert info.value.serial == b43.serial_number
        assert root_cache.check_serial(b42.serial_number, now + 1) is None
        # The batch's own CRL is untouched: no per-device entries.
        assert len(publisher.current("b43")) == 0
        assert device.identity_cert.issuer == b43.subject
    finally:
        fleet.close()
