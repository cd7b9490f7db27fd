"""Prometheus metrics of one cloud server process (requests, verdicts, verdict cache,
EST issuance, latency), kept by prometheus_client."""

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """Prometheus metrics of one server process (own CollectorRegistry, so tests and
    several apps in one process do not collide)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("fleetid_http_requests_total", "HTTP requests",
                                ["service", "endpoint", "status"], registry=self.registry)
        self.verdicts = Counter("fleetid_verifier_verdicts_total",
                                "Client certificate verdicts by reason (ok = accepted)",
                                ["reason"], registry=self.registry)
        self.cache = Counter("fleetid_verifier_cache_total", "Verdict cache lookups",
                             ["result"], registry=self.registry)
        self.issued = Counter("fleetid_est_issued_total", "Certificates issued through EST",
                              ["label", "operation"], registry=self.registry)
        self.latency = Histogram("fleetid_http_request_seconds", "Request handling time",
                                 ["service", "endpoint"], registry=self.registry,
                                 buckets=LATENCY_BUCKETS)

        # labels() costs a lock and a tuple lookup per call: the children of the label
        # sets seen so far are kept here (a handful: endpoints x statuses).
        self._children = {}

    def _child(self, metric, *labels):
        key = (id(metric),) + labels
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def on_verdict(self, reason, cached):
        self._child(self.verdicts, reason).inc()
        self._child(self.cache, "hit" if cached else "miss").inc()

    def request_done(self, service, endpoint, status, elapsed):
        """Count one answered request and observe its handling time."""
        self._child(self.requests, service, endpoint, str(status)).inc()
        self._child(self.latency, service, endpoint).observe(elapsed)
