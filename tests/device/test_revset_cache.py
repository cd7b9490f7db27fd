"""The offline tier: the device's compact-set cache (device/revset_cache.py) against an
emulated SE, fed by the cloud's publisher (cloud/revocation/revset_publisher.py).  A revoked
device is refused after the next set (whole or delta); a revoked batch CA refuses every
device under it with one entry; tampered, stale, truncated, rolled-back, wrongly signed
and foreign-fleet data are refused with the old state kept; the SE's mark defeats a
swapped cache file.  A delta is merged into the store's staged copy: a store failure or a
cut at any step leaves the old set answering, and the old set is never held beside the
new one."""

import datetime
import itertools
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.revocation import sign_with
from fleetid.cloud.revocation.revset_publisher import ca_key_id
from fleetid.common import revset, revset_merge
from fleetid.common.apdu import ApduProtocol
from fleetid.device.revset_cache import (
    FileStore,
    RevokedError,
    RevsetCache,
    RevsetCacheError,
    RevsetPolicy,
    StaleRevocationError,
)
from fleetid.device.se import SeSession
from tests.cloud.cloud_support import Fleet
from tests.cloud.revset_support import revset_publisher, revocation_signer
from tests.device.crl_support import MemoryStore, other_key


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("revsetfleet"))
    fleet.devices = [fleet.provision("b42") for _ in range(4)] + [fleet.provision("b43")]
    yield fleet
    fleet.close()


@pytest.fixture
def se(fabbed):
    _, chip = fabbed
    session = SeSession(ApduProtocol(chip.process))
    session.select()
    return session


def _cache(se, fleet, store=None, policy=None, signer_point=None):
    signer = revocation_signer(fleet)
    return RevsetCache(se, store if store is not None else MemoryStore(),
                       signer_point or signer.point, signer.fleet_id, policy)


def _now(wire):
    return revset.parse(wire).this_update + 60


def _aki(device):
    return ca_key_id(device.fleet.ca_certs[device.batch])


def _revoke(fleet, device, reason="keyCompromise"):
    cert = device.identity_cert
    fleet.registry.mark_revoked(cert.serial_number, reason,
                                issuer=cert.issuer.rfc4514_string())


def _refused(cache, data, now, reason, delta=False):
    before = cache.status(now)
    with pytest.raises(RevsetCacheError) as info:
        (cache.apply_delta if delta else cache.refresh)(lambda: data, now)
    assert info.value.reason == reason, info.value
    assert cache.status(now) == before
    return info.value


def test_offline_device_refuses_a_revoked_device_after_the_next_set(se, fleet):
    d = fleet.devices
    publisher = revset_publisher(fleet)
    first = publisher.current()
    store = MemoryStore()
    cache = _cache(se, fleet, store)
    now = _now(first)
    assert cache.refresh(lambda: first, now) == "updated"
    assert cache.check_device(d[1].serial, _aki(d[1]), now) is None  # not revoked yet
    _revoke(fleet, d[1])
    publisher.invalidate()
    fleet.clock.advance(seconds=2)
    second = publisher.current()
    assert cache.check_device(d[1].serial, _aki(d[1]), now) is None  # until the set arrives
    assert cache.refresh(lambda: second, now) == "updated"
    with pytest.raises(RevokedError) as info:
        cache.check_device(d[1].serial, _aki(d[1]), now)
    assert not info.value.batch and info.value.number == revset.parse(second).number
    for other in (d[0], d[2], d[3], d[4]):
        assert cache.check_device(other.serial, _aki(other), now) is None
    assert store.data == second
    assert cache.refresh(lambda: second, now) == "unchanged"


def test_a_delta_carries_the_next_revocation_and_gives_the_clouds_set(se, fleet):
    d = fleet.devices
    publisher = revset_publisher(fleet)
    base = publisher.current()
    cache = _cache(se, fleet)
    now = _now(base)
    cache.refresh(lambda: base, now)
    _revoke(fleet, d[2])
    publisher.invalidate()
    fleet.clock.advance(seconds=2)
    new = publisher.current()
    delta = publisher.delta(revset.parse(base).number)
    assert delta is not None and len(delta) < len(new) + 40
    # A delta whose (unsigned) header would need a huge buffer for the merge (k = 0, a
    # serial near 2^32): refused before anything is allocated, the old set kept.
    greedy = bytearray(delta)
    struct.pack_into(">I", greedy, revset.DELTA_FIXED + 30, 0xFFFFFFFF)  # universe
    greedy[revset.DELTA_FIXED + 38] = 0  # k
    struct.pack_into(">I", greedy, revset.RevDelta(delta).added_pos, 0xFFFFFFF0)
    _refused(cache, bytes(greedy), now, "malformed", delta=True)
    assert cache.apply_delta(lambda: delta, now) == "updated"
    assert cache.status(now)["number"] == revset.parse(new).number
    with pytest.raises(RevokedError):
        cache.check_device(d[2].serial, _aki(d[2]), now)
    # a delta for a set the device does not hold is refused: fetch the whole set
    _refused(cache, delta, now, "base", delta=True)
    tampered = bytearray(delta)
    tampered[-20] ^= 0x01  # the new signature
    _refused(_cache(se, fleet), tampered, now, "base", delta=True)


def test_revoking_a_batch_ca_refuses_every_device_under_it_with_one_entry(se, fleet):
    d = fleet.devices
    publisher = revset_publisher(fleet, revoked_cas=["b43"])
    wire = publisher.current()
    info = revset.parse(wire)
    assert info.ca_count == 1
    cache = _cache(se, fleet)
    now = _now(wire)
    cache.refresh(lambda: wire, now)
    with pytest.raises(RevokedError) as exc:
        cache.check_device(d[4].serial, _aki(d[4]), now)
    assert exc.value.batch
    assert cache.check_device(d[0].serial, _aki(d[0]), now) is None


def test_bad_sets_are_refused_and_the_old_state_kept(se, fleet, tmp_path):
    publisher = revset_publisher(fleet)
    good = publisher.current()
    now = _now(good)
    cache = _cache(se, fleet)
    cache.refresh(lambda: good, now)
    info = revset.parse(good)
    signer = revocation_signer(fleet)

    def resigned(number=None, this_update=None, next_update=None, fleet_id=None, key=None,
                 serials=None):
        signed = revset_merge.encode(fleet_id or info.fleet_id, number or info.number,
                                     this_update or info.this_update,
                                     next_update or info.next_update, info.universe,
                                     serials if serials is not None
                                     else list(info.iter_serials()),
                                     info.ca_ids())
        if key is not None:
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import ec
            return revset.sign_part(signed, key.sign(signed, ec.ECDSA(hashes.SHA256())))
        return signer.sign(signed)

    tampered = bytearray(resigned(number=info.number + 5, serials=[1]))
    tampered[revset.HEADER_LEN - 5] ^= 0x01  # the stride: header no longer what was signed
    _refused(cache, bytes(tampered), now, _reason_of(tampered))
    body = bytearray(resigned(number=info.number + 6, serials=[1, 2]))
    body[-11] ^= 0x40  # a body bit
    _refused(cache, bytes(body), now, "signature")
    _refused(cache, good[:-30], now, "malformed")  # cut: the length byte is no longer one
    _refused(cache, good[:40], now, "truncated")
    _refused(cache, resigned(number=info.number + 7, this_update=now - 40 * 86400,
                             next_update=now - 30 * 86400), now, "stale")
    before = cache.status(now)
    assert cache.refresh(lambda: resigned(number=info.number - 1), now) == \
        "older than cached, kept cached"  # a late copy: no refusal, the newer set stays
    assert cache.status(now) == before
    _refused(cache, resigned(number=info.number, serials=[1]), now, "rollback")
    _refused(cache, resigned(number=info.number + 10, this_update=now + 10 * 86400,
                             next_update=now + 17 * 86400), now, "future")
    _refused(cache, resigned(number=info.number + 8, key=other_key()), now, "signature")
    _refused(cache, resigned(number=info.number + 9, fleet_id=b"\xee" * 8), now, "fleet")
    with pytest.raises(RevsetCacheError) as exc:
        cache.refresh(lambda: (_ for _ in ()).throw(OSError("down")), now)
    assert exc.value.reason == "fetch"
    assert cache.status(now)["number"] == info.number


def _reason_of(data):
    try:
        revset.parse(bytes(data))
    except revset.RevsetError as exc:
        return "truncated" if exc.reason == revset.REASON_TRUNCATED else "malformed"
    return "signature"


def test_the_se_mark_refuses_an_older_set_put_back_in_the_store(se, fleet):
    publisher = revset_publisher(fleet)
    old = publisher.current()
    publisher.invalidate()
    _revoke(fleet, fleet.devices[3], "cessationOfOperation")
    fleet.clock.advance(seconds=2)
    new = publisher.current()
    store = MemoryStore()
    now = _now(new)
    _cache(se, fleet, store).refresh(lambda: new, now)
    store.data = old  # swapped behind the device's back
    cache = _cache(se, fleet, store)
    assert cache.status(now)["number"] is None  # the older set is not used
    assert cache.status(now)["high_water"] == revset.parse(new).number
    with pytest.raises(StaleRevocationError):
        cache.check_device(fleet.devices[0].serial, None, now)
    assert _cache(se, fleet, store, RevsetPolicy(fail_open=True)).check_device(
        fleet.devices[0].serial, None, now) is None


def test_a_stale_set_still_refuses_what_it_lists_and_fails_closed_otherwise(se, fleet):
    publisher = revset_publisher(fleet, validity=datetime.timedelta(hours=1))
    _revoke(fleet, fleet.devices[0])
    publisher.invalidate()
    wire = publisher.current()
    cache = _cache(se, fleet, policy=RevsetPolicy(grace_s=60))
    now = _now(wire)
    cache.refresh(lambda: wire, now)
    late = now + 3 * 3600
    with pytest.raises(RevokedError):
        cache.check_device(fleet.devices[0].serial, None, late)
    with pytest.raises(StaleRevocationError) as exc:
        cache.check_device(fleet.devices[4].serial, None, late)
    assert exc.value.reason == "stale"


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_no_false_positives_through_the_se_over_random_fleets(se, data):
    # Random fleets and revocation sets, signed, verified through the SE by the cache:
    # every unrevoked serial passes, every revoked one is refused.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.device.crl_support import point_of

    universe = data.draw(st.integers(1, 3000))
    revoked = sorted(data.draw(st.sets(st.integers(1, universe), max_size=min(universe, 300))))
    key = _KEY[0]
    fleet_id = b"\x11" * 8
    number = next(_NUMBERS)  # the examples share one SE: each set is newer
    signed = revset_merge.encode(fleet_id, number, 1000, 10**9, universe, revoked)
    wire = revset.sign_part(signed, key.sign(signed, ec.ECDSA(hashes.SHA256())))
    cache = RevsetCache(se, MemoryStore(), point_of(key.public_key()), fleet_id)
    assert cache.refresh(lambda: wire, 2000) == "updated"
    members = set(revoked)
    probes = set(revoked) | set(s + 1 for s in revoked) | set(
        data.draw(st.lists(st.integers(1, universe), max_size=50)))
    for serial in probes:
        if serial in members:
            with pytest.raises(RevokedError):
                cache.check_device(serial, None, 2000)
        else:
            assert cache.check_device(serial, None, 2000) is None


_KEY = [other_key()]
_NUMBERS = itertools.count(1)


def test_push_subscribers_get_each_new_set_once_and_a_device_takes_it(se, fleet):
    # The seam for push delivery (retained MQTT, broadcast): every new set is handed to
    # the subscribers once; what they carry is verified by the device like any other.
    publisher = revset_publisher(fleet)
    pushed = []
    publisher.subscribers.append(lambda number, wire: pushed.append((number, wire)))
    publisher.subscribers.append(lambda number, wire: 1 / 0)  # a broken channel
    first = publisher.current()
    assert publisher.current() == first
    assert pushed == [(revset.parse(first).number, first)]
    cache = _cache(se, fleet)
    assert cache.refresh(lambda: pushed[-1][1], _now(first)) == "updated"


def test_a_set_dated_beyond_the_clock_skew_is_refused_and_the_skew_is_configurable(se, fleet):
    from fleetid.device.revset_cache import RevsetPolicy

    publisher = revset_publisher(fleet)
    wire = publisher.current()
    this_update = revset.parse(wire).this_update
    cache = _cache(se, fleet, policy=RevsetPolicy(object_id=5))
    _refused(cache, wire, this_update - 301, "future")  # 5 min 1 s behind the set
    assert se_mark(se, 5) is None  # nothing reached the SE either
    assert cache.refresh(lambda: wire, this_update - 300) == "updated"  # at the bound
    wide = _cache(se, fleet, policy=RevsetPolicy(object_id=6, clock_skew_s=86400))
    assert wide.refresh(lambda: wire, this_update - 3600) == "updated"


def se_mark(se, object_id):
    from fleetid.common.errors import ReferenceNotFound

    try:
        return bytes(se.read_object(object_id))
    except ReferenceNotFound:
        return None


# -- the streamed merge into the store (device/revset_cache.py apply_delta) ---------------


class PowerCut(BaseException):
    """The device losing power mid-step: nothing after it runs (not even except Exception)."""


class StagingStore(MemoryStore):
    """A store that stages as FileStore does (begin / append / staged / commit / discard),
    failing on demand: `fail` is ("append", i) for the i-th chunk, ("staged", 0) or
    ("commit", 0); `error` the exception class raised there."""

    def __init__(self, data=None, fail=None, error=OSError):
        MemoryStore.__init__(self, data)
        self.fail = fail
        self.error = error
        self.staging = None
        self.chunks = 0
        self.discards = 0

    def _step(self, name, i=0):
        if self.fail == (name, i):
            raise self.error(name)

    def begin(self):
        self.staging = bytearray()
        self.chunks = 0

    def append(self, chunk):
        self._step("append", self.chunks)
        self.staging += chunk
        self.chunks += 1

    def staged(self):
        self._step("staged")
        return bytes(self.staging)

    def commit(self):
        self._step("commit")
        self.data = bytes(self.staging)
        self.writes += 1

    def discard(self):
        self.staging = None
        self.discards += 1


def _signed_pair(universe, revoked, added, key=None):
    """(base wire, new wire, delta, point, fleet_id): a base set, the set with `added`
    more, the delta between them, signed by `key` (a fresh one by default)."""
    from tests.device.crl_support import point_of

    key = key or other_key()
    fleet_id = b"\x22" * 8
    sign = sign_with(key)
    base = sign(revset_merge.encode(fleet_id, 1, 1000, 10**9, universe, revoked))
    new = sign(revset_merge.encode(fleet_id, 2, 1001, 10**9, universe,
                                   sorted(revoked + added)))
    return base, new, revset.encode_delta(1, new, added), point_of(key.public_key()), fleet_id


def _sample(universe, count, extra, seed):
    rng = random.Random(seed)
    picked = rng.sample(range(1, universe + 1), count + extra)
    return sorted(picked[:count]), sorted(picked[count:])


def test_a_store_failure_or_a_cut_at_any_step_of_a_merge_leaves_the_old_set(se):
    # Fault injection through every step of the streamed merge: each chunk written, the
    # read-back of the staged copy and the commit.  Each time the old set stays in the
    # store and keeps answering, on the same cache and after a restart.
    revoked, added = _sample(20000, 3000, 50, 5)
    base, new, delta, point, fleet_id = _signed_pair(20000, revoked, added)
    now = 2000
    dry = StagingStore(base)
    assert RevsetCache(se, dry, point, fleet_id, RevsetPolicy(object_id=8)).apply_delta(
        lambda: delta, now) == "updated"
    assert dry.data == new and dry.chunks > 4
    faults = [("append", i) for i in range(dry.chunks)] + [("staged", 0), ("commit", 0)]
    policy = RevsetPolicy(object_id=9)
    for fault in faults:
        for error in (OSError, PowerCut):
            store = StagingStore(base, fault, error)
            cache = RevsetCache(se, store, point, fleet_id, policy)
            before = cache.status(now)
            assert before["number"] == 1
            if error is OSError:
                with pytest.raises(RevsetCacheError) as info:
                    cache.apply_delta(lambda: delta, now)
                assert info.value.reason == "store", fault
            else:
                with pytest.raises(PowerCut):
                    cache.apply_delta(lambda: delta, now)
            assert store.data == base and store.writes == 0, fault
            assert cache.status(now) == before, fault
            with pytest.raises(RevokedError) as hit:
                cache.check_device(revoked[-1], None, now)
            assert hit.value.number == 1
            assert cache.check_device(added[0], None, now) is None
            rebooted = RevsetCache(se, StagingStore(store.data), point, fleet_id, policy)
            assert rebooted.status(now)["number"] == 1
    cache = RevsetCache(se, store, point, fleet_id, policy)
    store.fail = None
    assert cache.apply_delta(lambda: delta, now) == "updated"
    assert store.data == new
    with pytest.raises(RevokedError):
        cache.check_device(added[0], None, now)


def test_a_refused_merge_changes_nothing_and_leaves_no_staged_file(se, tmp_path):
    # Refusals after the merge (a flipped new signature, a delta re-signed under the
    # cached number with other contents) on a FileStore: the stored set, the SE's mark
    # and the answers stay; the staged file is gone.
    revoked, added = _sample(5000, 400, 20, 6)
    key = other_key()
    base, new, delta, point, fleet_id = _signed_pair(5000, revoked, added, key)
    path = tmp_path / "set.frs"
    cache = RevsetCache(se, FileStore(str(path)), point, fleet_id)
    now = 2000
    assert cache.refresh(lambda: base, now) == "updated"
    flipped = bytearray(delta)
    flipped[-12] ^= 0x01
    _refused(cache, bytes(flipped), now, "signature", delta=True)
    assert path.read_bytes() == base and not (tmp_path / "set.frs.tmp").exists()
    # the same number as the cached set, other contents: a rollback
    same_number = sign_with(key)(
        revset_merge.encode(fleet_id, 1, 1000, 10**9, 5000, sorted(revoked + added)))
    _refused(cache, revset.encode_delta(1, same_number, added), now, "rollback", delta=True)
    # a delta that gives the cached set again: unchanged
    assert cache.apply_delta(lambda: revset.encode_delta(1, base, []), now) == "unchanged"
    assert path.read_bytes() == base and not (tmp_path / "set.frs.tmp").exists()
    with pytest.raises(RevokedError):
        cache.check_device(revoked[0], None, now)
    assert cache.apply_delta(lambda: delta, now) == "updated"
    assert path.read_bytes() == new and not (tmp_path / "set.frs.tmp").exists()
    assert RevsetCache(se, FileStore(str(path)), point, fleet_id).number() == 2


def test_a_merge_never_holds_the_old_set_beside_the_new_one(se, tmp_path):
    # With a staging store (FileStore) the old set leaves the heap before the new one is
    # read back: the merge's peak above the cached set stays well under one set (it was
    # a whole new set, built beside the old one, before the merge was streamed).
    import tracemalloc

    revoked, added = _sample(10**6, 40000, 100, 7)
    base, new, delta, point, fleet_id = _signed_pair(10**6, revoked, added)
    cache = RevsetCache(se, FileStore(str(tmp_path / "set.frs")), point, fleet_id)
    now = 2000
    tracemalloc.start()
    try:
        assert cache.refresh(lambda: bytes(bytearray(base)), now) == "updated"
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        assert cache.apply_delta(lambda: delta, now) == "updated"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(new) > 30000
    assert peak - held < len(new) // 2, (peak - held, len(new))
    assert cache.status(now)["bytes"] == len(new)


def test_a_file_store_that_cannot_stage_keeps_the_old_set(se, tmp_path):
    # The FileStore's temporary file cannot be made (a directory in its place): the merge
    # is refused as a store failure before anything is written, the old set answers, and
    # once the way is clear the same delta goes through.
    revoked, added = _sample(5000, 400, 20, 8)
    base, new, delta, point, fleet_id = _signed_pair(5000, revoked, added)
    path = tmp_path / "set.frs"
    cache = RevsetCache(se, FileStore(str(path)), point, fleet_id)
    now = 2000
    assert cache.refresh(lambda: base, now) == "updated"
    (tmp_path / "set.frs.tmp").mkdir()
    _refused(cache, delta, now, "store", delta=True)
    assert path.read_bytes() == base
    with pytest.raises(RevokedError):
        cache.check_device(revoked[0], None, now)
    (tmp_path / "set.frs.tmp").rmdir()
    assert cache.apply_delta(lambda: delta, now) == "updated"
    assert path.read_bytes() == new


def test_a_stored_set_is_synced_before_its_rename_and_the_rename_after(se, tmp_path,
                                                                       monkeypatch):
    # Whole sets (FileStore.store) and merged ones (the staged copy): the bytes reach the
    # medium before the rename publishes them, and the rename before the SE's mark moves
    # past them (a power cut in between: the new name with no data, or the old set below
    # the mark, refused as a rollback until the next fetch).
    import os

    folder = tmp_path / "cache"  # apart from the emulated SE's NVM file
    folder.mkdir()
    events = []  # the cache's file operations
    real_fsync, real_rename = os.fsync, os.rename

    def note(kind, path):
        if os.path.dirname(path) == str(folder) or path == str(folder):
            events.append((kind, os.path.basename(path)))

    def fsync(fd):
        note("fsync", os.readlink("/proc/self/fd/%d" % fd))
        real_fsync(fd)

    def rename(source, target):
        note("rename", target)
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    revoked, added = _sample(5000, 400, 20, 7)
    base, new, delta, point, fleet_id = _signed_pair(5000, revoked, added, other_key())
    cache = RevsetCache(se, FileStore(str(folder / "set.frs")), point, fleet_id)
    published = [("fsync", "set.frs.tmp"), ("rename", "set.frs"), ("fsync", "cache")]
    assert cache.refresh(lambda: base, 2000) == "updated"
    assert events == published
    del events[:]
    assert cache.apply_delta(lambda: delta, 2000) == "updated"
    assert events == published
    assert (folder / "set.frs").read_bytes() == new


def test_a_mark_write_cut_after_the_commit_keeps_the_committed_set(se):
    # Power lost between the store's commit and the SE's mark: the staged copy is the
    # store's set by then, never discarded; the next start loads it and raises the mark.
    revoked, added = _sample(5000, 400, 20, 8)
    base, new, delta, point, fleet_id = _signed_pair(5000, revoked, added)
    policy = RevsetPolicy(object_id=10)
    store = StagingStore(base)
    cache = RevsetCache(se, store, point, fleet_id, policy)
    assert cache.status(2000)["number"] == 1

    def cut(number):
        raise PowerCut("mark")

    cache._write_mark = cut
    with pytest.raises(PowerCut):
        cache.apply_delta(lambda: delta, 2000)
    assert store.data == new and store.discards == 0
    rebooted = RevsetCache(se, StagingStore(store.data), point, fleet_id, policy)
    assert rebooted.status(2000)["number"] == 2
    with pytest.raises(RevokedError):
        rebooted.check_device(added[0], None, 2000)


def test_a_directory_that_cannot_be_synced_does_not_fail_a_published_set(se, tmp_path,
                                                                        monkeypatch):
    # Some file systems (FUSE, 9p) refuse fsync on a directory: the set is published by
    # then, and the cache takes it rather than failing closed on every refresh.
    import errno
    import os

    folder = tmp_path / "cache"  # apart from the emulated SE's NVM file
    folder.mkdir()
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink("/proc/self/fd/%d" % fd) == str(folder):
            raise OSError(errno.EINVAL, "directory fsync refused")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    revoked, added = _sample(5000, 400, 20, 9)
    base, new, delta, point, fleet_id = _signed_pair(5000, revoked, added, other_key())
    cache = RevsetCache(se, FileStore(str(folder / "set.frs")), point, fleet_id)
    assert cache.refresh(lambda: base, 2000) == "updated"
    assert cache.apply_delta(lambda: delta, 2000) == "updated"
    assert (folder / "set.frs").read_bytes() == new
