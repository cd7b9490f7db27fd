"""Batch revocation in the CRL tier: the fleet root's CRL (an authority revocation list,
RFC 5280 5: a CRL whose entries are CA certificates) lists each revoked issuing CA once.

A device on the intermittent tier keeps two CRL caches (device/crl_cache.py, one per
issuer): its peer's issuing CA's CRL, and the root's.  The peer's CA certificate serial on
the root's CRL refuses every device of that batch with one entry, as the revoked-CA file
does for the verifier and OCSP and the CA key identifier does in the compact set.

    view = RootCrlRegistry(registry, revoked_cas_path, root_cert)
    publisher = CrlPublisher(view, [CrlIssuer("root", hsm, "fleet-root", root_cert)] + ...)

RootCrlRegistry answers `revoked_certificates(root subject)` from the revoked-CA file (the
entries carry the CA certificate, hence its serial) and passes every other call to the
registry, so one CrlPublisher serves the issuing CAs' CRLs and the root's.  The root key
signs it: on the embedded set-up it is in the HSM; with an offline root the ARL is signed
at a ceremony with a long nextUpdate instead (not built here).
"""


from fleetid.cloud.verifier import revoked_cas as revoked_cas_file


class _RevokedCa:
    # The fields CrlPublisher reads from a CertificateRecord.
    def __init__(self, cert_serial, revoked_at, revocation_reason):
        self.cert_serial = cert_serial
        self.revoked_at = revoked_at
        self.revocation_reason = revocation_reason


class RootCrlRegistry:
    """A registry view whose root-issuer revocations come from the revoked-CA file."""

    def __init__(self, registry, revoked_cas_path, root_cert):
        self._registry = registry
        self._path = revoked_cas_path
        self._root_text = root_cert.subject.rfc4514_string()
        self._root_subject = root_cert.subject

    def __getattr__(self, name):
        return getattr(self._registry, name)

    def revoked_certificates(self, issuer):
        if issuer != self._root_text:
            return self._registry.revoked_certificates(issuer)
        out = []
        for entry, cert, _when in revoked_cas_file.decoded(self._path):
            if cert.issuer != self._root_subject:
                continue  # not a CA this root issued
            out.append(_RevokedCa("%x" % cert.serial_number, entry["revoked_at"],
                                  entry.get("reason")))
        out.sort(key=lambda r: int(r.cert_serial, 16))
        return out

