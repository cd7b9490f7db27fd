"""fleetid.cloud.est: the EST server (RFC 7030, RFC 8951) in front of the attestation-gated
issuing CAs.

    messages.py  sans-I/O formats: base64 bodies, certs-only PKCS#7, CsrAttrs, paths
    service.py   EstService: enrolment / re-enrolment policy, labels -> issuing CAs,
                 approvals (202), overlap rotation state
The HTTP handlers are fleetid.cloud.http.est_app; refusals are the domain errors of
fleetid.cloud.verifier.errors, rendered through the one table fleetid.cloud.http.errors.
"""
