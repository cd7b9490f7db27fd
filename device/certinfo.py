# What the device agent needs to know about an X.509 certificate, read with the portable
# strict DER reader (common/der.py).  Portable: CPython and MicroPython.  No signature is
# checked here: the certificate came from the SE (stored after the agent checked that it
# names the SE's own key) or from the CA over a server-authenticated channel.
#
# Parsing is common/x509.py's (strict DER X.509 v3, P-256, ecdsa-with-SHA256; the AKI's
# keyIdentifier, RFC 5280 4.2.1.1); this module keeps the facts a revocation check reads.

from fleetid.common import x509


class CertFacts:
    """serial (int), not_before / not_after (int seconds since 1970-01-01 UTC),
    common_name / serial_number (str or None: the subject's CN and serialNumber),
    point (65-byte uncompressed P-256 public key), authority_key_id (bytes: the issuing
    CA's key identifier from the AKI extension, or None)."""

    def __init__(self, serial, not_before, not_after, common_name, serial_number, point,
                 authority_key_id=None):
        self.authority_key_id = authority_key_id
        self.serial = serial
        self.not_before = not_before
        self.not_after = not_after
        self.common_name = common_name
        self.serial_number = serial_number
        self.point = point


def certificate_facts(cert_der):
    """Parse the facts above out of a DER certificate.

    Returns: CertFacts.  Raises: DerError when it is not a strict DER X.509 v3 certificate
    with a P-256 key signed with ecdsa-with-SHA256 (common/x509.py).
    """
    cert = x509.parse_certificate(cert_der)
    return CertFacts(cert.serial, cert.not_before, cert.not_after, cert.common_name,
                     cert.serial_number, cert.point, cert.authority_key_id)
