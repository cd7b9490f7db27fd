"""The compact revocation set codec (common/revset.py; its one encoder, whole sets and
streamed merges, in common/revset_merge.py): exact membership (no false positives, no
false negatives) over random fleets and revocation sets, size near log2 C(N, R),
canonical encoding (a delta merged on the device gives the cloud's bytes), and refusal of
truncated or inconsistent sets."""

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetid.common import revset, revset_merge

FLEET = bytes(range(8))
SIG = bytes.fromhex("3006020101020101")  # a syntactically valid DER signature


def wire(serials, universe, number=1, ca_ids=(), **kw):
    return revset.sign_part(revset_merge.encode(FLEET, number, 0, 100, universe, serials,
                                                ca_ids, **kw), SIG)


def bound_bits(n, r):
    return (math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)) / math.log(2)


@st.composite
def fleets(draw):
    universe = draw(st.integers(1, 5000))
    revoked = draw(st.sets(st.integers(1, universe), max_size=min(universe, 600)))
    stride = draw(st.sampled_from([None, 1, 2, 16]))
    k = draw(st.sampled_from([None, 0, 3]))
    return universe, sorted(revoked), stride, k


@settings(max_examples=150, deadline=None)
@given(fleets())
def test_no_false_positives_and_no_false_negatives_over_random_fleets(case):
    universe, revoked, stride, k = case
    info = revset.parse(wire(revoked, universe, stride=stride, k=k))
    info.check_consistent()
    members = set(revoked)
    probes = set(range(0, min(universe, 64) + 3)) | set(range(universe - 64, universe + 3))
    for serial in revoked:
        probes.update((serial - 1, serial, serial + 1))
    probes.update(range(0, universe + 3, max(1, universe // 300)))
    for serial in sorted(probes):
        assert info.contains(serial) == (serial in members), serial
    assert list(info.iter_serials()) == revoked


@pytest.mark.parametrize("n,fraction", [(10**4, 0.01), (10**5, 0.001), (10**5, 0.1)])
def test_body_and_index_stay_within_a_few_percent_of_the_bound(n, fraction):
    rng = random.Random(n)
    revoked = sorted(rng.sample(range(1, n + 1), int(n * fraction)))
    info = revset.parse(wire(revoked, n))
    payload_bits = 8 * (info.signed_len - info.index_pos)
    assert payload_bits <= 1.05 * bound_bits(n, len(revoked))


@settings(max_examples=60, deadline=None)
@given(fleets(), st.data())
def test_a_merged_delta_gives_the_clouds_exact_bytes(case, data):
    universe, revoked, _, _ = case
    base_serials = sorted(data.draw(st.sets(st.sampled_from(revoked)) if revoked
                                    else st.just(set())))
    base = revset.parse(wire(base_serials, universe, number=1))
    new = wire(revoked, universe, number=2, ca_ids=[b"\x01" * 20])
    added = sorted(set(revoked) - set(base_serials))
    delta = revset.RevDelta(revset.encode_delta(1, new, added))
    assert revset_merge.apply_delta(base, delta) == new
    chunks = []
    assert revset_merge.write_delta_merge(base, delta, lambda c: chunks.append(bytes(c))) == len(new)
    assert b"".join(chunks) == new


def test_a_streamed_merge_refuses_before_writing_and_respects_max_len():
    base = revset.parse(wire([3, 9, 27], 100, number=1))
    new = wire([3, 5, 9, 27], 100, number=2)
    chunks = []
    with pytest.raises(ValueError):
        revset_merge.write_delta_merge(base, revset.RevDelta(revset.encode_delta(1, new, [5])),
                                 chunks.append, max_len=len(new) - 1)
    with pytest.raises(revset.RevsetError):  # re-adds 9
        revset_merge.write_delta_merge(base, revset.RevDelta(revset.encode_delta(1, new, [5, 9])),
                                 chunks.append)
    with pytest.raises(revset.RevsetError):  # for another base
        revset_merge.write_delta_merge(base, revset.RevDelta(revset.encode_delta(7, new, [5])),
                                 chunks.append)
    assert chunks == []


def test_truncated_and_inconsistent_sets_are_refused():
    good = wire([3, 9, 27, 81], 100)
    for cut in (1, 10, 30, len(good) - 5):
        with pytest.raises(revset.RevsetError):
            revset.parse(good[:cut])
    indexed = bytearray(wire([3, 9, 27, 81], 100, stride=1))
    indexed[revset.HEADER_LEN + 3] ^= 0x01  # the first index entry's serial
    with pytest.raises(revset.RevsetError) as info:
        revset.parse(bytes(indexed)).check_consistent()
    assert info.value.detail == "index"
    longer = bytearray(good)
    longer[45] += 8  # body_bits: one byte more than the body has
    with pytest.raises(revset.RevsetError) as info:
        revset.parse(bytes(longer))
    assert info.value.reason == revset.REASON_TRUNCATED
    version = bytearray(good)
    version[4] = 2
    with pytest.raises(revset.RevsetError) as info:
        revset.parse(bytes(version))
    assert info.value.reason == revset.REASON_VERSION


def test_batch_entries_name_revoked_cas():
    info = revset.parse(wire([5], 10, ca_ids=[b"\x02" * 20, b"\x01" * 20]))
    assert info.ca_revoked(b"\x01" * 20) and info.ca_revoked(b"\x02" * 20)
    assert not info.ca_revoked(b"\x03" * 20)
