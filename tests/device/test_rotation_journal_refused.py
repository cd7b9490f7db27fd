"""The REFUSED record of the rotation journal (device/rotation_journal.py): where it may
stand, what it designates, how refusals are counted, and that the 63-record object holds
the longest rotation the agent's bounds allow."""

import pytest

from fleetid.device import rotation_journal as rj
from fleetid.device.agent import AgentPolicy


def _journal(*records):
    return rj.encode(list(records))


BASE = rj.Record(rj.BASE, 2, 0, rj.CAUSE_NONE, 10, 20)


def _refused(cur=2, new=3, code=rj.REFUSAL_CHECK):
    return rj.Record(rj.REFUSED, cur, new, rj.CAUSE_DUE, 30, code)


def test_refused_follows_begin_or_issued_and_is_followed_by_begin():
    records = rj.decode(_journal(
        BASE, rj.Record(rj.BEGIN, 2, 3, rj.CAUSE_DUE, 25), _refused(),
        rj.Record(rj.BEGIN, 2, 3, rj.CAUSE_DUE, 31),
        rj.Record(rj.ISSUED, 2, 3, rj.CAUSE_DUE, 40, 50), _refused(code=rj.REFUSAL_ACK),
        rj.Record(rj.BEGIN, 2, 3, rj.CAUSE_DUE, 51)))
    assert [rj.KIND_NAMES[r.kind] for r in records] == [
        "BASE", "BEGIN", "REFUSED", "BEGIN", "ISSUED", "REFUSED", "BEGIN"]
    assert rj.refusals(records) == 2
    assert records[5].t1 == rj.REFUSAL_ACK and rj.REFUSAL_NAMES[records[2].t1] == "check"
    # The first enrolment: no BASE, the identity slot is cur.
    first = rj.decode(_journal(rj.Record(rj.BEGIN, 1, 2, rj.CAUSE_ENROL, 5),
                               _refused(1, 2)))
    assert rj.credential_slot(first[-1]) == 1 and not rj.is_final(first[-1])


def test_refused_designates_the_old_credential():
    assert rj.credential_slot(_refused()) == 2
    issued = rj.Record(rj.ISSUED, 2, 3, rj.CAUSE_DUE, 40, 50)
    assert rj.credential_slot(issued) == 3  # before the refusal, the new one


@pytest.mark.parametrize("records, why", [
    ((BASE, _refused()), "REFUSED after BASE"),
    ((_refused(),), "REFUSED after start"),
    ((BASE, rj.Record(rj.BEGIN, 2, 3), rj.Record(rj.ISSUED, 2, 3),
      rj.Record(rj.ACKED, 2, 3), _refused()), "REFUSED after ACKED"),
    ((BASE, rj.Record(rj.BEGIN, 2, 3), _refused(), rj.Record(rj.ISSUED, 2, 3)),
     "ISSUED after REFUSED"),
    ((BASE, rj.Record(rj.BEGIN, 2, 3), _refused(), _refused()), "REFUSED after REFUSED"),
    ((BASE, rj.Record(rj.BEGIN, 2, 3), _refused(), rj.Record(rj.BEGIN, 2, 4)),
     "slots change"),
    ((BASE, rj.Record(rj.BEGIN, 2, 3), _refused(2, 4)), "slots change"),
])
def test_a_refused_record_out_of_place_is_corrupt(records, why):
    with pytest.raises(rj.JournalError) as refused:
        rj.decode(_journal(*records))
    assert refused.value.reason == rj.JournalError.CORRUPT and why in str(refused.value)


def test_the_longest_rotation_the_policy_allows_fits_the_object():
    with pytest.raises(ValueError):
        AgentPolicy(max_rotation_attempts=0)
    with pytest.raises(ValueError):
        AgentPolicy(max_rotation_attempts=9)
    with pytest.raises(ValueError):
        AgentPolicy(clock_skew_s=-1)
    attempts = 8
    records = [BASE]
    for _ in range(attempts):
        records += [rj.Record(rj.BEGIN, 2, 3), rj.Record(rj.ISSUED, 2, 3), _refused()]
    records += [rj.Record(rj.BEGIN, 2, 3), rj.Record(rj.ISSUED, 2, 3),
                rj.Record(rj.ACKED, 2, 3)]
    assert len(records) <= rj.MAX_RECORDS
    assert rj.refusals(rj.decode(_journal(*records))) == attempts
