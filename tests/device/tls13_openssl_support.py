"""The bench's real `openssl s_server` helpers (bench/_tls13_support.py), for the tests."""

from bench._tls13_support import (  # noqa: F401 (re-exported)
    OPENSSL,
    CountingChip,
    LineServerCerts,
    SServer,
    counting_session,
    free_port,
)
