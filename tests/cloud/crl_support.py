"""A fleet whose b42 CA publishes CRLs, for the cloud and the device-side CRL tests."""

import datetime

from fleetid.cloud.revocation import CrlIssuer, CrlPublisher


class FakeMonotonic:
    """A monotonic clock the test moves by hand (seconds)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def b42_publisher(fleet, next_update=datetime.timedelta(hours=24), poll_interval=5.0,
                  monotonic=None):
    """CrlPublisher for the fleet's b42 (and b43) CAs, on the fleet's clock."""
    issuers = [CrlIssuer(batch, fleet.hsm, "ca-widget-" + batch, fleet.ca_certs[batch])
               for batch in ("b42", "b43")]
    return CrlPublisher(fleet.registry, issuers, next_update=next_update,
                        poll_interval=poll_interval, clock=fleet.clock,
                        monotonic=monotonic or FakeMonotonic())
