"""The emulator's SE side of T=1' (sim/t1_card.py), driven frame by frame."""

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetid.common import t1
from fleetid.common.errors import FrameError
from fleetid.sim.t1_card import T1Card

GP = t1.PROFILE_GP
NXP = t1.PROFILE_SE05X


class Applet:
    """Counts executions; answers reverse(apdu) || 9000."""

    def __init__(self):
        self.calls = []

    def __call__(self, apdu):
        self.calls.append(bytes(apdu))
        return bytes(apdu[::-1]) + b"\x90\x00"


def host(profile, pcb, inf=b""):
    return t1.encode_block(profile, profile.nad_host, pcb, inf)


def dec(profile, frame):
    blk = t1.decode_block(profile, frame)
    assert blk.nad == profile.nad_se
    return blk


def make(profile=GP, **kw):
    applet = Applet()
    return applet, T1Card(applet, profile, **kw)


def test_single_block_apdu_executes_once_and_answers_i_block():
    applet, card = make()
    blk = dec(GP, card.receive(host(GP, t1.i_pcb(0, False), b"\x80\xca\x01\x01")))
    assert (blk.kind, blk.ns, blk.more) == (t1.BLOCK_I, 0, False)
    assert blk.inf == b"\x01\x01\xca\x80\x90\x00"
    assert applet.calls == [b"\x80\xca\x01\x01"]
    assert card.last_apdu == b"\x80\xca\x01\x01"


def test_command_chaining_acks_each_block_and_executes_on_the_last():
    applet, card = make(ifsc=4)
    apdu = bytes(range(10))
    r1 = dec(GP, card.receive(host(GP, t1.i_pcb(0, True), apdu[:4])))
    assert (r1.kind, r1.nr, r1.error) == (t1.BLOCK_R, 1, t1.R_OK)
    r2 = dec(GP, card.receive(host(GP, t1.i_pcb(1, True), apdu[4:8])))
    assert (r2.kind, r2.nr) == (t1.BLOCK_R, 0)
    assert applet.calls == []
    resp = dec(GP, card.receive(host(GP, t1.i_pcb(0, False), apdu[8:])))
    assert resp.kind == t1.BLOCK_I and applet.calls == [apdu]


def test_block_longer_than_ifsc_is_refused_without_state_change():
    applet, card = make(ifsc=4)
    blk = dec(GP, card.receive(host(GP, t1.i_pcb(0, False), bytes(5))))
    assert (blk.kind, blk.nr, blk.error) == (t1.BLOCK_R, 0, t1.R_OTHER_ERROR)
    assert applet.calls == []


def test_response_chaining_respects_ifsd_and_retransmits_on_request():
    applet, card = make()
    assert dec(GP, card.receive(host(GP, t1.s_pcb(GP.s_ifs), b"\x03"))).inf == b"\x03"
    first = dec(GP, card.receive(host(GP, t1.i_pcb(0, False), b"ABCDE")))
    assert (first.ns, first.more, first.inf) == (0, True, b"EDC")
    # The host lost the next block: R(N(R) = 1) after asking for it twice gives the same.
    nxt = card.receive(host(GP, t1.r_pcb(1)))
    again = card.receive(host(GP, t1.r_pcb(1, t1.R_CRC_ERROR)))
    assert nxt == again
    blk = dec(GP, nxt)
    assert (blk.ns, blk.more, blk.inf) == (1, True, b"BA\x90")
    last = dec(GP, card.receive(host(GP, t1.r_pcb(0))))
    assert (last.ns, last.more, last.inf) == (0, False, b"\x00")
    assert len(applet.calls) == 1


def test_host_retransmissions_never_execute_twice():
    applet, card = make()
    frame = host(GP, t1.i_pcb(0, False), b"\x80\x32\x00\x01")
    resp = card.receive(frame)
    # The host retransmits the same I-block (as if it never saw our answer) ...
    dup = dec(GP, card.receive(frame))
    assert (dup.kind, dup.nr) == (t1.BLOCK_R, 1)
    # ... and asks for the response with R(N(R) = 0): it gets the same response again.
    assert card.receive(host(GP, t1.r_pcb(0, t1.R_OTHER_ERROR))) == resp
    assert len(applet.calls) == 1
    assert card.duplicates == 1


def test_r_block_for_an_unsent_i_block_tells_the_host_what_we_expect():
    _, card = make()
    blk = dec(GP, card.receive(host(GP, t1.r_pcb(1))))
    assert (blk.kind, blk.nr) == (t1.BLOCK_R, 0)


def test_corrupted_frame_answers_r_block_with_crc_error_and_changes_nothing():
    applet, card = make()
    frame = bytearray(host(GP, t1.i_pcb(0, False), b"\x80\xca\x00\x00"))
    frame[5] ^= 0x10
    blk = dec(GP, card.receive(bytes(frame)))
    assert (blk.kind, blk.nr, blk.error) == (t1.BLOCK_R, 0, t1.R_CRC_ERROR)
    blk = dec(GP, card.receive(b"\x21\x00"))
    assert blk.error == t1.R_OTHER_ERROR
    assert applet.calls == [] and card.bad_frames == 2
    # The state did not move: N(S) = 0 is still the block expected.
    assert dec(GP, card.receive(host(GP, t1.i_pcb(0, False), b"\x00\x01"))).kind == t1.BLOCK_I


def test_frame_with_the_se_nad_is_refused():
    applet, card = make()
    frame = t1.encode_block(GP, GP.nad_se, t1.i_pcb(0, False), b"\x00\x01")
    assert dec(GP, card.receive(frame)).error == t1.R_OTHER_ERROR
    assert applet.calls == []


def test_s_blocks_resynch_ifs_abort_cip_release_swr():
    swr_calls = []
    applet, card = make(ifsc=16, bwt_ms=250, on_swr=lambda: swr_calls.append(1))
    cip = dec(GP, card.receive(host(GP, t1.s_pcb(GP.s_cip))))
    assert (cip.stype, cip.response) == (GP.s_cip, True)
    parsed = t1.decode_cip(GP, cip.inf)
    assert (parsed.ifsc, parsed.bwt_ms, parsed.plid) == (16, 250, t1.PLID_I2C)
    assert dec(GP, card.receive(host(GP, t1.s_pcb(GP.s_ifs), b"\x00\xff"))).inf == b"\x00\xff"
    assert card.ifsd == 255
    # A chain in progress is dropped by ABORT; the next block starts afresh.
    card.receive(host(GP, t1.i_pcb(0, True), b"AB"))
    assert dec(GP, card.receive(host(GP, t1.s_pcb(GP.s_abort)))).stype == GP.s_abort
    card.receive(host(GP, t1.i_pcb(1, False), b"CD"))
    assert applet.calls == [b"CD"]
    # RESYNCH: sequence numbers back to 0.
    assert dec(GP, card.receive(host(GP, t1.s_pcb(GP.s_resynch)))).pcb == 0xE0
    assert dec(GP, card.receive(host(GP, t1.i_pcb(0, False), b"EF"))).ns == 0
    assert dec(GP, card.receive(host(GP, t1.s_pcb(GP.s_release)))).pcb == 0xE6
    swr = dec(GP, card.receive(host(GP, t1.s_pcb(GP.s_swr))))
    assert (swr.pcb, swr.inf, swr_calls, card.ifsd) == (0xEF, b"", [1], 254)


def test_se05x_soft_reset_answers_with_the_atr():
    _, card = make(NXP, bwt_ms=1000)
    blk = dec(NXP, card.receive(host(NXP, t1.s_pcb(NXP.s_swr))))
    assert blk.pcb == 0xEF
    atr = t1.decode_cip(NXP, blk.inf)
    assert (atr.bwt_ms, atr.ifsc, atr.iin) == (1000, 254, bytes.fromhex("a000000396"))
    assert dec(NXP, card.receive(host(NXP, t1.s_pcb(NXP.s_cip)))).inf == blk.inf


def test_wtx_request_must_be_answered_before_anything_else():
    _, card = make()
    req = card.wtx_request(3)
    assert dec(GP, req).inf == b"\x03" and card.awaiting_wtx
    # Anything but the matching S(WTX response) gets the request again.
    assert card.receive(host(GP, t1.r_pcb(0))) == req
    assert card.receive(host(GP, t1.s_pcb(GP.s_wtx, True), b"\x02")) == req
    assert card.receive(host(GP, t1.s_pcb(GP.s_wtx, True), b"\x03")) is None
    assert not card.awaiting_wtx


def test_after_power_on_i_blocks_need_resynch_first():
    applet, card = make()
    card.receive(host(GP, t1.i_pcb(0, True), b"AB"))
    card.power_on_reset()
    # The host continues its chain with N(S) = 1, then 0: neither is spliced in.
    for ns in (1, 0):
        blk = dec(GP, card.receive(host(GP, t1.i_pcb(ns, False), b"CD")))
        assert (blk.kind, blk.error) == (t1.BLOCK_R, t1.R_OTHER_ERROR)
    assert applet.calls == []
    card.receive(host(GP, t1.s_pcb(GP.s_resynch)))
    assert dec(GP, card.receive(host(GP, t1.i_pcb(0, False), b"CD"))).kind == t1.BLOCK_I
    assert applet.calls == [b"CD"]


def test_handler_exception_answers_6f00():
    def broken(apdu):
        raise RuntimeError("bug")

    card = T1Card(broken, GP)
    assert dec(GP, card.receive(host(GP, 0, b"\x00\x01"))).inf == b"\x6f\x00"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([GP, NXP]), st.lists(st.binary(max_size=40), max_size=8))
def test_fuzz_malformed_frames_never_reach_the_applet(profile, frames):
    applet, card = make(profile)
    for raw in frames:
        try:
            blk = t1.decode_block(profile, raw)
            valid_i = blk.kind == t1.BLOCK_I and blk.nad == profile.nad_host
        except FrameError:
            valid_i = False
        before = len(applet.calls)
        reply = card.receive(raw)
        if reply is not None:
            t1.decode_block(profile, reply)  # every reply is a well-formed block
        if not valid_i:
            assert len(applet.calls) == before
