"""The TLS 1.3 client with the SE (emulated chip, APDUs straight into the applet): the
transient (RAM-only) key object SLOT_TRANSIENT that holds the ECDHE share -- made and used
inside the SE without a single NVM write, lost on power loss, ECDH only; a whole SE-keyed
handshake writing no NVM; and the server's revocation checked through the agent's CRL
cache, verified by the SE."""

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.common import se_consts as C
from fleetid.common import tls13 as T
from fleetid.common.apdu import ApduProtocol
from fleetid.common.host.tls13_host import CryptographyTls13Primitives
from fleetid.common.errors import IncorrectP1P2, ReferenceNotFound, WrongData
from fleetid.device.se import SeSession
from fleetid.device.tls13_keys import SeEphemeral, se_signer, se_verifier
from tests.common.tls13_support import NOW, FakeServer, TestPki, full_handshake


@pytest.fixture
def chip(fabbed):
    _record, chip = fabbed
    return chip


@pytest.fixture
def se(chip):
    session = SeSession(ApduProtocol(chip.process))
    session.select()
    return session


def _point(key):
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


def test_transient_key_agrees_with_a_peer_and_writes_no_nvm(chip, se):
    writes = chip.nvm.write_count
    before = chip.nvm.snapshot()
    point = se.generate_transient_key()
    peer = ec.generate_private_key(ec.SECP256R1())
    shared = se.ecdh_transient(_point(peer))
    expected = peer.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), point))
    assert shared == expected
    assert chip.nvm.write_count == writes and chip.nvm.snapshot() == before
    # A second GENERATE replaces the key (no ALREADY_EXISTS: it is ephemeral).
    assert se.generate_transient_key() != point
    assert chip.nvm.write_count == writes


def test_transient_key_is_lost_on_power_loss(chip, se):
    se.generate_transient_key()
    chip.power_loss()
    se.select()
    with pytest.raises(ReferenceNotFound):
        se.ecdh_transient(_point(ec.generate_private_key(ec.SECP256R1())))


def test_transient_key_is_ecdh_only_and_checks_the_peer_point(chip, se):
    send = ApduProtocol(chip.process).send_apdu
    with pytest.raises(WrongData):  # SIGN usage refused for the transient object
        send(C.CLA_PROPRIETARY, C.INS_GENERATE_KEY, C.SLOT_TRANSIENT, C.CURVE_P256,
             bytes((C.POLICY_SIGN | C.POLICY_ECDH,)), 256)
    se.generate_transient_key()
    with pytest.raises(IncorrectP1P2):  # no SIGN with it (not a key slot)
        send(C.CLA_PROPRIETARY, C.INS_SIGN, C.SLOT_TRANSIENT, 0, bytes(32), 256)
    off_curve = b"\x04" + bytes(63) + b"\x07"
    with pytest.raises(WrongData):
        se.ecdh_transient(off_curve)
    # DELETE KEY erases it; GET PUBLIC KEY then finds nothing.
    send(C.CLA_PROPRIETARY, C.INS_DELETE_KEY, C.SLOT_TRANSIENT, 0)
    with pytest.raises(ReferenceNotFound):
        send(C.CLA_PROPRIETARY, C.INS_GET_PUBLIC_KEY, C.SLOT_TRANSIENT, 0, b"", 256)


def test_handshake_with_every_key_operation_in_the_se_writes_no_nvm(chip, se):
    # A client key generated in slot 5 of this chip, certified by the test PKI; the
    # ECDHE share in the transient object; the server chain and CertificateVerify
    # checked by the SE's VERIFY.
    pki = TestPki()
    point = se.generate_key(5, C.POLICY_SIGN)
    client_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    pki.client = pki.leaf(type("K", (), {"public_key": lambda self: client_key})(),
                          eku=x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, names=())
    writes = chip.nvm.write_count
    ephemeral = SeEphemeral(se)
    config = T.Tls13Config(CryptographyTls13Primitives(), ephemeral, [pki.root_der()],
                           se_verifier(se), lambda: NOW, server_name="server.test",
                           signer=se_signer(se, 5), client_chain=[pki.client])
    client = T.Tls13Client(config)
    server = FakeServer(pki)
    events = full_handshake(client, server)  # the server checks our CertificateVerify
    assert events[0][1].client_certificate and ephemeral.operations == 2
    assert chip.nvm.write_count == writes  # 0 NVM writes per handshake


def test_session_copy_of_the_transient_slot_matches_se_consts():
    from fleetid.device import se as se_mod

    assert se_mod._SLOT_TRANSIENT == C.SLOT_TRANSIENT >= C.SLOT_COUNT
    assert se_mod._POLICY_ECDH == C.POLICY_ECDH


def test_revoked_server_is_refused_through_the_agents_crl_cache(chip, se):
    # The agent's CRL cache (device/crl_cache.py) of the server's issuer, verified through
    # the SE, behind the client's revocation hook (device/board.server_revocation, the one
    # both runtimes pass): a listed server is certificate_revoked.
    import datetime

    from cryptography.hazmat.primitives import hashes

    from fleetid.common.errors import TlsCertificateError
    from fleetid.device.crl_cache import CrlCache
    from fleetid.device.board import server_revocation
    from tests.common.tls13_support import client_config
    from tests.device.crl_support import MemoryStore, point_of

    pki = TestPki()
    server_serial = x509.load_der_x509_certificate(pki.server).serial_number
    at = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)

    def crl(number, revoked):
        builder = (x509.CertificateRevocationListBuilder().issuer_name(pki.root.subject)
                   .last_update(at - datetime.timedelta(hours=1))
                   .next_update(at + datetime.timedelta(hours=23))
                   .add_extension(x509.CRLNumber(number), critical=False))
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at)
                .build())
        return builder.sign(pki.root_key, hashes.SHA256()).public_bytes(
            serialization.Encoding.DER)

    cache = CrlCache(se, MemoryStore(), point_of(pki.root_key.public_key()),
                     pki.root.subject.public_bytes())
    cache.refresh(lambda: crl(1, []), NOW)
    hook = server_revocation([cache], lambda: NOW)
    events = full_handshake(T.Tls13Client(client_config(pki, revocation=hook)), FakeServer(pki))
    assert dict(events[0][1].chain_report)["revocation"] == "not revoked"
    cache.refresh(lambda: crl(2, [server_serial]), NOW)
    client = T.Tls13Client(client_config(pki, revocation=hook))
    server = FakeServer(pki)
    client.receive(server.server_hello(client.start()))
    with pytest.raises(TlsCertificateError) as caught:
        client.receive(server.protect(b"".join(server.flight())))
    assert (caught.value.check, caught.value.alert) == ("revocation", 44)
    assert "RevokedError" in caught.value.detail
