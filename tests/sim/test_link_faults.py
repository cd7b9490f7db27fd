"""THE property of the T=1' link: under bit errors, drops, truncation, NACK and WTX storms
and power cuts, every APDU either returns exactly the right response or raises a typed
LinkError within a bounded (virtual) time; a wrong response is never delivered, no APDU
runs twice, and once the faults stop the link works again.

Hypothesis runs derandomized: the fault plan has its own seed, so every example, and any
failure, replays exactly.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetid.common import t1
from fleetid.common.errors import LinkError
from fleetid.sim.faults import FaultPlan
from tests.sim.endpoint_support import Applet, Latency, command, get_cert, make_link

BWT_MS = 100
IFSC = 64
MAX_RETRIES = 3
MAX_WTX = 8
MAX_WAIT_MS = 2000
REASONS = {LinkError.TIMEOUT, LinkError.RETRIES, LinkError.RESYNCH, LinkError.RESET,
           LinkError.PROTOCOL, LinkError.ABORTED}
# Block exchanges a failed transceive may spend recovering: RESYNCH, SWR + CIP + IFS +
# RESYNCH, reset + CIP + IFS + RESYNCH, each with MAX_RETRIES + 1 attempts.
RECOVERY_EXCHANGES = 9 * (MAX_RETRIES + 1)
# One attempt: write polling (BWT), the wait for the answer (MAX_WAIT_MS, WTX included),
# the body read (BWT), WTX responses and bus time (bounded by another BWT).
ATTEMPT_MS = BWT_MS + MAX_WAIT_MS + BWT_MS + BWT_MS


def time_bound_ms(apdu_len, resp_len):
    blocks = -(-apdu_len // IFSC) + -(-resp_len // IFSC) + 1
    return (blocks * (MAX_RETRIES + 1) + RECOVERY_EXCHANGES) * ATTEMPT_MS


class RecordingApplet(Applet):
    def __init__(self):
        super().__init__()
        self.seen = []

    def process(self, apdu):
        self.seen.append(bytes(apdu))
        return super().process(apdu)


def faulty_link(profile, plan):
    link, ep, _, clock = make_link(
        profile, latency=Latency(bus_hz=1_000_000, sign=40, generate_key=250),
        ifsc=IFSC, bwt_ms=BWT_MS, ifsd=IFSC, max_retries=MAX_RETRIES, max_wtx=MAX_WTX,
        max_wait_ms=MAX_WAIT_MS)
    applet = RecordingApplet()
    ep.chip = applet
    ep.card.handler = applet.process
    ep.card.on_swr = applet.power_loss
    ep.faults = plan
    return link, ep, applet, clock


def run_apdus(link, applet, clock, apdus):
    delivered = []
    for apdu in apdus:
        expected = Applet.expected(apdu)
        t0 = clock.now_ms()
        try:
            resp = link.transceive(apdu)
        except LinkError as e:
            assert e.reason in REASONS, e
        else:
            assert resp == expected  # never a wrong response
            delivered.append(apdu)
        assert clock.now_ms() - t0 <= time_bound_ms(len(apdu), len(expected))
    # No APDU ran twice; every delivered response came from exactly one execution.
    assert len(set(applet.seen)) == len(applet.seen)
    assert set(delivered) <= set(applet.seen)
    return delivered


def works_again(link, ep, applet, clock):
    ep.faults.disable()
    probe = command(150, ins=0x2A) + b"probe"
    try:
        link.transceive(probe)
    except LinkError as e:  # the first may meet a card still in its power-on state
        assert e.reason in (LinkError.RESYNCH, LinkError.RESET)
        assert link.transceive(probe + b"2") == Applet.expected(probe + b"2")
    else:
        assert link.transceive(probe + b"2") == Applet.expected(probe + b"2")


_apdu_plan = st.lists(
    st.tuples(st.sampled_from(["cmd", "sign", "keygen", "get_cert"]),
              st.sampled_from([4, 5, IFSC - 1, IFSC, IFSC + 1, 200, 255, 256, 700, 1024, 4096])),
    min_size=1, max_size=6)


def build_apdus(plan):
    apdus = []
    for i, (kind, n) in enumerate(plan):
        tag = bytes((i,))
        if kind == "get_cert":
            apdus.append(get_cert(n) + tag)
        else:
            ins = {"cmd": 0xCA, "sign": 0x2A, "keygen": 0x46}[kind]
            apdus.append(command(max(n, 5), ins=ins)[:-1] + tag)
    return apdus


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    profile=st.sampled_from([t1.PROFILE_GP, t1.PROFILE_SE05X]),
    seed=st.integers(0, 2**32 - 1),
    ber=st.sampled_from([0.0, 1e-5, 1e-4, 1e-3]),
    drop=st.sampled_from([0.0, 0.02, 0.1]),
    truncate=st.sampled_from([0.0, 0.02, 0.1]),
    nack_storm=st.sampled_from([0.0, 0.002, 0.02]),
    wtx_storm=st.sampled_from([0.0, 0.2, 0.6]),
    power_loss=st.sampled_from([0.0, 1e-4, 1e-3]),
    plan=_apdu_plan,
)
def test_faulty_bus_gives_right_response_or_typed_error_in_bounded_time(
        profile, seed, ber, drop, truncate, nack_storm, wtx_storm, power_loss, plan):
    faults = FaultPlan(seed=seed, ber=ber, drop=drop, truncate=truncate,
                       nack_storm=nack_storm, nack_storm_len=(1, 300), wtx_storm=wtx_storm,
                       wtx_storm_len=(1, 12), power_loss=power_loss)
    link, ep, applet, clock = faulty_link(profile, faults)
    run_apdus(link, applet, clock, build_apdus(plan))
    works_again(link, ep, applet, clock)


def test_clean_bus_delivers_everything():
    link, ep, applet, clock = faulty_link(t1.PROFILE_GP, FaultPlan())
    apdus = build_apdus([("cmd", 4), ("sign", 700), ("get_cert", 1024), ("keygen", 5)])
    assert run_apdus(link, applet, clock, apdus) == apdus
    assert link.retransmissions == 0 and link.wtx == 1  # keygen outlasts BWT once


def test_moderate_noise_still_delivers_most_apdus():
    # 1e-4 bit errors and 2 % drops: recovery by retransmission, not by giving up.
    link, ep, applet, clock = faulty_link(t1.PROFILE_GP, FaultPlan(seed=7, ber=1e-4, drop=0.02))
    apdus = build_apdus([("cmd", 200)] * 40)
    delivered = run_apdus(link, applet, clock, [a + bytes((i,)) for i, a in enumerate(apdus)])
    assert len(delivered) >= 38
    assert link.retransmissions > 0
    assert ep.faults.counters["bit_flips"] > 0 and ep.faults.counters["drops"] > 0


@pytest.mark.parametrize("profile", [t1.PROFILE_GP, t1.PROFILE_SE05X], ids=["gp", "se05x"])
def test_power_cut_at_every_bus_transaction(profile):
    # MCUboot-simulator style: count the transactions of a clean exchange, then cut power
    # at each one in turn.
    apdu = command(300, ins=0x2A)
    link, ep, applet, clock = faulty_link(profile, FaultPlan())
    start = ep.faults.counters["transactions"]
    link.transceive(get_cert(200) + b"x")
    link.transceive(apdu)
    total = ep.faults.counters["transactions"] - start
    assert total > 10
    outcomes = set()
    for k in range(1, total + 1):
        link, ep, applet, clock = faulty_link(profile, FaultPlan())
        ep.faults.schedule_power_loss(k)
        delivered = run_apdus(link, applet, clock, [get_cert(200) + b"x", apdu])
        outcomes.add(len(delivered))
        assert ep.faults.counters["power_losses"] == 1
        works_again(link, ep, applet, clock)
    assert 0 in outcomes or 1 in outcomes  # some cuts did cost an APDU


def test_nack_storm_longer_than_bwt_ends_in_typed_error_then_recovers():
    link, ep, applet, clock = faulty_link(t1.PROFILE_GP, FaultPlan())
    ep.faults.schedule_nack_storm(10_000)  # ten seconds of NACKs at MPOT 1 ms
    t0 = clock.now_ms()
    with pytest.raises(LinkError) as e:
        link.transceive(command(20))
    assert e.value.reason in REASONS
    assert clock.now_ms() - t0 <= time_bound_ms(20, 40)
    works_again(link, ep, applet, clock)


def test_wtx_storm_within_the_limit_is_honoured():
    link, ep, applet, clock = faulty_link(t1.PROFILE_GP, FaultPlan())
    ep.faults.schedule_wtx_storm(MAX_WTX)
    apdu = command(20)
    assert link.transceive(apdu) == Applet.expected(apdu)
    assert link.wtx == MAX_WTX


def test_wtx_storm_beyond_the_limit_ends_in_typed_error_then_recovers():
    link, ep, applet, clock = faulty_link(t1.PROFILE_SE05X, FaultPlan())
    ep.faults.schedule_wtx_storm(MAX_WTX + 1)
    with pytest.raises(LinkError) as e:
        link.transceive(command(20))
    assert e.value.reason in (LinkError.RESYNCH, LinkError.RESET)
    assert "WTX" in e.value.detail
    works_again(link, ep, applet, clock)


def test_bit_errors_on_every_frame_never_deliver_and_end_in_typed_error():
    link, ep, applet, clock = faulty_link(t1.PROFILE_GP, FaultPlan(seed=3, ber=0.05))
    for i in range(5):
        with pytest.raises(LinkError) as e:
            link.transceive(command(100) + bytes((i,)))
        assert e.value.reason in REASONS
    works_again(link, ep, applet, clock)
