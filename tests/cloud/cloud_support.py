"""A whole fleet for the EST and verifier tests (HSM, root and batch CAs, SE vendor,
registry, provisioned devices, the cloud servers on 127.0.0.1).

It lives in bench/_cloud_support.py, where the benchmarks use it without the test extras;
the tests import it from here as before.
"""

from bench._cloud_support import (  # noqa: F401 (re-exported)
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
