"""A randomized campaign of rotations under link drops, server 5xx, lost answers, 202 +
Retry-After, process kills and SE power cuts (tests/device/agent_support.campaign):
every rotation ends settled and the designated credential is accepted after every
failure.  A reduced count here; `bench/agent_campaign.py` runs 1,000+ and prints the
counts."""

import os

import pytest

from tests.device.agent_support import Fleet, campaign

ROTATIONS = int(os.environ.get("FLEETID_AGENT_CAMPAIGN", "40"))


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(tmp_path, devices=1)
    yield fleet
    fleet.close()


@pytest.mark.parametrize("seed", [20261206])
def test_rotation_campaign_under_random_faults_keeps_an_accepted_credential(fleet, seed):
    counts = campaign(fleet, ROTATIONS, seed)
    assert counts.rotations == ROTATIONS and counts.refused_credentials == 0
    # The campaign really injected faults of every kind (else it proves nothing).
    for name in ("link_drops", "server_errors", "lost_answers", "pending", "kills",
                 "power_cuts", "failed_cycles", "retries"):
        assert getattr(counts, name) > 0, (name, counts.as_dict())


# -- the same invariants as a hypothesis property (shrinks a failing fault schedule) -------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fleetid.device.agent import NetError  # noqa: E402
from fleetid.sim.nvm import PowerLoss  # noqa: E402
from tests.device.agent_support import Killed, run_until_settled  # noqa: E402

_FAULTS = {
    "link": lambda: ("before", NetError(NetError.LINK, "reset")),
    "5xx": lambda: ("before", NetError(NetError.SERVER, "503", 503)),
    "lost": lambda: ("after", NetError(NetError.TIMEOUT, "answer lost")),
    "202": lambda: ("before", NetError(NetError.PENDING, "", 202, retry_after=2)),
    "kill-before": lambda: ("before", Killed("kill")),
    "kill-after": lambda: ("after", Killed("kill")),
}


@pytest.fixture(scope="module")
def shared_fleet(tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("agent-property"), devices=1)
    run_until_settled(fleet, 0)
    yield fleet
    fleet.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(faults=st.dictionaries(st.integers(0, 9), st.sampled_from(sorted(_FAULTS)), max_size=4),
       cut=st.one_of(st.none(), st.tuples(st.integers(1, 7), st.booleans())))
def test_any_fault_schedule_ends_settled_with_an_accepted_credential(shared_fleet, faults, cut):
    fleet = shared_fleet
    calls = [0]

    def plan(name, i):
        index = calls[0]
        calls[0] += 1
        return _FAULTS[faults[index]]() if index in faults else None

    nvm = fleet.nvm(0)
    if cut is not None:
        nvm.cut_power_at(cut[0], after_atomic=cut[1])
    command = "rotate"
    try:
        for _ in range(12):
            try:
                fleet.agent(0, plan=plan).run_once(command=command)
                break
            except (NetError, Killed, PowerLoss):
                nvm.disarm()
                command = None
                fleet.accepted(0)  # raises AccessRefused if the designated one is refused
        else:
            pytest.fail("no progress")
    finally:
        nvm.disarm()
    fleet.settled(0)
