"""The device agent (device/agent.py) against the real line, EST CA and verifier in one
process: enrolment, overlap re-keying, the decision table after power cuts at every SE
write and kills at every network step, retries, refusals, and the injected boot and
revocation collaborators."""

import pytest

from fleetid.cloud.verifier.errors import AccessRefused
from fleetid.device import rotation_journal as rj
from fleetid.device.anchored_store import RevokedError
from fleetid.device.boot import REASON_SIGNATURE, BootError
from fleetid.device.agent import Agent, AgentError, AgentPolicy, NetError
from fleetid.sim.nvm import PowerLoss
from tests.device.agent_support import Fleet, Killed, run_until_settled


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(tmp_path, devices=2)
    yield fleet
    fleet.close()


def _enrolled(fleet, index=0):
    report, failures = run_until_settled(fleet, index)
    assert failures == 0 and report.resumed == "none"
    return fleet.settled(index)


def test_enrolment_then_rotation_keeps_one_accepted_credential_and_no_spare_key(fleet):
    first = fleet.agent(0)
    report = first.run_once()
    assert report.resumed == "none" and report.slot == 2 and report.journal == "BASE"
    assert fleet.settled() == 2
    old_cert = bytes(fleet.cloud.session(0).get_cert(2))

    report = fleet.agent(0).run_once(command="rotate")
    assert report.slot == 3 and "old key and certificate deleted from slot 2" in report.actions
    assert fleet.settled() == 3
    with pytest.raises(AccessRefused) as refused:  # the ack closed the overlap window
        fleet.cloud.verifier.verify(old_cert)
    assert refused.value.reason == "superseded"

    status = fleet.agent(0).status()
    assert status["credential_slot"] == 3 and status["final"]
    assert [s for s, e in sorted(status["slots"].items()) if e["key"]] == [1, 3]
    assert status["renew_at"] is not None


def test_renewal_starts_at_the_configured_fraction_of_validity(fleet):
    _enrolled(fleet)
    policy = AgentPolicy(renew_fraction=0.5, max_attempts=2)
    report = fleet.agent(0, policy=policy).run_once()
    assert report.slot == 2 and not any("BEGIN" in a for a in report.actions)
    fleet.clock.offset = report.renew_at - fleet.clock.now() + 1  # just past the mark
    report = fleet.agent(0, policy=policy).run_once()
    assert any(a.startswith("BEGIN due") for a in report.actions) and report.slot == 3
    fleet.clock.offset = 0
    fleet.settled()


def _count_writes(fleet, index, command="rotate"):
    nvm = fleet.nvm(index)
    before = nvm.write_count
    fleet.agent(index).run_once(command=command)
    return nvm.write_count - before


@pytest.mark.parametrize("after_atomic", [False, True])
def test_rotation_survives_power_cut_at_every_se_write(fleet, after_atomic):
    _enrolled(fleet)
    writes = _count_writes(fleet, 0)  # a clean rotation, counted
    assert writes >= 6  # journal x4 (BEGIN, ISSUED, ACKED, BASE), GENERATE KEY, PUT CERT, DELETE
    nvm = fleet.nvm(0)
    for k in range(1, writes + 1):
        nvm.cut_power_at(k, after_atomic=after_atomic)
        with pytest.raises(PowerLoss):
            fleet.agent(0).run_once(command="rotate")
        nvm.disarm()
        slot, identity = fleet.accepted(0)  # after the cut, before any resume
        assert identity.serial and slot in (2, 3)
        report, failures = run_until_settled(fleet, 0)
        assert failures == 0, "cut at write %d" % k
        fleet.settled(0)


@pytest.mark.parametrize("when", ["before", "after"])
def test_rotation_survives_a_kill_at_every_network_step(fleet, when):
    _enrolled(fleet)
    clean = fleet.agent(0)
    clean.run_once(command="rotate")
    steps = list(clean.net.calls)
    assert steps == ["whoami", "cacerts", "nonce", "enroll", "ack"]
    for index, name in enumerate(steps):
        def plan(step, i, index=index):
            return (when, Killed(step)) if i == index else None

        with pytest.raises(Killed):
            fleet.agent(0, plan=plan).run_once(command="rotate")
        fleet.accepted(0)
        run_until_settled(fleet, 0)
        fleet.settled(0)


def test_transient_failures_are_retried_with_backoff_and_retry_after(fleet):
    _enrolled(fleet)
    faults = {1: ("before", NetError(NetError.SERVER, "503", 503)),
              2: ("before", NetError(NetError.PENDING, "", 202, retry_after=7)),
              4: ("after", NetError(NetError.TIMEOUT, "answer lost"))}

    def plan(name, i):
        return faults.get(i)

    fleet.clock.sleeps.clear()
    agent = fleet.agent(0, plan=plan, policy=AgentPolicy(max_attempts=4, base_delay=2,
                                                         max_delay=30))
    report = agent.run_once(command="rotate")
    assert report.retries == 3 and report.journal == "BASE"
    first, second, third = fleet.clock.sleeps
    assert 1.0 <= first <= 2.0  # U(0.5, 1) x 2 s
    assert 7.0 <= second <= 7.7  # never before Retry-After
    assert 1.0 <= third <= 2.0
    fleet.settled(0)


def test_retries_are_bounded_and_the_journal_keeps_the_progress(fleet):
    _enrolled(fleet)

    def plan(name, i):
        return ("before", NetError(NetError.LINK, "down")) if name == "ack" else None

    agent = fleet.agent(0, plan=plan, policy=AgentPolicy(max_attempts=3))
    with pytest.raises(NetError):
        agent.run_once(command="rotate")
    assert agent.net.calls.count("ack") == 3
    assert agent.journal.last().kind == rj.ISSUED
    report, _ = run_until_settled(fleet, 0)
    assert report.resumed == "ISSUED"
    fleet.settled(0)


def test_a_retry_after_beyond_the_bound_ends_the_cycle_without_waiting(fleet):
    _enrolled(fleet)

    def plan(name, i):
        return ("before", NetError(NetError.PENDING, "", 202, retry_after=3600)) \
            if name == "enroll" else None

    fleet.clock.sleeps.clear()
    with pytest.raises(NetError):
        fleet.agent(0, plan=plan).run_once(command="rotate")
    assert fleet.clock.sleeps == []


def test_a_revoked_device_is_refused_with_the_reason_and_does_not_rotate(fleet):
    _enrolled(fleet, 1)
    registry = fleet.cloud.line.registry
    record, _ = fleet.cloud.device(fleet.cloud.session(1))
    for cert in reversed(registry.certificates(record.serial)):
        registry.mark_revoked(cert.cert_serial, "keyCompromise", operator="test",
                              issuer=cert.issuer)
    agent = fleet.agent(1)
    with pytest.raises(AgentError) as refused:
        agent.run_once(command="rotate")
    assert refused.value.reason == AgentError.REFUSED
    assert agent.net.calls == ["whoami"]
    assert agent.journal.last().kind == rj.BASE


class FakeBoot:
    def __init__(self, fail=False):
        self.fail = fail
        self.calls = []

    def check(self):
        self.calls.append("check")
        if self.fail:
            raise BootError(REASON_SIGNATURE, "bad signature")
        return "report-1"

    def confirm(self, report):
        self.calls.append("confirm " + report)


class FakeRevocation:
    def __init__(self, revoked=()):
        self.revoked = set(revoked)
        self.calls = []

    def refresh(self, fetch, now):
        self.calls.append(("refresh", callable(fetch)))
        return "unchanged"

    def check_serial(self, serial, now):
        self.calls.append(("check", serial))
        if serial in self.revoked:
            raise RevokedError(serial, 1, "serial %x" % serial)

    def status(self, now):
        return "fresh until %d" % (now + 3600)


def test_boot_is_checked_before_connecting_and_confirmed_after(fleet):
    boot = FakeBoot()
    agent = fleet.agent(0, boot=boot)
    agent.run_once()
    assert boot.calls == ["check", "confirm report-1"]
    bad = FakeBoot(fail=True)
    agent = fleet.agent(0, boot=bad)
    with pytest.raises(AgentError) as refused:
        agent.run_once()
    assert refused.value.reason == AgentError.BOOT and agent.net.calls == []


def test_revocation_is_refreshed_checked_and_reported(fleet):
    revocation = FakeRevocation()
    report = fleet.agent(0, revocation=revocation).run_once()
    assert ("refresh", True) in revocation.calls
    assert ("check", report.serial) in revocation.calls
    assert report.revocation.startswith("fresh until")
    assert fleet.agent(0, revocation=revocation).status()["revocation"].startswith("fresh")
    revocation.revoked.add(report.serial)
    report = fleet.agent(0, revocation=revocation).run_once()
    assert report.revocation.startswith("RevokedError")


def test_the_root_crl_is_refreshed_too_and_a_changed_crl_drops_the_session_tickets(fleet):
    root, calls = FakeRevocation(), []

    def refresh(fetch, now):
        calls.append(fetch())
        return "updated" if len(calls) == 1 else "unchanged"

    root.refresh = refresh
    for _ in range(2):
        agent = fleet.agent(0)
        agent.root_revocation = root
        agent.net.fetch_root_revocation = lambda slot: b"root CRL of slot %d" % slot
        agent.net.forget_sessions = lambda: calls.append("forget")
        report = agent.run_once()
    # A changed CRL drops the tickets (a resumed session shows no certificate); the
    # device's own serial is never checked against the root's CRL.
    assert calls == [b"root CRL of slot 2", "forget", b"root CRL of slot 2"]
    assert root.calls == [] and report.revocation is None


def test_a_superseded_credential_re_enrols_with_the_identity_certificate(fleet):
    _enrolled(fleet)
    se = fleet.cloud.session(0)
    registry = fleet.cloud.line.registry
    record, _ = fleet.cloud.device(se)
    # The cloud moved on without the device (e.g. the device was restored from an old
    # state): its operational certificate is no longer the current one.
    registry.set_rotation_state(record.serial, "active:" + "00" * 32)
    fleet.cloud.verifier.invalidate(None) if hasattr(fleet.cloud.verifier, "invalidate") \
        else None
    report = fleet.agent(0).run_once()
    assert any("refused (superseded)" in a for a in report.actions)
    assert any("enrol with the identity certificate" in a for a in report.actions)
    fleet.settled(0)


def test_agent_policy_refuses_unsafe_bounds():
    for kwargs in ({"renew_fraction": 0}, {"max_attempts": 0}, {"slots": (1, 2)},
                   {"slots": (2, 2)}, {"max_delay": 0.1, "base_delay": 1}):
        with pytest.raises(ValueError):
            AgentPolicy(**kwargs)
    assert Agent  # imported for the public API


@pytest.mark.parametrize("enrolled", [False, True])
def test_a_new_certificate_refused_at_the_ack_is_abandoned_and_rotated_again(fleet, enrolled):
    if enrolled:
        _enrolled(fleet)
    acks = []

    def plan(name, i):
        if name == "ack":
            acks.append(i)
            if len(acks) == 1:
                return ("before", NetError(NetError.REFUSED, "superseded: replaced", 403,
                                           server_reason="superseded"))
        return None

    agent = fleet.agent(0, plan=plan)
    report = agent.run_once(command="rotate" if enrolled else None)
    assert any("refused at the acknowledgement (superseded)" in a for a in report.actions)
    assert len(acks) == 2 and report.journal == "BASE"
    assert fleet.settled(0) == (3 if enrolled else 2)


def test_the_device_crl_cache_plugs_in_as_the_revocation_collaborator(fleet):
    """device/crl_cache.CrlCache as it is: refreshed through net.fetch_revocation (HTTP
    GET), its signature verified in the SE, the device's own serial checked."""
    import datetime
    import http.server
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fleetid.cloud.pki.signing import sign_crl
    from fleetid.device.crl_cache import CrlCache, CrlPolicy
    from tests.device.crl_support import MemoryStore, point_of

    line = fleet.cloud.line
    served = {}

    def crl(number, revoked=()):
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(line.ca_cert.subject)
                   .last_update(now - datetime.timedelta(minutes=1))
                   .next_update(now + datetime.timedelta(hours=24))
                   .add_extension(x509.CRLNumber(number), critical=False))
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - datetime.timedelta(minutes=1)).build())
        return sign_crl(line.hsm, line.labels["ca"], builder, line.ca_cert.public_key()) \
            .public_bytes(serialization.Encoding.DER)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = served["crl"]
            self.send_response(200)
            self.send_header("Content-Type", "application/pkix-crl")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = "http://127.0.0.1:%d/ca.crl" % server.server_port
        store = MemoryStore()

        def agent():
            made = fleet.agent(0)
            cache = CrlCache(made.se, store, point_of(line.ca_cert.public_key()),
                             line.ca_cert.subject.public_bytes(), CrlPolicy(grace_s=3600))
            made.revocation = cache
            made.net.net.crl_url = url
            return made

        served["crl"] = crl(1)
        report = agent().run_once()
        assert report.revocation.startswith("CRL #1 fresh (fail-closed")
        assert store.writes == 1  # fetched over HTTP, verified in the SE, stored
        served["crl"] = crl(2, revoked=[report.serial])
        report = agent().run_once()
        assert report.revocation.startswith("RevokedError") and store.writes == 2
        status = agent().status()
        assert status["revocation"].startswith("CRL #2 fresh") and "1 revoked" in \
            status["revocation"]
    finally:
        server.shutdown()


def test_short_lived_certificates_renew_at_the_margin_before_not_after():
    # The renewal threshold for the cloud's "operational-short" profile (24 h): with a
    # 12 h margin the agent renews at notAfter - 12 h, earlier than 0.66 of the validity.
    from fleetid.cloud.pki.profiles import OPERATIONAL_SHORT, get_profile
    from fleetid.device.agent import AgentPolicy, renew_at

    assert get_profile("operational-short") is OPERATIONAL_SHORT
    day = int(OPERATIONAL_SHORT.validity.total_seconds())
    assert day == 86400
    assert renew_at(0, day, 0.66) == int(day * 0.66)
    assert renew_at(0, day, 0.66, margin=12 * 3600) == day - 12 * 3600
    assert renew_at(0, day, 0.66, margin=4 * 3600) == int(day * 0.66)  # the earlier wins
    assert renew_at(0, day, 0.66, margin=2 * day) == 0  # never before notBefore
    assert AgentPolicy(renew_margin_s=28800).renew_margin_s == 28800
    with pytest.raises(ValueError):
        AgentPolicy(renew_margin_s=-1)
