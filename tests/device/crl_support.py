"""CRLs for the device-side cache tests: made by the cloud publisher (cloud/revocation)
or, for the bad cases, by `cryptography` with chosen numbers, times, issuers and keys
(signed through the fleet's HSM unless the test wants another key)."""

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.pki.signing import sign_crl


class MemoryStore:
    """The cache's store in RAM; counts writes."""

    def __init__(self, data=None):
        self.data = data
        self.writes = 0

    def load(self):
        return self.data

    def store(self, data):
        self.data = bytes(data)
        self.writes += 1


def point_of(public_key):
    return public_key.public_bytes(serialization.Encoding.X962,
                                   serialization.PublicFormat.UncompressedPoint)


def epoch(when):
    return int(when.timestamp())


def make_crl(fleet, number, this_update, revoked=(), next_update=None, batch="b42",
             issuer_name=None, key=None, extensions=()):
    """A DER CRL of `batch`'s CA.  revoked: (serial, datetime) pairs.  key: sign with this
    private key instead of the CA's HSM key.  extensions: (ExtensionType, critical)."""
    ca = fleet.ca_certs[batch]
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(issuer_name or ca.subject)
               .last_update(this_update)
               .next_update(next_update or this_update + datetime.timedelta(hours=24))
               .add_extension(x509.CRLNumber(number), critical=False))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
            .build())
    if key is not None:
        crl = builder.sign(key, hashes.SHA256())
    else:
        crl = sign_crl(fleet.hsm, "ca-widget-" + batch, builder, ca.public_key())
    return crl.public_bytes(serialization.Encoding.DER)


def other_key():
    return ec.generate_private_key(ec.SECP256R1())
