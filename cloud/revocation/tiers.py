"""Composition of the revocation tiers for `fleetid cloud serve` and the CLI: the keys and
certificates each tier signs with, and the routes on the plain-HTTP revocation listener
(the CRL port):

    GET  /crl/<label>.crl            RFC 5280 CRL per issuing CA (cloud/revocation/app.py)
    GET  /crl/root.crl               the root's CRL: revoked issuing CAs (arl.py), when
                                     the root key is in this HSM
    POST /ocsp, GET /ocsp/<b64>      RFC 6960 OCSP (ocsp.py)          } when initialised:
    GET  /revset/current.frs         compact set (compact.py)         } `fleetid revocation
    GET  /revset/delta/<n>.frd       its delta from set n             }
    GET  /ocsp/staple                the verifier server certificate's OCSP response
                                     (also on every verifier response: staple.py)  init`

Files under <state_dir>/revocation/ (made by `init_keys`, read by `load`):
    revset-signer.pem          the compact-set signer, certified by the fleet root
    ocsp-<CA key label>.pem    one delegated OCSP responder per issuing CA
The keys are in the HSM under "revocation-set" and "ocsp-<CA key label>".  Certifying
the set signer needs the root key: on the embedded set-up it is in the HSM; with an
offline root it is a ceremony step (the signer's CSR signed at the root), not done here.

Every request on the listener first polls the revocation event file (service.py), so a
`fleetid revoke` in another process re-publishes at once; the publishers' poll_interval
bounds the delay when an event is missed.
"""

import os

from cryptography import x509

from fleetid.cloud.revocation.compact import (
    CompactPublisher,
    RevocationSigner,
    add_revset_routes,
    new_revocation_signer,
)
from fleetid.cloud.revocation.ocsp import (
    OcspResponder,
    OcspSigner,
    add_ocsp_routes,
    new_ocsp_signer,
)
from fleetid.cloud.revocation.service import EVENTS_FILE, EventWatcher
from fleetid.cloud.verifier.revoked_cas import revoked_ca_map

REVSET_SIGNER_LABEL = "revocation-set"
ROOT_CRL_LABEL = "root"  # GET /crl/root.crl: the root's CRL of revoked issuing CAs (arl.py)


def with_root_crl(hsm, registry, roots, crl_issuers, revoked_cas_path, root_label="fleet-root"):
    """(registry view, CRL issuers) with the root's CRL added when the root key is in this
    HSM under `root_label` (the embedded set-up; an offline root signs its CRL at a
    ceremony instead).  Otherwise (registry, crl_issuers) unchanged."""
    from fleetid.cloud.revocation.arl import RootCrlRegistry
    from fleetid.cloud.revocation.crl import CrlIssuer

    try:
        key = hsm.public_key(root_label)
    except Exception:  # noqa: BLE001 - KeyNotFound / no such label: no root CRL here
        return registry, crl_issuers
    for root in roots:
        if root.public_key().public_numbers() == key.public_numbers():
            return (RootCrlRegistry(registry, revoked_cas_path, root),
                    list(crl_issuers) + [CrlIssuer(ROOT_CRL_LABEL, hsm, root_label, root)])
    return registry, crl_issuers


def revocation_dir(state_dir):
    return os.path.join(state_dir, "revocation")


def events_path(state_dir):
    return os.path.join(state_dir, EVENTS_FILE)


def _write_pem(path, cert):
    from cryptography.hazmat.primitives import serialization

    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def _read_pem(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


SERVER_OCSP_LABEL = "ocsp-server-issuer"


def init_keys(hsm, state_dir, root_label, root_cert, issuers):
    """Create what is missing: the set signer (under the root), one OCSP responder per
    issuing CA, and the responder for the verifier's server certificate (under the root,
    which issues it: staple.py).  issuers: (ca_key_label, ca_cert) pairs.
    Returns the paths written."""
    folder = revocation_dir(state_dir)
    os.makedirs(folder, exist_ok=True)
    written = []
    path = os.path.join(folder, "revset-signer.pem")
    if not os.path.exists(path):
        _write_pem(path, new_revocation_signer(hsm, root_label, root_cert,
                                               REVSET_SIGNER_LABEL))
        written.append(path)
    for ca_key, ca_cert in issuers:
        path = os.path.join(folder, "ocsp-%s.pem" % ca_key)
        if not os.path.exists(path):
            _write_pem(path, new_ocsp_signer(hsm, ca_key, ca_cert, "ocsp-" + ca_key))
            written.append(path)
    path = os.path.join(folder, SERVER_OCSP_LABEL + ".pem")
    if not os.path.exists(path):
        _write_pem(path, new_ocsp_signer(hsm, root_label, root_cert, SERVER_OCSP_LABEL))
        written.append(path)
    return written


class RevocationTiers:
    """The OCSP responder and compact publisher of a cloud, with the event watcher."""

    def __init__(self, responder, compact, watcher, staple=None):
        self.responder = responder
        self.compact = compact
        self.watcher = watcher
        self.staple = staple


def load(hsm, registry, state_dir, root_cert, issuers, revoked_cas_path, crl_publisher=None,
         server_cert=None):
    """The tiers initialised by init_keys, or None when they are not (the CRL listener
    then serves CRLs only).  issuers: (ca_key_label, ca_cert) pairs.  server_cert: the
    verifier's TLS certificate (issued by root_cert) for the staple, or None."""
    folder = revocation_dir(state_dir)
    signer_path = os.path.join(folder, "revset-signer.pem")
    if not os.path.exists(signer_path):
        return None
    signers = []
    for ca_key, ca_cert in issuers:
        path = os.path.join(folder, "ocsp-%s.pem" % ca_key)
        if os.path.exists(path):
            signers.append(OcspSigner(ca_cert, hsm, "ocsp-" + ca_key, _read_pem(path)))
    responder = OcspResponder(registry, signers,
                              revoked_cas=lambda: revoked_ca_map(revoked_cas_path))
    signer = RevocationSigner(hsm, REVSET_SIGNER_LABEL, _read_pem(signer_path), root_cert)
    compact = CompactPublisher(registry, signer, [c for _, c in issuers],
                               revoked_cas=lambda: list(revoked_ca_map(revoked_cas_path)))

    staple = None
    staple_path = os.path.join(folder, SERVER_OCSP_LABEL + ".pem")
    if server_cert is not None and os.path.exists(staple_path) \
            and server_cert.issuer == root_cert.subject:
        from fleetid.cloud.revocation.staple import ServerStaple

        root_responder = OcspResponder(
            registry, [OcspSigner(root_cert, hsm, SERVER_OCSP_LABEL, _read_pem(staple_path))],
            revoked_cas=lambda: revoked_ca_map(revoked_cas_path), known=[server_cert])
        staple = ServerStaple(root_responder, server_cert, root_cert)

    def on_event():
        compact.invalidate()
        if crl_publisher is not None:
            crl_publisher.invalidate()
        if staple is not None:
            staple.invalidate()

    return RevocationTiers(responder, compact, EventWatcher(events_path(state_dir), on_event),
                           staple)


def attach(app, tiers):
    """Add the OCSP and compact-set routes, and the per-request event poll, to the
    revocation listener's aiohttp app (before it starts)."""
    from aiohttp import web

    @web.middleware
    async def poll_events(request, handler):
        tiers.watcher.poll()
        return await handler(request)

    app.middlewares.append(poll_events)
    if tiers.staple is not None:
        from fleetid.cloud.revocation.staple import add_staple_route

        add_staple_route(app.router, tiers.staple)
    add_ocsp_routes(app.router, tiers.responder)
    add_revset_routes(app.router, tiers.compact)
    return app
