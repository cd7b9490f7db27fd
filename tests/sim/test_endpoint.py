"""The T=1' link over the emulator's bus endpoint, on virtual time: CIP negotiation,
chaining at every boundary in both directions, busy NACKs, WTX, bus time, power loss."""

import pytest

from fleetid.common import t1
from fleetid.common.clock import FakeClock
from fleetid.common.errors import BusError, BusNack, LinkError
from fleetid.common.t1link import T1Link
from fleetid.sim.endpoint import BusEndpoint
from tests.sim.endpoint_support import Applet, Latency, command, get_cert, make_link

GP = t1.PROFILE_GP
NXP = t1.PROFILE_SE05X
PROFILES = pytest.mark.parametrize("profile", [GP, NXP], ids=["gp", "se05x"])


@PROFILES
def test_open_learns_cip_and_announces_ifsd(profile):
    link, ep, _, _ = make_link(profile, ifsc=32, bwt_ms=120, open_link=False, ifsd=100)
    assert link.ifsc == profile.default_ifsc
    cip = link.open()
    assert (cip.ifsc, cip.bwt_ms) == (32, 120)
    assert (link.ifsc, link.bwt_ms, link.poll_ms) == (32, 120, 1)
    assert ep.card.ifsd == 100


IFSC = 32


@PROFILES
@pytest.mark.parametrize("n", [IFSC - 1, IFSC, IFSC + 1, 254, 255, 256, 1024, 4096])
def test_command_chaining_boundaries(profile, n):
    link, ep, applet, _ = make_link(profile, ifsc=IFSC)
    apdu = command(n)
    assert link.transceive(apdu) == Applet.expected(apdu)
    assert applet.calls == 1
    sent = ep.counters["writes"]
    link.transceive(apdu)
    # One write per I-block of the command, and one acknowledgement per response block.
    blocks_out = -(-n // IFSC)
    blocks_in = -(-len(Applet.expected(apdu)) // link.ifsd)
    assert ep.counters["writes"] - sent == blocks_out + blocks_in - 1


@PROFILES
@pytest.mark.parametrize("n", [IFSC - 3, IFSC - 2, IFSC - 1, 252, 253, 254, 1024, 4094])
def test_response_chaining_boundaries(profile, n):
    link, _, _, _ = make_link(profile, ifsd=IFSC)
    apdu = get_cert(n)
    resp = link.transceive(apdu)
    assert resp == Applet.expected(apdu) and len(resp) == n + 2


def test_gp_profile_carries_long_blocks_when_the_se_offers_them():
    link, ep, _, _ = make_link(GP, ifsc=0xFF9, ifsd=0xFF9)
    apdu = command(4000)
    before = ep.counters["writes"]
    assert link.transceive(apdu) == Applet.expected(apdu)
    assert ep.counters["writes"] - before == 1  # one I-block each way


def test_busy_se_nacks_reads_until_the_operation_ends():
    link, ep, _, clock = make_link(GP, latency=Latency(sign=115))
    t0 = clock.now_ms()
    apdu = command(36, ins=0x2A)
    assert link.transceive(apdu) == Applet.expected(apdu)
    assert clock.now_ms() - t0 >= 115
    # polled from MPOT = 1 ms, backing off to 4 x MPOT (t1link.DEFAULT_POLL_BACKOFF):
    # about 115 / 4 polls, and the response is read within one interval of being ready
    assert 115 // 4 <= ep.counters["nacks"] <= 40
    assert clock.now_ms() - t0 <= 115 + 4 + 1
    assert link.wtx == 0


def test_poll_backoff_of_one_polls_at_mpot_and_backoff_never_passes_the_deadline():
    link, ep, _, clock = make_link(GP, latency=Latency(sign=115), poll_backoff=1)
    t0 = clock.now_ms()
    apdu = command(36, ins=0x2A)
    assert link.transceive(apdu) == Applet.expected(apdu)
    assert ep.counters["nacks"] >= 100 and clock.now_ms() - t0 <= 115 + 2  # every MPOT
    # a long backoff is still cut at BWT: the SE is asked for WTX, nothing times out
    link, ep, _, clock = make_link(GP, latency=Latency(sign=900), bwt_ms=300,
                                   poll_backoff=64)
    assert link.transceive(apdu) == Applet.expected(apdu)
    assert link.wtx >= 1 and link.timeouts == 0


@PROFILES
def test_operation_longer_than_bwt_uses_wtx(profile):
    link, ep, _, clock = make_link(profile, latency=Latency(generate_key=700), bwt_ms=200)
    t0 = clock.now_ms()
    apdu = command(5, ins=0x46)
    assert link.transceive(apdu) == Applet.expected(apdu)
    assert clock.now_ms() - t0 >= 700
    assert link.wtx == 1 and ep.counters["wtx"] == 1


def test_bus_time_is_charged_at_the_profile_clock():
    link, _, _, clock = make_link(GP, latency=Latency(bus_hz=1_000_000))
    apdu = command(1024)
    t0 = clock.now_us()
    link.transceive(apdu)
    moved = 2 * 1024 + 8 + 1024 // 254 * 6  # command and response bytes at least
    assert clock.now_us() - t0 >= moved * 9


def test_unknown_ins_and_short_apdu_cost_no_op_time():
    link, _, _, clock = make_link(GP, latency=Latency(sign=115))
    t0 = clock.now_ms()
    link.transceive(b"\x80")
    link.transceive(command(4, ins=0x10))
    assert clock.now_ms() - t0 < 5


def test_read_with_nothing_pending_nacks_and_write_discards_unread_reply():
    clock = FakeClock()
    ep = BusEndpoint(Applet(), GP, latency=Latency(), clock=clock)
    with pytest.raises(BusNack):
        ep.read(4)
    ep.write(t1.encode_block(GP, 0x21, t1.s_pcb(GP.s_resynch)))
    assert ep.read(4) == b"\x12\xe0\x00\x00"
    ep.write(t1.encode_block(GP, 0x21, t1.s_pcb(GP.s_resynch)))  # the CRC was never read
    assert ep.read(4) == b"\x12\xe0\x00\x00"
    ep.read(2)
    with pytest.raises(BusNack):
        ep.read(1)


def test_reads_past_the_frame_end_return_ff():
    ep = BusEndpoint(Applet(), GP, latency=Latency(), clock=FakeClock())
    ep.write(t1.encode_block(GP, 0x21, t1.s_pcb(GP.s_resynch)))
    assert ep.read(8)[6:] == b"\xff\xff"


@pytest.mark.parametrize("cut", ["power_loss", "reset"])
def test_power_loss_loses_ram_state_and_the_link_recovers(cut):
    link, ep, applet, _ = make_link(GP)
    link.transceive(command(10))
    getattr(ep, cut)()
    assert applet.power_losses == 1
    # The card wants RESYNCH after power-on: the first APDU fails with a typed error
    # (never executed), the link resynchronises, the next one works.
    with pytest.raises(LinkError) as e:
        link.transceive(command(300))
    assert e.value.reason == LinkError.RESYNCH
    assert applet.calls == 1
    assert link.transceive(command(300)) == Applet.expected(command(300))


def test_swr_is_a_warm_reset_of_the_applet():
    link, _, applet, _ = make_link(GP)
    link.soft_reset()
    assert applet.power_losses == 1
    assert link.transceive(command(8)) == Applet.expected(command(8))


def test_closed_endpoint_gives_link_error_bus():
    link, ep, _, _ = make_link(GP)
    ep.close()
    with pytest.raises(BusError):
        ep.read(1)
    with pytest.raises(LinkError) as e:
        link.transceive(command(8))
    assert e.value.reason == LinkError.BUS


def test_release_and_resynch_calls():
    link, ep, _, _ = make_link(NXP)
    link.release()
    link.resynch()
    assert link.transceive(command(8)) == Applet.expected(command(8))


def test_realistic_profile_from_sim_profiles():
    profiles = pytest.importorskip("fleetid.sim.profiles")
    link, _, _, clock = make_link(NXP, latency=profiles.get("se050"), bwt_ms=1000)
    t0 = clock.now_ms()
    apdu = command(36, ins=0x2A)  # SIGN
    assert link.transceive(apdu) == Applet.expected(apdu)
    assert clock.now_ms() - t0 >= profiles.get("se050").op_ms("sign")


def test_link_constructed_without_open_uses_profile_defaults():
    clock = FakeClock()
    ep = BusEndpoint(Applet(), GP, latency=Latency(), clock=clock)
    link = T1Link(ep, GP, clock)
    apdu = command(40)
    assert link.transceive(apdu) == Applet.expected(apdu)  # IFSC 8 before CIP


def test_power_cut_inside_the_chips_nvm_commit_is_a_power_loss():
    nvm = pytest.importorskip("fleetid.sim.nvm")

    class CutApplet(Applet):
        def process(self, apdu):
            if apdu[1] == 0xD6:
                raise nvm.PowerLoss(1, False)
            return super().process(apdu)

    clock = FakeClock()
    applet = CutApplet()
    ep = BusEndpoint(applet, GP, latency=Latency(), clock=clock)
    link = T1Link(ep, GP, clock)
    link.open()
    with pytest.raises(LinkError) as e:
        link.transceive(command(20, ins=0xD6))
    assert e.value.reason in (LinkError.RESYNCH, LinkError.RESET)
    assert ep.counters["power_losses"] == 1
    assert link.transceive(command(20)) == Applet.expected(command(20))
