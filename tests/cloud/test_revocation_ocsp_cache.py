"""OCSP like a production responder (cloud/revocation/ocsp_cache.py behind the listener's
fast path, cloud/http/ocsp_fast.py): pre-signed answers per certificate, the same status
as a fresh signing; a revocation committed through RevocationService is never answered
good from the cache afterwards; entries re-signed ahead of nextUpdate; nonces signed
fresh; per-client rate limits; malformed requests.  Everything through the real
listener on 127.0.0.1, with certificates the line really issued (bench fleet)."""

import base64
import datetime
import http.client
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from fleetid.cloud.http.metrics import Metrics
from fleetid.cloud.http.ocsp_fast import OcspFastPath
from fleetid.cloud.http.rate_limit import ClientRateLimits
from fleetid.cloud.http.revocation_app import make_revocation_app
from fleetid.cloud.revocation.ocsp import OCSP_REQUEST_TYPE, OcspResponder
from fleetid.cloud.revocation.ocsp_cache import OcspCache, OcspQuery
from fleetid.cloud.revocation.ocsp_tier import OcspTier
from fleetid.cloud.revocation.service import EventWatcher, read_event
from fleetid.cloud.revocation.tier import Deferred, Reply
from fleetid.cloud.verifier.revoked_cas import revoked_ca_map
from tests.cloud.cloud_support import Fleet, RecordingTransport, pad_headers, pem
from tests.cloud.ocsp_support import LoopbackServer, ocsp_responder, ocsp_signers
from tests.conftest import require

GOOD, REVOKED, UNKNOWN = (ocsp.OCSPCertStatus.GOOD, ocsp.OCSPCertStatus.REVOKED,
                          ocsp.OCSPCertStatus.UNKNOWN)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("ocspcache"))
    fleet.devices = [fleet.provision("b42") for _ in range(7)] + \
        [fleet.provision("b43") for _ in range(2)]
    yield fleet
    fleet.close()


class Listener(LoopbackServer):
    """The OCSP tier on the revocation listener as `fleetid cloud serve` runs it: the app
    plus the fast path, the event file polled per request, one bucket per client."""

    def __init__(self, tier, fleet, limits=None):
        limits = ClientRateLimits(1000, 1000) if limits is None else limits
        watcher = EventWatcher(fleet.revocation.events_path, tier.invalidate)
        self.metrics = Metrics()
        app = make_revocation_app([tier], watcher, self.metrics, client_limits=limits)
        super().__init__(app, fast=OcspFastPath(tier, limits, watcher, self.metrics))


def _responder(fleet):
    # As tiers.load builds it: the revoked-CA file behind batch revocations.
    return ocsp_responder(fleet, revoked_cas=lambda: revoked_ca_map(fleet.revoked_cas_path))


def _tier(fleet, **kwargs):
    responder = _responder(fleet)
    return OcspTier(responder, OcspCache(responder, **kwargs))


def _request(fleet, cert, nonce=None, algorithm=None, serial=None):
    ca = fleet.ca_certs["b42" if "b42" in cert.issuer.rfc4514_string() else "b43"]
    builder = ocsp.OCSPRequestBuilder()
    if serial is None:
        builder = builder.add_certificate(cert, ca, algorithm or hashes.SHA1())
    else:
        point = ca.public_key().public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint)
        import hashlib
        builder = builder.add_certificate_by_hash(
            hashlib.sha1(ca.subject.public_bytes()).digest(), hashlib.sha1(point).digest(),
            serial, hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _post(url, body, content_type=OCSP_REQUEST_TYPE):
    req = urllib.request.Request(url + "/ocsp", data=body,
                                 headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, dict(resp.headers), resp.read()


def _get(url, body):
    tail = urllib.request.quote(base64.b64encode(body).decode(), safe="")
    with urllib.request.urlopen(url + "/ocsp/" + tail, timeout=10) as resp:
        return resp.status, dict(resp.headers), resp.read()


def _facts(der):
    answer = ocsp.load_der_ocsp_response(der)
    if answer.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return (answer.response_status,)
    return (answer.response_status, answer.certificate_status, answer.serial_number,
            answer.issuer_key_hash, answer.revocation_time_utc, answer.revocation_reason,
            answer.responder_name)


def test_cached_answers_carry_the_status_a_fresh_signing_gives(fleet):
    good, revoked = fleet.devices[0], fleet.devices[1]
    fleet.revoke_certificate(revoked.identity_cert, "keyCompromise")
    tier = _tier(fleet)
    assert tier.cache.presign() >= 9  # every certificate the registry knows
    signatures = fleet.hsm.signatures
    fresh = _responder(fleet)
    with Listener(tier, fleet) as server:
        for cert, status in ((good.identity_cert, GOOD), (revoked.identity_cert, REVOKED)):
            body = _request(fleet, cert)
            code, headers, der = _post(server.url, body)
            assert code == 200 and headers["Content-Type"] == "application/ocsp-response"
            assert _facts(der)[1] == status
            assert _facts(der) == _facts(fresh.respond(body))
            assert _get(server.url, body)[2] == der  # byte-identical: the cached answer
            # RFC 5019 6.2: cacheable by HTTP until nextUpdate.
            answer = ocsp.load_der_ocsp_response(der)
            assert "max-age=" in headers["Cache-Control"] and "public" in \
                headers["Cache-Control"]
            max_age = int(headers["Cache-Control"].split("max-age=")[1].split(",")[0])
            assert 0 < max_age <= 3600
            assert headers["ETag"].startswith('"')
            assert headers["Last-Modified"] and headers["Expires"]
            assert answer.next_update_utc - answer.this_update_utc == \
                datetime.timedelta(hours=1)
        assert fleet.hsm.signatures - signatures == 2  # only `fresh` signed
        unknown = _request(fleet, good.identity_cert, serial=987654321)
        code, headers, der = _post(server.url, unknown)
        assert _facts(der)[1] == UNKNOWN and headers["Cache-Control"] == "no-store"


def test_a_revocation_committed_through_the_service_is_never_answered_good_again(fleet):
    device = fleet.devices[2]
    tier = _tier(fleet)
    tier.cache.presign()
    body = _request(fleet, device.identity_cert)
    with Listener(tier, fleet) as server:
        first = _post(server.url, body)[2]
        assert _facts(first)[1] == GOOD and _post(server.url, body)[2] == first  # cached
        fleet.revoke_certificate(device.identity_cert, "keyCompromise")
        for ask in (_post, _get, _post):
            answer = ocsp.load_der_ocsp_response(ask(server.url, body)[2])
            assert answer.certificate_status == REVOKED
            assert answer.revocation_reason == x509.ReasonFlags.key_compromise
    assert tier.cache.stats["dropped"] >= 1


def test_another_process_revocation_reaches_the_cache_through_the_epoch(fleet):
    # No listener and no event hook: the cache reads the epoch itself per request (here
    # the event file's sequence; pgstate's counter plugs in the same way).
    device = fleet.devices[3]
    responder = _responder(fleet)
    events = fleet.revocation.events_path
    cache = OcspCache(responder, epoch=lambda: read_event(events))
    body = _request(fleet, device.identity_cert)
    assert _facts(cache.answer(body).der)[1] == GOOD
    assert cache.prepare(body).query is None  # served from the cache now
    fleet.revoke_certificate(device.identity_cert, "cessationOfOperation")
    # prepare() (the event loop's part) does not read the registry: it defers the
    # reconciliation to sign(), which a worker thread runs.
    pending = cache.prepare(body)
    assert pending.der is None and pending.query is not None
    assert _facts(cache.sign(pending.query).der)[1] == REVOKED
    assert _facts(cache.answer(body).der)[1] == REVOKED


def test_a_signature_begun_before_a_revocation_never_lands_good_in_the_cache(fleet):
    # The background signer read "good" just before the revocation was committed and
    # stores its answer after the cache reconciled: the answer must not be kept.
    device = fleet.devices[4]
    responder = _responder(fleet)
    cache = OcspCache(responder)
    cache.sync()
    serial = device.identity_cert.serial_number
    issuer = device.identity_cert.issuer.rfc4514_string()
    stale = fleet.registry.certificate_status(serial, issuer=issuer)
    fleet.revoke_certificate(device.identity_cert, "keyCompromise")
    real = responder.registry
    responder.registry = _StaleOnce(real, stale)
    cache.invalidate()
    cache.sync()  # the revocation is reconciled
    try:  # the signer's path (a miss, or the background refresher)
        stale_answer = cache.sign(OcspQuery(0, "sha1", serial, None))
    finally:
        responder.registry = real
    assert _facts(stale_answer.der)[1] == GOOD  # what that one in-flight request gets
    answer = cache.answer(_request(fleet, device.identity_cert))
    assert _facts(answer.der)[1] == REVOKED


class _StaleOnce:
    def __init__(self, registry, record):
        self.registry, self.record = registry, record

    def certificate_status(self, *args, **kwargs):
        record, self.record = self.record, None
        return record or self.registry.certificate_status(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.registry, name)


def test_a_batch_revocation_re_signs_every_answer_of_that_ca(fleet):
    tier = _tier(fleet)
    tier.cache.presign()
    bodies = [_request(fleet, d.identity_cert) for d in fleet.devices[7:9]]
    with Listener(tier, fleet) as server:
        assert all(_facts(_post(server.url, b)[2])[1] == GOOD for b in bodies)
        fleet.revocation.revoke_batch("b43", "cACompromise")
        for body in bodies:
            answer = ocsp.load_der_ocsp_response(_post(server.url, body)[2])
            assert answer.certificate_status == REVOKED
            assert answer.revocation_reason == x509.ReasonFlags.ca_compromise
        # the b42 answers stay cached
        assert tier.cache.prepare(_request(fleet, fleet.devices[5].identity_cert)).query \
            is None


def test_entries_are_re_signed_ahead_of_next_update(fleet):
    responder = _responder(fleet)
    cache = OcspCache(responder, validity=datetime.timedelta(hours=1), refresh_fraction=0.5)
    body = _request(fleet, fleet.devices[5].identity_cert)
    first_der = cache.answer(body).der
    first = ocsp.load_der_ocsp_response(first_der)
    fleet.clock.advance(minutes=29)
    assert cache.refresh_due() == 0
    assert cache.answer(body).der == first_der
    fleet.clock.advance(minutes=2)  # past half the validity: re-signed, before nextUpdate
    assert cache.refresh_due() >= 1
    second = ocsp.load_der_ocsp_response(cache.answer(body).der)
    assert second.this_update_utc > first.this_update_utc
    assert second.next_update_utc > first.next_update_utc
    # A refresher that fell behind: past nextUpdate the entry is not served, a new
    # signature is.
    fleet.clock.advance(hours=2)
    assert cache.prepare(body).query is not None
    third = ocsp.load_der_ocsp_response(cache.answer(body).der)
    assert third.next_update_utc > fleet.clock()


def test_nonce_requests_are_signed_fresh_and_never_cached(fleet):
    tier = _tier(fleet)
    tier.cache.presign()
    cert = fleet.devices[5].identity_cert
    with Listener(tier, fleet) as server:
        signatures = fleet.hsm.signatures
        seen = set()
        for _ in range(3):
            nonce = os.urandom(16)
            _, headers, der = _post(server.url, _request(fleet, cert, nonce=nonce))
            answer = ocsp.load_der_ocsp_response(der)
            assert answer.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce \
                == nonce
            assert headers["Cache-Control"] == "no-store"
            seen.add(der)
        assert len(seen) == 3 and fleet.hsm.signatures - signatures == 3


def test_a_client_over_its_rate_gets_429_with_retry_after(fleet):
    tier = _tier(fleet)
    body = _request(fleet, fleet.devices[5].identity_cert)
    with Listener(tier, fleet, limits=ClientRateLimits(rate=0.5, burst=3)) as server:
        for _ in range(3):
            assert _post(server.url, body)[0] == 200
        for ask in (_post, _get):
            with pytest.raises(urllib.error.HTTPError) as refused:
                ask(server.url, body)
            assert refused.value.code == 429
            assert int(refused.value.headers["Retry-After"]) >= 1
            assert refused.value.read().startswith(b"rate_limited")


def test_the_client_table_is_bounded():
    now = [0.0]
    limits = ClientRateLimits(rate=1, burst=1, max_clients=2, clock=lambda: now[0])
    assert limits.take("10.0.0.1") == 0.0 and limits.take("10.0.0.1") > 0
    limits.take("10.0.0.2")
    limits.take("10.0.0.3")  # evicts the least recently used, 10.0.0.1
    assert len(limits) == 2
    now[0] = 2.0
    assert limits.take("10.0.0.2") == 0.0  # refilled at 1 token/s


def test_malformed_requests_are_refused_without_a_signature(fleet):
    tier = _tier(fleet)
    tier.cache.presign()  # the background thread has nothing left to sign
    signatures = fleet.hsm.signatures
    with Listener(tier, fleet) as server:
        # Not an OCSP request (POST, GET): an OCSP malformedRequest answer (RFC 6960
        # 2.3), HTTP 200 so that OCSP clients read it.
        for ask, body in ((_post, b"\x30\x03\x02\x01\x01"), (_post, b"garbage"),
                          (_get, b"\x01\x02\x03")):
            code, headers, der = ask(server.url, body)
            assert code == 200
            assert ocsp.load_der_ocsp_response(der).response_status == \
                ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        with urllib.request.urlopen(server.url + "/ocsp/%25%25notbase64", timeout=10) as r:
            assert ocsp.load_der_ocsp_response(r.read()).response_status == \
                ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        for body, content_type, status in ((b"x", "text/plain", 415),
                                           (b"\x30" * 5000, OCSP_REQUEST_TYPE, 413)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                _post(server.url, body, content_type)
            assert refused.value.code == status
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.putrequest("POST", "/ocsp", skip_accept_encoding=True)
        conn.putheader("Content-Length", "1")
        conn.putheader("Content-Length", "2")  # two lengths: aiohttp's parser refuses
        conn.endheaders()
        assert conn.getresponse().status == 400
    assert fleet.hsm.signatures == signatures


def test_other_routes_on_an_ocsp_connection_reach_the_aiohttp_app(fleet):
    tier = _tier(fleet)
    body = _request(fleet, fleet.devices[5].identity_cert)
    with Listener(tier, fleet) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        # The first answer comes from the fast path, the 404 from aiohttp's router (the
        # connection handed over), the last through the app's OCSP route.
        for method, path, expected in (("POST", "/ocsp", 200), ("GET", "/nothing", 404),
                                       ("POST", "/ocsp/", 200)):
            if method == "POST":
                conn.request(method, path, body, {"Content-Type": OCSP_REQUEST_TYPE})
            else:
                conn.request(method, path)
            response = conn.getresponse()
            data = response.read()
            assert response.status == expected, (method, path, response.status)
            if expected == 200:
                assert _facts(data)[1] == GOOD
        conn.close()
        samples = server.metrics.requests.collect()[0].samples
        endpoints = set(s.labels["endpoint"] for s in samples if s.value >= 1)
        assert {"/ocsp", "/ocsp/"} <= endpoints


def test_openssl_ocsp_reads_the_cached_answers_over_http_1_0(fleet, tmp_path):
    # openssl's client speaks HTTP/1.0 and verifies the delegated responder's signature.
    openssl = shutil.which("openssl")
    require(openssl is not None, "openssl")
    good, revoked = fleet.devices[5], fleet.devices[6]
    fleet.revoke_certificate(revoked.identity_cert, "keyCompromise")
    for name, cert in (("root", fleet.root), ("ca", fleet.ca_certs["b42"]),
                       ("good", good.identity_cert), ("revoked", revoked.identity_cert)):
        (tmp_path / (name + ".pem")).write_bytes(pem(cert))
    # openssl checks thisUpdate against the real clock (the fleet's is a test clock).
    responder = OcspResponder(fleet.registry, ocsp_signers(fleet),
                              revoked_cas=lambda: revoked_ca_map(fleet.revoked_cas_path))
    tier = OcspTier(responder)
    tier.cache.presign()
    with Listener(tier, fleet) as server:
        for name, said in (("good", "good.pem: good"), ("revoked", "revoked.pem: revoked")):
            out = subprocess.run(
                [openssl, "ocsp", "-issuer", str(tmp_path / "ca.pem"),
                 "-CAfile", str(tmp_path / "root.pem"),
                 "-verify_other", str(tmp_path / "ca.pem"),
                 "-cert", str(tmp_path / (name + ".pem")), "-no_nonce",  # RFC 5019
                 "-url", server.url + "/ocsp"],
                capture_output=True, text=True, timeout=30, check=False,
                env=dict(os.environ, OPENSSL_CONF="/dev/null"))
            text = out.stdout + out.stderr
            assert out.returncode == 0 and "Response verify OK" in text, text
            assert said in text, text
    assert tier.cache.stats["hits"] >= 2


def test_a_failed_reconciliation_answers_503_never_a_stale_good(fleet):
    # The registry is down when a revocation event arrives: every OCSP request is
    # refused (503, retry later) until the revoked set is read again, none answered from
    # the entries that may be stale.
    tier = _tier(fleet)
    tier.cache.presign()
    body = _request(fleet, fleet.devices[5].identity_cert)
    responder = tier.responder
    with Listener(tier, fleet) as server:
        assert _facts(_post(server.url, body)[2])[1] == GOOD
        real = responder.registry
        responder.registry = _Down(real)
        tier.invalidate()
        try:
            for ask in (_post, _get):
                with pytest.raises(urllib.error.HTTPError) as refused:
                    ask(server.url, body)
                assert refused.value.code == 503
        finally:
            responder.registry = real
        assert _facts(_post(server.url, body)[2])[1] == GOOD


class _Down:
    def __init__(self, registry):
        self.registry = registry

    def revoked_certificates(self, issuer):
        from fleetid.cloud.registry import RegistryError

        raise RegistryError(RegistryError.STORAGE, "database unreachable")

    def __getattr__(self, name):
        return getattr(self.registry, name)


def test_a_client_that_expects_100_continue_gets_it_then_the_answer(fleet):
    tier = _tier(fleet)
    body = _request(fleet, fleet.devices[5].identity_cert)
    with Listener(tier, fleet) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\n"
                         b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                         % (OCSP_REQUEST_TYPE.encode(), len(body)))
            assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
            answer = b""
            while not _complete(answer):
                answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 OK")
        assert _facts(answer.split(b"\r\n\r\n", 1)[1])[1] == GOOD


def _complete(answer):
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
              if line.startswith(b"content-length:")]
    return len(body) >= length[0]


def test_the_cloud_wires_a_shared_revocation_epoch_into_the_ocsp_cache(fleet, tmp_path):
    # Several processes over one database: a revocation another process commits reaches
    # this one's cache when the shared epoch moves (a counter in PostgreSQL, say), with
    # no event file in common.  Until it moves, the pre-signed answer stands.
    from fleetid.cloud.revocation import tiers

    state = str(tmp_path / "state")
    issuers = [("ca-widget-b42", fleet.ca_certs["b42"])]
    tiers.init_keys(fleet.hsm, state, "fleet-root", fleet.root, issuers)
    epoch = [0]
    built = tiers.load(fleet.hsm, fleet.registry, state, fleet.root, issuers,
                       str(tmp_path / "revoked-cas.jsonl"), revocation_epoch=lambda: epoch[0])
    cache = built.tier("ocsp").cache
    device = fleet.provision("b42")
    body = _request(fleet, device.identity_cert)
    assert _facts(cache.answer(body).der)[1] == GOOD
    fleet.registry.mark_revoked(device.identity_cert.serial_number, "keyCompromise",
                                issuer=device.identity_cert.issuer.rfc4514_string())
    assert _facts(cache.answer(body).der)[1] == GOOD  # the epoch has not moved yet
    epoch[0] += 1
    assert _facts(cache.answer(body).der)[1] == REVOKED


def test_a_get_with_the_cached_answers_etag_gets_304(fleet):
    # RFC 5019 6.2: ETag lets an HTTP cache revalidate the answer it holds.
    tier = _tier(fleet)
    tier.cache.presign()
    body = _request(fleet, fleet.devices[5].identity_cert)
    tail = urllib.request.quote(base64.b64encode(body).decode(), safe="")
    with Listener(tier, fleet) as server:
        _, headers, der = _get(server.url, body)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/ocsp/" + tail, headers={"If-None-Match": headers["ETag"]})
        response = conn.getresponse()
        assert response.status == 304 and response.read() == b""
        assert response.headers["ETag"] == headers["ETag"]
        conn.request("GET", "/ocsp/" + tail, headers={"If-None-Match": '"other"'})
        response = conn.getresponse()
        assert response.status == 200 and response.read() == der
        conn.close()


class _AnswerTier:
    """A tier whose cached answers are Reply objects and whose misses are Deferred (a
    signature off the event loop), as OcspTier's."""

    def __init__(self):
        self.deferred = False

    def answer_path(self, text):
        reply = Reply(b"\x30\x03\x0a\x01\x00", "application/ocsp-response")
        return Deferred(lambda: reply) if self.deferred else reply


def test_a_client_that_reads_no_answer_stops_being_read_and_answered():
    """Pipelined OCSP GETs from a client that never reads: once the transport's write
    buffer is over its high-water mark nothing more is answered or read, also when a
    signature (Deferred) finishes meanwhile; reading resumes when the client has read."""
    import asyncio

    from fleetid.cloud.http.ocsp_fast import OcspConnection

    request = b"GET /ocsp/MAo%3D HTTP/1.1\r\nHost: x\r\n\r\n"

    async def _signed(connection):  # bounded: the worker thread returns at once
        for _ in range(1000):
            if not connection.busy:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the deferred answer never finished")

    async def scenario():
        tier = _AnswerTier()
        fast = OcspFastPath(tier)
        connection = OcspConnection(fast, fallback=None)
        transport = RecordingTransport()
        connection.connection_made(transport)
        connection.data_received(request)
        assert len(transport.written) == 1 and transport.written[0].startswith(b"HTTP/1.1 200 ")
        connection.pause_writing()
        assert not transport.reading
        connection.data_received(request * 3)  # already in flight
        assert len(transport.written) == 1
        connection.resume_writing()
        assert transport.reading and len(transport.written) == 4
        tier.deferred = True  # a miss: signed in a worker thread
        connection.data_received(request * 2)
        assert connection.busy and not transport.reading
        connection.pause_writing()  # the answers before it fill the buffer meanwhile
        await _signed(connection)
        assert len(transport.written) == 5 and not transport.reading
        connection.resume_writing()
        await _signed(connection)
        assert len(transport.written) == 6 and transport.reading and not transport.closing
        fast.close_all()

    asyncio.run(scenario())


def test_stop_delivers_a_signature_running_in_its_worker_thread():
    """At stop an idle connection is closed at once; one whose answer is being signed
    (Deferred) gets it, with Connection: close, before it is closed (as EST's)."""
    import asyncio
    import threading

    from fleetid.cloud.http.ocsp_fast import OcspConnection

    release = threading.Event()
    tier = _AnswerTier()
    tier.deferred = True
    answer_path = tier.answer_path
    tier.answer_path = lambda text: Deferred(
        lambda: release.wait(10) and answer_path(text).work())

    async def scenario():
        fast = OcspFastPath(tier)
        idle, busy = OcspConnection(fast, fallback=None), OcspConnection(fast, fallback=None)
        idle.connection_made(RecordingTransport())
        busy.connection_made(RecordingTransport())
        busy.data_received(b"GET /ocsp/MAo%3D HTTP/1.1\r\nHost: x\r\n\r\n")
        assert busy.busy
        stopping = asyncio.ensure_future(fast.stop(10))
        await asyncio.sleep(0.05)
        assert idle.transport.closing and not busy.transport.closing and not stopping.done()
        release.set()
        await asyncio.wait_for(stopping, 5)
        [answer] = busy.transport.written
        assert answer.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close\r\n" in answer
        assert busy.transport.closing and not fast.connections

    asyncio.run(scenario())


def test_a_whole_head_over_max_head_is_refused_as_one_in_pieces():
    import asyncio

    from fleetid.cloud.http.ocsp_fast import OcspConnection

    head = b"GET /ocsp/MAo%3D HTTP/1.1\r\nHost: x\r\n" + pad_headers(3) + b"\r\n"

    async def scenario():
        written = []
        for pieces in ([head], [head[:-2], head[-2:]]):
            connection = OcspConnection(OcspFastPath(_AnswerTier()), fallback=None)
            transport = RecordingTransport()
            connection.connection_made(transport)
            for piece in pieces:
                connection.data_received(piece)
            assert transport.closing
            written.append(b"".join(transport.written).split(b"\r\n", 1))
        assert written[0][0] == written[1][0] == b"HTTP/1.1 400 Bad Request"
        assert written[0][1].split(b"\r\n\r\n")[1] == written[1][1].split(b"\r\n\r\n")[1]

    asyncio.run(scenario())


def test_a_malformed_head_is_refused_without_its_bytes_quoted_back():
    import asyncio

    from fleetid.cloud.http.ocsp_fast import OcspConnection

    marker = b"<script>echo-me-back</script>"

    async def scenario():
        for head in (b"GET /ocsp/MAo%3D HTTP/1.1\r\nHost x" + marker + b"\r\n\r\n",
                     b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                     b"Content-Length: 4\r\nX-" + marker + b": 1\r\n\r\nabcd"):
            connection = OcspConnection(OcspFastPath(_AnswerTier()), fallback=None)
            transport = RecordingTransport()
            connection.connection_made(transport)
            connection.data_received(head)
            answer = b"".join(transport.written)
            assert answer.startswith(b"HTTP/1.1 400 Bad Request") and transport.closing
            assert marker not in answer and b"Host x" not in answer, answer

    asyncio.run(scenario())


def test_a_signature_that_cannot_be_submitted_is_a_500_and_not_busy():
    import asyncio
    import concurrent.futures

    from fleetid.cloud.http.ocsp_fast import OcspConnection

    async def scenario():
        executor = concurrent.futures.ThreadPoolExecutor(1)
        executor.shutdown()  # as at interpreter exit
        asyncio.get_running_loop().set_default_executor(executor)
        tier = _AnswerTier()
        tier.deferred = True
        fast = OcspFastPath(tier)
        connection = OcspConnection(fast, fallback=None)
        connection.connection_made(RecordingTransport())
        connection.data_received(b"GET /ocsp/MAo%3D HTTP/1.1\r\nHost: x\r\n\r\n")
        [answer] = connection.transport.written
        assert answer.startswith(b"HTTP/1.1 500 ") and not connection.busy
        assert connection.transport.reading and not connection.transport.closing
        assert fast.idle(connection, connection.loop.time() + 100)
        fast.close_all()

    asyncio.run(scenario())
