"""MQTT for a CPython device: paho-mqtt over TLS whose client key stays in the SE.

paho-mqtt has no public hook for a custom socket (eclipse-paho/paho.mqtt.python issue 873;
PR 945 unmerged) and Python's `ssl` cannot sign with a key it does not hold.  So the TLS
session is the project's portable TLS 1.3 client (device/host/se_https.py over
device/host/tls13_socket.TlsSocket: ECDHE in the SE's transient key, the CertificateVerify
signed by the SE's SIGN command, the broker's chain verified to the fleet root by the SE's
VERIFY) and paho is handed plain MQTT over a loopback TCP connection that `SeTlsTunnel`
forwards into that session, stunnel-style:

    paho --MQTT--> 127.0.0.1:<ephemeral> ==SeTlsTunnel==> TLS 1.3 (SE-keyed) --> broker:8883

Why this and not a paho subclass: it uses only paho's public API (`connect(host, port)`,
`socket()`), so a paho upgrade cannot break it silently; a subclass overriding
`_create_socket` (private, changed between 1.x and 2.x) could.  The price is one loopback
hop and two pump threads.  The tunnel listens on 127.0.0.1 only, accepts exactly one
connection and forwards nothing until the caller has confirmed that the accepted peer is
paho's own socket (`authorise(paho.socket().getsockname())`): another local process that
races to the port gets a closed connection, never the device's TLS identity.  The TLS
handshake runs before the port opens, and the tunnel then waits (bounded) for the broker's
session ticket, which a TLS 1.3 server sends only once it has accepted the client's
certificate: a refused certificate (e.g. revoked: the broker's CRL) is an exception from
connect(), not a silent drop.  The ticket is not kept: a resumed session would skip the
broker's certificate and CRL checks (OpenSSL does not re-verify a resumed client), so a
revoked device could ride a ticket; MQTT reconnections are rare, each is a full handshake.

Pinned: paho-mqtt 2.1.0 (CallbackAPIVersion.VERSION2, the public client API only;
constraints.txt); tests/device/test_mqtt_paho.py and tests/cloud/test_mqtt_*.py run it
against mosquitto and the fleet's broker.
"""

import logging
import queue
import socket
import threading
import time

import paho.mqtt.client as paho_client
from paho.mqtt.enums import CallbackAPIVersion

from fleetid.common.errors import FleetidError
from fleetid.device.host.se_https import SeTlsClient, TlsClientError, client_error
from fleetid.device.mqtt import TransportError

DEFAULT_TIMEOUT = 10.0
SETTLE_TIMEOUT = 2.0  # bound on the wait for the broker's ticket (its certificate verdict)
_CHUNK = 16384
_log = logging.getLogger("fleetid.device.mqtt")


class SeTlsTunnel:
    """One TLS session to the broker, signed by the SE, exposed as a loopback TCP port.

    Params: tls_client: SeTlsClient (SE key, certificate chain, trust roots, timeouts).
        host, port: the broker.
    """

    def __init__(self, tls_client, host, port):
        self.tls_client = tls_client
        self.host = host
        self.port = port
        self.local_port = None
        self._listener = None
        self._tls = None
        self._local = None
        self._local_peer = None
        self._authorised = threading.Event()
        self._closed = threading.Event()
        self._threads = []
        self.bytes_up = 0
        self.bytes_down = 0

    def open(self):
        """Handshake with the broker (the SE signs), then listen on loopback.

        Returns: the local port paho must connect to.
        Raises: TlsClientError (connect, timeout, handshake (also: the broker refused our
            certificate), server_certificate, se).
        """
        client = self.tls_client
        tls = client.open(self.host, self.port)  # TlsClientError
        try:
            tls.settle(min(SETTLE_TIMEOUT, client.io_timeout))
        except FleetidError as exc:
            raise client_error(exc, False) from None
        tls.settimeout(None)  # the pumps block; close() unblocks them
        self._tls = tls
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self._listener = listener
        self.local_port = listener.getsockname()[1]
        accept = threading.Thread(target=self._accept, name="se-tls-accept", daemon=True)
        accept.start()
        self._threads.append(accept)
        return self.local_port

    def authorise(self, paho_sockname):
        """Start forwarding once the accepted connection is paho's socket (its local
        address `paho_sockname`).  Returns: True if it is; otherwise the tunnel closes."""
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while self._local is None and not self._closed.is_set():
            if time.monotonic() > deadline:
                self.close()
                return False
            time.sleep(0.005)
        if self._local is None or self._local_peer != tuple(paho_sockname[:2]):
            self.close()
            return False
        self._authorised.set()
        return True

    def dangerous_authorise_first_peer(self):
        """Forward for whichever local process connects first, unchecked.  Only for a peer
        whose socket this process cannot see (the MicroPython unix-port tests run umqtt in
        a child process); any local process that wins the race rides the device's TLS
        identity.  Never use it on a shared host."""
        self._authorised.set()

    def _accept(self):
        try:
            local, peer = self._listener.accept()
        except OSError:
            return
        finally:
            self._listener.close()  # exactly one connection
        self._local_peer = tuple(peer[:2])
        self._local = local
        for target, name in ((self._up, "se-tls-up"), (self._down, "se-tls-down")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _up(self):
        # paho -> broker.  Nothing moves before authorise().
        while not self._authorised.wait(0.1):
            if self._closed.is_set():
                return
        try:
            while True:
                data = self._local.recv(_CHUNK)
                if not data:
                    break
                self._tls.sendall(data)
                self.bytes_up += len(data)
        except (OSError, FleetidError):
            pass
        self.close()

    def _down(self):
        # broker -> paho.
        while not self._authorised.wait(0.1):
            if self._closed.is_set():
                return
        try:
            while True:
                data = self._tls.recv(_CHUNK)
                if not data:
                    break
                self._local.sendall(data)
                self.bytes_down += len(data)
        except (OSError, FleetidError):
            pass
        self.close()

    def close(self):
        """Close both sides (idempotent); the pumps end."""
        if self._closed.is_set():
            return
        self._closed.set()
        for sock in (self._listener, self._local):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        tls = self._tls
        if tls is not None:
            tls.close()  # close_notify, then shutdown (wakes the pumps) and close

    @property
    def closed(self):
        return self._closed.is_set()


class PahoSeTransport:
    """The device MQTT transport (device/mqtt.py's interface) on CPython: paho-mqtt through
    an SeTlsTunnel.

    Params: se: SeSession (selected).  slot: the key slot of the client certificate.
        cert_chain_der: [leaf, intermediates...].  trust_roots_der: roots the broker's
        certificate must chain to.  host, port: the broker.  client_id: MQTT client id
        (default the certificate CN).  timeout: bound on every wait.  revocation: the
        broker chain's `revocation(path)` hook (device/board.server_revocation over the
        agent's CRL caches) or None.
    """

    def __init__(self, se, slot, cert_chain_der, trust_roots_der, host, port, client_id=None,
                 timeout=DEFAULT_TIMEOUT, revocation=None):
        self.tls_client = SeTlsClient(se, slot, cert_chain_der, trust_roots_der,
                                      connect_timeout=timeout, io_timeout=timeout,
                                      revocation=revocation)
        if client_id is None:
            from cryptography.x509.oid import NameOID

            names = self.tls_client.certificate.subject.get_attributes_for_oid(
                NameOID.COMMON_NAME)
            client_id = names[0].value
        self.client_id = client_id
        self.host = host
        self.port = port
        self.timeout = timeout
        self.tunnel = None
        self.client = None
        self._inbox = queue.Queue()
        self._connack = threading.Event()
        self._connack_rc = None
        self._subacks = {}
        self._suback_cond = threading.Condition()
        self.callback_failures = 0  # exceptions raised in paho callbacks (survived)
        self._failure_kinds = set()

    def connect(self):
        """TLS (SE-signed) to the broker, then MQTT CONNECT (clean session).
        Raises: TransportError("connect"/"timeout"/"refused")."""
        self.tunnel = SeTlsTunnel(self.tls_client, self.host, self.port)
        try:
            local_port = self.tunnel.open()
        except TlsClientError as exc:
            raise TransportError(TransportError.CONNECT, str(exc)) from None
        # No reconnection inside paho: the tunnel it talks to carries one TLS session and
        # accepts one connection, so a lost broker leaves paho retrying a closed loopback
        # port for as long as the thread lives.  The caller reconnects (a new tunnel, a new
        # SE-signed handshake) with its own bounded backoff when `connected` turns false.
        client = paho_client.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                    protocol=paho_client.MQTTv311, clean_session=True,
                                    reconnect_on_failure=False)
        client.on_connect = self._guard(self._on_connect)
        client.on_message = self._guard(self._on_message)
        client.on_subscribe = self._guard(self._on_subscribe)
        self.client = client
        try:
            client.connect("127.0.0.1", local_port, keepalive=60)
        except OSError as exc:
            self.tunnel.close()
            raise TransportError(TransportError.CONNECT, str(exc)) from None
        if not self.tunnel.authorise(client.socket().getsockname()):
            raise TransportError(TransportError.CONNECT, "tunnel peer is not paho")
        client.loop_start()
        if not self._connack.wait(self.timeout) or self.tunnel.closed and not self._connack.is_set():
            self.close()
            raise TransportError(TransportError.TIMEOUT, "CONNACK")
        if self._connack_rc:
            self.close()
            raise TransportError(TransportError.REFUSED, "CONNACK %s" % self._connack_rc)

    def _guard(self, callback):
        """paho re-raises a callback's exception out of its network loop, which ends the
        thread: the session would go silent.  Guarded: logged once per kind, counted."""

        def guarded(*args):
            try:
                return callback(*args)
            except Exception as exc:
                self.callback_failures += 1
                kind = type(exc).__name__
                if kind not in self._failure_kinds:
                    self._failure_kinds.add(kind)
                    _log.warning("paho %s failed (%s); further ones only counted",
                                 callback.__name__, kind)
            return None

        return guarded

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self._connack_rc = 0 if not reason_code.is_failure else reason_code.value
        self._connack.set()

    def _on_message(self, client, userdata, message):
        self._inbox.put((message.topic, bytes(message.payload)))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._suback_cond:
            self._subacks[mid] = [rc.value for rc in reason_codes]
            self._suback_cond.notify_all()

    def subscribe(self, topic, qos=1):
        """Subscribe and wait for the SUBACK.  Returns: the granted QoS (0x80 = refused
        by the broker's ACL).  Raises: TransportError(TIMEOUT)."""
        _rc, mid = self.client.subscribe(topic, qos)
        deadline = time.monotonic() + self.timeout
        with self._suback_cond:
            while mid not in self._subacks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(TransportError.TIMEOUT, "SUBACK")
                self._suback_cond.wait(left)
            return self._subacks.pop(mid)[0]

    def publish(self, topic, payload, retain=False, qos=1):
        """Publish and wait for the PUBACK (QoS 1).  Raises: TransportError(TIMEOUT)."""
        info = self.client.publish(topic, bytes(payload), qos=qos, retain=retain)
        try:
            info.wait_for_publish(self.timeout)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(TransportError.CONNECT, str(exc)) from None
        if qos and not info.is_published():
            raise TransportError(TransportError.TIMEOUT, "PUBACK")

    def poll(self, timeout):
        """Messages received so far, waiting up to `timeout` s for the first one.
        Returns: list of (topic str, payload bytes)."""
        out = []
        try:
            out.append(self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait())
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self._inbox.get_nowait())
            except queue.Empty:
                return out

    @property
    def connected(self):
        return self.client is not None and self.client.is_connected() and not self.tunnel.closed

    def close(self):
        """Disconnect (idempotent)."""
        if self.client is not None:
            try:
                self.client.disconnect()
            except Exception:  # already gone
                pass
            self.client.loop_stop()
        if self.tunnel is not None:
            self.tunnel.close()
