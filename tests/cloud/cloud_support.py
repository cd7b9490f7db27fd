"""A whole fleet for the EST and verifier tests (HSM, root and batch CAs, SE vendor,
registry, provisioned devices, the cloud servers on 127.0.0.1).

It lives in bench/_cloud_support.py, where the benchmarks use it without the test extras;
the tests import it from here as before.
"""

from bench._cloud_support import (  # noqa: F401 (re-exported)
    read_http_answers as read_answers,
    Clock,
    Device,
    Fleet,
    LoopThread,
    NOW,
    PEM,
    RunningCloud,
    der,
    key_pem,
    pem,
    revocation_config,
    rogue_certificate,
    make_csr,
    new_key,
)


def check_flow_control(fast, connection, request):
    """A fast path's connection, given a request it answers 401 at once (no TLS here),
    stops reading and answering while its transport's write buffer is over its
    high-water mark (pause_writing), answers what came meanwhile on resume_writing, and
    takes a request split across reads.  Runs inside the event loop."""
    transport = RecordingTransport()
    connection.connection_made(transport)
    connection.data_received(request)
    assert len(transport.written) == 1 and transport.written[0].startswith(b"HTTP/1.1 401 ")
    connection.pause_writing()  # the write buffer is over its high-water mark
    assert not transport.reading
    connection.data_received(request * 3)  # already in flight
    assert len(transport.written) == 1
    connection.resume_writing()  # the client took the answers
    assert transport.reading and len(transport.written) == 4
    connection.data_received(request + request[:20])  # one and a piece
    assert len(transport.written) == 5
    connection.data_received(request[20:])
    assert len(transport.written) == 6 and not transport.closing
    fast.close_all()


class RecordingTransport:
    """What the fast paths' protocols (verifier_fast, ocsp_fast) use of a transport,
    recording what they are told."""

    def __init__(self):
        self.written = []
        self.reading = True
        self.closing = False

    def get_extra_info(self, name, default=None):
        return default  # no TLS (the verifier answers 401 no_client_certificate), no peer

    def write(self, data):
        self.written.append(data)

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def is_closing(self):
        return self.closing

    def close(self):
        self.closing = True

    def set_protocol(self, protocol):  # a hand-over to aiohttp
        self.protocol = protocol


class HandedOverApp:
    """aiohttp's protocol, as far as a fast path's hand-over goes: records what it is
    given."""

    def __init__(self):
        self.data = b""

    def connection_made(self, transport):
        pass

    def data_received(self, data):
        self.data += data


def pad_headers(count):
    """`count` header lines of about 4 KB each (each under aiohttp's 8190-byte bound)."""
    return b"".join(b"X-Pad-%d: %s\r\n" % (n, b"a" * 4000) for n in range(count))
