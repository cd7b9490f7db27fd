"""The device agent against a hostile EST server (issue 16, item 1): whatever the CA's
front-end answers to a (re-)enrolment, no device is left on a credential the verifier
refuses.  The real agent talks over TLS to tests/device/hostile_est_support.HostileEst
(the real EST app and CA behind a forging middleware) and to the real verifier; every
forged certificate is derived from the one the real CA issued, with the line's PKI.

After each kind of bad answer: the rotation is refused (the agent's checks, or the
verifier at the acknowledgement, then a bounded number of fresh attempts) or left to
resume (no certificate at all), the old credential is still the one the journal names
and the verifier accepts it, no refused certificate is left in the SE, and the next
honest rotation succeeds.
"""

import random

import pytest
from cryptography import x509

from fleetid.cloud.verifier.errors import AccessRefused
from fleetid.device import rotation_journal as rj
from fleetid.device.agent import Agent, AgentError, AgentPolicy, NetError
from fleetid.device.certcheck import CertificateRefused
from fleetid.sim.nvm import PowerLoss
from tests.device.agent_support import Fleet, FaultyNet
from tests.device.device_cloud_support import LABEL
from tests.device.hostile_est_support import FORGERIES, HostileEst

ATTEMPTS = 2


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("hostile"), devices=2)
    est = HostileEst(fleet.cloud).start()
    yield fleet, est
    est.stop()
    fleet.close()


def _agent(fleet, est, attempts=ATTEMPTS, seed=1):
    se = fleet.cloud.session(0)
    return Agent(se, FaultyNet(est.net(se, LABEL)), fleet.clock, random.Random(seed).random,
                 policy=AgentPolicy(max_attempts=2, base_delay=1, max_delay=2,
                                    max_rotation_attempts=attempts))


def _slot_certs(fleet):
    se = fleet.cloud.session(0)
    held = {}
    for slot in fleet.keys(se):
        held[slot] = bytes(se.get_cert(slot))
    return held


def _honest_rotation(fleet, est, command="rotate"):
    est.mode = None
    agent = _agent(fleet, est)
    report = agent.run_once(command=command)
    assert report.journal == "BASE", report.actions
    return fleet.settled(0)


def test_the_table_has_at_least_sixteen_kinds_of_bad_answers():
    assert len(FORGERIES) >= 16
    kinds = {expected for _make, expected in FORGERIES.values()}
    assert {"signature", "issuer", "expired", "not_yet_valid", "ack", "ack_tls", "key", "eku",
            "usage", "identity", "malformed", "too_large", "transient"} <= kinds


@pytest.mark.parametrize("mode", sorted(FORGERIES))
def test_a_bad_enrolment_answer_leaves_the_old_credential_in_use(rig, mode):
    fleet, est = rig
    if fleet.agent(0).journal.load() is None:  # first test of the module: enrol honestly
        est.mode = None
        _agent(fleet, est).run_once()
    before = _honest_rotation(fleet, est)
    old = _slot_certs(fleet)
    old_cert = old[before]
    expected = FORGERIES[mode][1]

    est.mode, est.remaining, est.forged = mode, None, 0
    agent = _agent(fleet, est)
    if expected == "transient":
        with pytest.raises(NetError):
            agent.run_once(command="rotate")
        assert agent.journal.last().kind == rj.BEGIN  # resumed by the next cycle
    else:
        with pytest.raises(AgentError) as failed:
            agent.run_once(command="rotate")
        assert failed.value.reason == AgentError.WRONG_CERTIFICATE
        cause = failed.value.cause
        if expected == "ack":
            assert isinstance(cause, NetError) and cause.status == 403, cause
            assert est.forged == ATTEMPTS
        elif expected == "ack_tls":
            assert isinstance(cause, NetError) and cause.reason == NetError.HANDSHAKE, cause
            assert est.forged == ATTEMPTS
        else:
            assert isinstance(cause, CertificateRefused) and cause.reason == expected, cause
        refusals = [a for a in agent.net.calls if a == "ack"]
        assert len(refusals) == {"ack": ATTEMPTS, "ack_tls": 2 * ATTEMPTS}.get(expected, 0)
        last = agent.journal.last()
        assert (last.kind, last.cur, len(agent.journal.records)) == (rj.BASE, before, 1)
        assert _slot_certs(fleet) == old  # nothing refused was left in the SE

    # Not stuck: the journal names the old credential, the verifier accepts it, and the
    # next honest rotation succeeds.
    slot, identity = fleet.accepted(0)
    assert slot == before and identity.kind == "operational"
    assert fleet.cloud.verifier.verify(old_cert).kind == "operational"
    # (after no certificate at all the journal's BEGIN is resumed: no command needed)
    after = _honest_rotation(fleet, est, None if expected == "transient" else "rotate")
    assert after != before


def test_every_later_run_works_after_the_refusals(rig):
    """The issue's symptom: after a refused certificate every later run failed with
    `resume ISSUED: acknowledge slot 3`.  Now three plain cycles after a refusal work."""
    fleet, est = rig
    if fleet.agent(0).journal.load() is None:
        est.mode = None
        _agent(fleet, est).run_once()
    est.mode, est.remaining = "real_ca_unknown_to_registry", None
    with pytest.raises(AgentError):
        _agent(fleet, est).run_once(command="rotate")
    est.mode = None
    for _ in range(3):
        report = _agent(fleet, est).run_once()
        assert report.resumed == "BASE" and report.journal == "BASE"
        assert not any("acknowledge" in a for a in report.actions)


def test_one_refused_answer_is_retried_with_a_fresh_key_in_the_same_cycle(rig):
    fleet, est = rig
    if fleet.agent(0).journal.load() is None:
        est.mode = None
        _agent(fleet, est).run_once()
    before = _honest_rotation(fleet, est)
    for mode in ("expired", "real_ca_unknown_to_registry"):
        est.mode, est.remaining = mode, 1
        report = _agent(fleet, est, attempts=3).run_once(command="rotate")
        assert any("BEGIN again: attempt 2 of 3" in a for a in report.actions), report.actions
        assert report.journal == "BASE" and report.slot != before
        before = fleet.settled(0)


def _usable_after_cut(fleet, k):
    # After the cut, before any resume: the credential the journal names is accepted; or
    # the journal is ISSUED with a certificate the verifier does not know (it passed the
    # device's checks, only the acknowledgement can tell), and the old one is accepted:
    # resuming ISSUED falls back to it (REFUSED) at the refused acknowledgement.
    se = fleet.cloud.session(0)
    last = rj.RotationJournal(se).load()
    try:
        slot, identity = fleet.accepted(0)
    except AccessRefused as exc:
        assert last.kind == rj.ISSUED and exc.reason == "unknown_device", "cut at %d" % k
        identity = fleet.cloud.verifier.verify(bytes(se.get_cert(last.cur)))
        slot = last.cur
    assert identity.serial and slot in (2, 3), "cut at write %d" % k


@pytest.mark.parametrize("mode", ["expired", "real_ca_unknown_to_registry"])
@pytest.mark.parametrize("after_atomic", [False, True])
def test_a_refused_rotation_survives_a_power_cut_at_every_se_write(rig, mode,
                                                                    after_atomic):
    fleet, est = rig
    if fleet.agent(0).journal.load() is None:
        est.mode = None
        _agent(fleet, est).run_once()
    nvm = fleet.nvm(0)
    est.mode, est.remaining = mode, 1
    before = nvm.write_count
    _agent(fleet, est, attempts=3).run_once(command="rotate")
    writes = nvm.write_count - before
    assert writes >= 9  # + REFUSED, BEGIN, DELETE of the refused attempt
    for k in range(1, writes + 1):
        est.mode, est.remaining = mode, 1
        nvm.cut_power_at(k, after_atomic=after_atomic)
        with pytest.raises(PowerLoss):
            _agent(fleet, est, attempts=3).run_once(command="rotate")
        nvm.disarm()
        _usable_after_cut(fleet, k)
        for _ in range(3):  # the forged answer may come once more, then honest ones
            try:
                report = _agent(fleet, est, attempts=3).run_once()
                break
            except AgentError:
                continue
        assert report.journal == "BASE", "cut at write %d" % k
        fleet.settled(0)


def test_a_forged_certificate_is_never_what_the_verifier_sees_from_the_device(rig):
    """Sanity of the rig: the look-alike certificate really names the device's key and
    subject, so only the signature check refuses it."""
    fleet, est = rig
    if fleet.agent(0).journal.load() is None:
        est.mode = None
        _agent(fleet, est).run_once()
    se = fleet.cloud.session(0)
    cur = rj.credential_slot(rj.RotationJournal(se).load())
    honest = x509.load_der_x509_certificate(bytes(se.get_cert(cur)))
    forged = est.forger.rebuild(honest, signer="lookalike")
    assert forged.subject == honest.subject and forged.issuer == honest.issuer
    assert forged.public_key() == honest.public_key()
    assert forged.signature != honest.signature


@pytest.mark.parametrize("mode, why", [("lookalike_ca_key", "signature"),
                                       ("expired", "expired"),
                                       ("another_key", "not for the new key"),
                                       ("another_device_uri_san", "identity")])
def test_the_host_est_client_checks_before_storing_too(rig, mode, why):
    """device/host/est_client.EstClient (the host-side enrolment API) makes the same checks:
    a refused certificate raises, and the new slot is left empty."""
    from fleetid.common import se_consts as C
    from fleetid.common.errors import ReferenceNotFound
    from fleetid.device.host.est_client import EstClient, EstClientError

    fleet, est = rig
    se = fleet.cloud.session(1)
    client = EstClient(se, "127.0.0.1", est.port, [fleet.cloud.root_der()], label=LABEL,
                       connect_timeout=5, io_timeout=10)
    est.mode, est.remaining = mode, None
    try:
        with pytest.raises(EstClientError) as refused:
            client.enroll(C.SLOT_IDENTITY, C.SLOT_OPERATIONAL_A)
    finally:
        est.mode = None
    assert refused.value.reason == EstClientError.WRONG_CERTIFICATE
    assert why in refused.value.detail
    with pytest.raises(ReferenceNotFound):
        se.public_key(C.SLOT_OPERATIONAL_A)
    result = client.enroll(C.SLOT_IDENTITY, C.SLOT_OPERATIONAL_A)  # an honest answer
    assert bytes(se.get_cert(C.SLOT_OPERATIONAL_A)) == result.certificate_der
    se.delete_key(C.SLOT_OPERATIONAL_A)
