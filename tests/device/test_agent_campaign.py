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
