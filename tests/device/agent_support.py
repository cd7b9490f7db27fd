"""The device agent against a real line + cloud in one process (no tests in this module).

`Fleet` (personalised emulated chips and the EST + verifier servers on 127.0.0.1, with the
invariant checks `accepted` and `settled`), the fault-injecting network wrapper and the
randomized rotation `campaign` live in bench/_support.py, which the benchmarks run without
the test extras; they are re-exported here for the tests.
"""

from bench._support import (  # noqa: F401 (re-exported)
    SLOTS,
    CampaignCounts,
    FaultyNet,
    Fleet,
    Killed,
    TestClock,
    campaign,
)
from fleetid.device.agent import NetError


def run_until_settled(fleet, index=0, plan=None, tries=12, **kw):
    """Run cycles (a fresh agent each, as restarts) until one completes.

    Returns: (the last report, the number of failed cycles)."""
    failures = 0
    for _ in range(tries):
        agent = fleet.agent(index, plan=plan, **kw)
        try:
            return agent.run_once(), failures
        except (NetError, Killed):
            failures += 1
    raise AssertionError("the agent did not settle in %d cycles" % tries)
