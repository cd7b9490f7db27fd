"""fleetid.cloud.pki: the fleet PKI (offline root, scoped issuing CAs, device profiles).

    from fleetid.cloud.pki import init_root, verify_ceremony, new_ca
    root, record = init_root(hsm, "fleet-root", "CN=Acme Fleet Root,O=Acme", 30,
                             "/srv/ceremony/2026-11", ["alice", "bob"])
    ca = new_ca(hsm, "fleet-root", root, "ca-widget-b42-eu",
                {"product": "widget", "batch": "b42", "region": "eu"})

Every CA signature is made inside the HSM (`signing.py`); certificate profiles are in
`profiles.py`; errors are PkiError (`errors.py`).
"""

from fleetid.cloud.pki.authority import new_ca
from fleetid.cloud.pki.ceremony import fingerprint, init_root, verify_ceremony
from fleetid.cloud.pki.errors import PkiError
from fleetid.cloud.pki.profiles import (
    IDENTITY,
    OPERATIONAL,
    CertificateProfile,
    ca_scope,
    device_urn,
)
from fleetid.cloud.pki.signing import sign_certificate, sign_crl

__all__ = [
    "init_root",
    "verify_ceremony",
    "fingerprint",
    "new_ca",
    "ca_scope",
    "device_urn",
    "CertificateProfile",
    "IDENTITY",
    "OPERATIONAL",
    "PkiError",
    "sign_certificate",
    "sign_crl",
]
