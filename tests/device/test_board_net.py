"""The board's network pieces on CPython: device/https.py's bounded HTTP/1.1 reader and
device/board_net.py's PKCS#7, CRL distribution point and status mapping, on artefacts the
cloud really makes (cloud/est/messages.certs_only, cloud/pki/profiles.device_builder).
The whole module under MicroPython against `fleetid cloud serve`:
tests/micropython/test_board_net_micropython.py."""

import binascii
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from fleetid.cloud.est.messages import certs_only, encode_base64
from fleetid.cloud.pki.profiles import device_builder, issuing_ca_builder, root_builder
from fleetid.device import board_net, https
from fleetid.device.agent import NetError
from fleetid.device.certcheck import CertificateRefused

DER = serialization.Encoding.DER
NOW = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
CRL_URL = "http://127.0.0.1:8080/crl/widget.crl"


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.fixture(scope="module")
def pki():
    """A root, an issuing CA naming its CRL, and a device certificate it issued."""
    root_key, ca_key, device_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = root_builder(_name("root"), root_key.public_key(), NOW - datetime.timedelta(1),
                        NOW + datetime.timedelta(3650)).sign(root_key, hashes.SHA256())
    ca = issuing_ca_builder(_name("ca"), ca_key.public_key(), root,
                            NOW - datetime.timedelta(1), NOW + datetime.timedelta(1000),
                            crl_url=CRL_URL).sign(root_key, hashes.SHA256())
    device = device_builder("operational", "FID-000000001", device_key.public_key(), ca, NOW,
                            crl_url=CRL_URL).sign(ca_key, hashes.SHA256())
    return root, ca, device


def _recv_from(data, step):
    chunks = [data[i:i + step] for i in range(0, len(data), step)]

    def recv():
        return chunks.pop(0) if chunks else b""

    return recv


# -- device/https.py ------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_content_length_and_chunked_answers_read_in_any_fragmentation(step):
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
              b"\r\n{\"a\": [1]}\n")
    response = https.read_response(_recv_from(answer, step))
    assert (response.status, response.body) == (200, b"{\"a\": [1]}\n")
    assert response.header("content-type") == "application/json"
    chunked = (b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\nRetry-After: 7\r\n\r\n"
               b"4;ext=1\r\nwait\r\n3\r\n: x\r\n0\r\nTrailer: y\r\n\r\n")
    response = https.read_response(_recv_from(chunked, step))
    assert (response.status, response.body, response.header("Retry-After")) == \
        (202, b"wait: x", "7")


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_a_200_answer_in_pieces_is_the_body_as_it_arrived(step):
    # read_response(pieces=True): the body as the recv() pieces (no block of the whole
    # body); a non-200 answer keeps its body, as error_for reads it.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"
    response = https.read_response(_recv_from(head + b"{\"a\": [1]}\nextra", step),
                                   pieces=True)
    assert response.body is None
    assert b"".join(response.pieces) == b"{\"a\": [1]}\n"
    assert all(len(piece) <= step for piece in response.pieces)
    refused = https.read_response(_recv_from(head.replace(b"200 OK", b"403 No") +
                                             b"revoked: x\n", step), pieces=True)
    assert (refused.body, refused.pieces) == (b"revoked: x\n", None)
    with pytest.raises(https.HttpError):
        https.read_response(_recv_from(head + b"short", step), pieces=True)


@given(st.binary(max_size=200), st.integers(1, 80), st.integers(0, 76))
def test_base64_decoded_from_pieces_is_the_standard_decoding(data, step, width):
    import base64

    text = base64.b64encode(data)
    if width:  # line breaks every `width` characters (RFC 8951 3 allows any)
        text = b"\r\n".join(text[i:i + width] for i in range(0, len(text), width))
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    assert board_net.decode_base64_pieces(pieces) == data
    assert pieces == []  # each piece dropped once decoded


@given(st.binary(max_size=1200))
def test_base64_body_is_b2a_base64_in_pieces(data):
    body = board_net.Base64Body(data)
    pieces = list(body)
    assert b"".join(pieces) == binascii.b2a_base64(data) and len(body) == len(b"".join(pieces))
    assert all(len(piece) <= 513 for piece in pieces)


@pytest.mark.parametrize("text", [b"QQ=", b"Q===", b"QQ==QUJD", b"QU*D", b"QUJ", b"=QUJ"])
def test_base64_pieces_that_are_not_base64_are_refused(text):
    with pytest.raises(ValueError):
        board_net.decode_base64_pieces([text[:2], text[2:]])


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 33\r\n\r\n",  # over max_body (32)
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n21\r\n",  # chunk over it
    b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 33,  # read to the close, over it
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # cut short
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",  # unsupported coding
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n", b"SSH-2.0-OpenSSH\r\n\r\n", b"",
    b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (https.MAX_HEADERS + 1) + b"\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"y" * https.MAX_LINE + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n no-name\r\n\r\n",
], ids=["length", "chunk", "to-close", "cut", "coding", "negative", "nan", "status",
        "not-http", "empty", "headers", "line", "header"])
def test_answers_outside_the_bounds_are_typed_link_errors(answer):
    with pytest.raises(https.HttpError) as refused:
        https.read_response(_recv_from(answer, 5), max_body=32)
    assert refused.value.reason == https.HttpError.LINK


@given(st.binary(max_size=300))
def test_any_bytes_give_an_answer_or_an_http_error(data):
    try:
        response = https.read_response(_recv_from(b"HTTP/1.1 200 OK\r\n" + data, 3), 64)
    except https.HttpError:
        return
    assert len(response.body) <= 64


def test_a_closed_port_is_a_link_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(https.HttpError) as refused:
        https.fetch("http://127.0.0.1:%d/crl" % port)
    assert refused.value.reason == https.HttpError.LINK


def test_urls():
    assert https.parse_url("https://10.0.0.2:8443") == ("https", "10.0.0.2", 8443, "/")
    assert https.parse_url("http://h/crl/a.crl") == ("http", "h", 80, "/crl/a.crl")
    for bad in ("ftp://h/", "https://u@h/", "https://[::1]:1/", "http://h:0/", "https://"):
        with pytest.raises(ValueError):
            https.parse_url(bad)


# -- device/board_net.py --------------------------------------------------------------------


def test_pkcs7_from_the_est_server_gives_its_certificates(pki):
    root, ca, device = pki
    # certificates is a SET OF: DER orders it, so compare as sets.
    assert sorted(board_net.pkcs7_certificates(certs_only([ca, root]))) == \
        sorted([ca.public_bytes(DER), root.public_bytes(DER)])
    for bad in (b"", b"\x30\x00", device.public_bytes(DER), certs_only([ca])[:-1]):
        with pytest.raises(board_net.Pkcs7Error):
            board_net.pkcs7_certificates(bad)


def test_crl_distribution_point_of_a_device_certificate(pki):
    root, ca, device = pki
    assert board_net.crl_urls(device.public_bytes(DER)) == [CRL_URL]
    assert board_net.crl_urls(root.public_bytes(DER)) == []


class _Response:
    def __init__(self, status, body, retry_after=None):
        self.status, self.body = status, body
        self._headers = {"retry-after": retry_after} if retry_after else {}

    def header(self, name, default=None):
        return self._headers.get(name.lower(), default)


@pytest.mark.parametrize("status,body,retry,expected", [
    (202, b"pending", "30", (NetError.PENDING, 30, None)),
    (503, b"busy", None, (NetError.SERVER, None, None)),
    (403, b"revoked: by the operator", None, (NetError.REFUSED, None, "revoked")),
    (401, b"superseded: use slot 3", "x", (NetError.REFUSED, None, "superseded")),
    (409, b"", "999999999", (NetError.REFUSED, 24 * 3600, None)),
])
def test_status_mapping_matches_the_cpython_reference(status, body, retry, expected):
    error = board_net.error_for(_Response(status, body, retry))
    assert (error.reason, error.retry_after, error.server_reason) == expected
    assert error.status == status


class _FakeHttps:
    """HttpsClient stand-in: answers the enrolment with a given response."""

    def __init__(self, response):
        self.response = response
        self.requests = []

    def request(self, slot, base, method, path, body=None, headers=None, pieces=False):
        self.requests.append((slot, base, method, path, body, headers))
        return self.response


def _net(response):
    net = board_net.BoardNetwork.__new__(board_net.BoardNetwork)
    net.se, net.est_label, net.crl_url = None, None, None
    net.verifier_url, net.est_url = "https://v:1", "https://e:2"
    net.https = _FakeHttps(response)
    return net


def test_enrolment_sends_base64_pkcs10_and_takes_exactly_one_certificate(pki):
    root, ca, device = pki
    ok = https.HttpResponse(200, {"content-type": "application/pkcs7-mime; smime-type=certs-only"},
                            encode_base64(certs_only([device])))
    net = _net(ok)
    assert net.enroll(2, b"\x30\x03\x02\x01\x05", True) == device.public_bytes(DER)
    slot, base, method, path, body, headers = net.https.requests[0]
    assert (slot, base, method, path) == (2, "https://e:2", "POST",
                                          "/.well-known/est/simplereenroll")
    assert b"".join(body) == b"MAMCAQU=\n" == binascii.b2a_base64(b"\x30\x03\x02\x01\x05")
    assert len(body) == 9 and headers["Content-Type"] == "application/pkcs10"
    for response in (
            https.HttpResponse(200, {"content-type": "application/pkcs7-mime"},
                               encode_base64(certs_only([device, ca]))),
            https.HttpResponse(200, {"content-type": "text/plain"}, b"hello"),
            https.HttpResponse(200, {"content-type": "application/pkcs7-mime"}, b"!!!!")):
        with pytest.raises(CertificateRefused) as refused:
            _net(response).enroll(1, b"\x30\x00", False)
        assert refused.value.reason == "malformed"
    with pytest.raises(NetError) as pending:
        _net(https.HttpResponse(202, {"retry-after": "5"}, b"")).enroll(1, b"\x30\x00", False)
    assert (pending.value.reason, pending.value.retry_after) == (NetError.PENDING, 5)
