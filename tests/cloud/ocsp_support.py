"""OCSP responders for a test fleet and a loopback HTTP server for any aiohttp app: they
live in bench/_ocsp_support.py (bench/revocation.py uses them without the test extras);
the tests import them from here as before."""

from bench._ocsp_support import (  # noqa: F401 (re-exported)
    LoopbackServer,
    ocsp_responder,
    ocsp_signers,
)
