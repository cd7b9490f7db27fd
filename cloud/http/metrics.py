"""Prometheus metrics of a cloud server (requests, verdicts, verdict cache, EST issuance,
latency), kept by prometheus_client: one process's own, or, for `cloud serve --workers N`,
the sum over every worker through prometheus_client's multiprocess mode (each worker
writes its values to memory-mapped files in one directory private to the run; a scrape
on any worker reads them all)."""

import os
import tempfile

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, values

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def new_shared_dir():
    """A new private directory (0700, under TMPDIR) for the metric files of one run of
    `cloud serve --workers N`: the files are named by process id, so a directory shared
    with another run or another host could mix or corrupt their counts.  The caller
    removes it when the run ends.  Returns its path."""
    return tempfile.mkdtemp(prefix="fleetid-metrics-")


def _share_process_values(shared_dir):
    """Make every metric this process creates from now on (labelled children included)
    keep its value in memory-mapped files under shared_dir.  prometheus_client chooses
    the value store once, at import, from PROMETHEUS_MULTIPROC_DIR; a worker imports it
    before it is forked, so the choice is made again here.  Process-wide: for a worker
    process only."""
    os.environ[_MULTIPROC_ENV] = shared_dir
    values.ValueClass = values.MultiProcessValue()


class Metrics:
    """Prometheus metrics of a server (own CollectorRegistry, so tests and several apps
    in one process do not collide).  shared_dir: None for one process's own metrics, or
    in a worker process the workers' shared directory (new_shared_dir; this switches
    the whole process to the shared store).  `scrape` is the registry /metrics reports:
    the process's own, or the sum over the workers (one that exited still counts: its
    files stay for the run, so totals never drop)."""

    def __init__(self, shared_dir=None):
        self.registry = CollectorRegistry()
        self.scrape = self.registry
        if shared_dir is not None:
            _share_process_values(shared_dir)
            self.scrape = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.scrape, path=shared_dir)
        self._make_metrics()

        # labels() costs a lock and a tuple lookup per call: the children of the label
        # sets seen so far are kept here (a handful: endpoints x statuses).
        self._children = {}

    def _make_metrics(self):
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
