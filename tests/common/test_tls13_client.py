"""The sans-I/O TLS 1.3 client (fleetid.common.tls13) against a scripted server
(tests/common/tls13_support.py): the handshake with client authentication, records split
and coalesced, HelloRetryRequest, PSK-DHE resumption, KeyUpdate, close_notify,
record_size_limit, and every refusal as a typed error with the alert queued for the peer.
"""

import datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fleetid.common import tls13 as T
from fleetid.common import tls13_crypto as K
from fleetid.common.errors import FleetidError, TlsAlertReceived, TlsCertificateError, TlsError
from fleetid.common.host.tls13_host import SoftwareEphemeral
from tests.common.tls13_support import (
    NOW,
    FakeServer,
    TestPki,
    client_config,
    ext,
    full_handshake,
    handshake,
    parse_records,
)


@pytest.fixture(scope="module")
def pki():
    return TestPki()


def _kinds(events):
    return [kind for kind, _ in events]


def _refused(client, data):
    with pytest.raises(TlsError) as caught:
        client.receive(data)
    assert client.closed
    return caught.value


def _alert_sent(server, client):
    # The fatal alert the client queued, read with the server's current read key.
    records = parse_records(client.data_to_send())
    assert records, "no alert queued"
    content_type, header, body = records[-1]
    if content_type == T.CT_ALERT:
        return body[1]
    inner = server.read.open(header, body).rstrip(b"\x00")
    assert inner[-1] == T.CT_ALERT
    return inner[1]


# -- the handshake ------------------------------------------------------------------------


def test_full_handshake_authenticates_both_sides(pki):
    signatures = []
    signer = pki.client_signer()
    config = client_config(pki, signer=lambda d: signatures.append(d) or signer(d))
    client = T.Tls13Client(config)
    server = FakeServer(pki)
    events = full_handshake(client, server)
    assert _kinds(events) == [T.EVENT_HANDSHAKE_COMPLETE]
    info = events[0][1]
    assert (info.version, info.suite, info.group) == ("TLSv1.3", "TLS_AES_128_GCM_SHA256",
                                                     "secp256r1")
    assert info.client_certificate and not info.resumed and not info.hello_retry
    assert dict(info.chain_report)["name"] == "server.test in subjectAltName"
    assert len(signatures) == 1 and client.connected
    assert server.client_certificate == pki.client
    # Application data both ways.
    client.send_data(b"ping")
    assert server.read_application(client.data_to_send()) == [(T.CT_APPLICATION_DATA, b"ping")]
    events = client.receive(server.protect(b"pong", T.CT_APPLICATION_DATA))
    assert events == [(T.EVENT_DATA, b"pong")]


def test_client_hello_offers_one_suite_one_group_one_scheme_and_sni(pki):
    client = T.Tls13Client(client_config(pki, record_size_limit=512))
    server = FakeServer(pki)
    server._client_hello(client.start())
    e = server.client_extensions
    assert e[T.EXT_SUPPORTED_VERSIONS] == b"\x02\x03\x04"
    assert e[T.EXT_SUPPORTED_GROUPS] == b"\x00\x02\x00\x17"
    assert e[T.EXT_SIGNATURE_ALGORITHMS] == b"\x00\x02\x04\x03"
    assert e[T.EXT_RECORD_SIZE_LIMIT] == b"\x02\x00"
    assert e[T.EXT_PSK_KEY_EXCHANGE_MODES] == b"\x01\x01"
    assert b"server.test" in e[T.EXT_SERVER_NAME]
    assert T.EXT_PRE_SHARED_KEY not in e
    # No SNI for an IP literal (RFC 6066 3).
    client = T.Tls13Client(client_config(pki, server_name="127.0.0.1"))
    server._client_hello(client.start())
    assert T.EXT_SERVER_NAME not in server.client_extensions


def test_records_split_to_single_bytes_and_coalesced_flights_both_complete(pki):
    client = T.Tls13Client(client_config(pki))
    server = FakeServer(pki)
    hello = server.server_hello(client.start())
    flight = server.protect(b"".join(server.flight()), fragment=7)  # 7-byte fragments
    events = []
    for i in range(len(hello + flight)):
        events += client.receive((hello + flight)[i:i + 1])  # one byte at a time
    assert _kinds(events) == [T.EVENT_HANDSHAKE_COMPLETE]

    client = T.Tls13Client(client_config(pki))
    server = FakeServer(pki)
    hello = server.server_hello(client.start())
    events = client.receive(hello + server.protect(b"".join(server.flight())))  # one read
    assert _kinds(events) == [T.EVENT_HANDSHAKE_COMPLETE]
    server.client_flight(client.data_to_send())
    both = server.protect(b"a", T.CT_APPLICATION_DATA) + server.protect(b"b", T.CT_APPLICATION_DATA)
    assert client.receive(both) == [(T.EVENT_DATA, b"a"), (T.EVENT_DATA, b"b")]


def test_change_cipher_spec_of_middlebox_compatibility_is_dropped(pki):
    client = T.Tls13Client(client_config(pki))
    server = FakeServer(pki)
    hello = server.server_hello(client.start())
    ccs = server.plain(b"\x01", T.CT_CHANGE_CIPHER_SPEC)
    events = client.receive(hello + ccs + server.protect(b"".join(server.flight())))
    assert _kinds(events) == [T.EVENT_HANDSHAKE_COMPLETE]


def test_hello_retry_request_with_a_cookie_is_answered_with_the_cookie(pki):
    ephemeral = SoftwareEphemeral()
    client = T.Tls13Client(client_config(pki, ephemeral=ephemeral))
    server = FakeServer(pki)
    hrr = server.hello_retry(client.start(), cookie=b"state-of-the-server")
    client.receive(hrr)
    second = client.data_to_send()
    hello = server.server_hello(second)
    assert server.client_extensions[T.EXT_COOKIE] == b"\x00\x13state-of-the-server"
    events = client.receive(hello + server.protect(b"".join(server.flight())))
    assert events[0][1].hello_retry
    server.client_flight(client.data_to_send())  # Finished over message_hash || HRR || ...
    assert ephemeral.operations == 2  # the same share is sent again


def test_hello_retry_request_selecting_the_group_gets_a_share_made_then(pki):
    ephemeral = SoftwareEphemeral()
    client = T.Tls13Client(client_config(pki, ephemeral=ephemeral, initial_key_share=False))
    server = FakeServer(pki)
    first = client.start()
    assert ephemeral.operations == 0
    client.receive(server.hello_retry(first, cookie=b"", select_group=True))
    hello = server.server_hello(client.data_to_send())
    events = client.receive(hello + server.protect(b"".join(server.flight())))
    assert events[0][1].hello_retry and ephemeral.operations == 2
    server.client_flight(client.data_to_send())


def test_second_hello_retry_or_one_that_changes_nothing_is_refused(pki):
    client = T.Tls13Client(client_config(pki))
    server = FakeServer(pki)
    client.receive(server.hello_retry(client.start()))
    again = server.hello_retry(client.data_to_send())
    assert _refused(client, again).alert == T.ALERT_UNEXPECTED_MESSAGE

    client = T.Tls13Client(client_config(pki))
    hrr = FakeServer(pki).hello_retry(client.start(), cookie=b"")
    assert _refused(client, hrr).alert == T.ALERT_ILLEGAL_PARAMETER
    client = T.Tls13Client(client_config(pki))
    hrr = FakeServer(pki).hello_retry(client.start(), select_group=True)
    assert _refused(client, hrr).reason == "illegal_parameter"  # we already sent P-256


def test_session_ticket_resumes_with_psk_dhe_and_no_signature(pki):
    client = T.Tls13Client(client_config(pki))
    server = FakeServer(pki)
    full_handshake(client, server)
    events = client.receive(server.new_session_ticket(lifetime=600))
    assert _kinds(events) == [T.EVENT_SESSION_TICKET]
    ticket = events[0][1]
    assert "redacted" in repr(ticket) and ticket.usable(NOW + 10, "server.test")
    assert not ticket.usable(NOW + 600, "server.test") and not ticket.usable(NOW, "other")

    signatures = []
    ephemeral = SoftwareEphemeral()
    resumed = T.Tls13Client(client_config(pki, ticket=ticket, ephemeral=ephemeral,
                                          signer=lambda d: signatures.append(d)))
    hello = server.server_hello(resumed.start())
    assert server.psk == ticket.psk  # the binder checked out on the server's side
    flight = server.flight()
    assert [m[0] for m in flight] == [T.HT_ENCRYPTED_EXTENSIONS, T.HT_FINISHED]
    events = resumed.receive(hello + server.protect(b"".join(flight)))
    info = events[0][1]
    assert info.resumed and info.chain_report == [] and not info.client_certificate
    assert server.client_flight(resumed.data_to_send()) == [T.HT_FINISHED]
    assert signatures == [] and ephemeral.operations == 2  # one ECDHE, no SIGN, no VERIFY


def test_server_declining_the_psk_falls_back_to_a_full_handshake(pki):
    client = T.Tls13Client(client_config(pki))
    server = FakeServer(pki)
    full_handshake(client, server)
    ticket = client.receive(server.new_session_ticket())[0][1]
    again = T.Tls13Client(client_config(pki, ticket=ticket))
    hello = server.server_hello(again.start(), accept_psk=False)
    events = again.receive(hello + server.protect(b"".join(server.flight())))
    assert not events[0][1].resumed and events[0][1].client_certificate


def test_key_update_requested_by_the_server_is_answered_and_keys_move(pki):
    client = T.Tls13Client(client_config(pki))
    server = FakeServer(pki)
    full_handshake(client, server)
    update = server.protect(handshake(T.HT_KEY_UPDATE, b"\x01"))
    server.write = T.RecordProtection(server.prims,
                                      K.next_traffic_secret(server.prims, server.s_ap))
    events = client.receive(update + server.protect(b"new keys", T.CT_APPLICATION_DATA))
    assert events == [(T.EVENT_KEY_UPDATE, True), (T.EVENT_DATA, b"new keys")]
    answer = server.read_application(client.data_to_send())
    assert answer == [(T.CT_HANDSHAKE, handshake(T.HT_KEY_UPDATE, b"\x00"))]
    server.read = T.RecordProtection(server.prims, K.next_traffic_secret(server.prims, server.c_ap))
    client.send_data(b"after")
    assert server.read_application(client.data_to_send()) == [(T.CT_APPLICATION_DATA, b"after")]


def test_close_notify_is_an_event_and_is_answered(pki):
    client = T.Tls13Client(client_config(pki))
    server = FakeServer(pki)
    full_handshake(client, server)
    events = client.receive(server.protect(b"\x01\x00", T.CT_ALERT))
    assert events == [(T.EVENT_CLOSED, None)] and client.closed
    assert server.read_application(client.data_to_send()) == [(T.CT_ALERT, b"\x01\x00")]
    with pytest.raises(TlsError):
        client.send_data(b"late")


def test_record_size_limit_of_the_server_bounds_what_the_client_sends(pki):
    client = T.Tls13Client(client_config(pki, record_size_limit=1024))
    server = FakeServer(pki, record_size_limit=256)
    events = full_handshake(client, server)
    assert events[0][1].peer_record_size_limit == 256
    client.send_data(bytes(1000))
    records = server.read_application(client.data_to_send())
    assert [len(content) for _, content in records] == [255, 255, 255, 235]
    # Ours is in force once the server acknowledged it: a 1025-byte inner plaintext is refused.
    oversized = server.protect(bytes(1024), T.CT_APPLICATION_DATA)
    error = _refused(client, oversized)
    assert error.alert == T.ALERT_RECORD_OVERFLOW


# -- refusals -----------------------------------------------------------------------------


def _to_flight(pki, **server_kwargs):
    client = T.Tls13Client(client_config(pki))
    server = FakeServer(pki, **server_kwargs)
    hello = server.server_hello(client.start())
    client.receive(hello)
    return client, server


def test_bad_server_finished_is_decrypt_error_with_the_alert_sent(pki):
    client, server = _to_flight(pki)
    flight = server.flight()
    flight[-1] = flight[-1][:-1] + bytes((flight[-1][-1] ^ 1,))
    error = _refused(client, server.protect(b"".join(flight)))
    assert (error.reason, error.alert) == ("bad_finished", T.ALERT_DECRYPT_ERROR)
    assert _alert_sent(server, client) == T.ALERT_DECRYPT_ERROR
    with pytest.raises(TlsError) as again:
        client.receive(b"\x17\x03\x03\x00\x00")
    assert again.value.reason == "closed"


def test_certificate_verify_by_another_key_is_refused(pki):
    client, server = _to_flight(pki)
    flight = server.flight()
    other = ec.generate_private_key(ec.SECP256R1())
    saved, server.pki = server.pki, type("P", (), {"server_key": other})()
    flight[3] = server.certificate_verify(b"".join(flight[:3]))
    server.pki = saved
    error = _refused(client, server.protect(b"".join(flight)))
    assert (error.reason, error.alert) == ("bad_certificate_verify", T.ALERT_DECRYPT_ERROR)


def test_truncated_and_tampered_records_are_bad_record_mac(pki):
    client, server = _to_flight(pki)
    record = server.protect(b"".join(server.flight()))
    cut = record[:-10]
    truncated = cut[:3] + (len(cut) - 5).to_bytes(2, "big") + cut[5:]
    assert _refused(client, truncated).alert == T.ALERT_BAD_RECORD_MAC
    client, server = _to_flight(pki)
    short = b"\x17\x03\x03\x00\x05hello"
    assert _refused(client, short).alert == T.ALERT_BAD_RECORD_MAC


def test_oversized_records_are_record_overflow(pki):
    client = T.Tls13Client(client_config(pki))
    client.start()
    error = _refused(client, b"\x16\x03\x03\x40\x01")  # 16385 plaintext bytes announced
    assert error.alert == T.ALERT_RECORD_OVERFLOW
    client, server = _to_flight(pki)
    error = _refused(client, b"\x17\x03\x03\x41\x01")  # 2^14 + 256 + 1
    assert error.alert == T.ALERT_RECORD_OVERFLOW


def test_unexpected_messages_are_refused(pki):
    client, server = _to_flight(pki)
    flight = server.flight()
    error = _refused(client, server.protect(flight[0] + flight[-1]))  # EE then Finished
    assert error.alert == T.ALERT_UNEXPECTED_MESSAGE
    client, server = _to_flight(pki)
    error = _refused(client, server.protect(b"data", T.CT_APPLICATION_DATA))
    assert error.alert == T.ALERT_UNEXPECTED_MESSAGE
    client = T.Tls13Client(client_config(pki))
    client.start()
    error = _refused(client, FakeServer(pki).plain(handshake(T.HT_FINISHED, bytes(32))))
    assert error.alert == T.ALERT_UNEXPECTED_MESSAGE
    client, server = _to_flight(pki)
    error = _refused(client, server.protect(server.encrypted_extensions(ext(0x10, b"h2"))))
    assert error.alert == T.ALERT_UNSUPPORTED_EXTENSION


def test_downgrade_to_tls12_is_protocol_version(pki):
    client = T.Tls13Client(client_config(pki))
    server = FakeServer(pki)
    error = _refused(client, server.server_hello(client.start(), version_ext=False))
    assert (error.reason, error.alert) == ("protocol_version", T.ALERT_PROTOCOL_VERSION)
    assert _alert_sent(server, client) == T.ALERT_PROTOCOL_VERSION  # in the clear
    # A TLS 1.2 ServerHello with TLS 1.2 extensions (extended_master_secret, renegotiation).
    client = T.Tls13Client(client_config(pki))
    server._client_hello(client.start())
    tls12 = handshake(T.HT_SERVER_HELLO, b"\x03\x03" + bytes(32) + b"\x00\xc0\x2b\x00"
                      + b"\x00\x09" + ext(23, b"") + ext(0xFF01, b"\x00"))
    assert _refused(client, server.plain(tls12)).alert == T.ALERT_PROTOCOL_VERSION
    client = T.Tls13Client(client_config(pki))
    sentinel = bytes(24) + b"DOWNGRD\x01"
    error = _refused(client, FakeServer(pki).server_hello(client.start(), random=sentinel))
    assert error.reason == "downgrade"
    client = T.Tls13Client(client_config(pki))
    error = _refused(client, FakeServer(pki).server_hello(client.start(), suite=0x1302))
    assert error.alert == T.ALERT_ILLEGAL_PARAMETER


def _chain_refused(pki, chain, **config):
    client = T.Tls13Client(client_config(pki, **config))
    server = FakeServer(pki, chain=chain)
    client.receive(server.server_hello(client.start()))
    with pytest.raises(TlsCertificateError) as caught:
        client.receive(server.protect(b"".join(server.flight())))
    assert client.closed
    return caught.value


def test_server_certificate_refusals_name_the_check(pki):
    at = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    key = pki.server_key
    error = _chain_refused(pki, [pki.server], server_name="other.test")
    assert (error.check, error.alert) == ("name", 42)
    expired = pki.leaf(key, not_before=at - 10 * day, not_after=at - day)
    error = _chain_refused(pki, [expired])
    assert (error.check, error.alert) == ("validity", 45)
    future = pki.leaf(key, not_before=at + day, not_after=at + 10 * day)
    assert _chain_refused(pki, [future]).check == "validity"
    stranger = TestPki("Another Root")
    error = _chain_refused(pki, [stranger.server])
    assert (error.check, error.alert) == ("path", 48)
    impostor = TestPki("Test Root")  # same name, another key: the signature fails
    assert _chain_refused(pki, [impostor.server]).check == "signature"
    client_only = pki.leaf(key, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
    assert _chain_refused(pki, [client_only]).check == "eku"


def test_revocation_hook_refuses_a_revoked_server(pki):
    seen = []

    def revoked(path):
        seen.append([c.serial for c in path])
        raise FleetidError("revoked")

    error = _chain_refused(pki, [pki.server], revocation=revoked)
    assert (error.check, error.alert) == ("revocation", 44) and len(seen[0]) == 1


def test_fatal_alert_from_the_peer_is_typed(pki):
    client = T.Tls13Client(client_config(pki))
    client.start()
    with pytest.raises(TlsAlertReceived) as caught:
        client.receive(b"\x15\x03\x03\x00\x02\x02\x28")  # handshake_failure
    assert caught.value.alert == 40 and client.closed


def test_se_failure_while_signing_is_a_typed_error(pki):
    from fleetid.common.errors import LinkError

    def broken(digest):
        raise LinkError(LinkError.TIMEOUT)

    client = T.Tls13Client(client_config(pki, signer=broken))
    server = FakeServer(pki)
    client.receive(server.server_hello(client.start()))
    error = _refused(client, server.protect(b"".join(server.flight())))
    assert (error.reason, error.alert) == ("se", T.ALERT_INTERNAL_ERROR)
