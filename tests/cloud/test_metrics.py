"""cloud/http/metrics.py: the /metrics text names, labels and buckets its metrics as an
independent prometheus_client reference does for the same observations (a change of a
name, a label or a bucket, which dashboards and alerts depend on, shows here)."""

import re

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from fleetid.cloud.http.metrics import LATENCY_BUCKETS, Metrics


def _reference():
    """The metrics as prometheus_client's classes keep them (the implementation before
    the plain counters), with the same names, help texts, labels and buckets."""
    registry = CollectorRegistry()
    counter, histogram = prometheus_client.Counter, prometheus_client.Histogram
    return registry, {
        "requests": counter("fleetid_http_requests_total", "HTTP requests",
                            ["service", "endpoint", "status"], registry=registry),
        "verdicts": counter("fleetid_verifier_verdicts_total",
                            "Client certificate verdicts by reason (ok = accepted)",
                            ["reason"], registry=registry),
        "cache": counter("fleetid_verifier_cache_total", "Verdict cache lookups",
                         ["result"], registry=registry),
        "issued": counter("fleetid_est_issued_total", "Certificates issued through EST",
                          ["label", "operation"], registry=registry),
        "latency": histogram("fleetid_http_request_seconds", "Request handling time",
                             ["service", "endpoint"], registry=registry,
                             buckets=LATENCY_BUCKETS),
    }


def _without_created_times(text):
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", text)


# (verdict reason, cached) and (service, endpoint, status, seconds): bucket bounds exactly,
# between them, above the last, zero.
VERDICTS = [("ok", True), ("ok", False), ("attestation", False), ("ok", True)]
REQUESTS = [("verifier", "/v1/whoami", 200, 0.0005), ("verifier", "/v1/whoami", 200, 0.0007),
            ("verifier", "/healthz", 401, 0.0), ("est", "/simpleenroll", 200, 0.3),
            ("verifier", "/v1/whoami", 403, 1.0), ("est", "/simpleenroll", 200, 7.25),
            ("verifier", "/v1/whoami", 200, 0.0123)]


def test_scrape_text_is_prometheus_clients():
    metrics = Metrics()
    registry, reference = _reference()
    for reason, cached in VERDICTS:
        metrics.on_verdict(reason, cached)
        reference["verdicts"].labels(reason).inc()
        reference["cache"].labels("hit" if cached else "miss").inc()
    for service, endpoint, status, seconds in REQUESTS:
        metrics.request_done(service, endpoint, status, seconds)
        reference["requests"].labels(service, endpoint, str(status)).inc()
        reference["latency"].labels(service, endpoint).observe(seconds)
    metrics.issued.labels("b42", "simpleenroll").inc()
    reference["issued"].labels("b42", "simpleenroll").inc()
    ours = generate_latest(metrics.registry).decode()
    theirs = generate_latest(registry).decode()
    assert _without_created_times(ours) == _without_created_times(theirs)
    assert "fleetid_http_request_seconds_bucket" in ours


def test_children_read_and_count_as_prometheus_clients():
    metrics = Metrics()
    metrics.request_done("verifier", "/v1/whoami", 200, 0.001)
    metrics.request_done("verifier", "/v1/whoami", 200, 0.002)
    assert metrics.requests.labels("verifier", "/v1/whoami", "200")._value.get() == 2
    metrics.issued.labels("b42", "simpleenroll").inc(3)
    assert metrics.issued.labels("b42", "simpleenroll")._value.get() == 3
    with pytest.raises(ValueError):
        metrics.issued.labels("b42", "simpleenroll").inc(-1)
    with pytest.raises(ValueError):
        metrics.requests.labels("verifier")
    samples = metrics.requests.collect()[0].samples
    assert {s.labels["endpoint"] for s in samples if s.value >= 1} == {"/v1/whoami"}
