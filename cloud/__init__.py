"""fleetid.cloud: fleet PKI, HSM, issuing CA, factory line, EST, verifier, registry (later issues)."""
