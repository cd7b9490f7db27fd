"""The host side of T=1' (common/t1link.py) against scripted SEs: every failure is a typed
LinkError within a bounded virtual time, never a hang; WTX, ABORT, protocol violations."""

import pytest

from fleetid.common import t1
from fleetid.common.clock import FakeClock
from fleetid.common.errors import BusError, BusNack, LinkError
from fleetid.common.t1link import T1Link
from fleetid.sim.t1_card import T1Card

GP = t1.PROFILE_GP


class ScriptedBus:
    """A Bus whose SE is a function frame -> reply frame (None: no reply, reads NACK)."""

    def __init__(self, se, clock):
        self.se = se
        self.clock = clock
        self.pending = None
        self.ready_ms = 0
        self.writes = []
        self.resets = 0
        self.closed = False

    def write(self, frame):
        self.writes.append(bytes(frame))
        reply = self.se(bytes(frame))
        if isinstance(reply, tuple):  # (frame, delay_ms)
            reply, delay = reply
            self.ready_ms = self.clock.now_ms() + delay
        else:
            self.ready_ms = 0
        self.pending = bytearray(reply) if reply is not None else None

    def read(self, n):
        if self.pending is None or self.clock.now_ms() < self.ready_ms:
            raise BusNack()
        out = bytes(self.pending[:n])
        del self.pending[:n]
        if not self.pending:
            self.pending = None
        return out + b"\xff" * (n - len(out))

    def reset(self):
        self.resets += 1

    def close(self):
        self.closed = True


def card_bus(clock, **card_kw):
    card = T1Card(lambda apdu: bytes(apdu) + b"\x90\x00", GP, **card_kw)
    return ScriptedBus(card.receive, clock), card


def se_frame(pcb, inf=b""):
    return t1.encode_block(GP, GP.nad_se, pcb, inf)


def test_silent_se_open_fails_with_timeout_in_bounded_time():
    clock = FakeClock()
    link = T1Link(ScriptedBus(lambda f: None, clock), GP, clock, max_retries=2)
    with pytest.raises(LinkError) as e:
        link.open()
    assert e.value.reason == LinkError.TIMEOUT
    assert clock.now_ms() <= 3 * (2 * GP.default_bwt_ms + 10)


def test_silent_se_transceive_ends_in_typed_error_after_all_recovery_steps():
    clock = FakeClock()
    bus = ScriptedBus(lambda f: None, clock)
    link = T1Link(bus, GP, clock, max_retries=1)
    with pytest.raises(LinkError) as e:
        link.transceive(b"\x00\xa4\x04\x00")
    assert e.value.reason == LinkError.TIMEOUT
    assert bus.resets == 1  # RESYNCH, SWR, then the hardware reset were all tried
    kinds = {w[1] for w in bus.writes}
    assert {0x00, 0x82, 0xC0, 0xCF, 0xC4} <= kinds  # I, R(other), RESYNCH, SWR, CIP
    assert clock.now_ms() < 60_000


def test_garbage_se_ends_in_retries_error():
    clock = FakeClock()
    link = T1Link(ScriptedBus(lambda f: b"\x12\x00\x00\x02\x90\x00\x00\x00", clock), GP, clock)
    with pytest.raises(LinkError) as e:
        link.transceive(b"\x00\xa4\x04\x00")
    assert e.value.reason == LinkError.RETRIES


def test_bus_failure_is_link_error_bus():
    class Broken(ScriptedBus):
        def write(self, frame):
            raise BusError("socket closed")

    clock = FakeClock()
    link = T1Link(Broken(None, clock), GP, clock)
    with pytest.raises(LinkError) as e:
        link.transceive(b"\x00\xa4\x04\x00")
    assert e.value.reason == LinkError.BUS


def test_empty_or_oversized_apdu_is_refused_before_the_bus():
    clock = FakeClock()
    bus, _ = card_bus(clock)
    link = T1Link(bus, GP, clock)
    for apdu in (b"", bytes(65545)):
        with pytest.raises(LinkError) as e:
            link.transceive(apdu)
        assert e.value.reason == LinkError.TOO_LONG
    assert bus.writes == []


def test_wtx_extends_the_waiting_time_by_the_multiplier():
    clock = FakeClock()
    bus, card = card_bus(clock, bwt_ms=100)
    link = T1Link(bus, GP, clock)
    link.open()
    state = {"n": 0}
    inner = bus.se

    def slow(frame):
        blk = t1.decode_block(GP, frame)
        if blk.kind == t1.BLOCK_I:
            state["resp"] = inner(frame)
            return card.wtx_request(5)
        if blk.kind == t1.BLOCK_S and blk.stype == GP.s_wtx:
            assert inner(frame) is None
            return state["resp"], 450  # within 5 x BWT, far beyond one BWT
        return inner(frame)

    bus.se = slow
    t0 = clock.now_ms()
    assert link.transceive(b"\x80\xca\x00\x00") == b"\x80\xca\x00\x00\x90\x00"
    assert link.wtx == 1 and clock.now_ms() - t0 >= 450


def test_se_abort_request_ends_the_chain_with_aborted():
    clock = FakeClock()
    bus, card = card_bus(clock, ifsc=4)
    link = T1Link(bus, GP, clock)
    link.open()
    inner = bus.se

    def aborting(frame):
        blk = t1.decode_block(GP, frame)
        if blk.kind == t1.BLOCK_I and blk.ns == 1:
            return se_frame(t1.s_pcb(GP.s_abort))
        return inner(frame)

    bus.se = aborting
    with pytest.raises(LinkError) as e:
        link.transceive(bytes(12))
    assert e.value.reason == LinkError.ABORTED
    assert t1.encode_block(GP, 0x21, t1.s_pcb(GP.s_abort, True)) in bus.writes
    bus.se = inner
    assert link.transceive(b"\x00\x01") == b"\x00\x01\x90\x00"


def test_se_answering_before_the_chain_ends_is_a_protocol_error():
    clock = FakeClock()
    bus, _ = card_bus(clock, ifsc=4)
    link = T1Link(bus, GP, clock)
    link.open()
    bus.se = lambda f: se_frame(t1.i_pcb(0, False), b"\x90\x00")
    with pytest.raises(LinkError) as e:
        link.transceive(bytes(12))
    assert "protocol" in e.value.detail


def test_duplicate_i_block_from_the_se_is_never_delivered():
    clock = FakeClock()
    link = T1Link(ScriptedBus(lambda f: se_frame(t1.i_pcb(1, False), b"\x6a\x80"), clock),
                  GP, clock)
    # The host expects N(S) = 0 from the SE: a block numbered 1 is not its response.
    with pytest.raises(LinkError):
        link.transceive(b"\x00\xa4\x04\x00")


def test_too_many_wtx_requests_end_in_timeout():
    clock = FakeClock()
    bus, card = card_bus(clock)
    link = T1Link(bus, GP, clock, max_wtx=3)
    inner = bus.se

    def storm(frame):
        blk = t1.decode_block(GP, frame)
        if blk.kind == t1.BLOCK_I or (blk.kind == t1.BLOCK_S and blk.stype == GP.s_wtx):
            card.receive(frame)
            return card.wtx_request(1)
        return inner(frame)

    bus.se = storm
    with pytest.raises(LinkError) as e:
        link.transceive(b"\x00\xa4\x04\x00")
    assert "WTX" in e.value.detail


def test_close_closes_the_bus():
    clock = FakeClock()
    bus, _ = card_bus(clock)
    T1Link(bus, GP, clock).close()
    assert bus.closed


def test_ifsd_out_of_range_is_refused():
    with pytest.raises(ValueError):
        T1Link(None, t1.PROFILE_SE05X, FakeClock(), ifsd=255)


# -- hints: a host and an SE set up with different framing profiles ---------------------------


@pytest.mark.parametrize("host,card", [("gp", "se05x"), ("se05x", "gp")])
def test_profile_mismatch_says_which_t1_profile_to_try(host, card):
    """The SE answers from its own profile's address (GP 0x12, SE05x 0xA5): every block is
    refused for its NAD, and the typed error names the profile the SE speaks."""
    clock = FakeClock()
    se = T1Card(lambda apdu: bytes(apdu) + b"\x90\x00", t1.PROFILES[card])
    link = T1Link(ScriptedBus(se.receive, clock), t1.PROFILES[host], clock=clock)
    with pytest.raises(LinkError) as info:
        link.open()
    assert info.value.reason == LinkError.RETRIES
    assert ("T=1' profile mismatch? try --t1-profile %s" % card) in str(info.value)
    assert "NAD %02X" % t1.PROFILES[card].nad_se in info.value.detail


def test_corrupted_blocks_of_the_right_profile_give_no_profile_hint():
    clock = FakeClock()
    card = T1Card(lambda apdu: bytes(apdu) + b"\x90\x00", GP)

    def flip_crc(frame):
        reply = card.receive(frame)
        return None if reply is None else reply[:-1] + bytes([reply[-1] ^ 0xFF])

    link = T1Link(ScriptedBus(flip_crc, clock), GP, clock=clock)
    with pytest.raises(LinkError) as info:
        link.open()
    assert info.value.reason == LinkError.RETRIES and info.value.detail == "bad blocks"
