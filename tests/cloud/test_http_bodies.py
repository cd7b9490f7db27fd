"""Request bodies that arrive in pieces (issue 9, defect 1).

Real networks split a body across TCP segments and TLS records; a client may send it with
Content-Length or chunked.  Every EST and telemetry body must get the same answer however
it is split, and a body over the limit must get 413 whichever way it comes.  The client
here writes the request itself over TLS, pausing between writes so that the server really
sees the body in several reads.
"""

import base64
import http.client
import json
import socket
import time

import pytest

from fleetid.cloud.http.est_app import MAX_BODY
from fleetid.cloud.http.verifier_app import MAX_TELEMETRY

PAUSE = 0.15  # seconds between writes: long enough that each write is its own read


def _split(body, parts):
    step = max(1, -(-len(body) // parts))
    return [body[i:i + step] for i in range(0, len(body), step)]


def _chunked(pieces):
    out = []
    for piece in pieces:
        out.append(b"%x\r\n" % len(piece) + piece + b"\r\n")
    out.append(b"0\r\n\r\n")
    return out


def raw_request(cloud, service, path, content_type, body, files, mode):
    """POST `body` over TLS, written as `mode` says:

    "one"      Content-Length, head and body in one write
    "length"   Content-Length, the body in 3 writes with a pause between them
    "chunked"  chunked, 3 chunks, each its own write with a pause
    "chunks"   chunked, 40 small chunks, in 4 writes with a pause
    Returns (status, body bytes).
    """
    head = ["POST %s HTTP/1.1" % path, "Host: 127.0.0.1", "Content-Type: " + content_type,
            "Connection: close"]
    if mode in ("one", "length"):
        head.append("Content-Length: %d" % len(body))
    else:
        head.append("Transfer-Encoding: chunked")
    head = ("\r\n".join(head) + "\r\n\r\n").encode("ascii")
    if mode == "one":
        writes = [head + body]
    elif mode == "length":
        writes = [head] + _split(body, 3)
    elif mode == "chunked":
        writes = [head] + _chunked(_split(body, 3))
    else:
        encoded = b"".join(_chunked(_split(body, 40)))
        writes = [head] + _split(encoded, 4)
    context = cloud.client_context(files)
    raw = socket.create_connection(("127.0.0.1", cloud.ports[service]), timeout=20)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        for i, data in enumerate(writes):
            if i:
                time.sleep(PAUSE)
            tls.sendall(data)
        response = http.client.HTTPResponse(tls)
        response.begin()
        return response.status, response.read()


MODES = ("one", "length", "chunked", "chunks")
EST = "/.well-known/est/"


def test_attested_enrolment_is_answered_the_same_however_the_body_is_split(fleet, cloud):
    for mode in MODES:
        device = fleet.provision()
        _, csr = device.csr()
        status, body = raw_request(cloud, "est", EST + "simpleenroll", "application/pkcs10",
                                   base64.b64encode(csr), device.files(), mode)
        assert status == 200, (mode, body)
        # and a re-enrolment with the new certificate, split the same way
        fleet.enrol(device)
        _, csr = device.csr()
        status, body = raw_request(cloud, "est", EST + "simplereenroll", "application/pkcs10",
                                   base64.b64encode(csr), device.files(), mode)
        assert status == 200, (mode, body)


def test_refused_enrolment_gets_the_same_reason_however_the_body_is_split(fleet, cloud):
    device = fleet.provision()
    _, csr = device.csr()
    # The identity certificate cannot re-enrol: a policy answer that needs the whole CSR.
    answers = {mode: raw_request(cloud, "est", EST + "simplereenroll", "application/pkcs10",
                                 base64.b64encode(csr), device.files(), mode)
               for mode in MODES}
    assert set(answers.values()) == {answers["one"]}
    assert answers["one"][0] == 403 and answers["one"][1].startswith(b"wrong_certificate_kind")


def test_telemetry_is_answered_the_same_however_the_body_is_split(fleet, cloud):
    device = fleet.provision()
    files = device.files()
    document = json.dumps({"temperature": [21.5] * 2000, "fw": "1.2.3"}).encode()
    answers = {mode: raw_request(cloud, "verifier", "/v1/telemetry", "application/json",
                                 document, files, mode) for mode in MODES}
    assert set(answers.values()) == {(202, b'{"accepted": 1}')}, answers


@pytest.mark.parametrize("service,path,content_type,limit", [
    ("est", EST + "simpleenroll", "application/pkcs10", MAX_BODY),
    ("verifier", "/v1/telemetry", "application/json", MAX_TELEMETRY),
])
def test_body_over_the_limit_is_413_however_it_is_sent(fleet, cloud, service, path,
                                                       content_type, limit):
    device = fleet.provision()
    files = device.files()
    before = fleet.snapshot()
    oversized = b"A" * (200 * 1024)
    for mode in MODES:
        status, body = raw_request(cloud, service, path, content_type, oversized, files, mode)
        assert status == 413, (mode, status, body)
    # exactly at the limit is not "too large" (it fails later, for its content)
    status, body = raw_request(cloud, service, path, content_type, b"A" * limit, files,
                               "chunked")
    assert status == 400, (status, body)
    assert fleet.snapshot() == before
