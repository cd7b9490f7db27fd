"""The one HTTP status table covers every reason the services raise, and nothing else."""

from fleetid.cloud.http.errors import HTTP_STATUS, http_status
from fleetid.cloud.verifier import errors


def test_every_domain_reason_has_exactly_one_status():
    assert set(HTTP_STATUS) == errors.REASONS


def test_anything_but_a_cloud_error_is_an_internal_error():
    assert http_status(ValueError("x")) == 500
    assert http_status(errors.AccessRefused(errors.REVOKED)) == 403
