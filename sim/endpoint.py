"""The emulator's bus endpoint: a Bus (write / read / reset / close) in front of a chip.

    ep = BusEndpoint(chip, profile=t1.PROFILE_GP, latency=profiles.get("none"),
                     clock=None, faults=None)

It runs the SE side of T=1' (sim/t1_card.py) and models what the host sees on I2C:

* Transfer time: every transaction costs (bytes + 1 address byte) x 9 clocks at
  ``latency.bus_hz`` (none when bus_hz is 0); the endpoint sleeps it on its clock (virtual
  with FakeClock, real with SystemClock) unless ``realtime_bus=False``.
* Busy: when a write completes an APDU, the SE executes it for
  ``latency.op_ms(se_consts.INS_NAMES[INS])`` (+ ``latency.nvm_write_ms`` of the chip's
  ``last_nvm_write_bytes`` when it reports one).  Meanwhile reads and writes NACK
  (BusNack), as an SE busy with crypto does not acknowledge its address.
* Waiting time extension: if the execution would outlast the block waiting time, the SE
  first sends S(WTX request) with multiplier ceil(remaining / BWT) (GPC_SPE_172 4 /
  ISO/IEC 7816-3:2006 11.6.2.3) and, after the host's S(WTX response), the real response
  when execution ends.
* Reads: the bytes of the pending reply frame are served in order across reads; beyond
  its end a read returns 0xFF; with nothing pending a read NACKs.  A write discards an
  unread reply (the host moved on).
* Faults (sim/faults.py FaultPlan): bit errors, drops, truncation in both directions,
  NACK storms, WTX storms, power loss at the k-th transaction.
* power_loss() / reset(): the chip loses its RAM state (chip.power_loss()), the T=1'
  state returns to power-on (the card then wants RESYNCH or SWR before I-blocks); NVM kept.
  S(SWR) is a warm reset: the chip's RAM state is lost too.

CPython only.
"""

import math

from fleetid.common import se_consts, t1
from fleetid.common.clock import SystemClock
from fleetid.common.errors import BusError, BusNack
from fleetid.sim.faults import FaultPlan
from fleetid.sim.t1_card import T1Card

try:  # the emulator's power-cut exception, when sim/nvm.py is present
    from fleetid.sim.nvm import PowerLoss as _PowerLoss
except ImportError:  # pragma: no cover
    _PowerLoss = ()


class _ZeroLatency:
    name = "none"
    bus_hz = 0

    def op_ms(self, op_name):
        return 0.0

    def nvm_write_ms(self, nbytes):
        return 0.0


def _default_latency():
    try:
        from fleetid.sim import profiles
    except ImportError:  # pragma: no cover
        return _ZeroLatency()
    return profiles.get("none")


class BusEndpoint:
    """The SE as the host's bus sees it.

    Params: chip: chip.process(apdu) -> response, chip.power_loss().  profile: T=1' framing
        profile.  latency: a LatencyProfile (.bus_hz, .op_ms(op), .nvm_write_ms(n)).
        clock: SystemClock by default.  faults: FaultPlan (none injected by default).
        ifsc, bwt_ms: what the card announces in its CIP.  realtime_bus: sleep the
        transfer time on the clock.  on_power_loss: called with the PowerLoss when an
        injected power cut fires (for `fleetid sim serve` to say so), or None.
    Attributes: card (T1Card), faults, counters (writes, reads, nacks, wtx, executions,
        power_losses).
    """

    def __init__(self, chip, profile=t1.PROFILE_GP, latency=None, clock=None, faults=None,
                 ifsc=254, bwt_ms=None, realtime_bus=True, on_power_loss=None):
        self.chip = chip
        self.on_power_loss = on_power_loss
        self.profile = profile
        self.latency = latency if latency is not None else _default_latency()
        self.clock = clock if clock is not None else SystemClock()
        self.faults = faults if faults is not None else FaultPlan()
        self.realtime_bus = realtime_bus
        bus_hz = getattr(self.latency, "bus_hz", 0) or 0
        fatal = (_PowerLoss,) if _PowerLoss else ()
        self.card = T1Card(chip.process, profile, ifsc=ifsc, bwt_ms=bwt_ms,
                           on_swr=chip.power_loss, synced=True,
                           mcf_khz=(bus_hz // 1000) if bus_hz else 1000, fatal=fatal)
        self._us_per_byte = (9 * 1000000.0 / bus_hz) if bus_hz else 0.0
        self.counters = dict(writes=0, reads=0, nacks=0, wtx=0, executions=0,
                             power_losses=0)
        self.closed = False
        self._idle()

    def _idle(self):
        self._out = None  # reply frame being read, read position, time it becomes readable
        self._pos = 0
        self._ready_us = 0
        self._held = None  # the response of an executing APDU
        self._busy_until_us = 0
        self._window_us = 0  # how long the host waits for our next block
        self._wtx_left = 0

    # ---- the Bus interface -------------------------------------------------------

    def write(self, frame):
        """One write transaction.  Raises BusNack while the SE is busy, BusError if closed."""
        self._check_open()
        if self.faults.on_transaction():
            self.power_loss()
            self._nack(0)
        now = self.clock.now_us()
        if now < self._busy_until_us and not self.card.awaiting_wtx:
            self._nack(0)
        self._bus_time(len(frame))
        self.counters["writes"] += 1
        frame = self.faults.frame(bytes(frame))
        if frame is None:
            return  # lost on the wire
        self._out = None
        try:
            reply = self.card.receive(frame)
        except _PowerLoss as cut:  # cut during the chip's NVM commit: RAM state gone
            self.counters["power_losses"] += 1
            self._idle()
            if self.on_power_loss is not None:
                self.on_power_loss(cut)
            return
        apdu = self.card.last_apdu
        now = self.clock.now_us()
        if apdu is not None:
            self.counters["executions"] += 1
            self._held = reply
            self._busy_until_us = now + int(self._exec_ms(apdu) * 1000)
            self._window_us = self.card.bwt_ms * 1000
            self._wtx_left = self.faults.wtx_extra()
            self._schedule(now)
        elif reply is None:  # the awaited S(WTX response)
            self._schedule(now)
        else:
            self._emit(reply, now)

    def read(self, n):
        """One read transaction of exactly n bytes.  Raises BusNack when nothing is ready."""
        self._check_open()
        if n < 1:
            raise BusError("read of %d bytes" % n)
        if self.faults.on_transaction():
            self.power_loss()
            self._nack(0)
        if self.faults.nack_read():
            self._nack(0)
        if self._out is None or self.clock.now_us() < self._ready_us:
            self._nack(0)
        self._bus_time(n)
        self.counters["reads"] += 1
        out = self._out
        chunk = out[self._pos : self._pos + n]
        self._pos += n
        if self._pos >= len(out):
            self._out = None
        if len(chunk) < n:
            chunk = chunk + b"\xff" * (n - len(chunk))
        return chunk

    def reset(self):
        """Hardware reset: as a power cycle (RAM state lost, NVM kept)."""
        self._check_open()
        self.power_loss()

    def close(self):
        """Close the endpoint; later transactions raise BusError."""
        self.closed = True

    def power_loss(self):
        """Power cut: the chip's RAM state and the T=1' state are lost, NVM is kept."""
        self.counters["power_losses"] += 1
        self.chip.power_loss()
        self.card.power_on_reset()
        self._idle()

    # ---- internals ---------------------------------------------------------------

    def _check_open(self):
        if self.closed:
            raise BusError("endpoint closed")

    def _nack(self, nbytes):
        self.counters["nacks"] += 1
        self._bus_time(nbytes)
        raise BusNack()

    def _bus_time(self, nbytes):
        if self.realtime_bus and self._us_per_byte:
            self.clock.sleep_us((nbytes + 1) * self._us_per_byte)

    def _exec_ms(self, apdu):
        ms = 0.0
        if len(apdu) >= 2:
            op = se_consts.INS_NAMES.get(apdu[1])
            if op is not None:
                ms += self.latency.op_ms(op)
        nvm = getattr(self.chip, "last_nvm_write_bytes", 0) or 0
        if nvm:
            ms += self.latency.nvm_write_ms(nvm)
        return ms

    def _emit(self, frame, ready_us):
        frame = self.faults.frame(frame)
        if frame is None:
            self._out = None  # lost on the wire; the card believes it was sent
            return
        self._out = frame
        self._pos = 0
        self._ready_us = ready_us

    def _schedule(self, now):
        """During an execution: send a WTX request, or the response when it is ready."""
        bwt_us = self.card.bwt_ms * 1000
        remaining = self._busy_until_us - now
        if self._wtx_left > 0:
            self._wtx_left -= 1
            self.counters["wtx"] += 1
            self._window_us = bwt_us
            self._emit(self.card.wtx_request(1), now)
        elif remaining > self._window_us and bwt_us > 0:
            mult = min(255, max(1, int(math.ceil(remaining / float(bwt_us)))))
            self.counters["wtx"] += 1
            self._window_us = mult * bwt_us
            self._emit(self.card.wtx_request(mult), now)
        else:
            held = self._held
            self._held = None
            if held is not None:
                self._emit(held, max(now, self._busy_until_us))
