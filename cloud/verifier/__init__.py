"""fleetid.cloud.verifier: the mTLS verifier of the fleet cloud.

    service.py      FleetTrust, FleetVerifier (checks, verdict cache, explain), DeviceIdentity
    errors.py       domain errors and their reason codes (the cloud's services raise them)
    revoked_cas.py  the revoked-CA file every process reads
The HTTP handlers are fleetid.cloud.http.verifier_app (status table: fleetid.cloud.http
.errors); fleetid.cloud.server composes verifier + EST + CRL into the running cloud.
Nothing here imports fleetid.cloud.est: EST builds on the verifier, not the reverse.
"""
