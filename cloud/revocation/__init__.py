"""Revocation publishing: RFC 5280 CRLs per issuing CA for intermittently connected
devices (crl.py: the service; app.py: the HTTP route at the CRL distribution point)."""

from fleetid.cloud.revocation.crl import CrlIssuer, CrlPublisher, crl_path, crl_url

__all__ = ["CrlIssuer", "CrlPublisher", "crl_path", "crl_url"]
