"""device/certcheck.py on the certificates the line and EST really issue, with the fleet
root held by a personalised emulated SE (every signature verified by the SE's VERIFY):
the checks one at a time with their boundaries, the cacerts filter, and the strict parser
under truncation and bit flips (hypothesis)."""

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetid.common import se_consts as C
from fleetid.device import certcheck
from fleetid.device.certcheck import CertificateChecker, CertificateRefused
from tests.device.agent_support import Fleet
from tests.device.hostile_est_support import Forger

DER = serialization.Encoding.DER


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("certcheck"), devices=2)
    report = fleet.agent(0).run_once()  # the first enrolment, through the real EST
    se = fleet.cloud.session(0)
    honest = bytes(se.get_cert(report.slot))
    yield fleet, se, honest, report.slot
    fleet.close()


def _checker(se):
    return CertificateChecker(se)


def _cas(fleet, se, now):
    line = fleet.cloud.line
    return _checker(se).verified_cas([line.ca_cert.public_bytes(DER),
                                      line.root_cert.public_bytes(DER)], now)


def _point(se, slot):
    return bytes(se.public_key(slot)[1])


def _identity(se):
    return certcheck.parse_certificate(se.get_cert(C.SLOT_IDENTITY))


def test_an_issued_certificate_passes_every_check(rig):
    fleet, se, honest, slot = rig
    now = fleet.clock.now()
    cas = _cas(fleet, se, now)
    assert [(ca.subject, ca.depth) for ca in cas] == [
        (fleet.cloud.line.ca_cert.subject.public_bytes(), 1)]
    cert = _checker(se).check_issued(honest, cas, _point(se, slot), _identity(se), now)
    parsed = x509.load_der_x509_certificate(honest)
    assert cert.serial == parsed.serial_number
    assert cert.not_after == int(parsed.not_valid_after_utc.timestamp())
    assert cert.uris == ["urn:fleetid:device:" + cert.common_name]
    assert cert.eku == ["1.3.6.1.5.5.7.3.2"] and not cert.is_ca


def test_validity_boundaries_on_the_agents_clock(rig):
    fleet, se, honest, slot = rig
    cert = certcheck.parse_certificate(honest)
    checker = _checker(se)
    cas = _cas(fleet, se, cert.not_before)
    args = (cas, _point(se, slot), _identity(se))
    checker.check_issued(honest, *args, now=cert.not_after)  # the last valid second
    checker.check_issued(honest, *args, now=cert.not_before - checker.skew_s)
    with pytest.raises(CertificateRefused) as refused:
        checker.check_issued(honest, *args, now=cert.not_after + 1)
    assert refused.value.reason == certcheck.REASON_EXPIRED
    with pytest.raises(CertificateRefused) as refused:
        checker.check_issued(honest, *args, now=cert.not_before - checker.skew_s - 1)
    assert refused.value.reason == certcheck.REASON_NOT_YET_VALID


def test_the_wrong_slot_key_and_another_devices_identity_are_refused(rig):
    fleet, se, honest, slot = rig
    now = fleet.clock.now()
    cas = _cas(fleet, se, now)
    with pytest.raises(CertificateRefused) as refused:
        _checker(se).check_issued(honest, cas, _point(se, C.SLOT_IDENTITY), _identity(se),
                                  now)
    assert refused.value.reason == certcheck.REASON_KEY
    other = certcheck.parse_certificate(fleet.cloud.session(1).get_cert(C.SLOT_IDENTITY))
    with pytest.raises(CertificateRefused) as refused:
        _checker(se).check_issued(honest, cas, _point(se, slot), other, now)
    assert refused.value.reason == certcheck.REASON_IDENTITY


def test_cacerts_keeps_only_cas_that_chain_to_the_root_in_the_se(rig):
    fleet, se, honest, _slot = rig
    line = fleet.cloud.line
    forger = Forger(fleet.cloud)  # reads both chips' identities (a fresh boot of each)
    se = fleet.cloud.session(0)
    now = fleet.clock.now()
    candidates = [forger.lookalike_ca.public_bytes(DER),  # the real CA's name, not its key
                  honest,  # not a CA
                  line.root_cert.public_bytes(DER),  # the anchor itself
                  b"\x30\x03\x02\x01\x01",  # not a certificate
                  forger.unconfigured_ca.public_bytes(DER),  # root-certified: kept
                  line.ca_cert.public_bytes(DER)]
    kept = _checker(se).verified_cas(candidates, now)
    assert sorted(ca.subject for ca in kept) == sorted(
        [line.ca_cert.subject.public_bytes(), forger.unconfigured_ca.subject.public_bytes()])
    # An expired CA is left out.
    assert _checker(se).verified_cas([line.ca_cert.public_bytes(DER)],
                                     int(line.ca_cert.not_valid_after_utc.timestamp()) + 1) \
        == []


def test_the_se_must_hold_the_fleet_root(rig):
    fleet, se, _honest, _slot = rig
    from fleetid.common.errors import ReferenceNotFound

    class NoAnchor:
        def get_data(self, tag, size=-1, le=0):
            raise ReferenceNotFound(0x6A88)

    with pytest.raises(ReferenceNotFound):
        CertificateChecker(NoAnchor())
    with pytest.raises(CertificateRefused):
        CertificateChecker(se, root_der=b"\x30\x00")


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_parser_refuses_truncations_and_flips_with_its_own_error(rig, data):
    _fleet, _se, honest, _slot = rig
    cut = data.draw(st.integers(0, len(honest) - 1))
    with pytest.raises(CertificateRefused):
        certcheck.parse_certificate(honest[:cut])
    at = data.draw(st.integers(0, len(honest) - 1))
    flipped = bytearray(honest)
    flipped[at] ^= data.draw(st.integers(1, 255))
    try:
        certcheck.parse_certificate(bytes(flipped))  # a flip inside a value may parse
    except CertificateRefused as exc:
        assert exc.reason in (certcheck.REASON_MALFORMED, certcheck.REASON_UNSUPPORTED,
                              certcheck.REASON_TOO_LARGE)
    junk = data.draw(st.binary(max_size=64))
    with pytest.raises(CertificateRefused):
        certcheck.parse_certificate(junk)


def test_the_size_limit_is_the_se_slots(rig):
    _fleet, _se, honest, _slot = rig
    assert certcheck.CERT_MAX == C.CERT_MAX
    with pytest.raises(CertificateRefused) as refused:
        certcheck.parse_certificate(honest + b"\x00" * (C.CERT_MAX + 1 - len(honest)))
    assert refused.value.reason == certcheck.REASON_TOO_LARGE


def test_a_long_cacerts_list_costs_a_bounded_number_of_se_verifies(rig):
    fleet, se, _honest, _slot = rig
    line = fleet.cloud.line
    lookalike = Forger(fleet.cloud).lookalike_ca.public_bytes(DER)
    se = fleet.cloud.session(0)
    verifies = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def get_data(self, *args):
            return self.inner.get_data(*args)

        def verify(self, *args, **kwargs):
            verifies.append(1)
            return self.inner.verify(*args, **kwargs)

    checker = CertificateChecker(Counting(se))
    candidates = [lookalike] * 100 + [line.ca_cert.public_bytes(DER)]
    assert checker.verified_cas(candidates, fleet.clock.now()) == []  # the real CA: #101
    assert len(verifies) == certcheck.MAX_CANDIDATES
