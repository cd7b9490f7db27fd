"""Revocation: one state and its one writer (service.py), and the tiers that publish it
(tier.py: the interface; tiers.py: the list; crl.py, staple.py, ocsp.py,
revset_publisher.py: one module each).  Their HTTP routes are served by
fleetid.cloud.http.revocation_app."""

from fleetid.cloud.revocation.crl import CrlIssuer, CrlPublisher, crl_path, crl_url

__all__ = ["CrlIssuer", "CrlPublisher", "crl_path", "crl_url"]
