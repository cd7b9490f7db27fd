"""The TLS 1.3 key schedule and record protection of fleetid.common.tls13 against the
RFC 8448 traces (tests/vectors/tls13/), with both crypto providers: `cryptography` and
the portable one (SHA-256 + HMAC written here + AES-GCM over a one-block AES, as
MicroPython's cryptolib gives it)."""

import hashlib

import pytest

from fleetid.common import tls13
from fleetid.common import tls13_crypto as K
from fleetid.common.errors import TlsError
from fleetid.common.host.tls13_host import CryptographyTls13Primitives, ecb_block_function
from fleetid.common.tls13_crypto import PortableTls13Primitives
from tests.conftest import load_vectors

V = {k: bytes.fromhex(v) for k, v in load_vectors("tls13/rfc8448.json").items()
     if not k.startswith("_")}

PROVIDERS = {
    "cryptography": CryptographyTls13Primitives(),
    "portable": PortableTls13Primitives(aes_ecb=ecb_block_function),
}


@pytest.fixture(params=sorted(PROVIDERS))
def prims(request):
    return PROVIDERS[request.param]


def _sha(*parts):
    return hashlib.sha256(b"".join(parts)).digest()


def test_transcriptions_of_the_rfc_hold_together():
    # The transcript hashes printed in the RFC check the messages copied from it.
    assert _sha(V["client_hello"], V["server_hello"]) == V["hash_client_hello_server_hello"]
    flight = (V["client_hello"], V["server_hello"], V["encrypted_extensions"],
              V["certificate"], V["certificate_verify"], V["server_finished"])
    assert _sha(*flight) == V["hash_through_server_finished"]
    assert _sha(*flight, V["client_finished"]) == V["hash_through_client_finished"]
    assert _sha(V["psk_client_hello_prefix"]) == V["psk_binder_hash"]


def test_key_schedule_of_the_simple_1rtt_handshake(prims):
    empty = _sha(b"")
    early = K.hkdf_extract(prims, b"", K.ZEROS)
    assert early == V["early_secret"]
    derived = K.derive_secret(prims, early, b"derived", empty)
    assert derived == V["derived_for_handshake"]
    handshake = K.hkdf_extract(prims, derived, V["ecdhe_shared_secret"])
    assert handshake == V["handshake_secret"]
    hello = V["hash_client_hello_server_hello"]
    c_hs = K.derive_secret(prims, handshake, b"c hs traffic", hello)
    s_hs = K.derive_secret(prims, handshake, b"s hs traffic", hello)
    assert (c_hs, s_hs) == (V["client_handshake_traffic_secret"],
                            V["server_handshake_traffic_secret"])
    assert K.traffic_keys(prims, s_hs) == (V["server_handshake_key"], V["server_handshake_iv"])
    assert K.traffic_keys(prims, c_hs) == (V["client_handshake_key"], V["client_handshake_iv"])
    derived = K.derive_secret(prims, handshake, b"derived", empty)
    assert derived == V["derived_for_master"]
    master = K.hkdf_extract(prims, derived, K.ZEROS)
    assert master == V["master_secret"]
    assert K.hkdf_expand_label(prims, s_hs, b"finished", b"", 32) == V["server_finished_key"]
    assert K.hkdf_expand_label(prims, c_hs, b"finished", b"", 32) == V["client_finished_key"]
    server_flight = _sha(V["client_hello"], V["server_hello"], V["encrypted_extensions"],
                         V["certificate"], V["certificate_verify"])
    assert K.finished_mac(prims, s_hs, server_flight) == V["server_finished"][4:]
    through = V["hash_through_server_finished"]
    assert K.finished_mac(prims, c_hs, through) == V["client_finished"][4:]
    c_ap = K.derive_secret(prims, master, b"c ap traffic", through)
    s_ap = K.derive_secret(prims, master, b"s ap traffic", through)
    assert (c_ap, s_ap) == (V["client_application_traffic_secret_0"],
                            V["server_application_traffic_secret_0"])
    assert K.traffic_keys(prims, c_ap) == (V["client_application_key"],
                                           V["client_application_iv"])
    assert K.traffic_keys(prims, s_ap) == (V["server_application_key"],
                                           V["server_application_iv"])
    res_master = K.derive_secret(prims, master, b"res master", V["hash_through_client_finished"])
    assert res_master == V["resumption_master_secret"]


def test_resumption_psk_and_binder(prims):
    # NewSessionTicket -> PSK (RFC 8446 4.6.1), then the binder of the resumed
    # ClientHello (4.2.11.2) over its prefix.
    client = _client_with(prims)
    client._res_master = V["resumption_master_secret"]
    ticket = client._new_session_ticket(V["new_session_ticket"][4:])
    assert ticket.psk == V["resumption_psk"] and ticket.lifetime_s == 30
    early = K.hkdf_extract(prims, b"", ticket.psk)
    assert early == V["psk_early_secret"]
    binder_key = K.derive_secret(prims, early, b"res binder", _sha(b""))
    assert binder_key == V["psk_binder_key"]
    assert K.finished_mac(prims, binder_key, V["psk_binder_hash"]) == V["psk_binder"]


def _client_with(prims):
    config = tls13.Tls13Config(prims, None, [], None, lambda: 1000, server_name="server")
    return tls13.Tls13Client(config)


def test_record_protection_seals_the_rfc_records(prims):
    c_hs = tls13.RecordProtection(prims, V["client_handshake_traffic_secret"])
    assert c_hs.seal(tls13.CT_HANDSHAKE, V["client_finished"]) == V["record_client_finished"]
    c_ap = tls13.RecordProtection(prims, V["client_application_traffic_secret_0"])
    assert c_ap.seal(tls13.CT_APPLICATION_DATA, V["application_data"]) == \
        V["record_client_application_data"]
    # Sequence number 1 of the same key: the close_notify alert.
    assert c_ap.seal(tls13.CT_ALERT, b"\x01\x00") == V["record_client_close_notify"]


def test_record_protection_opens_the_rfc_records(prims):
    record = V["record_server_application_data"]
    s_ap = tls13.RecordProtection(prims, V["server_application_traffic_secret_0"])
    # The server sent its NewSessionTicket first: the data record is its sequence 1.
    s_ap.seq = 1
    assert s_ap.open(record[:5], record[5:]) == V["application_data"] + b"\x17"
    c_hs = tls13.RecordProtection(prims, V["client_handshake_traffic_secret"])
    record = V["record_client_finished"]
    assert c_hs.open(record[:5], record[5:]) == V["client_finished"] + b"\x16"


def test_record_protection_refuses_a_flipped_bit_or_the_wrong_sequence(prims):
    record = V["record_client_application_data"]
    for index in (5, len(record) // 2, len(record) - 1):
        tampered = bytearray(record)
        tampered[index] ^= 0x01
        c_ap = tls13.RecordProtection(prims, V["client_application_traffic_secret_0"])
        with pytest.raises(TlsError) as caught:
            c_ap.open(bytes(tampered[:5]), bytes(tampered[5:]))
        assert caught.value.alert == tls13.ALERT_BAD_RECORD_MAC
    c_ap = tls13.RecordProtection(prims, V["client_application_traffic_secret_0"])
    c_ap.seq = 1
    with pytest.raises(TlsError):
        c_ap.open(record[:5], record[5:])
    # The header is authenticated too (additional data, RFC 8446 5.2).
    c_ap = tls13.RecordProtection(prims, V["client_application_traffic_secret_0"])
    with pytest.raises(TlsError):
        c_ap.open(b"\x17\x03\x01" + record[3:5], record[5:])


def test_key_update_secret_follows_rfc8446_7_2(prims):
    # application_traffic_secret_N+1 = HKDF-Expand-Label(secret_N, "traffic upd", "", 32)
    secret = V["client_application_traffic_secret_0"]
    expected = K.hkdf_expand(prims, secret, b"\x00\x20\x11tls13 traffic upd\x00", 32)
    assert K.next_traffic_secret(prims, secret) == expected
