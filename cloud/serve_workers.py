"""`fleetid cloud serve --workers N`: N processes serving the same listeners, composed
from cloud/server.py's parts (cloud/http/workers.py is the supervisor: the parent binds,
forks and restarts).

What the workers share lives outside them: the registry's database, the HSM, the state
directory's files, and - for /metrics - one directory of memory-mapped metric files
(prometheus_client's multiprocess mode), so a scrape answered by any worker reports the
whole service, not the one process the kernel happened to hand the connection to.
"""

import shutil

from fleetid.cloud.config import ConfigError
from fleetid.cloud.http.metrics import Metrics, new_shared_dir
from fleetid.cloud.http.sites import serve_forever
from fleetid.cloud.http.tls import TICKETS_STATELESS
from fleetid.cloud.server import CloudServer, ListenError, build_context


def serve_workers(config, environ, workers, ready=None, **supervisor_options):
    """N processes serving the same listeners (module docstring).

    The parent first builds the context once (the embedded PKI's bootstrap and the
    registry's migrations happen there, before any worker) and closes it; each worker
    then opens its own HSM session and registry connections.  Only worker 0 signs audit
    checkpoints (one witness anchor writer).  The metrics directory is made before the
    first fork and removed when the run ends.  `ready(ports, pids)` is
    called once every worker serves.  Returns the exit status (0 after SIGTERM / SIGINT,
    1 after a crash loop).

    Raises ConfigError for workers > 1 on a "memory:" registry (its nonces, approvals and
    audit chain would be one per process), ListenError, SupervisorError("not_ready").
    """
    from fleetid.cloud.http.workers import ListenerBindError, Supervisor, bind_listeners

    if workers > 1 and config.registry.startswith("memory:"):
        raise ConfigError("--workers %d needs a registry in a database (sqlite:<path> on "
                          "one host, postgresql://... across hosts): a memory: registry "
                          "would give each worker its own nonces, approvals and audit chain"
                          % workers)
    context = build_context(config, environ)
    try:
        # One TLS context made here, before the fork, with stateless tickets: every
        # worker then seals and opens tickets with the same key, and a device resumes
        # on whichever worker the kernel hands its connection to (cloud/http/tls.py).
        parent = CloudServer.from_context(context, tls_tickets=TICKETS_STATELESS)
        listeners, tls_context = parent.listeners(), parent.tls_context
    finally:
        context.close()
    try:
        sockets = bind_listeners(listeners)
    except ListenerBindError as exc:
        raise ListenError(exc.listener, exc.host, exc.port, exc.cause) from None
    metrics_dir = new_shared_dir() if config.metrics_port else None

    def run_worker(index, worker_ready):
        worker_context = build_context(config, environ)
        try:
            overrides = {"sockets": sockets, "tls_context": tls_context,
                         "metrics": Metrics(shared_dir=metrics_dir)}
            if index:
                overrides["checkpointer"] = None
            server = CloudServer.from_context(worker_context, **overrides)
            serve_forever(server, lambda _ports: worker_ready(), event_loop=config.event_loop)
        finally:
            worker_context.close()

    supervisor = Supervisor(workers, run_worker, **supervisor_options)
    try:
        pids = supervisor.start()
        if ready:
            ready({name: sock.getsockname()[1] for name, sock in sockets.items()}, pids)
        return supervisor.run()
    finally:
        for sock in sockets.values():
            sock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
