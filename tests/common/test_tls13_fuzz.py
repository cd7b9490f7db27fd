"""Hypothesis over the TLS 1.3 client's record and handshake parsers: whatever the peer
sends -- random bytes, or a real server flight with bytes flipped, cut or inserted
before protection -- the client either goes on or raises a TlsError that is not an
internal failure, and is closed after it."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetid.common import tls13 as T
from fleetid.common.errors import TlsError
from tests.common.tls13_support import FakeServer, TestPki, client_config

PKI = TestPki()
_SETTINGS = settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


def _feed(client, chunks):
    try:
        for chunk in chunks:
            client.receive(chunk)
    except TlsError as exc:
        assert exc.reason != "internal", exc  # a parser bug, not a refusal
        assert client.closed
        return exc
    return None


@_SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_random_bytes_before_the_server_hello_give_typed_errors_only(chunks):
    client = T.Tls13Client(client_config(PKI))
    client.start()
    _feed(client, chunks)


@_SETTINGS
@given(st.binary(max_size=120), st.integers(0, 1 << 16))
def test_random_records_after_a_valid_server_hello(payload, seed):
    # Well-formed headers with random protected contents: only bad_record_mac, overflow
    # or an unexpected record type can come out.
    client = T.Tls13Client(client_config(PKI))
    server = FakeServer(PKI)
    client.receive(server.server_hello(client.start()))
    content_type = (20, 21, 22, 23, seed & 0xFF)[seed % 5]
    record = bytes((content_type,)) + b"\x03\x03" + len(payload).to_bytes(2, "big") + payload
    _feed(client, [record])


def _mutate(data, position, action, value):
    position %= len(data) + 1
    if action == 0:  # flip
        if position == len(data):
            return data
        return data[:position] + bytes((data[position] ^ (value or 1),)) + data[position + 1:]
    if action == 1:  # cut
        return data[:position]
    return data[:position] + bytes((value,)) + data[position:]  # insert


@_SETTINGS
@given(st.integers(0, 4), st.integers(0, 4000), st.integers(0, 2), st.integers(0, 255),
       st.integers(1, 600))
def test_mutated_server_flights_give_typed_errors_only(index, position, action, value, fragment):
    # Each handshake message of a real flight altered before protection: the handshake
    # parsers (EE, CertificateRequest, Certificate with the DER inside, CV, Finished) see it.
    client = T.Tls13Client(client_config(PKI))
    server = FakeServer(PKI)
    client.receive(server.server_hello(client.start()))
    flight = server.flight()
    index %= len(flight)
    flight[index] = _mutate(flight[index], position, action, value)
    error = _feed(client, [server.protect(b"".join(flight), fragment=fragment)])
    if error is None:
        # Only a mutation the parsers must accept (e.g. inside an opaque field that is
        # checked later) can leave the handshake unfinished, never half-done and silent.
        assert client.connected or not client.closed


@_SETTINGS
@given(st.integers(0, 200), st.integers(0, 2), st.integers(0, 255))
def test_mutated_server_hello_gives_typed_errors_only(position, action, value):
    client = T.Tls13Client(client_config(PKI))
    server = FakeServer(PKI)
    hello = server.server_hello(client.start())
    body = _mutate(hello[5:], position, action, value)
    _feed(client, [hello[:3] + len(body).to_bytes(2, "big") + body])


@_SETTINGS
@given(st.binary(min_size=1, max_size=200))
def test_mutated_post_handshake_messages_give_typed_errors_only(message):
    from tests.common.tls13_support import full_handshake

    client = T.Tls13Client(client_config(PKI))
    server = FakeServer(PKI)
    full_handshake(client, server)
    _feed(client, [server.protect(message)])
