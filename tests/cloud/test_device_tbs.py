"""The device TBS template (cloud/pki/device_tbs.py) writes the same bytes as
cryptography's builder (profiles.device_builder + signing.tbs_of): on the certificates the
line and EST really issue, and with hypothesis over serials, times, keys, CRL URLs and
extension values.  A template that cannot reproduce the builder is not used."""

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetid.cloud.ca import IssuingCa
from fleetid.cloud.ca.evidence import ATTESTATION_EXTENSION_OID
from fleetid.cloud.pki import PkiError, device_tbs, profiles
from fleetid.cloud.pki.signing import tbs_of
from fleetid.common.oids import OID_EXT_ATTESTATION

UTC = datetime.timezone.utc


def _rebuilt(cert, profile, issuer, crl_url):
    """The builder's TBS for the fields of an issued certificate."""
    extension = cert.extensions.get_extension_for_oid(ATTESTATION_EXTENSION_OID).value
    serial = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    return tbs_of(profiles.device_builder(
        profile, serial, cert.public_key(), issuer,
        cert.not_valid_before_utc + profiles.NOT_BEFORE_BACKDATE, crl_url=crl_url,
        extra_extensions=[(extension, False)], serial_number=cert.serial_number))


def test_the_line_and_est_issue_the_builders_bytes_through_the_template(fleet):
    device = fleet.provision()
    fleet.enrol(device)
    ca = fleet.cas["b42"]
    assert [t is not None for t in ca._templates.values()] == [True, True]
    for cert, profile in ((device.identity_cert, "identity"), (device.cert, "operational")):
        assert cert.tbs_certificate_bytes == _rebuilt(cert, profile, ca.ca_certificate, None)
        cert.verify_directly_issued_by(ca.ca_certificate)


_ROOT_KEY = ec.generate_private_key(ec.SECP256R1())
_ISSUER = profiles.issuing_ca_builder(
    x509.Name.from_rfc4514_string("CN=Widget CA b42,OU=batch:b42,O=Acme"),
    _ROOT_KEY.public_key(),
    x509.CertificateBuilder().subject_name(
        x509.Name.from_rfc4514_string("CN=Fleet Root,O=Acme")).issuer_name(
        x509.Name.from_rfc4514_string("CN=Fleet Root,O=Acme")).public_key(
        _ROOT_KEY.public_key()).serial_number(1).not_valid_before(
        datetime.datetime(2000, 1, 1, tzinfo=UTC)).not_valid_after(
        datetime.datetime(2200, 1, 1, tzinfo=UTC)).add_extension(
        x509.SubjectKeyIdentifier.from_public_key(_ROOT_KEY.public_key()), False).sign(
        _ROOT_KEY, hashes.SHA256()),
    datetime.datetime(2000, 1, 1, tzinfo=UTC), datetime.datetime(2199, 1, 1, tzinfo=UTC),
).sign(_ROOT_KEY, hashes.SHA256())
_TEMPLATES = {}


def _template(profile, crl_url):
    key = (profile, crl_url)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = device_tbs.DeviceTbsTemplate(profile, _ISSUER, crl_url,
                                                       extra_oids=[OID_EXT_ATTESTATION])
    return _TEMPLATES[key]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(serial=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9.-]{0,63}\Z").filter(
           lambda s: not profiles.is_reserved_name(s)),
       profile=st.sampled_from(["identity", "operational", "operational-short"]),
       crl_url=st.sampled_from([None, "http://crl.example/b42.crl"]),
       moment=st.datetimes(min_value=datetime.datetime(1951, 1, 1),
                           max_value=datetime.datetime(2150, 1, 1), timezones=st.just(UTC)),
       scalar=st.integers(min_value=1, max_value=2**255),
       serial_number=st.integers(min_value=1, max_value=2**159 - 1),
       value=st.binary(max_size=400))
def test_the_template_writes_the_builders_bytes(serial, profile, crl_url, moment, scalar,
                                                serial_number, value):
    key = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
    extension = x509.UnrecognizedExtension(ATTESTATION_EXTENSION_OID, value)
    expected = tbs_of(profiles.device_builder(
        profile, serial, key, _ISSUER, moment, crl_url=crl_url,
        extra_extensions=[(extension, False)], serial_number=serial_number))
    template = _template(profile, crl_url)
    assert template.tbs(serial, device_tbs._spki(key), moment, [value],
                        serial_number=serial_number) == expected


def test_the_template_refuses_what_the_builder_refuses():
    template = _template("operational", None)
    key = device_tbs._spki(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(PkiError) as info:
        template.tbs("fleet-verifier", key, datetime.datetime.now(UTC), [b""])
    assert info.value.reason == PkiError.BAD_INPUT
    with pytest.raises(PkiError) as info:
        template.tbs("WX-1", key, datetime.datetime(2199, 1, 1, tzinfo=UTC), [b""])
    assert info.value.reason == PkiError.VALIDITY
    with pytest.raises(PkiError):
        template.tbs("WX-1", key[:-1], datetime.datetime.now(UTC), [b""])


def test_a_template_that_differs_from_the_builder_is_not_used(fleet, monkeypatch):
    real = device_tbs.DeviceTbsTemplate.tbs

    def off_by_one(self, *args, **kwargs):
        tbs = real(self, *args, **kwargs)
        return tbs[:-1] + bytes([tbs[-1] ^ 1])

    monkeypatch.setattr(device_tbs.DeviceTbsTemplate, "tbs", off_by_one)
    with pytest.raises(device_tbs.TemplateMismatch):
        device_tbs.DeviceTbsTemplate("identity", _ISSUER)
    ca = IssuingCa(fleet.hsm, "ca-widget-b42", fleet.ca_certs["b42"], [fleet.vendor.root])
    fleet.cas["b42"] = ca
    device = fleet.provision()
    assert ca._templates == {("identity", profiles.IDENTITY.validity): None}
    assert device.identity_cert.tbs_certificate_bytes == _rebuilt(
        device.identity_cert, "identity", ca.ca_certificate, None)
