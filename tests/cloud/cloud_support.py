"""A whole fleet for the EST and verifier tests (HSM, root and batch CAs, SE vendor,
registry, provisioned devices, the cloud servers on 127.0.0.1).

It lives in bench/_cloud_support.py, where the benchmarks use it without the test extras;
the tests import it from here as before.
"""

from bench._cloud_support import (  # noqa: F401 (re-exported)
    NOW,
    PEM,
    Clock,
    Device,
    Fleet,
    RunningCloud,
    der,
    key_pem,
    make_csr,
    new_key,
    pem,
    rogue_certificate,
)
