"""audit.certificate_facts(der, cert) (the parsed certificate the line already has, the
issuer's string cached by its DER) gives the answer from the DER alone exactly, issuer
names with escapes included."""

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fleetid.cloud import audit
from fleetid.cloud.audit import entries


def _cert(serial, issuer_cn):
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, issuer_cn),
                        x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Fleet, Inc.")])
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "FID-000000001")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(serial).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert, cert.public_bytes(serialization.Encoding.DER)


def test_facts_from_the_parsed_certificate_equal_the_ones_from_the_der():
    for serial, cn in ((0x0ABC, 'CA "one"+'), (1, "CA two"), (0x0ABC, 'CA "one"+')):
        cert, der = _cert(serial, cn)
        assert audit.certificate_facts(der, cert) == audit.certificate_facts(der)
        assert entries._ISSUER_NAMES[entries.issuer_der(der)] == cert.issuer.rfc4514_string()
