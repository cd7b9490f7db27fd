"""/metrics of `fleetid cloud serve --workers N` reports the whole service: the kernel hands
a scrape to one worker, and what it answers must be every worker's counts summed
(prometheus_client's multiprocess mode over a directory private to the run), including those of a
worker that was killed and restarted in between, so a Prometheus rate() never sees the
service's counters jump down."""

import http.client
import os
import re
import signal
import ssl
import time

from bench._serve_support import CloudServe
from bench.mtls import free_port

REQUESTS = 30


def _cacerts(port, context):
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        conn.request("GET", "/.well-known/est/cacerts")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _scrape(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def _est_requests_reported(port):
    """fleetid_http_requests_total summed over the EST service's series, one scrape."""
    text = _scrape(port)
    series = re.findall(r'^fleetid_http_requests_total\{(.*)\} (\S+)$', text, re.M)
    return sum(float(value) for labels, value in series if 'service="est"' in labels)


def test_a_scrape_on_any_worker_reports_every_workers_requests(tmp_path, monkeypatch):
    metrics_port = free_port()
    config = tmp_path / "cloud.toml"
    config.write_text('state_dir = "%s"\nverifier_port = 0\nest_port = 0\ncrl_port = 0\n'
                      "metrics_port = %d\n" % (tmp_path / "state", metrics_port))
    temporary = tmp_path / "tmp"  # the server's TMPDIR: its metrics directory goes there
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    serve = CloudServe(config, tmp_path / "serve.log", workers=2, cwd=str(tmp_path))
    try:
        assert [p.name[:16] for p in temporary.iterdir()] == ["fleetid-metrics-"]
        context = ssl.create_default_context(cafile=serve.info["root"])
        est = serve.ports["est"]
        assert [_cacerts(est, context) for _ in range(REQUESTS)] == [200] * REQUESTS
        # A killed worker's counts stay in the sum after the parent restarts it.
        os.kill(serve.workers[0], signal.SIGKILL)
        end = time.monotonic() + 30
        while " restarted (pid " not in serve.log():
            assert time.monotonic() < end, serve.log()[-2000:]
            time.sleep(0.1)
        assert [_cacerts(est, context) for _ in range(10)] == [200] * 10
        # Each scrape is a new connection the kernel may hand to either worker.
        reported = [_est_requests_reported(serve.ports["metrics"]) for _ in range(8)]
        assert reported == [REQUESTS + 10] * 8
    finally:
        assert serve.stop() == 0
    assert list(temporary.iterdir()) == []  # removed with the run

