"""The device's EST client (fleetid.device.host.est_client) against the real EST server on
127.0.0.1, for chips personalised by the real factory line: enrolment and re-enrolment
with keys generated, attested and used inside the SE; 202 + Retry-After within bounds;
refusals typed with the server's status and reason."""

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetid.cloud.ca import verify_attestation_extension
from fleetid.common import se_consts as C
from fleetid.common.errors import ReferenceNotFound
from fleetid.device.host.est_client import (
    EstClient,
    EstClientError,
    decode_base64_body,
    spare_slot,
)
from fleetid.device.host.se_https import SeTlsClient, TicketCache
from tests.device.device_cloud_support import LABEL, LineAndCloud

APPROVAL = "widget-approval"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    running = LineAndCloud(tmp_path_factory.mktemp("est-client"), devices=5,
                           labels_extra=[(APPROVAL, 7)])
    yield running
    running.close()


def _anchor(se):
    return se.get_data(C.DATA_TRUST_FLEET_ROOT, -1, 65536)


def _est(env, se, label=LABEL, **kwargs):
    return EstClient(se, "127.0.0.1", env.ports["est"], [_anchor(se)], label=label,
                     **kwargs)


def _point(cert):
    return cert.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint)


def _whoami(env, se, slot):
    client = SeTlsClient(se, slot, [se.get_cert(slot)], [_anchor(se)])
    return client.request("127.0.0.1", env.ports["verifier"], "GET", "/v1/whoami")


def test_an_enrolment_makes_one_full_handshake_and_resumes_the_rest(env):
    # nonce, simpleenroll, cacerts (the issued certificate's check): three connections
    # authenticated by the identity key; the first is a full TLS 1.3 handshake, the
    # others resume with the EST server's session ticket (PSK-DHE).
    se = env.session(4)
    env.device(se)
    tickets = TicketCache()
    handshakes = []
    original = SeTlsClient.open

    def counted(client, host, port):
        tls = original(client, host, port)
        handshakes.append(tls.info.resumed)
        return tls

    SeTlsClient.open = counted
    try:
        result = _est(env, se, tickets=tickets).enroll(C.SLOT_IDENTITY)
    finally:
        SeTlsClient.open = original
    assert result.slot == C.SLOT_OPERATIONAL_A
    assert handshakes == [False, True, True]
    assert len(tickets) == 1  # the newest ticket, kept for the next request


def test_enrol_then_reenrol_keys_made_attested_and_kept_in_the_se(env):
    se = env.session(0)
    record, identity = env.device(se)
    est = _est(env, se)

    first = est.enroll(C.SLOT_IDENTITY)
    assert first.operation == "simpleenroll" and first.slot == C.SLOT_OPERATIONAL_A
    policy, point = se.public_key(first.slot)
    assert _point(first.certificate) == point
    assert policy & C.POLICY_GENERATED_ON_CHIP and policy & C.POLICY_NON_EXPORTABLE
    assert se.get_cert(first.slot) == first.certificate_der
    assert first.certificate.subject == identity.subject
    statement = verify_attestation_extension(first.certificate, env.line.vendor_roots,
                                             expected_se_uid=se.uid())
    assert statement.slot == first.slot

    second = est.enroll(first.slot, reenroll=True)
    assert second.operation == "simplereenroll" and second.slot == C.SLOT_OPERATIONAL_B
    assert _point(second.certificate) == se.public_key(second.slot)[1] != point
    statement = verify_attestation_extension(second.certificate, env.line.vendor_roots,
                                             expected_se_uid=se.uid())
    assert statement.slot == second.slot
    kinds = [c.kind for c in env.line.registry.certificates(record.serial)]
    assert kinds == ["identity", "operational", "operational"]
    assert se.get_cert(C.SLOT_IDENTITY) == identity.public_bytes(serialization.Encoding.DER)

    # The new certificate authenticates; the previous one is in its overlap window.
    response = _whoami(env, se, second.slot)
    assert response.status == 200 and b'"operational"' in response.body
    assert b'"in_overlap": true' in _whoami(env, se, first.slot).body


def test_reenrol_with_the_identity_certificate_is_refused_with_the_server_reason(env):
    se = env.session(1)
    with pytest.raises(EstClientError) as info:
        _est(env, se).enroll(C.SLOT_IDENTITY, reenroll=True)
    assert info.value.reason == EstClientError.REFUSED and info.value.status == 403
    assert info.value.server_reason == "wrong_certificate_kind"


def test_202_retry_after_is_honoured_within_its_bounds(env):
    se = env.session(2)
    device_serial = env.device(se)[1].subject.rfc4514_string().split("CN=")[1]
    slept = []
    est = _est(env, se, label=APPROVAL, sleep=slept.append, max_attempts=3)
    with pytest.raises(EstClientError) as info:
        est.enroll(C.SLOT_IDENTITY)
    assert info.value.reason == EstClientError.PENDING and info.value.status == 202
    assert slept == [7.0, 7.0]  # the server's Retry-After, three requests in all
    assert (APPROVAL, device_serial) in env.est.pending()

    # The operator approves while the device waits; the same request then succeeds (the
    # stale key of the abandoned attempt is replaced by a fresh one).
    def approve_then_wait(seconds):
        slept.append(seconds)
        env.est.approve(APPROVAL, device_serial)

    slept.clear()
    result = _est(env, se, label=APPROVAL, sleep=approve_then_wait).enroll(C.SLOT_IDENTITY)
    assert result.attempts == 2 and result.waited_s == 7.0
    assert _point(result.certificate) == se.public_key(result.slot)[1]

    capped = _est(env, se, label=APPROVAL, sleep=slept.append, max_wait_s=5)
    with pytest.raises(EstClientError) as info:
        capped.enroll(C.SLOT_IDENTITY)
    assert info.value.reason == EstClientError.PENDING  # 7 s > the 5 s budget: no wait


def test_a_revoked_device_cannot_enrol(env):
    se = env.session(3)
    _record, identity = env.device(se)
    env.revoke_certificate(identity, "cessationOfOperation", operator="test")
    with pytest.raises(EstClientError) as info:
        _est(env, se).enroll(C.SLOT_IDENTITY)
    assert info.value.status == 403 and info.value.server_reason == "revoked"
    assert "cessationOfOperation" in info.value.detail
    with pytest.raises(ReferenceNotFound):
        se.get_cert(C.SLOT_OPERATIONAL_A)  # nothing was stored


def test_spare_slots_alternate_and_never_reuse_the_current_one(env):
    assert spare_slot(C.SLOT_IDENTITY) == C.SLOT_OPERATIONAL_A
    assert spare_slot(C.SLOT_OPERATIONAL_A) == C.SLOT_OPERATIONAL_B
    assert spare_slot(C.SLOT_OPERATIONAL_B) == C.SLOT_OPERATIONAL_A
    with pytest.raises(ValueError):
        _est(env, env.session(0)).enroll(C.SLOT_OPERATIONAL_A, C.SLOT_OPERATIONAL_A)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6),
       st.sampled_from([b"\n", b"\r\n", b" ", b"\t"]))
def test_base64_bodies_with_any_line_breaks_decode(data, cuts, sep):
    """RFC 8951 3: whitespace and line breaks anywhere in a base64 body are accepted."""
    text = base64.b64encode(data)
    for cut in sorted({c % (len(text) + 1) for c in cuts}, reverse=True):
        text = text[:cut] + sep + text[cut:]
    assert decode_base64_body(text) == data


@pytest.mark.parametrize("body", [b"%%%", b"abc", b"QUJD\x00"])
def test_malformed_base64_is_a_bad_response(body):
    with pytest.raises(EstClientError) as info:
        decode_base64_body(body)
    assert info.value.reason == EstClientError.BAD_RESPONSE
