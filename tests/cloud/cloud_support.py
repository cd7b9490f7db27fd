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
