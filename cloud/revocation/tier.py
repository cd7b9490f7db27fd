"""The tier interface: what every revocation tier (CRL, staple, OCSP, compact set) gives
the cloud, so that a new tier is one module and one entry in tiers.TIERS.

A tier instance (built by tiers.load from the HSM, the registry and the revoked-CA file):

    name                  the key of the tier in `fleetid revocation status`
    invalidate()          a revocation was written (the event, service.py): drop what is
                          cached, so the next request sees it
    start() / stop()      the listener starts / stops (a tier's background work)
    routes()              list of Route: what the tier serves on the revocation listener,
                          without HTTP (cloud/http/revocation_app.py adapts them to aiohttp
                          and renders refusals through cloud/http/errors.py)

and on its class:

    init_keys(setup)      create the keys and certificates the tier signs with, when
                          missing (`fleetid revocation init`); returns the paths written
    build(setup)          the tier instance, or None when its keys are not made (then
                          the listener does without it)
    status(base_url, facts, fetch, failed)
                          what a running listener at base_url publishes for this tier (a
                          dict; or None when there is nothing to report).  facts:
                          {"labels": CRL label names, "ca_certs": issuing CAs, "now": epoch
                          s}; fetch(url, data=None, content_type=None) -> bytes;
                          failed(url, exc) -> the dict reporting a failed fetch.  A tier
                          whose status is per CA label sets `per_label = True` and returns
                          {label: dict}.

A route handler raises CloudError (cloud/verifier/errors.py) for a refusal; the reason
picks the HTTP status in the one table.

`setup` is a TierSetup: what every tier is built from.
"""

import os


class TierSetup:
    """What tiers are made from: hsm, registry, folder (<state_dir>/revocation: the tiers'
    certificates), root_cert (the fleet root), issuers ((CA key label, CA certificate)
    pairs), revoked_cas (() -> {CA key identifier: revoked_at}, the revoked-CA file),
    crl_publisher (or None), server_cert (the verifier's TLS certificate, or None),
    root_label (the root key's HSM label, for init_keys), revocation_epoch (() -> a value
    that moves when any process commits a revocation, read per request by caches that
    must see it: the OCSP cache; None: the event file's watcher alone)."""

    def __init__(self, hsm, registry, folder, root_cert, issuers, revoked_cas,
                 crl_publisher=None, server_cert=None, root_label="fleet-root",
                 revocation_epoch=None):
        self.revocation_epoch = revocation_epoch
        self.root_label = root_label
        self.hsm = hsm
        self.registry = registry
        self.folder = folder
        self.root_cert = root_cert
        self.issuers = list(issuers)
        self.revoked_cas = revoked_cas
        self.crl_publisher = crl_publisher
        self.server_cert = server_cert

    def path(self, name):
        return os.path.join(self.folder, name)

    def read_pem(self, name):
        """The certificate <folder>/<name>, or None when it is not there."""
        from cryptography import x509

        try:
            with open(self.path(name), "rb") as f:
                return x509.load_pem_x509_certificate(f.read())
        except FileNotFoundError:
            return None

    def write_pem(self, name, make):
        """Write make() (a certificate) to <folder>/<name> unless it exists.
        Returns [path] when written, [] otherwise."""
        from cryptography.hazmat.primitives import serialization

        path = self.path(name)
        if os.path.exists(path):
            return []
        os.makedirs(self.folder, exist_ok=True)
        cert = make()
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, path)
        return [path]


class Reply:
    """A route's answer: body bytes, content type, extra headers."""

    def __init__(self, body, content_type, headers=None):
        self.body = body
        self.content_type = content_type
        self.headers = dict(headers or {})


class Deferred:
    """A route's answer that needs blocking work (a signature, a storage read):
    `work()` -> Reply, which the listener runs in a worker thread, off the event loop."""

    __slots__ = ("work",)

    def __init__(self, work):
        self.work = work


class Route:
    """One route of a tier.

    Params: method: "GET" (HEAD answered too) or "POST".  path: aiohttp pattern, e.g.
        "/crl/{name}".  handle(params, body) -> Reply: params are the path's variables,
        body the request body (b"" for GET).  content_type: the one request type a POST
        takes (others: unsupported_content_type), or None.  body_limit: bytes a POST may
        carry (more: too_large).  blocking: handle signs or reads storage and runs in a
        worker thread, off the event loop (a handle that answers from memory runs on the
        loop and returns a Deferred for its blocking cases).  client_limited: the
        listener's per-client rate limit applies (over it: rate_limited, 429 with
        Retry-After).
    """

    def __init__(self, method, path, handle, content_type=None, body_limit=0,
                 blocking=False, client_limited=False):
        self.client_limited = client_limited
        self.method = method
        self.path = path
        self.handle = handle
        self.content_type = content_type
        self.body_limit = body_limit
        self.blocking = blocking


class Tier:
    """Base of the tiers: no cache, no routes, nothing to report."""

    name = ""
    per_label = False

    def invalidate(self):
        pass

    def start(self):
        """The listener started (background work may begin)."""

    def stop(self):
        """The listener stops (bounded)."""

    def routes(self):
        return []

    @classmethod
    def init_keys(cls, setup):
        return []

    @classmethod
    def build(cls, setup):
        return None

    @staticmethod
    def status(base_url, facts, fetch, failed):
        return None
