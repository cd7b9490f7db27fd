"""SeSession over the real T=1' link and the emulator's bus endpoint, in-process.

bus endpoint (chip + SE-side T=1' + latency model) <- T1Link <- ApduProtocol <- SeSession,
on one virtual clock, so latency profiles with waiting-time extensions cost no real time.
"""

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from fleetid.common import se_consts as C
from fleetid.common import t1
from fleetid.common.clock import FakeClock
from fleetid.device.stack import open_se

DIGEST = hashlib.sha256(b"over the link").digest()


def _stack(chip, profile, latency):
    from fleetid.sim import profiles
    from fleetid.sim.endpoint import BusEndpoint

    clock = FakeClock()
    endpoint = BusEndpoint(chip, profile=profile, latency=profiles.get(latency), clock=clock)
    opened = open_se(endpoint, profile, clock)  # the one device stack, on the endpoint
    return opened.se, opened.link, endpoint, clock


@pytest.mark.parametrize(
    "profile,latency",
    [(t1.PROFILE_GP, "none"), (t1.PROFILE_GP, "atecc608"), (t1.PROFILE_SE05X, "se050"),
     (t1.PROFILE_SE05X, "optiga")],
)
def test_session_verbs_over_t1_with_each_profile_and_latency(fabbed, profile, latency):
    record, chip = fabbed
    se, link, endpoint, clock = _stack(chip, profile, latency)
    info = se.info()  # the chain (about 1 KB) crosses several chained I-blocks
    assert info.uid == record.se_uid and info.attestation_chain == record.chain_der
    start = clock.now_ms()
    point = se.generate_key(2, C.POLICY_SIGN)
    sig = se.sign(2, DIGEST)
    elapsed = clock.now_ms() - start
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    key.verify(sig, DIGEST, ec.ECDSA(Prehashed(hashes.SHA256())))
    if latency == "atecc608":
        # generate_key 115 ms + sign 115 ms of modelled SE time, on the virtual clock.
        assert elapsed >= 230
    assert se.counter_increment(1) == 1
    se.write_object(3, bytes(range(256)) * 4)  # DATA_OBJECT_MAX: an extended APDU
    assert se.read_object(3) == bytes(range(256)) * 4
    link.close()


def test_session_survives_an_se_reset_between_commands(fabbed):
    record, chip = fabbed
    se, link, endpoint, _ = _stack(chip, t1.PROFILE_GP, "none")
    se.generate_key(1, C.POLICY_SIGN)
    endpoint.power_loss()  # RAM state gone, NVM kept: the key survives, selection does not
    link.open()
    se.select()
    policy, point = se.public_key(1)
    assert policy & C.POLICY_SIGN and len(point) == 65
    assert se.uid() == record.se_uid
