"""The composition of the fleet cloud: the verifier (mTLS: a client certificate on every
request) and the EST server (TLS, client certificate optional) on one TLS context, the
plain-HTTP CRL listener and the metrics listener, in one process and one event loop.
The one module that knows all of them (the HTTP handlers are fleetid.cloud.http's; the
services below know no HTTP and nothing of each other beyond EST using the verifier).

    context = build_context(load_config(path))     # opens HSM + registry, bootstraps the
                                                   # embedded PKI on first run
    server = CloudServer.from_context(context)
    await server.start(); ...; await server.stop()

`bootstrap_embedded` is the "one command" default: with no labels configured it creates,
under state_dir, a software keystore (its passphrase from FLEETID_KEYSTORE_PASS, which
`fleetid cloud serve` fills from a prompt or a file the user names; never stored beside
the keystore), a root key ceremony, one issuing CA
("default" label) and a TLS server certificate for 127.0.0.1 / localhost signed by the
root through the HSM.  A production set-up names its HSM, CAs and TLS files instead.

Audit checkpoints: every issuance, re-issuance, rotation acknowledgement and revocation
the servers record is an entry of the registry's audit chain; with checkpoint keys
(config audit_line_key / audit_witness_key, the witness key in its own keystore or token
audit_witness_hsm; the embedded set-up makes its own, the witness's in a soft keystore of
its own under state_dir/witness) the server signs a checkpoint when one is due and at
shutdown, and the witness keeps its anchor at config.witness_anchor.
"""

import asyncio
import datetime
import glob
import os

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud import audit
from fleetid.cloud.config import ConfigError, embedded_hsm_uri
from fleetid.cloud.est.service import EstLabel, EstService
from fleetid.cloud.hsm.errors import KeyNotFound
from fleetid.cloud.http.est_app import make_est_app
from fleetid.cloud.http.metrics import Metrics
from fleetid.cloud.http.middleware import BODY_TIMEOUT, ServerTimeouts, log
from fleetid.cloud.http.tls import TICKETS_STATEFUL, server_ssl_context
from fleetid.cloud.http import sites
from fleetid.cloud.http.sites import EVENT_LOOPS, event_loop_factory, serve_forever  # noqa: F401
from fleetid.cloud.http.verifier_app import make_metrics_app, make_verifier_app
from fleetid.cloud.pki.profiles import get_profile, server_certificate_builder
from fleetid.cloud.registry.shared_state import shared_tables
from fleetid.cloud.http.est_fast import EstFastPath, EstFastSite
from fleetid.cloud.http.ocsp_fast import OcspFastPath, OcspFastSite
from fleetid.cloud.http.verifier_fast import VerifierFastPath, VerifierFastSite
from fleetid.cloud.http.rate_limit import ClientRateLimits
from fleetid.cloud.http.revocation_app import (
    CLIENT_BURST,
    CLIENT_RATE,
    attach_staple_header,
    make_revocation_app,
)
from fleetid.cloud.revocation.crl import CrlIssuer, CrlPublisher, CrlTier, crl_url
from fleetid.cloud.verifier.revoked_cas import RevokedCaFile
from fleetid.cloud.verifier.service import FleetTrust, FleetVerifier
from fleetid.common.errors import FleetidError

DEFAULT_SCOPE = {"product": "default", "batch": "b0", "region": "local"}
ROOT_LABEL = "fleet-root"
DEFAULT_CA_LABEL = "ca-default"
AUDIT_LINE_LABEL = "audit-line"
AUDIT_WITNESS_LABEL = "audit-witness"
CHECKPOINT_POLL_SECONDS = 10.0  # how often a running server asks whether one is due
_FAST_SITES = {"verifier": VerifierFastSite, "est": EstFastSite, "crl": OcspFastSite}


def _read_pems(paths):
    certs = []
    for path in paths:
        with open(path, "rb") as f:
            certs.extend(x509.load_pem_x509_certificates(f.read()))
    return certs


def _write(path, data, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # an existing file keeps its mode otherwise (a private key: 0600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class CloudContext:
    """Everything the servers need: hsm, registry, trust (FleetTrust), labels (EstLabel
    list), default_label, tls_cert / tls_key paths, config."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def close(self):
        self.registry.close()
        for hsm in (getattr(self, "witness_hsm", None), self.hsm):
            close = getattr(hsm, "close", None)
            if close:
                close()


def refuse_missing_tls_files(config):
    """Configured TLS files are the operator's: used as they are, never made.  Only the
    embedded defaults (neither named) are generated, under state_dir/tls.
    Raises ConfigError naming the configured path that does not exist."""
    for option, path in (("tls_cert", config.tls_cert), ("tls_key", config.tls_key)):
        if path and not os.path.isfile(path):
            raise ConfigError("%s %s does not exist: a configured TLS certificate and key "
                              "are used as they are, never generated (name existing files, "
                              "or neither for the embedded set-up's own under %s)"
                              % (option, path, os.path.join(config.state_dir, "tls")))


def bootstrap_embedded(config, hsm, now=None):
    """Create the embedded PKI under state_dir if it is not there yet (idempotent).
    Returns (labels config list, tls_cert path, tls_key path)."""
    from fleetid.cloud.pki import init_root, new_ca
    from fleetid.cloud.pki.signing import sign_certificate

    state = config.state_dir
    refuse_missing_tls_files(config)
    pki_dir = os.path.join(state, "pki")
    os.makedirs(pki_dir, exist_ok=True)
    root_path = os.path.join(state, "ceremony", "root.pem")
    ca_path = os.path.join(pki_dir, DEFAULT_CA_LABEL + ".pem")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if not os.path.exists(root_path):
        root, _record = init_root(hsm, ROOT_LABEL, "CN=fleetid embedded root,O=fleetid", 30,
                                  os.path.join(state, "ceremony"), ["fleetid-cloud-serve"],
                                  now=now)
    else:
        root = _read_pems([root_path])[0]
    if not os.path.exists(ca_path):
        ca = new_ca(hsm, ROOT_LABEL, root, DEFAULT_CA_LABEL, DEFAULT_SCOPE, now=now)
        _write(ca_path, ca.public_bytes(serialization.Encoding.PEM))
    tls_cert = config.tls_cert or os.path.join(state, "tls", "server.pem")
    tls_key = config.tls_key or os.path.join(state, "tls", "server.key.pem")
    if not os.path.exists(tls_cert):
        os.makedirs(os.path.dirname(tls_cert), exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = server_certificate_builder(key.public_key(), root,
                                             ["localhost", "127.0.0.1", "::1"], now)
        cert = sign_certificate(hsm, ROOT_LABEL, builder, root.public_key())
        _write(tls_key, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), 0o600)
        _write(tls_cert, cert.public_bytes(serialization.Encoding.PEM) +
               root.public_bytes(serialization.Encoding.PEM))
    labels = [{"name": "default", "ca_key": DEFAULT_CA_LABEL, "ca_cert": ca_path,
               "default": True}]
    return labels, [root_path], tls_cert, tls_key


def ensure_audit_keys(hsm, witness_hsm, state_dir):
    """The embedded set-up's audit checkpoint keys: the line key in `hsm`, the witness key
    in `witness_hsm` (its own keystore), made on first use; public keys written to
    <state_dir>/audit/{audit-line,audit-witness}.pub.pem (what
    `fleetid audit verify --line-pub / --witness-pub` takes).  Returns the two labels."""
    directory = os.path.join(state_dir, "audit")
    os.makedirs(directory, exist_ok=True)
    for hsm, label in ((hsm, AUDIT_LINE_LABEL), (witness_hsm, AUDIT_WITNESS_LABEL)):
        try:
            public = hsm.public_key(label)
        except KeyNotFound:
            hsm.generate_signing_key(label)
            public = hsm.public_key(label)
        path = os.path.join(directory, label + ".pub.pem")
        if not os.path.exists(path):
            _write(path, public.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    return AUDIT_LINE_LABEL, AUDIT_WITNESS_LABEL


def checkpointer_for(config, hsm, witness_hsm, registry, line_label, witness_label):
    """An audit.Checkpointer over the registry, the line's signature made in `hsm`, the
    witness's in its own `witness_hsm`, the witness keeping its anchor at
    config.witness_anchor."""
    return audit.Checkpointer(
        registry, audit.HsmSigner(hsm, line_label),
        audit.AnchoringWitness(audit.HsmSigner(witness_hsm, witness_label),
                               config.witness_anchor))


def embedded_witness_hsm_uri(config):
    """The embedded set-up's witness keystore: a soft keystore of its own under
    <state_dir>/witness, unlocked like the embedded keystore (FLEETID_KEYSTORE_PASS)."""
    return "soft:%s;pass-env=FLEETID_KEYSTORE_PASS" % os.path.join(
        config.state_dir, "witness", "keystore.json")


def _check_adopted_ca(entry, ca_cert, root_certs):
    """An EST label's CA must be issued by one of the configured roots (the HSM key under
    its label is checked against the certificate by IssuingCa)."""
    for root in root_certs:
        try:
            ca_cert.verify_directly_issued_by(root)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise ValueError("label %s: its CA %s is not issued by a configured root"
                     % (entry["name"], entry["ca_cert"]))


def check_tls_files(config):
    """The server certificate and key are named together or not at all (then the embedded
    set-up makes both under state_dir).  A key without its certificate is refused: the
    embedded set-up would otherwise write a new key over the operator's.
    Raises ConfigError."""
    if config.tls_key and not config.tls_cert:
        raise ConfigError("tls_key %s is set but tls_cert is not: name the certificate of "
                          "that key as well (or neither, for the embedded set-up's own)"
                          % config.tls_key)
    if config.tls_cert and not config.tls_key:
        raise ConfigError("tls_cert %s is set but tls_key is not: name its private key as "
                          "well (or neither, for the embedded set-up's own)" % config.tls_cert)
    if not config.labels and config.hsm == embedded_hsm_uri(config.state_dir):
        refuse_missing_tls_files(config)  # the embedded set-up, before its keystore opens


def build_context(config, environ=None, clock=None):
    """Open the HSM and registry named by `config`, bootstrap the embedded PKI when no
    labels are configured, and build the trust and the EST labels.  Returns CloudContext."""
    from fleetid.cloud.hsm import open_hsm
    from fleetid.cloud.registry import open_registry
    environ = os.environ if environ is None else environ
    check_tls_files(config)
    os.makedirs(config.state_dir, exist_ok=True)
    hsm = open_hsm(config.hsm, environ)  # its secret by environment variable only
    label_configs, roots, tls_cert, tls_key = list(config.labels), list(config.roots), \
        config.tls_cert, config.tls_key
    if not label_configs:
        if config.hsm != embedded_hsm_uri(config.state_dir):
            # Key custody: an HSM's root and CAs are adopted, never made by the server.
            hsm.close()
            raise ValueError("a cloud on its own HSM adopts its root and issuing CAs "
                             "(roots and [[cloud.labels]], or --root-cert and --ca) as "
                             "`fleetid pki init-root` / `fleetid pki new-ca` made them")
        label_configs, embedded_roots, tls_cert, tls_key = bootstrap_embedded(config, hsm)
        roots = roots or embedded_roots
    if not tls_cert or not tls_key:
        raise ConfigError("tls_cert and tls_key are required when labels are configured")
    root_certs = _read_pems(roots)
    vendor_paths = list(config.vendor_roots) or sorted(
        glob.glob(os.path.join(config.state_dir, "vendor-roots", "*.pem")))
    vendor_roots = _read_pems(vendor_paths)
    intermediates = _read_pems(config.intermediates)
    labels = []
    crl_issuers = []
    default_label = None
    registry = open_registry(config.registry,
                             timeout_s=getattr(config, "registry_timeout", 0) or None)
    shared = shared_tables(registry)  # None on memory: (state kept in this process)
    for entry in label_configs:
        label, crl_issuer = _est_label(config, hsm, entry, root_certs, intermediates,
                                       vendor_roots, clock, shared)
        labels.append(label)
        crl_issuers.append(crl_issuer)
        if entry.get("default"):
            default_label = entry["name"]
    trust = FleetTrust(root_certs, intermediates, vendor_roots, config.revoked_cas,
                       revoked_ca_file=RevokedCaFile(config.revoked_cas_file))
    checkpointer, witness_hsm = _audit_checkpointer(config, hsm, registry, environ)
    return CloudContext(hsm=hsm, registry=registry, trust=trust, labels=labels,
                        default_label=default_label, tls_cert=tls_cert, tls_key=tls_key,
                        config=config, vendor_paths=vendor_paths, crl_issuers=crl_issuers,
                        checkpointer=checkpointer, witness_hsm=witness_hsm,
                        shared=shared)


def _est_label(config, hsm, entry, root_certs, intermediates, vendor_roots, clock,
               shared=None):
    """(EstLabel, CrlIssuer) for one [[cloud.labels]] entry: its CA certificate checked
    against the roots and added to `intermediates`, its IssuingCa on the HSM key (its
    nonces in the registry's shared tables when given, so any worker consumes them)."""
    from fleetid.cloud.ca import IssuingCa
    from fleetid.cloud.ca.nonces import RegistryNonceStore

    ca_cert = _read_pems([entry["ca_cert"]])[0]
    _check_adopted_ca(entry, ca_cert, root_certs)
    if ca_cert not in intermediates:
        intermediates.append(ca_cert)
    chain = [ca_cert] + [r for r in root_certs if r.subject == ca_cert.issuer]
    # Every HSM signature is verified before a certificate leaves the CA (a fault
    # in the HSM path must not ship a bad certificate); ~0.1 ms per issuance.
    # The CRL distribution point new certificates name: this label's CRL route.
    label_crl_url = (crl_url(config.crl_base_url, entry["name"])
                     if config.crl_base_url else None)
    nonce_store = (RegistryNonceStore(shared.nonces(entry["ca_key"]))
                   if shared is not None else None)
    ca = IssuingCa(hsm, entry["ca_key"], ca_cert, vendor_roots, clock=clock,
                   verify_signatures="always", crl_url=label_crl_url, nonce_store=nonce_store)
    label = EstLabel(entry["name"], ca, chain,
                     require_approval=bool(entry.get("require_approval")),
                     profile=get_profile(entry.get("profile") or "operational"))
    return label, CrlIssuer(entry["name"], hsm, entry["ca_key"], ca_cert)


def _audit_checkpointer(config, hsm, registry, environ):
    """(audit.Checkpointer or None, the witness's HSM or None): the configured audit
    keys, or on the embedded set-up its own; the witness key always in a keystore or
    token of its own."""
    from fleetid.cloud.hsm import open_hsm

    audit_labels = (config.audit_line_key, config.audit_witness_key)
    witness_hsm = None
    if audit_labels[0]:
        witness_hsm = open_hsm(config.audit_witness_hsm, environ)
    elif not config.labels:
        witness_dir = os.path.join(config.state_dir, "witness")
        os.makedirs(witness_dir, exist_ok=True)
        witness_hsm = open_hsm(embedded_witness_hsm_uri(config), environ)
        audit_labels = ensure_audit_keys(hsm, witness_hsm, config.state_dir)
    checkpointer = (checkpointer_for(config, hsm, witness_hsm, registry, *audit_labels)
                    if audit_labels[0] else None)
    return checkpointer, witness_hsm


class ListenError(FleetidError, OSError):
    """A listener could not bind its address.  Fields: listener (verifier, est, crl,
    metrics), host, port, cause (the OS's words: "Address already in use").  Also an
    OSError: it stands for the bind() failure, which callers may catch as one."""

    def __init__(self, listener, host, port, cause):
        super().__init__("cannot listen on %s:%d (%s): %s" % (host, port, listener, cause))
        self.listener = listener
        self.host = host
        self.port = port
        self.cause = cause


class CloudServer:
    """The verifier + EST + metrics listeners, and the plain-HTTP CRL listener when a
    CrlPublisher is given.  Ports may be 0 (pick a free one; the metrics listener is off
    at 0); `ports` holds the bound ones after start().  `timeouts` (ServerTimeouts)
    bounds what a client can make every listener wait for: the TLS handshake, a request
    head, a request body."""

    def __init__(self, verifier, est_service, tls_cert, tls_key, client_ca_pem,
                 host="127.0.0.1", verifier_port=8443, est_port=8444, metrics_port=0,
                 metrics=None, crl_publisher=None, crl_port=0, checkpointer=None,
                 checkpoint_poll=CHECKPOINT_POLL_SECONDS, revocation_tiers=None,
                 sockets=None, timeouts=None, tls_tickets=TICKETS_STATEFUL,
                 tls_context=None):
        # sockets: {listener name: bound listening socket} to serve instead of binding
        # (the workers of serve_workers share the parent's).
        self.timeouts = timeouts or ServerTimeouts()
        # checkpointer: an audit.Checkpointer; while the server runs it signs a checkpoint
        # when one is due, and once more at stop() (every issuance, re-issuance, rotation
        # acknowledgement and revocation the server recorded is then anchored).
        self.checkpointer = checkpointer
        self.checkpoint_poll = checkpoint_poll
        self._checkpoint_task = None
        self.metrics = metrics or Metrics()
        verifier.on_verdict = self.metrics.on_verdict
        self.verifier = verifier
        self.est_service = est_service
        self.host = host
        # One SSLContext for both TLS listeners, hence one OpenSSL session cache: a session
        # a device made with one server resumes on the other (a rotation's whoami,
        # nonce and re-enrolment then cost one full handshake between them, RFC 8446
        # 4.6.1: same server certificate, same name).  The context asks for a client
        # certificate without requiring one (EST's cacerts needs none); the verifier
        # refuses a request without one in its own middleware (401
        # no_client_certificate, before any handler), and both check the certificate
        # of every request, a resumed session's included.  A certificate that is
        # presented and does not chain to the fleet's CAs still fails the handshake.
        # tls_tickets: TICKETS_STATEFUL (one process) or TICKETS_STATELESS for worker
        # processes forked after this constructor: they share the context's ticket key,
        # so a session resumes on whichever worker gets the connection (tls.py).
        # tls_context: that SSLContext, made beforehand (serve_workers makes it in the
        # parent, so every forked worker has the same ticket key).
        if tls_context is None:
            tls_context = server_ssl_context(tls_cert, tls_key, client_ca_pem, False,
                                             tickets=tls_tickets)
        self.tls_context = tls_context
        self._plan = [
            ("verifier", make_verifier_app(verifier, self.metrics), verifier_port,
             tls_context),
            ("est", make_est_app(est_service, self.metrics), est_port, tls_context),
        ]
        if metrics_port:
            self._plan.append(("metrics", make_metrics_app(self.metrics), metrics_port, None))
        self.crl_publisher = crl_publisher
        # listener name -> its fast path (verifier_fast.py, est_fast.py, ocsp_fast.py)
        self._fast = {"verifier": VerifierFastPath(verifier, self.metrics, self.timeouts.idle),
                      "est": EstFastPath(est_service, self.metrics, self.timeouts.idle)}
        if crl_publisher is not None:
            self._plan.append(("crl", self._revocation_app(crl_publisher, revocation_tiers),
                               crl_port, None))
        self.revocation_tiers = revocation_tiers
        self.sockets = dict(sockets or {})
        for _name, app, _port, _context in self._plan:
            app[BODY_TIMEOUT] = self.timeouts.body  # read_limited's bound
        self._runners = []
        self.ports = {}

    def _revocation_app(self, crl_publisher, revocation_tiers):
        """The plain-HTTP revocation listener's app: CRLs only when the tiers are not
        initialised, else every tier (tiers.TIERS), OCSP also on the fast path."""
        if revocation_tiers is None:
            return make_revocation_app([CrlTier(crl_publisher)], metrics=self.metrics)
        limits = ClientRateLimits(CLIENT_RATE, CLIENT_BURST)
        app = make_revocation_app(revocation_tiers.tiers, revocation_tiers.watcher,
                                  self.metrics, client_limits=limits)
        ocsp_tier = revocation_tiers.tier("ocsp")
        if ocsp_tier is not None:  # OCSP off aiohttp's request path: ocsp_fast.py
            self._fast["crl"] = OcspFastPath(
                ocsp_tier, limits, revocation_tiers.watcher, self.metrics,
                keepalive_timeout=self.timeouts.idle, body_timeout=self.timeouts.body)
        staple = revocation_tiers.tier("staple")
        if staple is not None:  # no TLS stapling: staple.py
            attach_staple_header(self._plan[0][1], staple.staple)
            self._fast["verifier"].staple = staple.staple
        return app

    @classmethod
    def from_context(cls, context, **overrides):
        config = context.config
        verifier = FleetVerifier(context.trust, context.registry,
                                 accept_identity=config.accept_identity)
        shared = getattr(context, "shared", None)
        est = EstService(context.labels, context.registry, context.trust,
                         default_label=context.default_label,
                         overlap=datetime.timedelta(days=config.overlap_days),
                         approvals=shared.approvals if shared is not None else None)
        kwargs = dict(host=config.host, verifier_port=config.verifier_port,
                      est_port=config.est_port, metrics_port=config.metrics_port,
                      checkpointer=getattr(context, "checkpointer", None))
        if config.crl_port and context.crl_issuers:
            from fleetid.cloud.revocation import tiers

            registry_view, crl_issuers = tiers.with_root_crl(
                context.hsm, context.registry, context.trust.roots, context.crl_issuers,
                config.revoked_cas_file)
            kwargs["crl_publisher"] = CrlPublisher(
                registry_view, crl_issuers,
                next_update=datetime.timedelta(hours=config.crl_next_update_hours))
            kwargs["crl_port"] = config.crl_port
            issuers = [(i.key_label, i.ca_certificate) for i in context.crl_issuers]
            roots = [r for r in context.trust.roots
                     if r.subject == issuers[0][1].issuer] or context.trust.roots
            kwargs["revocation_tiers"] = tiers.load(
                context.hsm, context.registry, config.state_dir, roots[0], issuers,
                config.revoked_cas_file, kwargs["crl_publisher"],
                server_cert=_read_pems([context.tls_cert])[0])
        kwargs.update(overrides)
        return cls(verifier, est, context.tls_cert, context.tls_key,
                   context.trust.ca_bundle_pem(), **kwargs)

    async def start(self):
        for name, app, port, ssl_context in self._plan:
            runner = sites.Runner(app, access_log=None, **self.timeouts.runner_options())
            await runner.setup()
            host = self.host if name != "metrics" else "127.0.0.1"
            bounds = sites.ssl_bounds(ssl_context, self.timeouts)
            if name in self._fast:
                site = _FAST_SITES[name](
                    runner, host, port, self._fast[name], sock=self.sockets.get(name),
                    ssl_context=ssl_context, backlog=1024, reuse_address=True)
            elif name in self.sockets:
                site = sites.BoundedSockSite(runner, self.sockets[name],
                                             ssl_context=ssl_context, backlog=1024)
            else:
                site = sites.BoundedTcpSite(runner, host, port, ssl_context=ssl_context,
                                            backlog=1024, reuse_address=True)
            site.ssl_bounds = bounds
            try:
                await site.start()
            except OSError as exc:  # EADDRINUSE, EACCES (< 1024), EADDRNOTAVAIL
                await runner.cleanup()
                for started in reversed(self._runners):  # the listeners already up
                    await started.cleanup()
                self._runners = []
                # asyncio words it "error while attempting to bind on address ...": the
                # OS's own words for the errno are shorter and name the cause alone.
                cause = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ListenError(name, host, port, cause) from None
            self._runners.append(runner)
            self.ports[name] = site._server.sockets[0].getsockname()[1]
        if self.checkpointer is not None:
            self._checkpoint_task = asyncio.get_running_loop().create_task(
                self._checkpoint_loop())
        return self.ports

    def listeners(self):
        """[(name, host, port)] of the listeners start() would bind."""
        return [(name, self.host if name != "metrics" else "127.0.0.1", port)
                for name, _app, port, _ssl in self._plan]

    async def _checkpoint(self, due_only):
        # Signing goes through the HSM and writes the registry: off the event loop.  A
        # failure is logged (JSON) and retried at the next poll; it never stops serving.
        work = self.checkpointer.maybe_checkpoint if due_only else self.checkpointer.checkpoint
        try:
            return await asyncio.get_running_loop().run_in_executor(None, work)
        except Exception:  # noqa: BLE001 - logged; the next poll or stop() retries
            log.error("audit checkpoint failed", exc_info=True)
            return None

    async def _checkpoint_loop(self):
        while True:
            await asyncio.sleep(self.checkpoint_poll)
            await self._checkpoint(due_only=True)

    async def stop(self):
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            try:
                await self._checkpoint_task
            except asyncio.CancelledError:
                pass
            self._checkpoint_task = None
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners = []
        if self.checkpointer is not None:
            # Shutdown: everything this server recorded is anchored before it exits.
            await self._checkpoint(due_only=False)


def trust_from_config(config, extra_intermediates=()):
    """FleetTrust from the configuration alone (no HSM): for diagnosis commands.

    Roots: config.roots, else the embedded root (<state_dir>/ceremony/root.pem).
    Intermediates: config.intermediates + every label's CA + the embedded CAs
    (<state_dir>/pki/*.pem) + `extra_intermediates` (x509 certificates).
    Vendor roots: config.vendor_roots, else <state_dir>/vendor-roots/*.pem.
    Raises OSError / ValueError for unreadable files, ValueError if there is no root.
    """
    roots = list(config.roots) or [p for p in [os.path.join(config.state_dir, "ceremony",
                                                            "root.pem")] if os.path.exists(p)]
    intermediate_paths = list(config.intermediates) + [entry["ca_cert"]
                                                       for entry in config.labels]
    intermediate_paths += sorted(glob.glob(os.path.join(config.state_dir, "pki", "*.pem")))
    vendor_paths = list(config.vendor_roots) or sorted(
        glob.glob(os.path.join(config.state_dir, "vendor-roots", "*.pem")))
    intermediates = _read_pems(intermediate_paths) + list(extra_intermediates)
    return FleetTrust(_read_pems(roots), intermediates, _read_pems(vendor_paths),
                      config.revoked_cas,
                      revoked_ca_file=RevokedCaFile(config.revoked_cas_file))
