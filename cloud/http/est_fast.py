"""EST's fast path: a device's rotation requests answered by a lean asyncio protocol around
aiohttp's own HTTP parser; every other request handed, with its connection, to the EST
aiohttp application (est_app.py).

    fast = EstFastPath(est_service, metrics, keepalive_timeout=..)
    site = EstFastSite(runner, host, port, fast, ssl_context=context)  # not TCPSite
    await site.start()

Why: a rotation opens a new (resumed) TLS connection for its nonce and another for its
re-enrolment, and aiohttp's per-connection machinery (a request handler and its task,
request and response objects, router, middleware, the body read under wait_for) is
paid on each, as the verifier's and OCSP's fast paths found (verifier_fast.py,
ocsp_fast.py).  So these two routes are taken off that path:

    GET  /.well-known/est[/<label>]/nonce            no body
    POST /.well-known/est[/<label>]/simplereenroll   Content-Type application/pkcs10,
                                                     Content-Length <= MAX_BODY, the
                                                     whole body in with its head

Anything else (the other operations, a wrong method or content type, HEAD, a query
string, a percent-encoded or otherwise unusual path, a chunked body, Expect, a body
that is not whole yet, a head aiohttp refuses) hands the connection and the bytes not
yet consumed to aiohttp's protocol, which serves it through the app as before.

The same steps as est_app's dispatch, in the same order, through the same functions:
the label (est_app.split_tail, EstService.label: 404), the TLS client certificate of
this connection (none: 401 no_client_certificate), the base64 body
(messages.decode_base64_body: 400), EstService.nonce / EstService.enroll in a worker
thread (blocking: HSM and registry), the issuance counter; refusals rendered from the
one status table (fast_path.error_answer), registry and HSM failures 503 and anything
else 500 (middleware.failure_error: logged, never sent); the request counter and
latency histogram under the app's endpoint name; the JSON access line when INFO is
enabled.  One request at a time per connection: reading pauses while the worker thread
runs, so pipelined requests are answered in order.

Bounds: a request head of at most MAX_HEAD bytes, whether it arrives whole or in pieces
(longer: handed to aiohttp, which bounds each line and the number of header lines, not
the head as a whole, and refuses or serves it); a connection with no complete request head for `keepalive_timeout` seconds
is closed (one answering is not idle); the body bound and its timeout are aiohttp's, as
a body that is not whole with its head is read by aiohttp; while the transport's write
buffer is over its high-water mark nothing is read or answered.  When the listener stops
(FastPath.stop), a request running in its worker thread still gets its answer (with
Connection: close; the certificate it issued is delivered), within the runner's
shutdown timeout.
"""

import re
import time

from aiohttp.http import HttpProcessingError

from fleetid.cloud.est import messages
from fleetid.cloud.http.est_app import MAX_BODY, split_tail
from fleetid.cloud.http.fast_path import KEEPALIVE_TIMEOUT, MAX_HEAD, FastConnection, \
    FastPath, FastSite, error_answer
from fleetid.cloud.http.middleware import failure_error
from fleetid.cloud.verifier.errors import CloudError

SERVICE = "est"
ENDPOINT = messages.WELL_KNOWN + "/{tail}"  # the app's one route (its metrics name)
# The request lines served here: the path's characters are those of a label and no
# segment is a dot segment, so the path aiohttp routes and logs (request.path, decoded
# and normalised) is the same text.
_ROUTE = re.compile(rb"\A(GET|POST) " + re.escape(messages.WELL_KNOWN.encode())
                    + rb"/((?:[A-Za-z0-9][A-Za-z0-9._-]*/)?(nonce|simplereenroll)) HTTP/1\.[01]\Z")
_METHOD = {b"nonce": b"GET", b"simplereenroll": b"POST"}
_NONCE_HEADERS = [b"Content-Type: " + messages.CT_NONCE.encode(),
                  b"Content-Transfer-Encoding: base64"]
_CERTS_HEADERS = [b"Content-Type: %s; smime-type=%s" % (messages.CT_PKCS7_MIME.encode(),
                                                        messages.SMIME_CERTS_ONLY.encode()),
                  b"Content-Transfer-Encoding: base64"]


class EstFastPath(FastPath):
    """What the fast-path connections of the EST listener share.

    Params: service: the EstService.  metrics: Metrics or None.  keepalive_timeout:
        seconds (module text).
    """

    def __init__(self, service, metrics=None, keepalive_timeout=KEEPALIVE_TIMEOUT):
        super().__init__(keepalive_timeout)
        self.service = service
        self.metrics = metrics


class EstConnection(FastConnection):
    """One client connection while it asks for nonces and re-enrolments (module text)."""

    def __init__(self, fast, fallback):
        super().__init__(fast, fallback)

    def data_received(self, data):
        self.buffer += data
        if not self.busy and not self.write_paused:
            self._process()

    def _process(self):
        while self.buffer and not self.busy and not self.write_paused \
                and not self.transport.is_closing():
            if not self._next_request():
                return

    def _next_request(self):
        """Start answering the request at the start of the buffer when it is whole.  True
        to look for another one; False to wait for more bytes (or after handing over)."""
        buffer = self.buffer
        line_end = buffer.find(b"\r\n")
        if line_end < 0:
            if len(buffer) > MAX_HEAD:
                self._hand_over()  # aiohttp refuses the over-long line
            return False
        route = _ROUTE.match(bytes(buffer[:line_end]))
        if route is None or _METHOD[route.group(3)] != route.group(1):
            self._hand_over()
            return False
        end = buffer.find(b"\r\n\r\n", line_end)
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._hand_over()
            return False
        try:
            message = self.fast.parse_head(bytes(buffer[:end + 4]))
        except HttpProcessingError:
            self._hand_over()  # aiohttp answers 400 and logs it as it does for any route
            return False
        length = message.length
        if message.chunked or message.expect_continue or len(buffer) < end + 4 + length \
                or (message.method == "GET" and length) \
                or (message.method == "POST" and (message.content_type != messages.CT_PKCS10
                                                  or length > MAX_BODY)):
            self._hand_over()  # aiohttp reads, bounds or refuses it
            return False
        body = bytes(buffer[end + 4:end + 4 + length])
        del buffer[:end + 4 + length]
        self._answer(message, route.group(2).decode(), body)
        return True

    def _answer(self, message, tail, body):
        """est_app's dispatch for one request: the checks here, the service call in a
        worker thread (reading paused until it is answered)."""
        started = time.perf_counter()
        service = self.fast.service
        try:
            label, op = split_tail(tail)
            service.label(label)  # 404 for an unknown label before anything else
            client = self.client_certificate()
            if op == messages.OP_NONCE:
                work = (service.nonce, label, client)
            else:
                work = (service.enroll, label, client, messages.decode_base64_body(body),
                        True)
        except Exception as exc:  # noqa: BLE001 - internal causes: logged, never sent
            self._send_error(exc, message, started)
            return
        try:
            future = self.loop.run_in_executor(None, *work)
        except Exception as exc:  # noqa: BLE001 - the executor is shut down: 500, logged
            self._send_error(exc, message, started)
            return
        # Busy only once submitted: a connection marked busy with no worker thread to
        # clear it would never be swept.
        self.busy = True
        self.transport.pause_reading()
        future.add_done_callback(lambda f: self._done(f, message, label, op, started))

    def _done(self, future, message, label, op, started):
        self.busy = False
        try:
            headers, body = self._success(future.result(), label, op)
        except Exception as exc:  # noqa: BLE001 - internal causes: logged, never sent
            self._send_error(exc, message, started)
        else:
            self._write(200, headers, body, message, started)
        if not self.transport.is_closing() and not self.write_paused:
            self.transport.resume_reading()
            self._process()

    def _success(self, result, label, op):
        """(headers, body) of the 200 answer to the worker thread's `result` (the issued
        counter first, as est_app)."""
        if op == messages.OP_NONCE:
            return _NONCE_HEADERS, messages.encode_base64(result)
        if self.fast.metrics is not None:
            self.fast.metrics.issued.labels(label or self.fast.service.default_label,
                                            op).inc()
        return _CERTS_HEADERS, messages.encode_base64(messages.certs_only([result]))

    def _send_error(self, exc, message, started):
        if not isinstance(exc, CloudError):
            exc = failure_error(exc, SERVICE, message.path)
        status, headers, body = error_answer(exc)
        self._write(status, headers, body, message, started, exc.reason)

    def _write(self, status, headers, body, message, started, reason=None):
        # Counted and logged also when the client has gone meanwhile: the request was
        # served all the same.
        self.served(SERVICE, ENDPOINT, status, message, started, reason)
        if not self.transport.is_closing():
            self.send(status, headers, body, message, message.should_close
                      or self.fast.stopping)


class EstFastSite(FastSite):
    """The EST listener's site: connections start in EstConnection (FastSite)."""

    connection_class = EstConnection
