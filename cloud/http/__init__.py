"""fleetid.cloud.http: the HTTP layer of the fleet cloud, above the services it serves
(cloud/est, cloud/verifier: they know no HTTP).

    errors.py        THE table: domain reason -> HTTP status; the error response
    middleware.py    error rendering, request metrics, JSON access lines, bounded bodies
    tls.py           server SSLContext, the request's peer certificate
    metrics.py       Prometheus metrics of one server process
    verifier_app.py  the verifier's aiohttp handlers (make_verifier_app, make_metrics_app)
    verifier_fast.py the verifier's hot GET routes off aiohttp's request path (the same
                     checks), everything else handed to verifier_app
    est_app.py       the EST server's aiohttp handlers (make_est_app)
    revocation_app.py  the revocation listener: every revocation tier's routes
                     (make_revocation_app), the verifier's staple header

fleetid.cloud.server composes them into the running cloud.
"""
