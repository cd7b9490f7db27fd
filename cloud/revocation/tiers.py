"""The revocation tiers of a cloud: the one list (TIERS), their keys, and the event that
reaches them all.  Each tier is a class with the interface of tier.py, in its own module:

    tier          module      routes on the revocation listener (the CRL port)
    crl           crl.py      GET /crl/<label>.crl (and /crl/root.crl, arl.py, when the
                              root key is in this HSM: with_root_crl)
    staple        staple.py   GET /ocsp/staple (and a header on every verifier response)
    ocsp          ocsp_tier.py  POST /ocsp, GET /ocsp/<b64> (ocsp.py signs, ocsp_cache.py
                              keeps the pre-signed answers)
    revset        revset_publisher.py
                              GET /revset/current.frs, GET /revset/delta/<n>.frd

cloud/http/revocation_app.py serves the routes of every built tier, polling the event file
(service.py) on each request: a `fleetid revoke` in another process invalidates every
tier at once (RevocationTiers.on_event); each publisher's poll_interval bounds the delay
when an event is missed.  `fleetid revocation status --url` asks every tier's status().
Adding a tier: its module (a Tier subclass) and one entry in TIERS.

Files under <state_dir>/revocation/ (made by `init_keys`, read by `load`):
    revset-signer.pem          the compact-set signer, certified by the fleet root
    ocsp-<CA key label>.pem    one delegated OCSP responder per issuing CA
    ocsp-server-issuer.pem     the responder for the verifier's server certificate
The keys are in the HSM under the same labels ("revocation-set" for the set signer).
Certifying under the root needs the root key: on the embedded set-up it is in the HSM;
with an offline root it is a ceremony step (the CSR signed at the root), not done here.
"""

import os

from fleetid.cloud.revocation.revset_publisher import RevsetTier
from fleetid.cloud.revocation.crl import ROOT_CRL_NAME, CrlTier
from fleetid.cloud.revocation.ocsp_tier import OcspTier
from fleetid.cloud.revocation.service import (
    EVENTS_FILE,
    AnyWatcher,
    EventWatcher,
    RegistryEventWatcher,
)
from fleetid.cloud.revocation.staple import StapleTier
from fleetid.cloud.revocation.tier import TierSetup
from fleetid.cloud.verifier.revoked_cas import revoked_ca_map

# THE list: every tier, in route order (the staple's /ocsp/staple before OCSP's
# /ocsp/{request}).
TIERS = (CrlTier, StapleTier, OcspTier, RevsetTier)

ROOT_CRL_LABEL = ROOT_CRL_NAME


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


def _setup(hsm, registry, state_dir, root_cert, issuers, revoked_cas_path,
           crl_publisher=None, server_cert=None, root_label="fleet-root",
           revocation_epoch=None):
    return TierSetup(hsm, registry, revocation_dir(state_dir), root_cert, issuers,
                     lambda: revoked_ca_map(revoked_cas_path), crl_publisher, server_cert,
                     root_label, revocation_epoch)


def init_keys(hsm, state_dir, root_label, root_cert, issuers):
    """Create what is missing for every tier (tier.init_keys): the set signer (under the
    root), one OCSP responder per issuing CA, and the responder for the verifier's server
    certificate (under the root, which issues it: staple.py).  issuers: (ca_key_label,
    ca_cert) pairs.  Returns the paths written."""
    setup = _setup(hsm, None, state_dir, root_cert, issuers, None, root_label=root_label)
    written = []
    for tier in TIERS:
        written += tier.init_keys(setup)
    return written


class RevocationTiers:
    """The built tiers of a cloud (in TIERS order) and the watcher of the event file,
    whose change invalidates every one of them."""

    def __init__(self, tiers, events_file=None, registry_events=None):
        # registry_events: the registry's shared_state.RevocationEvents, for events
        # announced by processes on other hosts (no shared event file).
        self.tiers = list(tiers)
        self.watcher = EventWatcher(events_file, self.on_event) if events_file else None
        if registry_events is not None:
            watchers = [RegistryEventWatcher(registry_events, self.on_event)]
            self.watcher = AnyWatcher(watchers + ([self.watcher] if self.watcher else []))

    def on_event(self):
        for tier in self.tiers:
            tier.invalidate()

    def tier(self, name):
        """The built tier called `name`, or None."""
        for tier in self.tiers:
            if tier.name == name:
                return tier
        return None


def load(hsm, registry, state_dir, root_cert, issuers, revoked_cas_path, crl_publisher=None,
         server_cert=None, revocation_epoch=None):
    """Every tier whose keys init_keys made (and the CRL tier of crl_publisher), or None
    when none but the CRL's is (not initialised: the listener then serves CRLs only).
    issuers: (ca_key_label, ca_cert) pairs.  server_cert: the verifier's TLS certificate
    (issued by root_cert) for the staple, or None.  revocation_epoch: see TierSetup (a
    counter shared by every process, e.g. in PostgreSQL), or None."""
    setup = _setup(hsm, registry, state_dir, root_cert, issuers, revoked_cas_path,
                   crl_publisher, server_cert, revocation_epoch=revocation_epoch)
    built = [tier for tier in (cls.build(setup) for cls in TIERS) if tier is not None]
    if all(tier.name == CrlTier.name for tier in built):
        return None
    from fleetid.cloud.registry.shared_state import shared_tables

    shared = shared_tables(registry) if registry is not None else None
    return RevocationTiers(built, events_path(state_dir),
                           shared.revocation_events if shared is not None else None)
