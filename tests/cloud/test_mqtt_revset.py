"""Retained-MQTT delivery of the compact set against a real mosquitto: the cloud publishes
each new set retained on fleet/crl/revset; a device that was offline when it was
published subscribes later, receives it, verifies it through its SE and refuses the
revoked peer; a forged retained set is refused and the old set kept."""

import time

import pytest

from fleetid.cloud.revocation.revset_publisher import (
    RevsetPublisher,
    RevocationSigner,
    new_revocation_signer,
)
from fleetid.cloud.revocation.mqtt_delivery import retained_publisher
from fleetid.common import se_consts as C
from fleetid.device.crl_cache import FileStore
from fleetid.device.host.mqtt_paho import PahoSeTransport
from fleetid.device.mqtt import DeviceChannel
from fleetid.device.revset_cache import RevokedError, RevsetCache
from fleetid.device.revset_mqtt import RevsetDispatch
from tests.cloud.mqtt_support import MqttFleet

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    made = MqttFleet(tmp_path_factory.mktemp("mqttrevset"), devices=2)
    yield made
    made.close()


def test_a_retained_compact_set_reaches_an_offline_device_and_refuses_the_revoked(fleet,
                                                                                tmp_path):
    line = fleet.line
    cert = new_revocation_signer(line.hsm, line.labels["root"], line.root_cert,
                                 "revocation-set-mqtt")
    signer = RevocationSigner(line.hsm, "revocation-set-mqtt", cert, line.root_cert)
    publisher = RevsetPublisher(line.registry, signer, [line.ca_cert], poll_interval=0.0)
    cloud = fleet.cloud(client_id="fleet-cloud-revset-%d" % time.monotonic_ns())
    cloud.connect()
    try:
        publisher.subscribers.append(retained_publisher(cloud))
        se_revoked = fleet.session(0)
        name_revoked, revoked_cert = fleet.device_name(se_revoked)
        fleet.line.registry.mark_revoked(revoked_cert.serial_number, "keyCompromise",
                                         issuer=revoked_cert.issuer.rfc4514_string())
        wire = publisher.current()  # published retained: no device is connected
        # Device 1, offline when the set was published, connects and subscribes.
        se = fleet.session(1)
        name, _ = fleet.device_name(se)
        link = PahoSeTransport(se, C.SLOT_IDENTITY, fleet.chain_der(se), [fleet.root_der()],
                               fleet.broker.host, fleet.broker.port, timeout=10)
        cache = RevsetCache(se, FileStore(str(tmp_path / "revset.frs")), signer.point,
                            signer.fleet_id)
        dispatch = RevsetDispatch(cache, lambda: int(time.time()))
        channel = DeviceChannel(link, name, on_crl=dispatch)
        channel.start(crl_labels=("revset",))
        try:
            deadline = time.monotonic() + 10
            while not dispatch.results and time.monotonic() < deadline:
                channel.step(0.2)
            assert dispatch.results == ["updated"]
            assert (tmp_path / "revset.frs").read_bytes() == wire
            with pytest.raises(RevokedError):
                cache.check_device(fleet.parse_serial(name_revoked), None, int(time.time()))
            assert cache.check_device(fleet.parse_serial(name), None, int(time.time())) is None
            # A forged retained set (the cloud's identity may publish there, a device may
            # not; this one is simply not signed by the revocation key): refused.
            forged = bytearray(wire)
            forged[-12] ^= 0x01
            cloud.publish_crl("revset", bytes(forged))
            deadline = time.monotonic() + 10
            while len(dispatch.results) < 2 and time.monotonic() < deadline:
                channel.step(0.2)
            assert dispatch.results[1:] == ["refused: signature"]
            with pytest.raises(RevokedError):
                cache.check_device(fleet.parse_serial(name_revoked), None, int(time.time()))
        finally:
            channel.close()
    finally:
        cloud.close()
