"""The device's CRL cache (device/crl_cache.py) against an emulated SE: a CRL made by the
cloud publisher verifies through the SE and answers revoked / not revoked; stale, rolled
back, truncated, wrongly signed and wrong-issuer CRLs are refused with their reasons and
the old cache is kept; the high-water mark in the SE defeats a swapped cache file; the
freshness policy fails closed or open as configured."""

import datetime

import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.device import crl_cache
from fleetid.device.crl_cache import (
    CrlCache,
    CrlError,
    CrlPolicy,
    FileStore,
    RevokedError,
    StaleRevocationError,
)
from fleetid.device.se import SeSession
from tests.cloud.cloud_support import NOW, Fleet
from tests.cloud.crl_support import b42_publisher
from tests.device.crl_support import MemoryStore, epoch, make_crl, other_key, point_of

T0 = NOW.replace(microsecond=0) - datetime.timedelta(hours=1)
HOUR = 3600


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("crlfleet"))
    yield fleet
    fleet.close()


@pytest.fixture
def se(fabbed):
    _, chip = fabbed
    session = SeSession(ApduProtocol(chip.process))
    session.select()
    session.chip = chip
    return session


def _cache(se, fleet, store=None, policy=None, batch="b42"):
    ca = fleet.ca_certs[batch]
    return CrlCache(se, store if store is not None else MemoryStore(),
                    point_of(ca.public_key()), ca.subject.public_bytes(), policy)


def _refused(cache, data, now, reason):
    before = cache.status(now)
    with pytest.raises(CrlError) as info:
        cache.refresh(lambda: data, now)
    assert info.value.reason == reason, info.value
    assert cache.status(now) == before  # the old cache is kept
    return info.value


def test_cloud_made_crl_verifies_through_the_se_and_answers_checks(se, fleet):
    revoked = fleet.provision("b42")
    kept = fleet.provision("b42")
    cert = revoked.identity_cert
    fleet.registry.mark_revoked(cert.serial_number, "keyCompromise",
                                issuer=cert.issuer.rfc4514_string())
    publisher = b42_publisher(fleet)
    crl = publisher.current("b42")
    der = publisher.current_der("b42")
    store = MemoryStore()
    cache = _cache(se, fleet, store)
    now = epoch(crl.last_update_utc) + 60
    assert cache.refresh(lambda: der, now) == "updated"
    assert store.data == der
    with pytest.raises(RevokedError) as info:
        cache.check_serial(cert.serial_number, now)
    assert info.value.serial == cert.serial_number and info.value.reason == "revoked"
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert info.value.number == number
    assert cache.check_serial(kept.identity_cert.serial_number, now) is None
    status = cache.status(now)
    assert status["number"] == number and status["high_water"] == number
    assert status["this_update"] == epoch(crl.last_update_utc)
    assert status["next_update"] == epoch(crl.next_update_utc)
    assert status["fresh"] and status["state"] == "fresh" and status["revoked"] >= 1
    assert cache.refresh(lambda: der, now) == "unchanged"
    assert store.writes == 1
    # The mark is in the SE: a data object holding the number.
    record = se.read_object(C.DATA_OBJECT_CRL_NUMBER)
    assert int.from_bytes(record[9:], "big") == number


def test_revocation_dates_and_times_decode_like_cryptography(se, fleet):
    when = datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
    later = datetime.datetime(2050, 1, 1, 0, 0, 1, tzinfo=datetime.timezone.utc)  # Generalized
    data = make_crl(fleet, 7, T0, [(0x1234, when), (0x5678, later)],
                    next_update=later + datetime.timedelta(days=1))
    info = crl_cache.parse_crl(data)
    assert info.this_update == epoch(T0) and info.next_update == epoch(later) + 86400
    assert crl_cache.find_revoked(info, 0x1234) == epoch(when)
    assert crl_cache.find_revoked(info, 0x5678) == epoch(later)
    assert crl_cache.find_revoked(info, 0x9999) is None
    assert info.number == 7 and info.revoked_count == 2


def test_stale_crl_is_refused_and_the_old_one_kept(se, fleet):
    cache = _cache(se, fleet)
    now = epoch(T0) + HOUR
    cache.refresh(lambda: make_crl(fleet, 10, T0), now)
    old_crl = make_crl(fleet, 11, T0 - datetime.timedelta(days=3))  # next update 2 days ago
    _refused(cache, old_crl, now, crl_cache.REASON_STALE)
    assert cache.status(now)["number"] == 10


def test_an_older_crl_is_kept_out_without_a_refusal_and_a_same_number_one_refused(se, fleet):
    cache = _cache(se, fleet)
    now = epoch(T0) + HOUR
    cache.refresh(lambda: make_crl(fleet, 20, T0), now)
    before = cache.status(now)
    # A late copy (a retained MQTT message after the HTTP fetch): the newer one stays.
    assert cache.refresh(lambda: make_crl(fleet, 19, T0), now) == crl_cache.RESULT_OLDER
    assert crl_cache.RESULT_OLDER == "older than cached, kept cached"
    assert cache.status(now) == before
    # Same number, other contents: not newer either.
    _refused(cache, make_crl(fleet, 20, T0, [(5, T0)]), now, crl_cache.REASON_ROLLBACK)
    assert cache.refresh(lambda: make_crl(fleet, 21, T0), now) == "updated"


@pytest.mark.parametrize("cut", [1, 2, 3, 50, 120, -70, -1])
def test_truncated_crl_is_refused(se, fleet, cut):
    cache = _cache(se, fleet)
    now = epoch(T0) + HOUR
    cache.refresh(lambda: make_crl(fleet, 30, T0), now)
    data = make_crl(fleet, 31, T0, [(77, T0)])
    _refused(cache, data[:cut], now, crl_cache.REASON_TRUNCATED)


def test_wrongly_signed_crl_is_refused_by_the_se(se, fleet):
    cache = _cache(se, fleet)
    now = epoch(T0) + HOUR
    cache.refresh(lambda: make_crl(fleet, 40, T0), now)
    forged = make_crl(fleet, 41, T0, key=other_key())  # b42's name, another key
    _refused(cache, forged, now, crl_cache.REASON_SIGNATURE)
    flipped = bytearray(make_crl(fleet, 41, T0, [(99, T0)]))
    flipped[-10] ^= 0x01  # one bit of the signature's s
    _refused(cache, bytes(flipped), now, crl_cache.REASON_SIGNATURE)
    assert cache.check_serial(99, now) is None  # the refused CRLs changed nothing


def test_crl_of_another_issuer_is_refused(se, fleet):
    cache = _cache(se, fleet)
    now = epoch(T0) + HOUR
    cache.refresh(lambda: make_crl(fleet, 50, T0), now)
    _refused(cache, make_crl(fleet, 51, T0, batch="b43"), now, crl_cache.REASON_ISSUER)


def test_unknown_critical_extension_is_refused(se, fleet):
    cache = _cache(se, fleet)
    now = epoch(T0) + HOUR
    delta = (x509.DeltaCRLIndicator(3), True)
    _refused(cache, make_crl(fleet, 60, T0, extensions=[delta]), now,
             crl_cache.REASON_UNSUPPORTED)


def test_fetch_failure_keeps_the_cache(se, fleet):
    cache = _cache(se, fleet)
    now = epoch(T0) + HOUR
    cache.refresh(lambda: make_crl(fleet, 70, T0), now)

    def offline():
        raise OSError("network unreachable")

    with pytest.raises(CrlError) as info:
        cache.refresh(offline, now)
    assert info.value.reason == crl_cache.REASON_FETCH
    assert cache.status(now)["number"] == 70


def test_freshness_policy_fails_closed_or_open(se, fleet):
    data = make_crl(fleet, 80, T0, [(0xABC, T0)])
    closed = _cache(se, fleet)
    with pytest.raises(StaleRevocationError) as info:
        closed.check_serial(1, epoch(T0))
    assert info.value.reason == crl_cache.REASON_NO_CRL
    closed.refresh(lambda: data, epoch(T0) + HOUR)
    fresh_until = epoch(T0) + 24 * HOUR + 86400  # nextUpdate + default grace
    assert closed.check_serial(1, fresh_until) is None
    with pytest.raises(StaleRevocationError) as info:
        closed.check_serial(1, fresh_until + 1)
    assert info.value.reason == crl_cache.REASON_STALE
    assert closed.status(fresh_until + 1)["state"] == "stale"
    with pytest.raises(RevokedError):  # a stale CRL still proves a revocation
        closed.check_serial(0xABC, fresh_until + 1)

    open_policy = CrlPolicy(grace_s=0, fail_open=True, object_id=2)
    opened = _cache(se, fleet, policy=open_policy)
    assert opened.check_serial(1, epoch(T0)) is None  # nothing cached: open
    opened.refresh(lambda: data, epoch(T0) + HOUR)
    assert opened.check_serial(1, epoch(T0) + 24 * HOUR + 1) is None
    with pytest.raises(RevokedError):
        opened.check_serial(0xABC, epoch(T0) + 24 * HOUR + 1)
    assert opened.status(epoch(T0))["policy"] == "fail-open"


def test_swapped_cache_file_cannot_roll_back(se, fleet, tmp_path):
    now = epoch(T0) + HOUR
    older = make_crl(fleet, 90, T0)
    newer = make_crl(fleet, 91, T0, [(0x77, T0)])
    store = FileStore(str(tmp_path / "b42.crl"))
    first = _cache(se, fleet, store)
    first.refresh(lambda: older, now)
    first.refresh(lambda: newer, now)
    (tmp_path / "b42.crl").write_bytes(older)  # someone puts the older CRL back
    restarted = _cache(se, fleet, store)
    assert restarted.status(now)["state"] == "none"  # refused at load
    with pytest.raises(StaleRevocationError):
        restarted.check_serial(0x77, now)
    with pytest.raises(CrlError) as info:
        restarted.refresh(lambda: older, now)
    assert info.value.reason == crl_cache.REASON_ROLLBACK
    assert restarted.refresh(lambda: newer, now) == "updated"  # the mark's own CRL is back
    with pytest.raises(RevokedError):
        restarted.check_serial(0x77, now)


def test_power_cut_between_store_and_mark_is_healed_at_load(se, fleet):
    now = epoch(T0) + HOUR
    store = MemoryStore()
    first = _cache(se, fleet, store)
    first.refresh(lambda: make_crl(fleet, 100, T0), now)
    store.data = make_crl(fleet, 101, T0)  # stored, then power lost before the mark
    second = _cache(se, fleet, store)
    assert second.status(now)["number"] == 101 and second.status(now)["high_water"] == 101


def test_power_cut_during_the_mark_write_keeps_a_consistent_mark(se, fleet):
    from fleetid.sim.nvm import PowerLoss

    now = epoch(T0) + HOUR
    store = MemoryStore()
    cache = _cache(se, fleet, store)
    cache.refresh(lambda: make_crl(fleet, 110, T0), now)
    se.chip.nvm.cut_power_at(1, after_atomic=False)
    with pytest.raises(PowerLoss):
        cache.refresh(lambda: make_crl(fleet, 111, T0), now)
    se.chip.power_loss()
    se.select()
    restarted = _cache(se, fleet, store)
    assert restarted.status(now)["number"] == 111  # stored; the mark catches up at load
    assert int.from_bytes(se.read_object(C.DATA_OBJECT_CRL_NUMBER)[9:], "big") == 111


def test_se_object_of_another_issuer_is_refused(se, fleet):
    now = epoch(T0) + HOUR
    _cache(se, fleet, batch="b43").refresh(lambda: make_crl(fleet, 5, T0, batch="b43"), now)
    with pytest.raises(CrlError) as info:
        _cache(se, fleet).refresh(lambda: make_crl(fleet, 6, T0), now)
    assert info.value.reason == crl_cache.REASON_STATE


@settings(max_examples=300, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_parser_fuzz_gives_info_or_crl_error(fleet, data):
    base = data.draw(st.sampled_from(_FUZZ_BASES(fleet)))
    crl = bytearray(base)
    for _ in range(data.draw(st.integers(0, 4))):
        pos = data.draw(st.integers(0, len(crl) - 1))
        crl[pos] = data.draw(st.integers(0, 255))
    crl = bytes(crl[: data.draw(st.integers(0, len(crl)))])
    if data.draw(st.booleans()):
        crl = data.draw(st.binary(max_size=200))
    try:
        info = crl_cache.parse_crl(crl)
    except CrlError as exc:
        assert exc.reason in (crl_cache.REASON_TRUNCATED, crl_cache.REASON_MALFORMED,
                              crl_cache.REASON_ALGORITHM, crl_cache.REASON_UNSUPPORTED)
    else:
        assert info.number >= 0 and info.next_update >= info.this_update
        crl_cache.find_revoked(info, 1)


_BASES = []


def _FUZZ_BASES(fleet):  # noqa: N802 - built once per module
    if not _BASES:
        _BASES.append(make_crl(fleet, 1, T0))
        _BASES.append(make_crl(fleet, 2 ** 100, T0, [(3, T0), (2 ** 150, T0)]))
    return _BASES


_SEQUENCE_CRLS = {}


@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.integers(1, 5), st.booleans(), st.booleans()),
                      max_size=8))
def test_any_refresh_sequence_keeps_the_highest_good_crl_and_a_matching_mark(se, fleet, steps):
    # Model: a refresh is accepted iff the CRL is well signed and its number is above the
    # highest accepted so far (or equal with the same bytes); a well-signed older one
    # returns RESULT_OLDER (the cache is what it was); the cache and the SE's mark
    # always name the highest accepted number, whatever was refused in between.
    if not _SEQUENCE_CRLS:
        for number in range(1, 6):
            _SEQUENCE_CRLS[number, True] = make_crl(fleet, number, T0, [(number, T0)])
            _SEQUENCE_CRLS[number, False] = make_crl(fleet, number, T0, key=other_key())
    # TEST-ONLY: forget the previous example's mark (the NVM API, never an APDU).
    se.chip.nvm.commit({"obj/%d" % C.DATA_OBJECT_CRL_NUMBER: None})
    store = MemoryStore()
    now = epoch(T0) + HOUR
    best = None
    cache = None
    for number, good, restart in steps:
        if cache is None or restart:  # a restart re-loads and re-verifies the stored CRL
            cache = _cache(se, fleet, store)
        data = _SEQUENCE_CRLS[number, good]
        try:
            result = cache.refresh(lambda: data, now)
            accepted = result != crl_cache.RESULT_OLDER
        except CrlError:
            result, accepted = None, False
        assert accepted == (good and (best is None or number >= best)), (number, good, best)
        # An older good CRL with a CRL cached is set aside without a refusal.
        assert (result == crl_cache.RESULT_OLDER) == (good and best is not None and
                                                      number < best), (number, good, best)
        if accepted:
            best = number
        status = cache.status(now)
        assert status["number"] == best and status["high_water"] == best
        if best is not None:
            with pytest.raises(RevokedError):
                cache.check_serial(best, now)


@pytest.mark.parametrize("ahead", [301, 3600, 10 * 86400])
def test_a_ca_signed_crl_dated_beyond_the_clock_skew_is_refused_and_the_cache_kept(
        se, fleet, ahead):
    now = epoch(T0) + HOUR
    store = MemoryStore()
    cache = _cache(se, fleet, store)
    cache.refresh(lambda: make_crl(fleet, 300, T0), now)
    future = T0 + datetime.timedelta(hours=1, seconds=ahead)  # thisUpdate = now + ahead
    data = make_crl(fleet, 301, future, [(0x55, future)])
    error = _refused(cache, data, now, crl_cache.REASON_FUTURE)
    assert "%d s ahead" % ahead in str(error) and "300 s allowed" in str(error)
    assert store.writes == 1 and cache.status(now)["high_water"] == 300  # SE mark kept
    assert cache.check_serial(0x55, now) is None


def test_a_crl_within_the_clock_skew_is_taken_and_the_skew_is_configurable(se, fleet):
    assert crl_cache.DEFAULT_CLOCK_SKEW_S == 300
    now = epoch(T0) + HOUR
    cache = _cache(se, fleet)
    cache.refresh(lambda: make_crl(fleet, 400, T0), now)
    ahead = T0 + datetime.timedelta(hours=1, seconds=300)  # exactly the allowed skew
    assert cache.refresh(lambda: make_crl(fleet, 401, ahead), now) == "updated"
    wide = _cache(se, fleet, policy=CrlPolicy(clock_skew_s=11 * 86400, object_id=4))
    later = T0 + datetime.timedelta(days=10)
    assert wide.refresh(lambda: make_crl(fleet, 402, later), now) == "updated"
    with pytest.raises(ValueError):
        CrlPolicy(clock_skew_s=-1)


def test_the_publishers_crl_from_the_future_is_refused(se, fleet):
    # The cloud's own publisher (cloud/revocation/crl.py) on a clock 10 days ahead.
    publisher = b42_publisher(fleet)
    fleet.clock.advance(days=10)
    try:
        crl = publisher.current("b42")
        data = publisher.current_der("b42")
    finally:
        fleet.clock.advance(days=-10)
    now = epoch(crl.last_update_utc) - 10 * 86400
    cache = _cache(se, fleet, policy=CrlPolicy(object_id=5))
    _refused(cache, data, now, crl_cache.REASON_FUTURE)
    assert cache.status(now)["state"] == "none"


def test_a_retained_mqtt_crl_older_than_the_http_one_is_no_refusal_for_the_agent(se, fleet):
    # The agent fetched CRL 501 over HTTP; the broker's retained message still holds 500
    # and arrives when the agent subscribes.  device/agent_mqtt.py records the cache's
    # answer (cli/agent_mqtt.py prints it): "older than cached, kept cached", not
    # "refused: rollback".
    from fleetid.device.agent_mqtt import AgentMqtt

    class Clock:
        def now(self):
            return epoch(T0) + HOUR

    class Agent:
        clock = Clock()
        revocation = _cache(se, fleet, policy=CrlPolicy(object_id=6))

    class Channel:
        on_crl = on_rotate = None

    agent, channel = Agent(), Channel()
    link = AgentMqtt(agent, channel)
    assert agent.revocation.refresh(lambda: make_crl(fleet, 501, T0, [(0x66, T0)]),
                                    Clock().now()) == "updated"
    channel.on_crl("b42", make_crl(fleet, 500, T0))
    assert link.crl_results == ["older than cached, kept cached"]
    with pytest.raises(RevokedError):
        agent.revocation.check_serial(0x66, Clock().now())
