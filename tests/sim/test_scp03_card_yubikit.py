"""Interop: Yubico's yubikit SCP03 host state machine against fleetid's card side.

yubikit (yubikey-manager, `yubikit.core.smartcard`) is an independent host implementation:
`SmartCardProtocol.init_scp(Scp03KeyParams(...))` runs INITIALIZE UPDATE and EXTERNAL
AUTHENTICATE, then every `send_apdu` goes through its `ScpProcessor` (C-DEC + C-MAC out,
R-MAC + R-ENC in).  Here its bytes reach `fleetid.sim.scp03_card.Scp03Card` through an
in-memory connection.

What yubikit covers: security level 0x33 only (it hard-codes P1 = 0x33 in EXTERNAL
AUTHENTICATE), S8 mode, AES-128, short and extended APDU encodings, no Le on wrapped
commands, error status words answered without R-MAC.  It does not check the status word
of EXTERNAL AUTHENTICATE (the card then refuses every wrapped command).  It encrypts an
empty data field as one padding block where Amd D 6.2.6 says "no encryption"; the card
accepts both.  Levels
0x01, 0x03, 0x11, 0x13 are covered with fleetid's own host (tests/sim/test_scp03_card.py);
here yubikit's low-level ScpState also checks fleetid's host bytes at level 0x33.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

yubikit_scp = pytest.importorskip("yubikit.core.smartcard.scp")
from yubikit.core import TRANSPORT, Version  # noqa: E402
from yubikit.core.smartcard import (  # noqa: E402
    ApduError,
    SmartCardConnection,
    SmartCardProtocol,
)

from fleetid.common import scp03  # noqa: E402
from fleetid.common.apdu_wire import split_response  # noqa: E402
from fleetid.common.command_apdu import decode_command  # noqa: E402
from fleetid.common.host.hostcrypto import CryptographyPrimitives  # noqa: E402
from fleetid.sim.scp03_card import Scp03Card  # noqa: E402
from tests.sim.scp03_support import CardDispatch  # noqa: E402

PRIMS = CryptographyPrimitives()
ENC = bytes.fromhex("404142434445464748494a4b4c4d4e4f")
MAC = bytes.fromhex("505152535455565758595a5b5c5d5e5f")
DEK = bytes.fromhex("606162636465666768696a6b6c6d6e6f")
KVN = 0x30
FLEETID_KEYS = scp03.StaticKeys(ENC, MAC, DEK, KVN)
YUBIKIT_PARAMS = yubikit_scp.Scp03KeyParams(
    ref=yubikit_scp.KeyRef(yubikit_scp.ScpKid.SCP03, KVN),
    keys=yubikit_scp.StaticKeys(ENC, MAC, DEK),
)

INS_ECHO = 0x10  # answers the command data reversed
INS_EMPTY = 0x12  # answers 9000 without data
INS_MISSING = 0x14  # answers 6A88


class InMemoryCard(SmartCardConnection, CardDispatch):
    """A yubikit connection whose other end is the chip's SCP03 dispatch in miniature."""

    def __init__(self):
        CardDispatch.__init__(
            self,
            Scp03Card(PRIMS, lambda kvn: FLEETID_KEYS if kvn in (0, KVN) else None,
                      PRIMS.random),
            7,
        )
        self.wire = []

    @property
    def transport(self):
        return TRANSPORT.USB

    def close(self):
        pass

    def send_and_receive(self, apdu):
        self.wire.append(bytes(apdu))
        data, sw = split_response(self.process(bytes(apdu)))
        return data, sw

    def app(self, plain):
        cmd = decode_command(plain)
        if cmd.ins == INS_ECHO:
            return self.card.wrap_response(cmd.data[::-1], 0x9000)
        if cmd.ins == INS_EMPTY:
            return self.card.wrap_response(b"", 0x9000)
        return self.card.wrap_response(b"", 0x6A88)


def yubikit_session(extended=False):
    connection = InMemoryCard()
    protocol = SmartCardProtocol(connection)
    if extended:
        protocol.configure(Version(5, 7, 2))  # USB + 5.x: extended APDUs
    protocol.init_scp(YUBIKIT_PARAMS)
    return protocol, connection


def test_yubikit_opens_a_level_33_session_on_the_fleetid_card():
    protocol, connection = yubikit_session()
    card = connection.card
    assert card.active and card.level == 0x33 and card.kvn == KVN and card.counter == 1
    assert connection.wire[0][:4] == bytes((0x80, 0x50, KVN, 0x00))
    assert connection.wire[1][:4] == bytes.fromhex("84823300")
    assert connection.failures == 0


def test_yubikit_wrapped_commands_reach_the_card_and_responses_verify():
    protocol, connection = yubikit_session()
    for i, data in enumerate([b"\x01", bytes(range(15)), bytes(range(16)), bytes(200)]):
        assert protocol.send_apdu(0x80, INS_ECHO, 0x01, 0x02, data) == data[::-1]
        assert connection.plain_seen[-1] == bytes((0x80, INS_ECHO, 1, 2, len(data))) + data
        assert connection.card.counter == i + 2
        assert data not in connection.wire[-1] or len(data) == 1  # C-DEC on the wire


def test_yubikit_empty_data_and_sw_only_responses():
    protocol, connection = yubikit_session()
    # yubikit encrypts an empty data field as one padding block; the card strips it.
    assert protocol.send_apdu(0x80, INS_EMPTY, 0, 0) == b""
    assert connection.plain_seen[-1] == bytes((0x80, INS_EMPTY, 0, 0))
    assert len(connection.wire[-1]) == 5 + 16 + 8
    # Error status: the card sends SW alone (Amd D 6.2.5), yubikit raises its ApduError.
    with pytest.raises(ApduError) as info:
        protocol.send_apdu(0x80, INS_MISSING, 0, 0, b"\x01")
    assert info.value.sw == 0x6A88
    assert connection.card.active  # an application error does not end the session
    assert protocol.send_apdu(0x80, INS_ECHO, 0, 0, b"\x01\x02") == b"\x02\x01"


def test_yubikit_extended_apdus_round_trip():
    protocol, connection = yubikit_session(extended=True)
    # Extended mode encodes EXTERNAL AUTHENTICATE with an extended Lc too, MAC included.
    assert connection.wire[1][4:7] == b"\x00\x00\x10" and connection.card.active
    data = bytes(range(256)) * 3
    assert protocol.send_apdu(0x80, INS_ECHO, 0, 0, data) == data[::-1]
    assert connection.wire[-1][4] == 0x00  # extended Lc on the wire
    assert decode_command(connection.plain_seen[-1]).data == data


def test_yubikit_with_wrong_keys_refuses_the_fleetid_card_cryptogram():
    connection = InMemoryCard()
    protocol = SmartCardProtocol(connection)
    wrong = yubikit_scp.Scp03KeyParams(ref=yubikit_scp.KeyRef(yubikit_scp.ScpKid.SCP03, KVN),
                                       keys=yubikit_scp.StaticKeys(MAC, ENC, DEK))
    with pytest.raises(ValueError):
        protocol.init_scp(wrong)
    assert len(connection.wire) == 1 and not connection.card.active


def test_a_tampered_yubikit_command_is_refused_and_counted():
    protocol, connection = yubikit_session()
    original = connection.send_and_receive

    def tamper(apdu):
        apdu = bytearray(apdu)
        apdu[6] ^= 0x01  # inside the encrypted data
        return original(bytes(apdu))

    connection.send_and_receive = tamper
    with pytest.raises(ApduError) as info:
        protocol.send_apdu(0x80, INS_ECHO, 0, 0, b"\x01\x02\x03")
    assert info.value.sw == 0x6982
    assert connection.failures == 1 and not connection.card.active


def test_yubikit_ignoring_a_refused_external_authenticate_still_gets_nothing():
    # yubikit does not look at the status word of EXTERNAL AUTHENTICATE; the card refuses
    # it (counted) and then every wrapped command, so nothing runs without authentication.
    connection = InMemoryCard()
    original = connection.send_and_receive

    def tamper(apdu):
        if apdu[1] == scp03.INS_EXTERNAL_AUTHENTICATE:
            apdu = apdu[:5] + bytes((apdu[5] ^ 0x01,)) + apdu[6:]
        return original(apdu)

    connection.send_and_receive = tamper
    protocol = SmartCardProtocol(connection)
    protocol.init_scp(YUBIKIT_PARAMS)  # no error raised by yubikit here
    assert connection.failures == 1 and not connection.card.active
    with pytest.raises(ApduError) as info:
        protocol.send_apdu(0x80, INS_ECHO, 0, 0, b"\x01")
    assert info.value.sw == 0x6982 and connection.plain_seen == []


def test_fleetid_host_and_yubikit_state_produce_the_same_bytes():
    """Same keys and challenges: yubikit's ScpState and fleetid's host agree on the host
    cryptogram, the C-MAC chain, C-DEC and the R-MAC / R-ENC check."""
    host_challenge = bytes.fromhex("0102030405060708")
    connection = InMemoryCard()
    state, yk_host_cryptogram = yubikit_scp.ScpState.scp03_init(
        lambda cla, ins, p1, p2, data: split_response(
            connection.process(bytes((cla, ins, p1, p2, len(data))) + data))[0],
        YUBIKIT_PARAMS, host_challenge=host_challenge)
    card_challenge = connection.card._card_challenge
    keys = scp03.derive_session_keys(PRIMS, FLEETID_KEYS, host_challenge, card_challenge)
    assert yk_host_cryptogram == scp03.host_cryptogram(PRIMS, keys.s_mac, host_challenge,
                                                       card_challenge)
    # EXTERNAL AUTHENTICATE from yubikit's state, then one data command from each side.
    header = bytes.fromhex("8482330010")
    ext_auth = header + yk_host_cryptogram + state.mac(header + yk_host_cryptogram)
    chain = PRIMS.cmac(keys.s_mac, bytes(16) + header + yk_host_cryptogram)
    ours = scp03.SecureMessaging(PRIMS, keys, 0x33, chain, 1)
    connection.card.external_authenticate(ext_auth)

    plain_data = b"fleetid-interop"
    encrypted = state.encrypt(plain_data)
    cmd_header = bytes((0x84, INS_ECHO, 0, 0, len(encrypted) + 8))
    yk_wrapped = cmd_header + encrypted + state.mac(cmd_header + encrypted)
    assert ours.wrap_command(bytes((0x80, INS_ECHO, 0, 0, len(plain_data))) + plain_data) \
        == yk_wrapped
    response = connection.process(yk_wrapped)
    data, sw = split_response(response)
    assert state.decrypt(state.unmac(data, sw)) == plain_data[::-1]
    assert ours.unwrap_response(response) == plain_data[::-1] + b"\x90\x00"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(st.binary(max_size=240), min_size=1, max_size=4))
def test_random_yubikit_commands_round_trip_through_the_card(payloads):
    protocol, connection = yubikit_session()
    for payload in payloads:
        assert protocol.send_apdu(0x80, INS_ECHO, 0x00, 0x00, payload) == payload[::-1]
    assert connection.card.counter == len(payloads) + 1 and connection.failures == 0
