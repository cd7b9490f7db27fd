"""Prometheus metrics of one cloud server process (requests, verdicts, verdict cache,
EST issuance, latency).

The counts are plain Python numbers, turned into Prometheus samples only when /metrics
is scraped (each metric is a custom collector of its CollectorRegistry): counting a
request costs a dict lookup and an addition under one lock, where prometheus_client's
Counter.inc and Histogram.observe cost a few wrapper calls and a lock per value (~2.5 us
of every verifier request, the verdict and the cache lookup counted, the request counted
and timed).  The scrape's text is the one prometheus_client's Counter and Histogram
would give for the same observations (same families, samples, labels, floats, `_created`
times; tests/cloud/test_metrics.py compares them), and the metric objects keep the part
of their interface that callers use: `labels(*values)` returning a child with `inc()` /
`observe()` and `_value.get()`, and `collect()`.
"""

import bisect
import threading
import time

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _Value:
    """One number of a child (`_value.get()`, as prometheus_client's children have)."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0.0

    def get(self):
        return self.value


class _CounterChild:
    __slots__ = ("_value", "_lock", "created")

    def __init__(self, lock):
        self._value, self._lock, self.created = _Value(), lock, time.time()

    def inc(self, amount=1):
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        with self._lock:
            self._value.value += amount


class _HistogramChild:
    __slots__ = ("counts", "sum", "_lock", "created")

    def __init__(self, lock, buckets):
        self.counts = [0.0] * (len(buckets) + 1)  # per bucket (not cumulative), then +Inf
        self.sum, self._lock, self.created = 0.0, lock, time.time()

    def observe(self, amount, buckets=LATENCY_BUCKETS):
        with self._lock:
            self.sum += amount
            self.counts[bisect.bisect_left(buckets, amount)] += 1.0


class _Family:
    """A labelled metric: children per label values, in creation order (as the
    samples of prometheus_client's metrics are)."""

    kind = None

    def __init__(self, name, documentation, labelnames, registry, lock):
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self._lock = lock
        self.children = {}
        registry.register(self)

    def labels(self, *values):
        values = tuple(str(v) for v in values)
        if len(values) != len(self.labelnames):
            raise ValueError("Incorrect label count")
        child = self.children.get(values)
        if child is None:
            with self._lock:
                child = self.children.get(values)
                if child is None:
                    child = self.children[values] = self._new_child()
        return child

    def collect(self):
        metric = Metric(self.name, self.documentation, self.kind)
        with self._lock:
            children = list(self.children.items())
        for values, child in children:
            labels = dict(zip(self.labelnames, values))
            self._add_samples(metric, labels, child)
        return [metric]


class Counter(_Family):
    kind = "counter"

    def __init__(self, name, documentation, labelnames, registry, lock):
        super().__init__(name[:-len("_total")] if name.endswith("_total") else name,
                         documentation, labelnames, registry, lock)

    def _new_child(self):
        return _CounterChild(self._lock)

    def _add_samples(self, metric, labels, child):
        metric.add_sample(self.name + "_total", labels, child._value.value)
        metric.add_sample(self.name + "_created", labels, child.created)


class Histogram(_Family):
    kind = "histogram"

    def _new_child(self):
        return _HistogramChild(self._lock, LATENCY_BUCKETS)

    def _add_samples(self, metric, labels, child):
        with self._lock:
            counts, total = list(child.counts), child.sum
        cumulative = 0.0
        for bound, count in zip(LATENCY_BUCKETS + (float("inf"),), counts):
            cumulative += count
            metric.add_sample(self.name + "_bucket",
                              dict(labels, le=floatToGoString(bound)), cumulative)
        metric.add_sample(self.name + "_count", labels, cumulative)
        metric.add_sample(self.name + "_sum", labels, total)
        metric.add_sample(self.name + "_created", labels, child.created)


class Metrics:
    """Prometheus metrics of one server process (own CollectorRegistry, so tests and
    several apps in one process do not collide)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        lock = self._lock = threading.Lock()
        self.requests = Counter("fleetid_http_requests_total", "HTTP requests",
                                ["service", "endpoint", "status"], self.registry, lock)
        self.verdicts = Counter("fleetid_verifier_verdicts_total",
                                "Client certificate verdicts by reason (ok = accepted)",
                                ["reason"], self.registry, lock)
        self.cache = Counter("fleetid_verifier_cache_total", "Verdict cache lookups",
                             ["result"], self.registry, lock)
        self.issued = Counter("fleetid_est_issued_total", "Certificates issued through EST",
                              ["label", "operation"], self.registry, lock)
        self.latency = Histogram("fleetid_http_request_seconds", "Request handling time",
                                 ["service", "endpoint"], self.registry, lock)
        # The children of the label sets seen so far, by the callers' own values (a
        # handful: endpoints x statuses), so a count is one dict lookup.
        self._verdict_children = {}
        self._request_children = {}

    def on_verdict(self, reason, cached):
        children = self._verdict_children.get((reason, cached))
        if children is None:
            children = self._verdict_children[(reason, cached)] = (
                self.verdicts.labels(reason)._value,
                self.cache.labels("hit" if cached else "miss")._value)
        with self._lock:
            children[0].value += 1.0
            children[1].value += 1.0

    def request_done(self, service, endpoint, status, elapsed):
        """Count one answered request and observe its handling time."""
        key = (service, endpoint, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(service, endpoint, str(status))._value,
                self.latency.labels(service, endpoint))
        latency = children[1]
        with self._lock:
            children[0].value += 1.0
            latency.sum += elapsed
            latency.counts[bisect.bisect_left(LATENCY_BUCKETS, elapsed)] += 1.0
