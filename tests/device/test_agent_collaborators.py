"""The agent's injected collaborators as built: device/boot.py's signed boot (images signed
by MCUboot's imgtool) through agent.SignedBoot, against an emulated SE holding the
firmware key and a fleet root, with a small in-test root + issuing CA (the project's
certificate profiles) as the network.  A refused image stops the agent before any network
call; a good one is confirmed (the SE's firmware counter advances) only after the first
accepted connection."""

import datetime
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetid.cloud.pki import profiles
from fleetid.common import se_consts as C
from fleetid.device import boot
from fleetid.device.agent import Agent, AgentError, SignedBoot
from tests.device.boot_support import ImgtoolKeys, provisioned_se, sign_image

CN = "FID-000000001"


class _CloudInTest:
    """whoami / nonce / enroll / ack with a throwaway CA (no verifier policy: the agent's
    side is under test here, the real cloud's in test_agent.py)."""

    def __init__(self, accept=True):
        now = datetime.datetime.now(datetime.timezone.utc)
        year = datetime.timedelta(days=3660)
        root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
        self.root = profiles.root_builder(root_name, root_key.public_key(), now, now + 2 * year) \
            .sign(root_key, hashes.SHA256())
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.ca = profiles.issuing_ca_builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]),
            self.key.public_key(), self.root, now, now + year).sign(root_key, hashes.SHA256())
        self.calls = []
        self.accept = accept

    def der(self, cert):
        return cert.public_bytes(serialization.Encoding.DER)

    def issue(self, public_key, subject, profile="operational"):
        serial = subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        now = datetime.datetime.now(datetime.timezone.utc)
        return self.der(profiles.device_builder(profile, serial, public_key, self.ca, now)
                        .sign(self.key, hashes.SHA256()))

    def whoami(self, slot):
        self.calls.append("whoami")
        return {"slot": slot}

    def cacerts(self, slot):
        self.calls.append("cacerts")
        return [self.der(self.ca), self.der(self.root)]

    def nonce(self, slot):
        self.calls.append("nonce")
        return os.urandom(16)

    def enroll(self, slot, csr_der, reenroll):
        self.calls.append("enroll")
        csr = x509.load_der_x509_csr(csr_der)
        assert csr.is_signature_valid
        return self.issue(csr.public_key(), csr.subject)

    def ack(self, slot):
        self.calls.append("ack")


class _Clock:
    def now(self):
        return int(datetime.datetime.now(datetime.timezone.utc).timestamp())

    def sleep(self, seconds):
        pass


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agent-images")
    keys = ImgtoolKeys(folder)
    payload = os.urandom(4096)
    return {"keys": keys,
            "good": sign_image(folder, keys.a, payload, "good", "1.2.3", 5),
            "foreign": sign_image(folder, keys.b, payload, "foreign", "1.2.3", 5)}


@pytest.fixture
def device(tmp_path, images):
    cloud = _CloudInTest()
    se, chip, _record = provisioned_se(str(tmp_path / "vendor"), tmp_path,
                                       images["keys"].a_point,
                                       fleet_root_der=cloud.der(cloud.root))
    point = se.generate_key(C.SLOT_IDENTITY, C.POLICY_SIGN)
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(point))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CN),
                         x509.NameAttribute(NameOID.SERIAL_NUMBER, CN)])
    se.put_cert(C.SLOT_IDENTITY, cloud.issue(public, subject, "identity"))
    return se, cloud


def test_a_refused_image_stops_the_agent_before_any_network_call(device, images):
    se, cloud = device
    signed_boot = SignedBoot(boot.check_image, boot.confirm_boot, se, images["foreign"],
                             max_size=0x40000)
    with pytest.raises(AgentError) as refused:
        Agent(se, cloud, _Clock(), lambda: 0.5, boot=signed_boot).run_once()
    assert refused.value.reason == AgentError.BOOT and "BootError" in refused.value.detail
    assert cloud.calls == [] and se.counter_read(C.COUNTER_FIRMWARE) == 0


def test_a_good_image_is_confirmed_after_the_first_accepted_connection(device, images):
    se, cloud = device
    signed_boot = SignedBoot(boot.check_image, boot.confirm_boot, se, images["good"],
                             max_size=0x40000)
    report = Agent(se, cloud, _Clock(), lambda: 0.5, boot=signed_boot).run_once()
    assert report.boot.security_counter == 5 and report.slot == C.SLOT_OPERATIONAL_A
    assert cloud.calls == ["cacerts", "nonce", "enroll", "ack", "whoami"]
    assert report.actions.index("connected with slot 2") < report.actions.index(
        "boot confirmed")
    assert se.counter_read(C.COUNTER_FIRMWARE) == 5
    # The same SignedBoot serves the next cycle: checked and confirmed once only.
    Agent(se, cloud, _Clock(), lambda: 0.5, boot=signed_boot).run_once()
    assert signed_boot.confirmed and se.counter_read(C.COUNTER_FIRMWARE) == 5
