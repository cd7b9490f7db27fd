"""TLS of the cloud's listeners: the server SSLContext (TLS 1.3, and TLS 1.2 with
ECDHE-ECDSA-AES-GCM for clients that have no TLS 1.3) and the peer certificate of a
request."""

import os
import ssl

from fleetid.cloud.config import ConfigError

# TLS 1.2 suites, ECDHE-ECDSA with AES-GCM (RFC 5289), for clients whose TLS stack has no
# TLS 1.3 client authentication.  fleetid's own device agent no longer needs them: it
# speaks TLS 1.3 only (common/tls13.py, on CPython and MicroPython).  Kept because the
# verifier and EST server are also reached by integrators' firmware on stacks that are
# TLS 1.2-only with an SE-held key (e.g. mbedTLS 2.x with an ATECC/SE05x key
# callback), and tests/cloud/test_verifier.py pins that they work; dropping TLS 1.2 is
# a fleet policy decision (an option), not something the agent requires.
TLS12_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"

SESSION_TICKETS = 1

# How resumed sessions are found (RFC 8446 4.6.1 leaves it to the server):
TICKETS_STATEFUL = "stateful"  # a session id into this process's session cache (default)
TICKETS_STATELESS = "stateless"  # the session sealed into the ticket (OpenSSL's default)
TICKET_MODES = (TICKETS_STATEFUL, TICKETS_STATELESS)


def server_ssl_context(cert_file, key_file, client_ca_pem, require_client_cert=True,
                       tickets=TICKETS_STATEFUL):
    """A server SSLContext: TLS 1.2 (ECDHE-ECDSA-AES-GCM only) and TLS 1.3, client
    certificates verified against `client_ca_pem` (bytes: the fleet's roots and
    intermediates).  require_client_cert False = CERT_OPTIONAL (EST: cacerts needs no
    client certificate; enrolment answers 401 without one).  tickets: TICKETS_STATEFUL
    (one process: cheaper, see below) or TICKETS_STATELESS (worker processes forked
    after this context was made: OpenSSL draws the ticket key when the context is
    created, so every fork seals and opens tickets with the same key and a device
    resumes whichever worker the kernel hands its connection to; a stateful session
    lives in one worker's cache only).
    Raises fleetid.cloud.config.ConfigError when the certificate or key cannot be used,
    ValueError for an unknown `tickets`."""
    if tickets not in TICKET_MODES:
        raise ValueError("tickets must be one of %s" % (TICKET_MODES,))
    for option, path in (("tls_cert", cert_file), ("tls_key", key_file)):
        if not os.path.isfile(path):
            raise ConfigError("%s %s does not exist" % (option, path))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError("tls_cert %s / tls_key %s: not a certificate and its private key "
                          "(%s)" % (cert_file, key_file,
                                    getattr(exc, "reason", None) or exc.strerror or exc)) \
            from None
    context.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    # The fleet's issuing CAs are configured trust (client_ca_pem), and every accepted
    # certificate is validated again to a fleet root by FleetVerifier
    # (cryptography.x509.verification, cached per certificate) before any handler runs.
    # So OpenSSL may stop at the trusted issuing CA (RFC 5280 6.1: any trust anchor)
    # instead of re-checking the CA's own signature by the root on every handshake.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    # TLS 1.3 (RFC 8446 4.6.1): one ticket per connection is what a reconnecting device
    # uses (OpenSSL's default is 2: the second is sealed and sent for nothing).
    context.num_tickets = SESSION_TICKETS
    # Stateful resumption: with OP_NO_TICKET, OpenSSL's TLS 1.3 tickets are session ids
    # into this context's in-memory session cache (RFC 8446 4.6.1 lets the ticket be a
    # database lookup key) instead of a sealed copy of the session.  Why: a stateless
    # ticket is built by encoding the session, client certificate included, and decoding
    # it again (OpenSSL 3.0 construct_stateless_ticket), and a resumption decrypts and
    # decodes it once more; profiled, that was ~10% of a full handshake's server CPU.
    # Security: the session never leaves the server (no ticket-encryption key to leak or
    # rotate; Python's ssl never rotates its random ticket key), and OpenSSL removes a
    # TLS 1.3 session from the cache when it is resumed (single use: a replayed ticket
    # falls back to a full handshake).  Resumption is per process either way (Python's
    # ticket key is random per context), and the verifier re-runs its checks on every
    # request of a resumed connection as well (the registry is read each time).  Cost:
    # OpenSSL's default cache bound (20480 sessions, oldest evicted: a device beyond it
    # makes a full handshake) and the session timeout.
    if tickets == TICKETS_STATEFUL:
        context.options |= ssl.OP_NO_TICKET
    return context


def peer_certificate(request):
    """DER of the TLS client certificate, or None (plain HTTP or none presented)."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if ssl_object is None:
        return None
    return ssl_object.getpeercert(binary_form=True)
