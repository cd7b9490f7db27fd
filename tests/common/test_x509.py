"""common/x509.py, the one X.509 reader under device/certcheck, common/tls13_cert and
device/certinfo: the facts it reads from certificates the project's PKI profiles make
(cloud/pki/profiles.py) agree with cryptography's reading, a chain verifies through an
injected ECDSA verify, and any bytes give a Certificate or a DerError, nothing else
(hypothesis: truncations, bit flips, random bytes)."""

import datetime
import ipaddress

import pytest
from cryptography import x509 as cx509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetid.cloud.pki import profiles
from fleetid.common import der, x509
from fleetid.common.errors import DerError, VerificationFailed
from fleetid.common.host.tls13_host import ecdsa_verify

DER = serialization.Encoding.DER
NOW = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.timezone.utc)
SAMPLES = settings(max_examples=150, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])


def _name(text):
    return cx509.Name([cx509.NameAttribute(NameOID.COMMON_NAME, text)])


@pytest.fixture(scope="module")
def pki():
    years = datetime.timedelta(days=3700)
    root_key, ca_key, device_key, server_key = (ec.generate_private_key(ec.SECP256R1())
                                                for _ in range(4))
    root = profiles.root_builder(_name("x509 root"), root_key.public_key(), NOW,
                                 NOW + 2 * years).sign(root_key, hashes.SHA256())
    ca = profiles.issuing_ca_builder(_name("x509 CA"), ca_key.public_key(), root, NOW,
                                     NOW + years).sign(root_key, hashes.SHA256())
    device = profiles.device_builder("operational", "FID-000000042", device_key.public_key(),
                                     ca, NOW, crl_url="http://crl.example/ca.crl") \
        .sign(ca_key, hashes.SHA256())
    server = profiles.server_certificate_builder(server_key.public_key(), ca,
                                                 ["est.example", "10.0.0.7"], NOW) \
        .sign(ca_key, hashes.SHA256())
    return {"root": root, "ca": ca, "device": device, "server": server}


def test_a_device_certificate_reads_as_cryptography_reads_it(pki):
    expected = pki["device"]
    cert = x509.parse_certificate(expected.public_bytes(DER))
    assert cert.serial == expected.serial_number
    assert cert.not_before == int(expected.not_valid_before_utc.timestamp())
    assert cert.not_after == int(expected.not_valid_after_utc.timestamp())
    assert cert.issuer == pki["ca"].subject.public_bytes()
    assert cert.subject == expected.subject.public_bytes()
    assert (cert.common_name, cert.serial_number) == ("FID-000000042", "FID-000000042")
    assert cert.point == expected.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    assert cert.is_ca is False and cert.path_len is None
    assert cert.key_usage == x509.KU_DIGITAL_SIGNATURE
    assert cert.eku == [x509.OID_CLIENT_AUTH]
    assert cert.uris == ["urn:fleetid:device:FID-000000042"]
    aki = expected.extensions.get_extension_for_class(cx509.AuthorityKeyIdentifier).value
    assert cert.authority_key_id == aki.key_identifier
    assert cert.unknown_critical is None
    assert bytes(cert.tbs()) == expected.tbs_certificate_bytes
    assert cert.signature == expected.signature


def test_a_ca_and_a_server_certificate(pki):
    ca = x509.parse_certificate(pki["ca"].public_bytes(DER))
    assert ca.is_ca is True and ca.key_usage & x509.KU_KEY_CERT_SIGN
    constraints = pki["ca"].extensions.get_extension_for_class(cx509.BasicConstraints).value
    assert ca.path_len == constraints.path_length
    server = x509.parse_certificate(pki["server"].public_bytes(DER))
    assert server.eku == [x509.OID_SERVER_AUTH]
    assert server.dns_names == ["est.example"]
    assert server.ip_addresses == [ipaddress.ip_address("10.0.0.7").packed]


def test_the_chain_verifies_with_an_injected_verify_and_finds_its_issuers(pki):
    root, ca, device = (x509.parse_certificate(pki[n].public_bytes(DER))
                        for n in ("root", "ca", "device"))
    assert x509.find_issuer(device, [root, ca]) is ca
    assert x509.find_issuer(ca, [device, root]) is root
    assert x509.find_issuer(root, [root]) is None  # not its own issuer
    x509.verify_signature(device, ca.point, ecdsa_verify)
    x509.verify_signature(ca, root.point, ecdsa_verify)
    with pytest.raises(VerificationFailed):
        x509.verify_signature(device, root.point, ecdsa_verify)


def test_validity_boundaries(pki):
    cert = x509.parse_certificate(pki["device"].public_bytes(DER))
    assert x509.time_status(cert, cert.not_before) is None
    assert x509.time_status(cert, cert.not_before - 1) == x509.NOT_YET_VALID
    assert x509.time_status(cert, cert.not_before - 300, 300) is None
    assert x509.time_status(cert, cert.not_after) is None
    assert x509.time_status(cert, cert.not_after + 1) == x509.EXPIRED


def test_an_unknown_critical_extension_is_reported_not_ignored(pki):
    key = ec.generate_private_key(ec.SECP256R1())
    unknown = cx509.UnrecognizedExtension(cx509.ObjectIdentifier("1.3.6.1.4.1.99999.1"),
                                          der.encode_null())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    cert = profiles.device_builder("operational", "FID-000000043", key.public_key(), pki["ca"],
                                   NOW, extra_extensions=[(unknown, True)]) \
        .sign(ca_key, hashes.SHA256())
    assert x509.parse_certificate(cert.public_bytes(DER)).unknown_critical == \
        "1.3.6.1.4.1.99999.1"


def _parse_or_der_error(data):
    try:
        cert = x509.parse_certificate(data)
    except DerError:
        return None
    assert isinstance(cert, x509.Certificate)
    return cert


@SAMPLES
@given(st.sampled_from(["root", "ca", "device", "server"]), st.data())
def test_truncations_and_bit_flips_give_a_certificate_or_a_der_error(pki, which, data):
    encoded = pki[which].public_bytes(DER)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    assert _parse_or_der_error(encoded[:cut]) is None
    flips = data.draw(st.lists(st.integers(0, len(encoded) * 8 - 1), min_size=1, max_size=4))
    mutated = bytearray(encoded)
    for bit in flips:
        mutated[bit // 8] ^= 0x80 >> (bit % 8)
    _parse_or_der_error(bytes(mutated))


@SAMPLES
@given(st.binary(max_size=400))
def test_random_bytes_give_a_der_error(data):
    assert _parse_or_der_error(data) is None
