"""The device agent's network on a Linux host (CPython adapter of device/agent.py's `net`).

Every request is HTTPS over the portable TLS 1.3 client with mutual authentication whose
client key stays in the SE (device/host/se_https.SeTlsClient: the ECDHE share in the SE's
transient key, the CertificateVerify signed by the SE's SIGN command); the server is
validated against the fleet root the factory line stored in the SE (the SE's VERIFY).
One request per connection, but for the enrolment, which goes over the connection its
nonce came on (kept open for it, at most KEEP_OPEN_S; a lost kept connection is a LINK
error, and the agent starts over with a fresh nonce as after any failed enrolment); every
wait bounded (connect and per-I/O timeouts).  The session tickets the servers send are
kept (in memory, per server name and key: the cloud's verifier and EST share one session
cache) and used once by the next connection with the same key: PSK-DHE resumption, so a
rotation's connections cost the SE one ECDHE each and no SIGN or VERIFY, but for the
acknowledgement's, the one full handshake that proves the new key.

    net = HostNetwork(se, "https://127.0.0.1:8443", "https://127.0.0.1:8444", [root_der])
    net.whoami(slot) / net.cacerts(slot) / net.nonce(slot) / net.enroll(slot, csr, reenroll)
    net.ack(slot)
    net.fetch_revocation(slot)              the CRL named by the slot's certificate
    net.fetch_root_revocation(slot)         the fleet root's CRL (root.crl beside it)
    net.fetch(url)                          GET of a public document (a revocation list):
                                            https:// over the TLS 1.3 client without a
                                            client certificate, http:// plain (bounded)

Failures become device.agent.NetError: TlsClientError connect / protocol -> LINK, timeout
-> TIMEOUT, handshake -> HANDSHAKE (the server refused the session: an alert, or the
connection closed before any answer, which is how a TLS 1.3 server refuses a client
certificate after the handshake; retried within the agent's bounds; at the rotation's
acknowledgement the agent tells a refused new certificate from a bad link by it),
server certificate -> REFUSED (server_reason "certificate_revoked" when the `revocation`
hook, device/board.server_revocation over the agent's CRL caches, lists it), SE -> LINK; HTTP 5xx -> SERVER, 202 -> PENDING (with Retry-After),
other 4xx -> REFUSED with the server's reason code (the first word of its text answer).
An enrolment answer that is not exactly one certificate in a certs-only PKCS#7 (wrong
content type, not base64, not PKCS#7, none, several) raises
device.certcheck.CertificateRefused(MALFORMED): the CA answered, and what it answered
cannot be the device's certificate (the agent counts it as a refused certificate).
"""

import base64
import time
import urllib.error
import urllib.parse
import urllib.request

from fleetid.common.mqttmsg import MessageError, decode_document
from fleetid.device.agent import NetError
# The answer -> NetError mapping and the nonce's checks are the board's (portable) ones:
# the same contract on both runtimes.
from fleetid.device.board_net import (  # noqa: F401 - re-exported
    CERTIFICATE_REVOKED,
    MAX_RETRY_AFTER,
    error_for,
    nonce_value,
    retry_after_seconds,
    root_crl_url_beside,
)
from fleetid.device.certcheck import REASON_MALFORMED, CertificateRefused
from fleetid.device.host.est_client import (
    CT_PKCS10,
    WELL_KNOWN,
    EstClient,
    EstClientError,
)
from fleetid.device.host.se_https import (
    SeTlsClient,
    TicketCache,
    TlsClientError,
    VerifiedSignatures,
)

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_IO_TIMEOUT = 30.0
MAX_FETCH = 4 * 1024 * 1024
# The nonce's connection is reused by the enrolment only this soon after (the agent sends
# it after building the CSR in the SE, well under a second; aiohttp closes an idle
# connection after 75 s).
KEEP_OPEN_S = 10.0

_TLS_REASONS = {
    TlsClientError.CONNECT: NetError.LINK,
    TlsClientError.TIMEOUT: NetError.TIMEOUT,
    TlsClientError.HANDSHAKE: NetError.HANDSHAKE,
    TlsClientError.PROTOCOL: NetError.LINK,
    TlsClientError.SERVER_CERTIFICATE: NetError.REFUSED,
    TlsClientError.SE: NetError.LINK,
}


class _NoTickets(TicketCache):
    # A ticket cache that keeps nothing: every connection a full handshake.
    def put(self, key, ticket):
        pass


def net_error(exc):
    """NetError for a TlsClientError (module docstring); a server certificate refused
    with certificate_revoked (alert 44: a CRL cache lists it) is REFUSED with
    server_reason "certificate_revoked", as device/board_net.net_error maps it."""
    if exc.reason == TlsClientError.SERVER_CERTIFICATE and exc.alert == 44:
        return NetError(NetError.REFUSED, CERTIFICATE_REVOKED + ": " + exc.detail, None,
                        None, CERTIFICATE_REVOKED)
    return NetError(_TLS_REASONS.get(exc.reason, NetError.LINK), exc.detail)


def parse_url(url):
    """("host", port) of an https:// URL.  Raises ValueError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or not parts.port:
        raise ValueError("expected https://HOST:PORT, got %r" % url)
    return parts.hostname, parts.port


class HostNetwork:
    """device.agent's `net` over HTTPS (module docstring).

    Params: se: SeSession.  verifier_url, est_url: https://HOST:PORT.  trust_roots_der:
        DER roots for the servers (the SE's fleet root).  label: EST label (None: the
        default).  connect_timeout / io_timeout: seconds per connection / per I/O.
        resumption: keep the servers' session tickets (False: every request a full
        handshake; for measurements).  verify_in_se: as se_https.SeTlsClient.
        tickets: a TicketCache to keep across HostNetworks (a long-running agent opens
        one per cycle; default: this one's own).  revocation: the servers' chains'
        `revocation(path)` hook, given to every connection (device/board.server_revocation
        over the agent's CRL caches) or None.  root_crl_url: the fleet root's CRL (None:
        root.crl beside the issuing CA's CRL URL).
    Attributes: requests (count), last_status, tickets (TicketCache), handshakes /
        resumed (counts of TLS handshakes, and of those resumed with a ticket),
        se_operations (the SE commands the TLS handshakes issued).
    """

    def __init__(self, se, verifier_url, est_url, trust_roots_der, label=None,
                 connect_timeout=DEFAULT_CONNECT_TIMEOUT, io_timeout=DEFAULT_IO_TIMEOUT,
                 crl_url=None, resumption=True, verify_in_se=True, tickets=None,
                 revocation=None, root_crl_url=None):
        self.se = se
        self.verifier = parse_url(verifier_url)
        self.est = parse_url(est_url)
        self.trust_roots_der = list(trust_roots_der)
        self.label = label
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.crl_url = crl_url
        self.root_crl_url = root_crl_url
        self.revocation = revocation
        self.requests = 0
        self.last_status = None
        if not resumption:
            tickets = _NoTickets()
        self.tickets = tickets if tickets is not None else TicketCache()
        self.verify_in_se = verify_in_se
        # Server chains verified once per HostNetwork; only when resuming (the
        # no-resumption mode measures the plain full handshake).
        self.verified = VerifiedSignatures() if resumption else None
        self._chains = {}  # slot -> DER certificate read from the SE (see _client)
        self._kept = None  # (slot, server, KeptConnection, monotonic time) or None
        self.handshakes = 0
        self.resumed = 0
        self.se_operations = 0

    def _client(self, slot):
        # The slot's certificate is read from the SE once and kept while the slot holds
        # the same key: SeTlsClient checks the certificate against the slot's public key
        # (GET PUBLIC KEY, a few bytes) on every connection, and the agent gives every
        # new key its own certificate (a rotation generates a new key), so a mismatch is
        # the only way a kept certificate goes stale: then it is read again.  Saves
        # GET CERT (~1.5 KB over the bus) per request.
        kwargs = dict(connect_timeout=self.connect_timeout, io_timeout=self.io_timeout,
                      tickets=self.tickets, verify_in_se=self.verify_in_se,
                      verified=self.verified, revocation=self.revocation)
        if slot is None:
            return SeTlsClient(self.se, None, [], self.trust_roots_der, **kwargs)
        kept = self._chains.get(slot)
        if kept is not None:
            try:
                return SeTlsClient(self.se, slot, [kept], self.trust_roots_der, **kwargs)
            except ValueError:  # the slot has another key now
                del self._chains[slot]
        chain = [bytes(self.se.get_cert(slot))]
        client = SeTlsClient(self.se, slot, chain, self.trust_roots_der, **kwargs)
        self._chains[slot] = chain[0]
        return client

    def _take_kept(self, slot, server):
        # The connection the last request left open, if it is for this slot and server and
        # recent; any other is closed.
        kept, self._kept = self._kept, None
        if kept is None:
            return None
        if kept[:2] == (slot, server) and time.monotonic() - kept[3] < KEEP_OPEN_S:
            return kept[2]
        kept[2].close()
        return None

    def close(self):
        """Close the connection kept open for a next request, if any."""
        kept, self._kept = self._kept, None
        if kept is not None:
            kept[2].close()

    def _request(self, slot, server, method, path, body=None, headers=None, keep_open=False,
                 **kwargs):
        client = None
        kept = self._take_kept(slot, server)
        counts = (0, 0, 0)
        try:
            # A kept connection goes on with the client that opened it (its certificate
            # was checked against the slot then, and the slot has not changed since).
            client = kept.conn._client if kept is not None else self._client(slot)
            counts = (client.handshakes, client.resumed, client.se_operations)
            self.requests += 1
            response = client.request(server[0], server[1], method, path, body, headers,
                                      keep_open=keep_open, connection=kept, **kwargs)
            if response.connection is not None:
                self._kept = (slot, server, response.connection, time.monotonic())
        except TlsClientError as exc:
            raise net_error(exc) from None
        finally:
            if client is not None:
                self.handshakes += client.handshakes - counts[0]
                self.resumed += client.resumed - counts[1]
                self.se_operations += client.se_operations - counts[2]
        self.last_status = response.status
        return response

    def _est_path(self, op):
        return "%s/%s%s" % (WELL_KNOWN, self.label + "/" if self.label else "", op)

    def whoami(self, slot):
        """GET /v1/whoami.  Returns: the identity (dict)."""
        response = self._request(slot, self.verifier, "GET", "/v1/whoami")
        if response.status != 200:
            raise error_for(response)
        try:
            identity = decode_document(response.body)
        except MessageError as exc:
            raise NetError(NetError.SERVER, "whoami answer: %s" % exc) from None
        if not isinstance(identity, dict):
            raise NetError(NetError.SERVER, "whoami answer is not a JSON object")
        return identity

    def cacerts(self, slot):
        """GET <label>/cacerts (RFC 7030 4.1): the CA certificates, unchecked (the agent
        keeps those that chain to the fleet root in its SE).

        Returns: list of DER certificates.  Raises NetError (SERVER when the answer is
        not a certs-only PKCS#7)."""
        from cryptography.hazmat.primitives import serialization

        response = self._request(slot, self.est, "GET", self._est_path("cacerts"))
        if response.status != 200:
            raise error_for(response)
        try:
            certs = EstClient._certs(response)
        except EstClientError as exc:
            raise NetError(NetError.SERVER, "cacerts: " + exc.detail) from None
        return [cert.public_bytes(serialization.Encoding.DER) for cert in certs]

    def nonce(self, slot):
        """GET <label>/nonce.  Returns: the CA's single-use nonce (bytes)."""
        # Kept open for the enrolment that follows (module docstring).
        response = self._request(slot, self.est, "GET", self._est_path("nonce"),
                                 keep_open=True)
        if response.status != 200:
            raise error_for(response)
        return nonce_value(response.body)

    def enroll(self, slot, csr_der, reenroll):
        """POST simpleenroll / simplereenroll (RFC 7030 4.2.1 / 4.2.2).

        Returns: the issued certificate (DER; the agent checks it).  202 raises
        NetError(PENDING) with the server's Retry-After: the agent sends the same request
        again after it.  Raises CertificateRefused(MALFORMED) for a 200 answer that is not
        exactly one certificate in a certs-only PKCS#7."""
        from cryptography.hazmat.primitives import serialization

        op = "simplereenroll" if reenroll else "simpleenroll"
        response = self._request(slot, self.est, "POST", self._est_path(op),
                                 base64.encodebytes(csr_der),
                                 {"Content-Type": CT_PKCS10,
                                  "Content-Transfer-Encoding": "base64"})
        if response.status != 200:
            raise error_for(response)
        try:
            certs = EstClient._certs(response)
        except EstClientError as exc:
            raise CertificateRefused(REASON_MALFORMED, exc.detail) from None
        if len(certs) != 1:
            raise CertificateRefused(REASON_MALFORMED, "%d certificates" % len(certs))
        return certs[0].public_bytes(serialization.Encoding.DER)

    def ack(self, slot):
        """POST /v1/rotation/ack with the new credential."""
        response = self._request(slot, self.verifier, "POST", "/v1/rotation/ack")
        if response.status != 200:
            raise error_for(response)

    def _crl_url(self, slot):
        # crl_url, else the first http(s) distribution point of the slot's certificate.
        url = self.crl_url
        if url is None:
            from cryptography import x509

            cert = x509.load_der_x509_certificate(bytes(self.se.get_cert(slot)))
            try:
                points = cert.extensions.get_extension_for_class(
                    x509.CRLDistributionPoints).value
            except x509.ExtensionNotFound:
                points = ()
            for point in points:
                for name in point.full_name or ():
                    if isinstance(name, x509.UniformResourceIdentifier) and \
                            name.value.startswith(("http://", "https://")):
                        url = name.value
                        break
                if url:
                    break
        if not url:
            raise NetError(NetError.REFUSED, "no CRL distribution point", None, None,
                           "no_crl_url")
        return url

    def forget_sessions(self):
        """Drop the session tickets (device/agent.py calls it after a CRL changed)."""
        self.tickets.clear()

    def fetch_revocation(self, slot):
        """GET the CRL for the certificate in `slot`: the configured crl_url, else the
        first HTTP URL of the certificate's CRL distribution points (RFC 5280 4.2.1.13).

        Returns: bytes.  Raises NetError (REFUSED when there is no URL to fetch)."""
        return self.fetch(self._crl_url(slot))

    def fetch_root_revocation(self, slot):
        """GET the fleet root's CRL: root_crl_url, else root.crl beside the issuing CA's
        CRL URL (device/board_net.root_crl_url_beside).  Returns: bytes.  Raises
        NetError."""
        return self.fetch(self.root_crl_url or root_crl_url_beside(self._crl_url(slot)))

    def fetch(self, url, timeout=None):
        """GET of a public document (a CRL, a compact set), bounded in time and size: an
        https:// URL over the TLS 1.3 client (the server validated to the fleet root by
        the SE; no client certificate), http:// plain.

        Returns: bytes.  Raises NetError."""
        if urllib.parse.urlsplit(url).scheme != "https":
            return fetch_url(url, timeout or self.io_timeout)
        host, port, path = _https_target(url)
        response = self._request(None, (host, port), "GET", path, max_response=MAX_FETCH)
        if response.status != 200:
            raise error_for(response)
        return response.body


def _https_target(url):
    # (host, port, path?query) of an https:// URL; NetError(REFUSED) without a host.
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise NetError(NetError.REFUSED, "GET %s: no host" % url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        port = parts.port or 443
    except ValueError:
        raise NetError(NetError.REFUSED, "GET %s: bad port" % url) from None
    return parts.hostname, port, path


def fetch_url(url, timeout=DEFAULT_IO_TIMEOUT, se=None, trust_roots_der=None):
    """GET of a public document (a CRL), bounded in time and size.  With `se` and
    `trust_roots_der`, an https:// URL goes over the device's TLS 1.3 client (the server
    verified to those roots by the SE, no client certificate); otherwise urllib (http://,
    or https:// against the host's trust store).

    Returns: bytes.  Raises NetError."""
    if se is not None and trust_roots_der and urllib.parse.urlsplit(url).scheme == "https":
        host, port, path = _https_target(url)
        client = SeTlsClient(se, None, [], trust_roots_der,
                             connect_timeout=min(timeout, DEFAULT_CONNECT_TIMEOUT),
                             io_timeout=timeout)
        try:
            response = client.request(host, port, "GET", path, max_response=MAX_FETCH)
        except TlsClientError as exc:
            raise net_error(exc) from None
        if response.status != 200:
            raise error_for(response)
        return response.body
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            data = answer.read(MAX_FETCH + 1)
    except urllib.error.HTTPError as exc:
        reason = NetError.SERVER if exc.code >= 500 else NetError.REFUSED
        raise NetError(reason, "GET %s" % url, exc.code) from None
    except TimeoutError:
        raise NetError(NetError.TIMEOUT, "GET %s" % url) from None
    except (urllib.error.URLError, OSError) as exc:
        raise NetError(NetError.LINK, "GET %s: %s" % (url, exc)) from None
    if len(data) > MAX_FETCH:
        raise NetError(NetError.SERVER, "GET %s: answer too large" % url)
    return data


class SystemClock:
    """The agent's clock on a host: now() in whole seconds, sleep(seconds) bounded by the
    caller; `stop` (a threading.Event) interrupts a sleep (clean SIGTERM)."""

    def __init__(self, stop=None):
        import threading

        self.stop = stop if stop is not None else threading.Event()

    def now(self):
        import time

        return int(time.time())

    def sleep(self, seconds):
        if self.stop.wait(max(0.0, seconds)):
            raise InterruptedError("stopping")
