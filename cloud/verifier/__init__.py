"""fleetid.cloud.verifier: the mTLS verifier of the fleet cloud.

    service.py  FleetTrust, FleetVerifier (checks, verdict cache, explain), DeviceIdentity
    errors.py   domain errors and THE table mapping them to HTTP status
    http.py     TLS contexts, peer certificate, error rendering, metrics, JSON logs
    app.py      aiohttp handlers (make_verifier_app, make_metrics_app)
    server.py   configuration -> running verifier + EST (CloudServer, build_context)
"""
