"""The EST server (RFC 7030 / RFC 8951) over real TLS on 127.0.0.1: operations, content
types, status codes, attestation-gated enrolment and re-enrolment, the attack list of the
cloud issue (each refused with its reason, nothing written), and malformed bodies.

TLS clients use the software device keys the test vendor generated (see
tests/cloud/cloud_support.py: Python's ssl cannot sign with an SE-held key).
"""

import base64
import datetime

import pytest
from cryptography.hazmat.primitives.serialization import pkcs7
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetid.cloud.est import messages
from fleetid.cloud.verifier.errors import AccessRefused, PendingApproval, RequestRefused
from fleetid.common import der as der_codec
from fleetid.common.oids import OID_ATTR_EVIDENCE
from tests.cloud.attestation_support import SoftVendor, enrolment, make_csr, new_key
from tests.cloud.cloud_support import Fleet, der

PKCS10 = {"Content-Type": "application/pkcs10"}


def b64(data):
    return base64.b64encode(data)


def post(cloud, op, device_files, csr_der, label=None, body=None, headers=PKCS10):
    path = "/.well-known/est/%s%s" % (label + "/" if label else "", op)
    return cloud.request("est", "POST", path, files=device_files,
                         body=b64(csr_der) if body is None else body, headers=headers)


def certs_from(body):
    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))


# -- the operations ---------------------------------------------------------------------------


def test_cacerts_returns_the_label_chain_as_base64_certs_only_pkcs7(fleet, cloud):
    for path, batch in (("/.well-known/est/cacerts", "b42"),
                        ("/.well-known/est/b43/cacerts", "b43")):
        status, headers, body = cloud.request("est", "GET", path)
        assert status == 200
        assert headers["Content-Type"] == "application/pkcs7-mime"
        assert set(certs_from(body)) == {fleet.ca_certs[batch], fleet.root}  # a DER SET


def test_csrattrs_asks_for_p256_ecdsa_and_the_evidence_attribute(cloud):
    status, headers, body = cloud.request("est", "GET", "/.well-known/est/csrattrs")
    assert status == 200 and headers["Content-Type"] == "application/csrattrs"
    text = base64.b64decode(body)
    assert text[0] == 0x30  # CsrAttrs ::= SEQUENCE OF AttrOrOID
    assert der_codec.encode_oid(OID_ATTR_EVIDENCE) in text
    assert der_codec.encode_oid("1.2.840.10045.4.3.2") in text


def test_simpleenroll_with_identity_certificate_and_fresh_attestation(fleet, cloud):
    device = fleet.provision()
    status, _, nonce_b64 = cloud.request("est", "GET", "/.well-known/est/nonce",
                                         files=device.files())
    assert status == 200
    nonce = base64.b64decode(nonce_b64)
    key, csr = enrolment(device.chip, nonce, device.name)
    status, headers, body = post(cloud, "simpleenroll", device.files(), csr)
    assert status == 200, body
    assert headers["Content-Type"] == "application/pkcs7-mime; smime-type=certs-only"
    [cert] = certs_from(body)
    assert cert.public_key() == key.public_key()
    assert cert.issuer == fleet.ca_certs["b42"].subject
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= datetime.timedelta(days=31)
    history = fleet.registry.certificates(device.serial)
    assert [c.kind for c in history] == ["identity", "operational"]
    assert fleet.registry.get_device(device.serial).rotation_state.startswith("active:")
    # The new certificate authenticates at the verifier.
    assert fleet.verifier.verify(der(cert)).kind == "operational"


def test_simplereenroll_rotates_with_overlap_closed_by_the_acknowledgement(fleet, cloud):
    device = fleet.provision()
    old = fleet.enrol(device)
    old_files = device.files()
    key, csr = device.csr()
    status, _, body = post(cloud, "simplereenroll", old_files, csr)
    assert status == 200, body
    [new] = certs_from(body)
    assert new.subject == old.subject and new.public_key() == key.public_key()
    new_files = device.files(new, key)
    # Inside the overlap window both authenticate.
    assert cloud.request("verifier", "GET", "/v1/whoami", files=old_files)[0] == 200
    assert cloud.request("verifier", "GET", "/v1/whoami", files=new_files)[0] == 200
    status, _, body = cloud.request("verifier", "POST", "/v1/rotation/ack", files=new_files)
    assert status == 200 and b"acked" in body
    status, _, body = cloud.request("verifier", "GET", "/v1/whoami", files=old_files)
    assert status == 403 and body.startswith(b"superseded")


def test_base64_with_or_without_line_breaks_and_any_transfer_encoding(fleet, cloud):
    """RFC 8951 3: whitespace in base64 is accepted; Content-Transfer-Encoding ignored."""
    device = fleet.provision()
    _, csr = device.csr()
    wrapped = messages.encode_base64(csr)
    assert b"\r\n" in wrapped
    status, _, body = post(cloud, "simpleenroll", device.files(), csr, body=wrapped,
                           headers=dict(PKCS10, **{"Content-Transfer-Encoding": "binary"}))
    assert status == 200, body
    _, csr = device.csr()
    status, _, body = post(cloud, "simplereenroll", device.files(), csr,
                           body=b64(csr).replace(b"A", b"A\n"))
    assert status == 403  # the identity cert cannot re-enrol: parsing was fine
    assert body.startswith(b"wrong_certificate_kind")


def test_status_codes_for_wrong_requests(fleet, cloud):
    device = fleet.provision()
    _, csr = device.csr()
    files = device.files()
    cases = [
        (("GET", "/.well-known/est/simpleenroll", files, None, {}), 405),
        (("POST", "/.well-known/est/cacerts", None, b"x", {}), 405),
        (("GET", "/.well-known/est/nope/cacerts", None, None, {}), 404),
        (("GET", "/.well-known/est/cacertz", None, None, {}), 404),
        (("POST", "/.well-known/est/simpleenroll", None, b64(csr), PKCS10), 401),
        (("GET", "/.well-known/est/nonce", None, None, {}), 401),
        (("POST", "/.well-known/est/simpleenroll", files, b64(csr),
          {"Content-Type": "text/plain"}), 415),
        (("POST", "/.well-known/est/simpleenroll", files, b"%%%not base64", PKCS10), 400),
        (("POST", "/.well-known/est/simpleenroll", files, b64(b"\x30\x03\x02\x01\x00"),
          PKCS10), 400),
        (("POST", "/.well-known/est/simpleenroll", files, b"A" * 70000, PKCS10), 413),
    ]
    before = fleet.snapshot()
    for (method, path, tls_files, body, headers), expected in cases:
        status, answer, text = cloud.request("est", method, path, files=tls_files, body=body,
                                             headers=headers)
        assert status == expected, (path, status, text)
        if status == 401:  # RFC 7235 3.1: every 401 carries a challenge
            assert answer["WWW-Authenticate"] == 'TLS-Client-Certificate realm="fleetid"'
    bad_sig = bytearray(csr)
    bad_sig[-5] ^= 0x01
    status, _, text = post(cloud, "simpleenroll", files, bytes(bad_sig))
    assert status == 400 and b"signature" in text
    assert fleet.snapshot() == before


def test_pending_approval_answers_202_with_retry_after_until_approved(fleet, cloud):
    device = fleet.provision()
    _, csr = device.csr("b42-approval")
    status, headers, body = post(cloud, "simpleenroll", device.files(), csr,
                                 label="b42-approval")
    assert status == 202 and headers["Retry-After"] == "30"
    assert fleet.est.pending() == [("b42-approval", device.name)]
    fleet.est.approve("b42-approval", device.name)
    status, _, body = post(cloud, "simpleenroll", device.files(), csr, label="b42-approval")
    assert status == 200, body
    assert fleet.est.pending() == []


# -- attacks: each refused with its reason, nothing written -----------------------------------


def _enrol_refused(fleet, client_cert, csr, reenroll, reason_text, status_reason="policy"):
    before = fleet.snapshot()
    with pytest.raises((AccessRefused, RequestRefused)) as info:
        fleet.est.enroll("b42", der(client_cert), csr, reenroll=reenroll)
    assert info.value.reason == status_reason, info.value
    assert reason_text in info.value.detail, info.value.detail
    assert fleet.snapshot() == before
    return info.value


def test_attack_software_key_without_attestation_is_refused_clearly(fleet):
    device = fleet.provision()
    csr = make_csr(new_key(), device.name)  # no evidence attribute
    _enrol_refused(fleet, device.identity_cert, csr, False, "attestation required")


def test_attack_evidence_from_an_unknown_vendor(fleet):
    device = fleet.provision()
    fake = SoftVendor("Counterfeit Chips").make_chip(se_uid=device.chip.se_uid)
    _, csr = enrolment(fake, fleet.cas["b42"].issue_nonce(), device.name)
    _enrol_refused(fleet, device.identity_cert, csr, False, "trusted SE vendor")


def test_attack_attested_key_is_not_the_csr_key(fleet):
    device = fleet.provision()
    nonce = fleet.cas["b42"].issue_nonce()
    evidence = device.chip.evidence(new_key().public_key(), nonce)
    csr = make_csr(new_key(), device.name, evidence)
    _enrol_refused(fleet, device.identity_cert, csr, False, "attested key is not the CSR")


def test_attack_evidence_from_another_devices_se(fleet):
    device, other = fleet.provision(), fleet.provision()
    _, csr = enrolment(other.chip, fleet.cas["b42"].issue_nonce(), device.name)
    _enrol_refused(fleet, device.identity_cert, csr, False, "not this device's SE")


def test_attack_replayed_and_expired_nonces(fleet):
    device = fleet.provision()
    nonce = fleet.cas["b42"].issue_nonce()
    _, csr = enrolment(device.chip, nonce, device.name)
    fleet.est.enroll("b42", der(device.identity_cert), csr)
    _, replay = enrolment(device.chip, nonce, device.name)  # same nonce, new key
    _enrol_refused(fleet, device.identity_cert, replay, False, "already used")
    stale = fleet.cas["b42"].issue_nonce()
    fleet.clock.advance(minutes=6)
    _, late = enrolment(device.chip, stale, device.name)
    _enrol_refused(fleet, device.identity_cert, late, False, "expired")


def test_attack_reenrolment_with_someone_elses_certificate(fleet):
    victim, attacker = fleet.provision(), fleet.provision()
    fleet.enrol(victim)
    fleet.enrol(attacker)
    # The attacker's certificate, a CSR naming the victim: a subject change.
    _, csr = enrolment(attacker.chip, fleet.cas["b42"].issue_nonce(), victim.name)
    _enrol_refused(fleet, attacker.cert, csr, True, "subject")
    # The victim's certificate (stolen), the attacker's own chip attesting: wrong SE.
    _, csr = enrolment(attacker.chip, fleet.cas["b42"].issue_nonce(), victim.name)
    _enrol_refused(fleet, victim.cert, csr, True, "not this device's SE")


def test_attack_same_key_reenrolment_is_refused(fleet):
    device = fleet.provision()
    fleet.enrol(device)
    evidence = device.chip.evidence(device.key.public_key(), fleet.cas["b42"].issue_nonce())
    csr = make_csr(device.key, device.name, evidence)
    _enrol_refused(fleet, device.cert, csr, True, "new key")


def test_attack_revoked_device_cannot_enrol(fleet):
    device = fleet.provision()
    fleet.enrol(device)
    fleet.revoke_certificate(device.cert, "keyCompromise")
    _, csr = device.csr()
    _enrol_refused(fleet, device.cert, csr, True, "revoked at", status_reason="revoked")


def test_attack_revoked_batch_intermediate(fleet):
    device = fleet.provision()
    other_batch = fleet.provision(batch="b43")
    fleet.revocation.revoke_ca(fleet.ca_certs["b42"], "unspecified")
    _, csr = device.csr()
    _enrol_refused(fleet, device.identity_cert, csr, False, "is revoked",
                   status_reason="ca_revoked")
    # The other batch is untouched.
    _, csr = other_batch.csr("b43")
    assert fleet.est.enroll("b43", der(other_batch.identity_cert), csr) is not None


def test_attack_expired_certificate_inside_and_outside_the_overlap_window(fleet):
    device = fleet.provision()
    old = fleet.enrol(device)
    key, csr = device.csr()
    new = fleet.est.enroll("b42", der(old), csr, reenroll=True)
    # Past the old certificate's notAfter the overlap deadline (capped at notAfter) has
    # passed too; an expired certificate is refused either way.
    fleet.clock.advance(days=31)
    _, csr = device.csr()
    _enrol_refused(fleet, old, csr, True, "expired at", status_reason="expired")
    _, csr = device.csr()
    _enrol_refused(fleet, new, csr, True, "expired at", status_reason="expired")


def test_attack_certificate_from_another_fleet(fleet, tmp_path):
    other = Fleet(tmp_path / "other")
    try:
        stranger = other.provision()
        _, csr = enrolment(stranger.chip, fleet.cas["b42"].issue_nonce(), stranger.name)
        _enrol_refused(fleet, stranger.identity_cert, csr, False, "fleet root",
                       status_reason="chain")
    finally:
        other.close()


def test_attack_pending_approval_does_not_issue(fleet):
    device = fleet.provision()
    _, csr = device.csr("b42-approval")
    before = fleet.snapshot()
    with pytest.raises(PendingApproval):
        fleet.est.enroll("b42-approval", der(device.identity_cert), csr)
    assert fleet.snapshot() == before


# -- malformed bodies: 4xx, never 500, nothing changes ----------------------------------------


def test_malformed_bodies_get_4xx_and_change_nothing(fleet, cloud):
    device = fleet.provision()
    files = device.files()
    _, good_csr = device.csr()
    before = fleet.snapshot()
    seen = set()

    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(base64.b64encode),
        st.integers(1, len(good_csr) - 1).map(lambda n: base64.b64encode(good_csr[:n])),
        st.tuples(st.integers(0, len(good_csr) - 1), st.integers(1, 255)).map(
            lambda t: base64.b64encode(good_csr[:t[0]] + bytes([good_csr[t[0]] ^ t[1]])
                                       + good_csr[t[0] + 1:])),
    ), st.sampled_from(["simpleenroll", "simplereenroll"]))
    def check(body, op):
        status, _, text = post(cloud, op, files, b"", body=body)
        seen.add(status)
        assert 400 <= status < 500, (status, text)

    check()
    assert fleet.snapshot() == before
    assert 400 in seen


# -- interop with clients nobody here wrote ---------------------------------------------------


def _tools():
    import shutil

    return shutil.which("curl") and shutil.which("openssl")


def test_interop_curl_and_openssl_as_est_client(fleet, cloud, tmp_path):
    import subprocess

    from tests.conftest import require

    require(_tools(), "curl and openssl")
    base = "https://127.0.0.1:%d/.well-known/est" % cloud.ports["est"]
    cacerts = subprocess.run(["curl", "-sS", "--cacert", fleet.root_file, base + "/cacerts"],
                             check=True, capture_output=True).stdout
    printed = subprocess.run(["openssl", "pkcs7", "-inform", "DER", "-print_certs"],
                             input=base64.b64decode(cacerts), check=True,
                             capture_output=True).stdout.decode()
    assert "subject=O = Acme, OU = product:widget" in printed
    assert "CN = Test Fleet Root" in printed

    device = fleet.provision()
    cert_file, key_file = device.files()
    key = tmp_path / "soft.key"
    csr_der = tmp_path / "req.der"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-subj",
                    "/CN=%s/serialNumber=%s" % (device.name, device.name), "-outform", "DER",
                    "-out", str(csr_der)], check=True, capture_output=True)
    body = tmp_path / "req.b64"
    body.write_bytes(base64.encodebytes(csr_der.read_bytes()))  # with line breaks
    before = fleet.snapshot()
    result = subprocess.run(
        ["curl", "-sS", "--cacert", fleet.root_file, "--cert", cert_file, "--key", key_file,
         "-H", "Content-Type: application/pkcs10", "--data-binary", "@" + str(body),
         "-w", "\n%{http_code}", base + "/simpleenroll"],
        check=True, capture_output=True).stdout.decode()
    text, code = result.rsplit("\n", 1)
    assert code == "403"
    assert "attestation required" in text and "genuine SE" in text
    assert fleet.snapshot() == before


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=200), st.lists(st.sampled_from([b" ", b"\r\n", b"\n", b"\t"]),
                                         max_size=5))
def test_base64_bodies_decode_whatever_the_line_breaks(data, breaks):
    """RFC 8951 3: base64 with or without whitespace decodes to the same bytes."""
    text = base64.b64encode(data)
    for n, brk in enumerate(breaks):
        cut = (n * 7) % (len(text) + 1)
        text = text[:cut] + brk + text[cut:]
    if not data:
        with pytest.raises(RequestRefused):
            messages.decode_base64_body(text)
    else:
        assert messages.decode_base64_body(text) == data


def test_reenrolment_writes_certificate_and_rotation_state_in_one_registry_call(fleet):
    calls = []
    registry = fleet.registry
    original = registry.add_certificate

    def add_certificate(serial, cert_der, kind, rotation_state=None, **audit_fields):
        calls.append(rotation_state)
        return original(serial, cert_der, kind, rotation_state=rotation_state,
                        **audit_fields)

    def set_rotation_state(*args, **kwargs):  # the second transaction must not happen
        raise AssertionError("rotation state written in a transaction of its own")

    device = fleet.provision()
    fleet.enrol(device)
    registry.add_certificate = add_certificate
    registry.set_rotation_state = set_rotation_state
    from fleetid.cloud.est.service import EstService

    est = EstService(fleet.labels, registry, fleet.trust, default_label="b42",
                     clock=fleet.clock)
    old = der(device.cert)
    _, csr = device.csr()
    cert = est.enroll("b42", old, csr, reenroll=True)
    assert len(calls) == 1 and calls[0].startswith("overlap:")
    state = registry.get_device(device.serial).rotation_state
    assert state == calls[0] and der(cert) != old


def test_a_registry_failure_behind_a_503_is_logged_for_the_operator(fleet, caplog):
    from fleetid.cloud.est.service import EstService
    from fleetid.cloud.registry import RegistryError

    device = fleet.provision()
    fleet.enrol(device)
    registry = fleet.registry

    def add_certificate(*args, **kwargs):
        raise RegistryError(RegistryError.STORAGE, "OperationalError (40P01)")

    registry.add_certificate = add_certificate
    est = EstService(fleet.labels, registry, fleet.trust, default_label="b42",
                     clock=fleet.clock)
    _, csr = device.csr()
    with caplog.at_level("WARNING", logger="fleetid.cloud.est.service"):
        with pytest.raises(RequestRefused) as info:
            est.enroll("b42", der(device.cert), csr, reenroll=True)
    assert info.value.reason == "unavailable"
    lines = [r.getMessage() for r in caplog.records if r.name == "fleetid.cloud.est.service"]
    assert len(lines) == 1 and "40P01" in lines[0] and str(device.serial) in lines[0], lines
    assert "PRIVATE" not in lines[0]
