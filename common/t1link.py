# Host side of the GlobalPlatform T=1' block protocol (GPC_SPE_172 4, after ISO/IEC
# 7816-3:2006 11.6).  Portable: CPython and MicroPython (64 KiB heap).
#
# T1Link(bus, profile, clock).transceive(apdu) -> response: splits the APDU into I-blocks
# of at most IFSC bytes (M bit chaining), reassembles chained responses, and recovers from
# every fault the bus can produce, always within a bounded time:
#
#   * invalid block (CRC, LEN, NAD, PCB) -> R(N(R), CRC error / other error)      (11.6.3)
#   * no block within BWT (lost)          -> R(N(R), other error)
#   * R(N(R) = our N(S))                  -> retransmit our last I-block
#   * R(N(R) = our N(S) + 1)              -> our I-block arrived: next chunk, or ask for the
#                                            response when it was the last one
#   * I-block with an unexpected N(S)     -> a duplicate: never delivered, R-block instead
#   * S(WTX request)                      -> S(WTX response), wait multiplier x BWT
#                                            (bounded count and total wait)
#   * more than max_retries failures on one block -> RESYNCH, then SWR (then CIP again),
#     then bus.reset() + open(); the APDU in flight ends in LinkError(reason).  It is
#     never retried automatically: it may already have executed.
#
# Invariants that keep a wrong response from being delivered: data is taken only from a
# block with a good CRC, the SE's NAD and the N(S) we expect; progress happens only on the
# SE's N(R); after any failure both sides restart from RESYNCH (sequence numbers 0).
#
# Host reading rule (GP T=1' over I2C): read the prologue (NAD PCB LEN), then LEN + 2
# bytes.  While the SE is busy it NACKs: the host polls at MPOT until BWT has elapsed
# (GPC_SPE_172 3.2 / 4: MPOT and BWT come from the CIP, 4.3).

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common import t1
from fleetid.common.clock import SystemClock
from fleetid.common.errors import BusError, BusNack, FleetidError, FrameError, LinkError

DEFAULT_IFSD = const(254)  # what the host announces with S(IFS) in open()
DEFAULT_MAX_RETRIES = const(3)  # ISO/IEC 7816-3:2006 11.6.3: retransmissions per block
DEFAULT_MAX_WTX = const(32)  # WTX requests honoured per block
DEFAULT_MAX_WAIT_MS = const(60000)  # bound on one block's wait, WTX included
# MPOT is a minimum polling time (GPC_SPE_172 3.2): while the SE stays busy the host backs
# off, doubling the interval up to this many MPOTs.  Cuts the polls of a 100 ms operation
# from ~100 to ~30 (each one is host CPU, and on a shared bus, bus time) for at most
# (cap - 1) x MPOT of extra latency after the SE becomes ready.
DEFAULT_POLL_BACKOFF = const(4)
MAX_APDU = const(65544)  # extended case 4: 4 + 3 + 65535 + 2
MAX_RESPONSE = const(65538)  # 65536 data bytes + SW1 SW2
_CTL_LEN = const(10)  # an R- or S-block with up to 4 INF bytes
_MAX_S_INF = const(254)  # room for S-block INF (CIP) whatever the IFSD


class _Timeout(FleetidError):
    pass


class _LinkFail(FleetidError):
    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class T1Link:
    """GP T=1' host: the `transceive(apdu) -> response` link over a Bus.

    Params: bus: write(frame), read(n), reset(), close(); BusNack while the SE is busy.
        write() is given a memoryview of the link's frame buffer, valid during the call
        only: a bus that keeps the frame must copy it.
        profile: t1.PROFILE_GP or t1.PROFILE_SE05X.  clock: SystemClock() by default
        (FakeClock in tests).  ifsd: largest INF the host accepts (announced by open()).
        max_retries: failed attempts per block before recovery.  max_wtx, max_wait_ms:
        bounds on waiting-time extensions.  max_ifsc: cap on the I-blocks we send (None =
        IFSC from the CIP).  poll_backoff: while the SE NACKs, the poll interval doubles
        from MPOT up to poll_backoff x MPOT (1 = poll at MPOT).
    Attributes: ifsc, bwt_ms, poll_ms, cip (after open()), and counters: blocks_sent,
        blocks_received, retransmissions, timeouts, frame_errors, wtx, resynchs, resets.
    """

    def __init__(self, bus, profile=t1.PROFILE_GP, clock=None, ifsd=DEFAULT_IFSD,
                 max_retries=DEFAULT_MAX_RETRIES, max_wtx=DEFAULT_MAX_WTX,
                 max_wait_ms=DEFAULT_MAX_WAIT_MS, max_ifsc=None,
                 poll_backoff=DEFAULT_POLL_BACKOFF):
        if ifsd < 1 or ifsd > profile.max_ifs:
            raise ValueError("ifsd out of range")
        self.bus = bus
        self.profile = profile
        self.clock = clock if clock is not None else SystemClock()
        self.ifsd = ifsd
        self.max_retries = max_retries
        self.max_wtx = max_wtx
        self.max_wait_ms = max_wait_ms
        self.max_ifsc = max_ifsc
        self.poll_backoff = max(1, poll_backoff)
        self.ifsc = profile.default_ifsc
        self.bwt_ms = profile.default_bwt_ms
        self.poll_ms = profile.default_poll_ms
        self.cip = None
        self._ns = 0  # N(S) of our next I-block
        self._nr = 0  # N(S) we expect in the SE's next I-block
        p = profile.prologue_len
        # S-block responses (the CIP / ATR) may be longer than a small IFSD.
        self._rx = bytearray(p + max(ifsd, _MAX_S_INF) + 2)
        self._tx = bytearray(0)
        self._size_tx()
        self._ctl = bytearray(_CTL_LEN)
        self._wtxbuf = bytearray(_CTL_LEN)
        self._ctl_len = 0
        self._tx_len = 0
        self._last_ctl = False  # the last block we sent is in _ctl (else in _tx)
        self._need_open = False  # a reset happened and open() has not completed since
        self._foreign_nad = None  # NAD of the last block refused for its NAD (for a hint)
        self.blocks_sent = 0
        self.blocks_received = 0
        self.retransmissions = 0
        self.timeouts = 0
        self.frame_errors = 0
        self.wtx = 0
        self.resynchs = 0
        self.resets = 0

    # ---- public calls -------------------------------------------------------------

    def open(self):
        """Start the link: S(CIP) to learn BWT/IFSC/MPOT, S(IFS) to announce IFSD, RESYNCH.

        Returns: the t1.Cip the SE sent.  Raises LinkError(reason).
        """
        try:
            return self._open()
        except _LinkFail as f:
            raise LinkError(f.reason, f.detail)

    def transceive(self, apdu):
        """Send one command APDU and return the complete response APDU (data || SW).

        Raises LinkError(reason) when the exchange cannot complete; the outcome of the APDU
        is then unknown, and the link has been resynchronised or reset where it could be
        (LinkError.RESYNCH / RESET), so the next call may succeed.  LinkError.TOO_LONG for
        an empty or oversized APDU, LinkError.BUS when the bus itself failed.
        """
        n = len(apdu)
        if n == 0 or n > MAX_APDU:
            raise LinkError(LinkError.TOO_LONG, "APDU of %d bytes" % n)
        try:
            if self._need_open:
                self._open()
            return self._transceive(memoryview(apdu), n)
        except _LinkFail as f:
            reason = self._recover(f)
            raise LinkError(reason, f.reason + (": " + f.detail if f.detail else ""))

    def resynch(self):
        """S(RESYNCH): both sides restart with N(S) = 0.  Raises LinkError(reason)."""
        try:
            self._resynch()
        except _LinkFail as f:
            raise LinkError(f.reason, f.detail)

    def soft_reset(self):
        """S(SWR): software reset of the SE's link layer, then open() again.

        Raises LinkError(reason).
        """
        try:
            self._soft_reset()
        except _LinkFail as f:
            raise LinkError(f.reason, f.detail)

    def release(self):
        """S(RELEASE) (GP) / end of APDU session (SE05x): the SE may enter power saving."""
        try:
            self._exchange_s(self.profile.s_release)
        except _LinkFail as f:
            raise LinkError(f.reason, f.detail)

    def close(self):
        """Close the bus.  The link object must not be used afterwards."""
        self.bus.close()

    # ---- sizing -------------------------------------------------------------------

    def _block_size(self):
        size = self.ifsc
        if self.max_ifsc is not None and self.max_ifsc < size:
            size = self.max_ifsc
        return size

    def _size_tx(self):
        need = self.profile.prologue_len + self._block_size() + 2
        if len(self._tx) != need:
            self._tx = bytearray(need)

    # ---- bus transactions ---------------------------------------------------------

    def _write(self, buf, n):
        # The BWT deadline is read from the clock at the first NACK only: an SE that takes
        # the frame at once (the usual case) costs no clock read.
        deadline = None
        # A view of the frame buffer, not a copy (see the class docstring).
        frame = memoryview(buf)[:n]
        wait = self.poll_ms
        while True:
            try:
                self.bus.write(frame)
                self.blocks_sent += 1
                return
            except BusNack:
                if deadline is None:
                    deadline = self.clock.now_ms() + self.bwt_ms
                wait = self._poll_wait(deadline, wait)
            except BusError as e:
                raise _LinkFail(LinkError.BUS, str(e))

    def _poll_wait(self, deadline, wait):
        """After a NACK: sleep `wait` ms (never past the deadline) and return the next
        interval (doubled, at most poll_backoff x MPOT).  Raises _Timeout at the deadline."""
        now = self.clock.now_ms()
        if now >= deadline:
            raise _Timeout()
        self.clock.sleep_ms(wait if now + wait <= deadline else deadline - now)
        wait += wait
        cap = self.poll_ms * self.poll_backoff
        return min(cap, wait)

    def _read_polled(self, n, deadline):
        # deadline None: one BWT from the first NACK (read from the clock only then).
        wait = self.poll_ms
        while True:
            try:
                data = self.bus.read(n)
            except BusNack:
                if deadline is None:
                    deadline = self.clock.now_ms() + self.bwt_ms
                wait = self._poll_wait(deadline, wait)
                continue
            except BusError as e:
                raise _LinkFail(LinkError.BUS, str(e))
            if len(data) != n:
                raise FrameError(t1.ERR_SHORT, "read %d of %d" % (len(data), n))
            return data

    def _read_block(self, deadline):
        p = self.profile.prologue_len
        hdr = self._read_polled(p, deadline)
        n = t1.prologue_inf_len(self.profile, hdr)
        if hdr[0] != self.profile.nad_se:
            raise FrameError(t1.ERR_NAD, "%02X" % hdr[0])
        if p + n + 2 > len(self._rx):
            raise FrameError(t1.ERR_LENGTH, "LEN %d above IFSD" % n)
        # The body follows the prologue at once on a sane bus; allow one more BWT (from
        # the body's first NACK, if any).
        body = self._read_polled(n + 2, None)
        rx = self._rx
        rx[0:p] = hdr
        rx[p : p + n + 2] = body
        blk = t1.decode_block(self.profile, memoryview(rx)[: p + n + 2])
        if blk.kind == t1.BLOCK_I and n > self.ifsd:
            raise FrameError(t1.ERR_LENGTH, "I-block above IFSD")
        self.blocks_received += 1
        return blk

    def _xfer(self):
        """Send the last block (I in _tx or control in _ctl), return the SE's answer.

        Honours S(WTX) requests on the way.  Raises FrameError, _Timeout, _LinkFail.
        """
        if self._last_ctl:
            self._write(self._ctl, self._ctl_len)
        else:
            self._write(self._tx, self._tx_len)
        start = self.clock.now_ms()
        deadline = start + self.bwt_ms
        limit = start + self.max_wait_ms
        wtx = 0
        while True:
            blk = self._read_block(deadline)
            if (blk.kind == t1.BLOCK_S and not blk.response
                    and blk.stype == self.profile.s_wtx):
                # GPC_SPE_172 4 / ISO/IEC 7816-3:2006 11.6.2.3: answer S(WTX response)
                # with the same INF, then wait multiplier x BWT for the next block.
                wtx += 1
                self.wtx += 1
                if wtx > self.max_wtx:
                    raise _LinkFail(LinkError.TIMEOUT, "too many WTX requests")
                n = t1.encode_block_into(self.profile, self._wtxbuf, self.profile.nad_host,
                                         t1.s_pcb(self.profile.s_wtx, True), blk.inf)
                self._write(self._wtxbuf, n)
                mult = blk.inf[0] or 1
                now = self.clock.now_ms()
                if now >= limit:
                    raise _LinkFail(LinkError.TIMEOUT, "waiting time bound")
                deadline = min(now + mult * self.bwt_ms, limit)
                continue
            return blk

    def _set_ctl(self, pcb, inf=b""):
        self._ctl_len = t1.encode_block_into(self.profile, self._ctl, self.profile.nad_host,
                                             pcb, inf)
        self._last_ctl = True

    def _set_r(self, error):
        self._set_ctl(t1.r_pcb(self._nr, error))

    def _set_i(self, apdu, off, size, more):
        self._tx_len = t1.encode_block_into(self.profile, self._tx, self.profile.nad_host,
                                            t1.i_pcb(self._ns, more), apdu, off, off + size)
        self._last_ctl = False

    # ---- block protocol -----------------------------------------------------------

    def _try(self):
        """One exchange of the last block.  Returns (block or None, failure kind)."""
        try:
            blk = self._xfer()
            self._foreign_nad = None
            return blk, None
        except FrameError as e:
            self.frame_errors += 1
            if e.reason == t1.ERR_NAD:
                self._foreign_nad = e.detail
            return None, (t1.R_CRC_ERROR if e.reason == t1.ERR_CRC else t1.R_OTHER_ERROR)
        except _Timeout:
            self.timeouts += 1
            return None, _Timeout

    def _count(self, tries, why):
        tries += 1
        self.retransmissions += 1
        if tries > self.max_retries:
            if why is _Timeout:
                raise _LinkFail(LinkError.TIMEOUT, "no block within BWT")
            raise _LinkFail(LinkError.RETRIES, why if isinstance(why, str) else self._bad_blocks())
        return tries

    def _bad_blocks(self):
        """The RETRIES detail; names the other framing profile when the refused blocks came
        from its SE address (GPC_SPE_172 4: 0x12, UM11225: 0xA5), the signature of a host
        and an SE set up with different profiles."""
        nad = self._foreign_nad
        for name in t1.PROFILES:
            other = t1.PROFILES[name]
            if other is not self.profile and nad == "%02X" % other.nad_se:
                return ("bad blocks from NAD %s, the %s profile's SE address: T=1' profile "
                        "mismatch? try --t1-profile %s" % (nad, name, name))
        return "bad blocks"

    def _abort(self, blk):
        if blk.kind == t1.BLOCK_S and not blk.response and blk.stype == self.profile.s_abort:
            # ISO/IEC 7816-3:2006 11.6.3.2: acknowledge the SE's abort, give up the chain.
            try:
                self._set_ctl(t1.s_pcb(self.profile.s_abort, True))
                self._write(self._ctl, self._ctl_len)
            except (_Timeout, _LinkFail):
                pass
            raise _LinkFail(LinkError.ABORTED, "S(ABORT) from the SE")

    def _transceive(self, apdu, total):
        first = self._send_chain(apdu, total)
        # Our last I-block is implicitly acknowledged by the SE's I-block.
        self._ns ^= 1
        self._nr ^= 1
        if not first.more:
            return first.inf  # the usual case: one block, already its own bytes
        return self._receive_chain(first)

    def _send_chain(self, apdu, total):
        """Send phase: the APDU as I-blocks, until the SE's first response I-block.

        Returns: that I-block (N(S)/N(R) not yet advanced).  Raises: _LinkFail.
        """
        size = self._block_size()
        off = 0
        tries = 0
        chunk = size if total > size else total
        more = off + chunk < total
        self._set_i(apdu, off, chunk, more)
        first = None
        # Send phase: our I-blocks, each acknowledged by R(N(R) = N(S) + 1); the last one
        # by the first I-block of the response.
        while first is None:
            blk, why = self._try()
            if blk is None:
                tries = self._count(tries, why)
                self._set_r(why if why is not _Timeout else t1.R_OTHER_ERROR)
                continue
            if blk.kind == t1.BLOCK_R:
                if blk.nr != self._ns:
                    if more:  # acknowledged: next chunk
                        self._ns ^= 1
                        off += chunk
                        tries = 0
                        chunk = size if total - off > size else total - off
                        more = off + chunk < total
                        self._set_i(apdu, off, chunk, more)
                        continue
                    # Our last I-block arrived but its response did not: ask for it.
                    tries = self._count(tries, "response not received")
                    self._set_r(t1.R_OK)
                    continue
                # The SE expects our I-block (again).
                tries = self._count(tries, "I-block rejected")
                self._set_i(apdu, off, chunk, more)
                continue
            if blk.kind == t1.BLOCK_I:
                if more:
                    raise _LinkFail(LinkError.PROTOCOL, "I-block before the chain ended")
                if blk.ns != self._nr:
                    tries = self._count(tries, "unexpected N(S)")
                    self._set_r(t1.R_OTHER_ERROR)
                    continue
                first = blk
                continue
            self._abort(blk)
            tries = self._count(tries, "unexpected S-block")
            self._set_r(t1.R_OTHER_ERROR)
        return first

    def _receive_chain(self, first):
        """Receive phase of a chained response whose first I-block is `first`: R(ACK)
        each block until the last.  Returns: the whole response.  Raises: _LinkFail."""
        # A chained response grows one buffer; each step's old copy is garbage at once.
        # (Keeping the pieces to join them at the end was measured worse on a 64 KiB
        # MicroPython heap: the live pieces end up spread over the free space.)
        resp = bytearray(first.inf)
        more = True
        tries = 0
        self._set_r(t1.R_OK)
        while more:
            blk, why = self._try()
            if blk is None:
                tries = self._count(tries, why)
                self._set_r(why if why is not _Timeout else t1.R_OTHER_ERROR)
                continue
            if blk.kind == t1.BLOCK_I:
                if blk.ns != self._nr:  # a duplicate of a block we already have
                    tries = self._count(tries, "unexpected N(S)")
                    self._set_r(t1.R_OK)
                    continue
                if len(resp) + len(blk.inf) > MAX_RESPONSE:
                    raise _LinkFail(LinkError.TOO_LONG, "response chain too long")
                resp.extend(blk.inf)
                self._nr ^= 1
                tries = 0
                more = blk.more
                if more:
                    self._set_r(t1.R_OK)
                continue
            if blk.kind == t1.BLOCK_S:
                self._abort(blk)
            # An R-block: the SE did not get our acknowledgement; send it again.
            tries = self._count(tries, "acknowledgement lost")
            self._set_r(t1.R_OK)
        return bytes(resp)

    def _exchange_s(self, stype, inf=b""):
        """S(request) -> S(response) of the same type, resent on any failure (S requests
        are idempotent).  Returns the response Block.  Raises _LinkFail."""
        tries = 0
        while True:
            self._set_ctl(t1.s_pcb(stype), inf)
            blk, why = self._try()
            if (blk is not None and blk.kind == t1.BLOCK_S and blk.response
                    and blk.stype == stype):
                return blk
            tries = self._count(tries, why if blk is None else "unexpected block")

    def _resynch(self):
        self._exchange_s(self.profile.s_resynch)
        self._ns = 0
        self._nr = 0
        self.resynchs += 1

    def _announce_ifsd(self):
        value = t1.encode_ifs(self.ifsd)
        blk = self._exchange_s(self.profile.s_ifs, value)
        if blk.inf != value:
            raise _LinkFail(LinkError.PROTOCOL, "IFS not echoed")

    def _open(self):
        self._need_open = True
        self.ifsc = self.profile.default_ifsc
        self.bwt_ms = self.profile.default_bwt_ms
        self.poll_ms = self.profile.default_poll_ms
        blk = self._exchange_s(self.profile.s_cip)
        try:
            cip = t1.decode_cip(self.profile, blk.inf)
        except FrameError as e:
            raise _LinkFail(LinkError.PROTOCOL, "CIP: " + e.reason)
        self._apply_cip(cip)
        self._announce_ifsd()
        self._resynch()
        self._need_open = False
        return cip

    def _apply_cip(self, cip):
        self.cip = cip
        self.ifsc = cip.ifsc
        self.bwt_ms = cip.bwt_ms if cip.bwt_ms > 0 else self.profile.default_bwt_ms
        self.poll_ms = t1.cip_poll_ms(self.profile, cip)
        self._size_tx()

    def _soft_reset(self):
        self._need_open = True
        self._exchange_s(self.profile.s_swr)
        self._ns = 0
        self._nr = 0
        self.resets += 1
        self._open()

    def _recover(self, failure):
        """After a failed exchange: RESYNCH, else SWR, else bus reset; return the reason."""
        if failure.reason == LinkError.BUS:
            return LinkError.BUS
        try:
            self._resynch()
            # The SE may have lost power meanwhile (its IFSD back to the default): say
            # ours again; S(IFS) is idempotent.
            self._announce_ifsd()
            if failure.reason == LinkError.ABORTED:
                return LinkError.ABORTED
            return LinkError.RESYNCH
        except _LinkFail as f:
            if f.reason == LinkError.BUS:
                return LinkError.BUS
        try:
            self._soft_reset()
            return LinkError.RESET
        except _LinkFail as f:
            if f.reason == LinkError.BUS:
                return LinkError.BUS
        try:
            self._need_open = True
            self.bus.reset()
            self.resets += 1
            self._ns = 0
            self._nr = 0
            self._open()
            return LinkError.RESET
        except (_LinkFail, FleetidError):
            return failure.reason
