"""The rotation state's one text format (fleetid.cloud.registry.rotation): every state
round-trips through its text, any other text parses as "unknown" (never raises), and an
acknowledgement only moves the overlap its new certificate opened."""

import datetime

from hypothesis import given
from hypothesis import strategies as st

from fleetid.cloud.registry.rotation import (
    ACKED,
    ACTIVE,
    OVERLAP,
    UNKNOWN,
    RotationState,
    format_deadline,
    parse_deadline,
)

FINGERPRINTS = st.text("0123456789abcdef", min_size=64, max_size=64)
DEADLINES = st.datetimes(min_value=datetime.datetime(1970, 1, 2),
                         max_value=datetime.datetime(9999, 12, 30),
                         timezones=st.just(datetime.timezone.utc)).map(
    lambda moment: moment.replace(microsecond=0))
STATES = st.one_of(
    st.builds(RotationState.active, FINGERPRINTS),
    st.builds(RotationState.overlap, FINGERPRINTS, FINGERPRINTS, DEADLINES),
    st.builds(lambda old, new: RotationState(ACKED, old, new), FINGERPRINTS, FINGERPRINTS),
)


@given(STATES)
def test_every_state_round_trips_through_its_text(state):
    assert RotationState.parse(state.format()) == state


@given(st.text())
def test_any_text_parses_to_a_state_and_never_raises(text):
    state = RotationState.parse(text)
    assert state.kind in (None, ACTIVE, OVERLAP, ACKED, UNKNOWN)
    if state.kind not in (None, UNKNOWN):
        assert RotationState.parse(state.format()) == state


def test_the_documented_forms():
    old, new = "aa" * 32, "bb" * 32
    assert RotationState.parse(None) == RotationState() == RotationState.parse("")
    assert RotationState.parse("active:" + new) == RotationState.active(new)
    overlap = RotationState.parse("overlap:%s:%s:2027-01-02T03:04:05Z" % (old, new))
    assert overlap.deadline == datetime.datetime(2027, 1, 2, 3, 4, 5,
                                                 tzinfo=datetime.timezone.utc)
    assert RotationState.parse("acked:%s:%s" % (old, new)) == RotationState(ACKED, old, new)
    for text in ("overlap:55", "overlap", "acked", "active:x:y", "overlap:a:b:tomorrow"):
        assert RotationState.parse(text).kind == UNKNOWN


@given(STATES, FINGERPRINTS)
def test_only_the_overlap_a_certificate_opened_is_acknowledged_by_it(state, fingerprint):
    after = state.acknowledged(fingerprint)
    if state.kind == OVERLAP and fingerprint == state.new:
        assert after == RotationState(ACKED, state.old, state.new)
    else:
        assert after is None
    if state.kind == OVERLAP:
        assert state.acknowledged(state.new) == RotationState(ACKED, state.old, state.new)


@given(DEADLINES)
def test_deadlines_round_trip(moment):
    assert parse_deadline(format_deadline(moment)) == moment
