"""The SE-keyed TLS 1.3 client (fleetid.common.tls13) over a CPython TCP socket.

    config = se_client_config(se, slot, anchors, server_name=host)
    stream = connect(host, port, config)          # handshake done, bounded waits
    stream.send(b"..."); stream.recv(); stream.close()

`se_client_config` binds the SE: the ECDHE share in its transient key object, the
CertificateVerify signed with the key in `slot`, the server chain verified with the SE's
VERIFY, the wall clock of this host.  The connection itself is the portable
fleetid.device.tls13_keys.Tls13Stream, which a MicroPython board drives over its own
socket the same way.  Not yet used by the EST client, the verifier calls or MQTT (those
still go through fleetid.device.host.se_tls, TLS 1.2 with tlslite-ng).
"""

import socket
import time

from fleetid.common.clock import SystemClock
from fleetid.common.errors import TlsError
from fleetid.common.host.tls13_host import CryptographyTls13Primitives
from fleetid.common.tls13 import Tls13Client, Tls13Config
from fleetid.device.tls13_keys import SeEphemeral, Tls13Stream, se_signer, se_verifier

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_IO_TIMEOUT = 30.0


def se_client_config(se, slot, anchors_der, server_name, client_chain=None, revocation=None,
                     ticket=None, prims=None, now=None, **kwargs):
    """A Tls13Config with every private-key operation in the SE behind `se`.

    Params: se: selected SeSession.  slot: the client key's slot (identity or
        operational).  anchors_der: DER trust anchors (the fleet root from the SE).
        server_name: host name or IP to check.  client_chain: DER certificates (default:
        the certificate stored beside the key, GET CERT `slot`).  revocation, ticket,
        record_size_limit, ...: as Tls13Config.  now: epoch-seconds clock (default
        time.time).
    Returns: (Tls13Config, SeEphemeral) -- the latter counts the SE's ECDHE operations.
    """
    if client_chain is None:
        client_chain = [bytes(se.get_cert(slot))]
    ephemeral = SeEphemeral(se)
    config = Tls13Config(
        prims or CryptographyTls13Primitives(), ephemeral, anchors_der, se_verifier(se),
        now or (lambda: int(time.time())), server_name=server_name,
        signer=se_signer(se, slot), client_chain=client_chain, revocation=revocation,
        ticket=ticket, **kwargs)
    return config, ephemeral


def connect(host, port, config, connect_timeout=DEFAULT_CONNECT_TIMEOUT,
            io_timeout=DEFAULT_IO_TIMEOUT):
    """Open TCP to host:port and run the handshake.

    Returns: a connected Tls13Stream (its .info says what was negotiated).
    Raises: TlsError("connect") when TCP fails, TlsError for every handshake refusal
        (TlsCertificateError for the server chain, TlsAlertReceived for the peer's alerts);
        the socket is closed on any error.
    """
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as exc:
        raise TlsError("connect", None, type(exc).__name__) from None
    sock.settimeout(io_timeout)
    stream = Tls13Stream(sock, Tls13Client(config), SystemClock(),
                         deadline_ms=int(io_timeout * 1000))
    stream.handshake()
    return stream
