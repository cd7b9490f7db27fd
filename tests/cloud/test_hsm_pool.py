"""The bounded session pool as a state machine (no HSM: fake sessions)."""

import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fleetid.cloud.hsm.errors import HsmBusy, HsmError, SessionLost
from fleetid.cloud.hsm.pool import SessionPool


class FakeSessions:
    def __init__(self):
        self.live = set()
        self.opened = 0
        self.fail_next_open = False

    def open(self):
        if self.fail_next_open:
            self.fail_next_open = False
            raise HsmError(HsmError.TOKEN, "open failed")
        self.opened += 1
        self.live.add(self.opened)
        return self.opened

    def close(self, raw):
        self.live.discard(raw)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.fake = FakeSessions()
        self.max = 3
        self.pool = SessionPool(self.fake.open, self.fake.close, max_sessions=self.max,
                                acquire_timeout=0)
        self.held = []
        self.discarded = 0
        self.closed = False

    @rule(fail=st.booleans())
    def acquire(self, fail):
        self.fake.fail_next_open = fail
        idle = self.pool.stats()["idle"]
        full = len(self.held) == self.max
        try:
            pooled = self.pool.acquire()
        except HsmBusy:
            assert full and not self.closed
        except HsmError as exc:
            if self.closed:
                assert exc.reason == HsmError.CLOSED
            else:
                assert exc.reason == HsmError.TOKEN and fail and idle == 0 and not full
        else:
            assert not full and not self.closed
            assert pooled.raw in self.fake.live
            assert all(pooled.raw != other.raw for other in self.held)
            self.held.append(pooled)
        self.fake.fail_next_open = False

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 10), lost=st.booleans())
    def release(self, index, lost):
        pooled = self.held.pop(index % len(self.held))
        self.pool.release(pooled, lost)
        if lost:
            self.discarded += 1
        if lost or self.closed:
            assert pooled.raw not in self.fake.live

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self):
        self.pool.close()
        self.closed = True

    @invariant()
    def accounting_adds_up(self):
        stats = self.pool.stats()
        assert stats["in_use"] == len(self.held)
        assert stats["open"] <= self.max
        assert stats["open"] == len(self.fake.live)
        assert stats["idle"] + stats["in_use"] == stats["open"]
        assert stats["discarded"] == self.discarded
        if self.closed:
            assert stats["idle"] == 0


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_a_waiting_caller_gets_the_session_released_by_another_thread():
    fake = FakeSessions()
    pool = SessionPool(fake.open, fake.close, max_sessions=1, acquire_timeout=5)
    first = pool.acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    pool.release(first)
    waiter.join(5)
    assert got and got[0].raw == first.raw
    assert pool.stats()["busy_timeouts"] == 0


def test_session_context_discards_on_session_lost_only():
    fake = FakeSessions()
    pool = SessionPool(fake.open, fake.close, max_sessions=2)
    with pytest.raises(SessionLost):
        with pool.session():
            raise SessionLost("gone")
    with pytest.raises(ValueError):
        with pool.session():
            raise ValueError("not a session problem")
    stats = pool.stats()
    assert (stats["discarded"], stats["idle"], stats["in_use"]) == (1, 1, 0)


def test_acquire_after_close_is_refused():
    pool = SessionPool(FakeSessions().open, lambda raw: None, max_sessions=1)
    pool.close()
    with pytest.raises(HsmError) as info:
        pool.acquire()
    assert info.value.reason == HsmError.CLOSED


@pytest.mark.parametrize("kwargs", [{"max_sessions": 0}, {"acquire_timeout": -1}])
def test_bad_pool_settings_are_refused(kwargs):
    with pytest.raises(HsmError) as info:
        SessionPool(FakeSessions().open, lambda raw: None, **kwargs)
    assert info.value.reason == HsmError.CONFIG
