"""The SE side of GlobalPlatform T=1' (GPC_SPE_172 4) for the emulator.  CPython only.

T1Card is sans-I/O: ``receive(frame) -> reply frame`` for every frame the host writes.
The bus endpoint (sim/endpoint.py) adds timing (busy NACKs, WTX) and faults.

Rules this side follows (after ISO/IEC 7816-3:2006 11.6, with one stated choice):

* An invalid frame (CRC, LEN, NAD, PCB) changes nothing and is answered with
  R(N(R), CRC error / other error).
* Every R-block we send carries N(R) = the N(S) of the host I-block we expect next, so
  the host can always tell whether its last I-block arrived.
* An I-block with the expected N(S) is accepted; M=1 -> R(N(R)) acknowledgement; the last
  block of a chain hands the complete APDU to ``apdu_handler`` exactly once, and the
  response goes out in I-blocks of at most IFSD bytes.  An I-block with the other N(S)
  is a duplicate of one already accepted: never re-executed, answered with R(N(R)).
* R(N(R) = N(S) of our last I-block) -> retransmit it; R(N(R) = our next N(S)) while a
  response chain is pending -> next chunk; any other R-block -> R(N(R)).
* S requests: RESYNCH (sequence numbers to 0, chains dropped), IFS (sets IFSD), ABORT
  (chains dropped), CIP (GP CIP / SE05x ATR), RELEASE, SWR (link state reset + on_swr,
  e.g. a warm reset of the applet).  S(WTX) requests come from the endpoint through
  ``wtx_request()``; while one is outstanding any other host block gets it again.
* Choice: after power-on (``power_on_reset()``) the card accepts I- and R-blocks only once
  the host has sent RESYNCH or SWR (a GP host starts with CIP + RESYNCH anyway).  This is
  what stops a power cut in the middle of a chain from splicing the tail of one APDU onto
  a fresh chain, or re-executing an APDU whose response was lost.
"""

from fleetid.common import t1
from fleetid.common.errors import FrameError

_MAX_APDU = 65544
_SW_UNKNOWN = b"\x6f\x00"


# Physical layer parameters the emulated SE announces (layouts in common/t1.py; the
# builders live here because only the SE side writes a CIP).
def i2c_plp(pwt_ms=5, mcf_khz=1000, pst_ms=0, mpot_100us=10, rwgt_us=10, config=0):
    """Return a GP I2C PLP (8 bytes: configuration, PWT, MCF, PST, MPOT, RWGT)."""
    return bytes((config, pwt_ms, mcf_khz >> 8, mcf_khz & 0xFF, pst_ms, mpot_100us,
                  rwgt_us >> 8, rwgt_us & 0xFF))


def nxp_plp(mcf_khz=1000, config=0x08, mpot_ms=1, segt_us=100, wut_us=0):
    """Return an SE05x ATR PLP (11 bytes: MCF, configuration, MPOT, RFU x3, SEGT, WUT)."""
    return bytes((mcf_khz >> 8, mcf_khz & 0xFF, config, mpot_ms, 0, 0, 0, segt_us >> 8,
                  segt_us & 0xFF, wut_us >> 8, wut_us & 0xFF))



class T1Card:
    """The SE's T=1' engine.

    Params: apdu_handler(apdu: bytes) -> response bytes (data || SW).
        profile: t1.PROFILE_GP / t1.PROFILE_SE05X.  ifsc: largest INF we accept (announced
        in the CIP).  bwt_ms: block waiting time announced in the CIP.  ifsd: largest INF
        we send until the host's S(IFS) says otherwise.  cip: a t1.Cip to announce (built
        from ifsc/bwt_ms when None).  on_swr: called on S(SWR).  synced: start already
        synchronised (True) or in the power-on state (False).  fatal: exception classes
        from the handler that must propagate (the emulator's PowerLoss); any other
        exception answers 6F00.
    Attributes: executed (APDUs handed to the handler), last_apdu (the APDU executed by
        the latest receive() call, else None; the endpoint charges its latency),
        bad_frames, duplicates.
    """

    def __init__(self, apdu_handler, profile=t1.PROFILE_GP, ifsc=254, bwt_ms=None,
                 ifsd=254, cip=None, on_swr=None, synced=True, mcf_khz=1000, fatal=()):
        if ifsc < 1 or ifsc > profile.max_ifs or ifsd < 1 or ifsd > profile.max_ifs:
            raise ValueError("IFS out of range for the profile")
        self.handler = apdu_handler
        self.profile = profile
        self.ifsc = ifsc
        self.bwt_ms = bwt_ms if bwt_ms is not None else profile.default_bwt_ms
        self.default_ifsd = ifsd
        self.on_swr = on_swr
        self.fatal = tuple(fatal)
        if cip is None:
            if profile is t1.PROFILE_SE05X or profile.cip_layout == "nxp":
                cip = t1.Cip(0, b"\xa0\x00\x00\x03\x96", t1.PLID_I2C, nxp_plp(mcf_khz),
                             self.bwt_ms, ifsc, b"fleetid-sim")
            else:
                cip = t1.Cip(1, b"\x00\x00\x00", t1.PLID_I2C, i2c_plp(mcf_khz=mcf_khz),
                             self.bwt_ms, ifsc, b"fleetid-sim")
        self.cip = cip
        self.cip_bytes = t1.encode_cip(profile, cip)
        self.executed = 0
        self.bad_frames = 0
        self.duplicates = 0
        self.last_apdu = None
        self._reset_link()
        self.synced = synced

    # ---- state --------------------------------------------------------------------

    def _reset_link(self):
        self.ifsd = self.default_ifsd
        self._ns = 0  # N(S) of our next I-block
        self._nr = 0  # N(S) we expect from the host
        self._rx = bytearray()
        self._resp = None  # pending response chain (bytes) and offset
        self._resp_off = 0
        self._last = None  # last frame sent (any kind)
        self._last_i = None  # last I-block sent, and its N(S)
        self._last_i_ns = None
        self._wtx_inf = None  # INF of the outstanding S(WTX request)

    def power_on_reset(self):
        """RAM lost: link state back to power-on; I-blocks refused until RESYNCH/SWR."""
        self._reset_link()
        self.synced = False

    @property
    def sending_chain(self):
        """True while a response chain is partly sent."""
        return self._resp is not None

    # ---- frames out ---------------------------------------------------------------

    def _send(self, pcb, inf=b""):
        frame = t1.encode_block(self.profile, self.profile.nad_se, pcb, inf)
        self._last = frame
        return frame

    def _r(self, error=t1.R_OK):
        return self._send(t1.r_pcb(self._nr, error))

    def _next_chunk(self):
        resp = self._resp
        off = self._resp_off
        n = min(self.ifsd, len(resp) - off)
        more = off + n < len(resp)
        frame = self._send(t1.i_pcb(self._ns, more), resp[off : off + n])
        self._last_i = frame
        self._last_i_ns = self._ns
        self._ns ^= 1
        if more:
            self._resp_off = off + n
        else:
            self._resp = None
            self._resp_off = 0
        return frame

    def wtx_request(self, multiplier):
        """Return an S(WTX request) frame asking for `multiplier` x BWT (1..255)."""
        multiplier = max(1, min(255, int(multiplier)))
        self._wtx_inf = bytes((multiplier,))
        return self._send(t1.s_pcb(self.profile.s_wtx), self._wtx_inf)

    @property
    def awaiting_wtx(self):
        """True while an S(WTX request) waits for the host's S(WTX response)."""
        return self._wtx_inf is not None

    # ---- frames in ----------------------------------------------------------------

    def receive(self, frame):
        """Process one host frame.

        Returns: the reply frame, or None when the frame was the awaited S(WTX response)
        (the endpoint then decides what comes next).  Never raises on bad input.
        """
        self.last_apdu = None
        try:
            blk = t1.decode_block(self.profile, frame)
            if blk.nad != self.profile.nad_host:
                raise FrameError(t1.ERR_NAD)
        except FrameError as e:
            self.bad_frames += 1
            if self._wtx_inf is not None:
                return self._last
            return self._r(t1.R_CRC_ERROR if e.reason == t1.ERR_CRC else t1.R_OTHER_ERROR)
        if blk.kind == t1.BLOCK_S:
            return self._on_s(blk)
        if self._wtx_inf is not None:
            return self._last  # the host missed our S(WTX request)
        if not self.synced:
            return self._r(t1.R_OTHER_ERROR)
        if blk.kind == t1.BLOCK_R:
            return self._on_r(blk)
        return self._on_i(blk)

    def _on_s(self, blk):
        p = self.profile
        t = blk.stype
        if blk.response:
            if t == p.s_wtx and self._wtx_inf is not None and blk.inf == self._wtx_inf:
                self._wtx_inf = None
                return None
            if self._wtx_inf is not None:
                return self._last
            return self._r(t1.R_OTHER_ERROR)
        if self._wtx_inf is not None and t not in (p.s_resynch, p.s_swr):
            return self._last
        if t == p.s_resynch:
            self._reset_link_keep_ifsd()
            self.synced = True
            return self._send(t1.s_pcb(t, True))
        if t == p.s_ifs:
            value = t1.decode_ifs(blk.inf)
            if value < 1 or value > p.max_ifs:
                return self._r(t1.R_OTHER_ERROR)
            self.ifsd = value
            return self._send(t1.s_pcb(t, True), blk.inf)
        if t == p.s_abort:
            self._rx = bytearray()
            self._resp = None
            return self._send(t1.s_pcb(t, True))
        if t == p.s_cip:
            return self._send(t1.s_pcb(t, True), self.cip_bytes)
        if t == p.s_release:
            return self._send(t1.s_pcb(t, True))
        if t == p.s_swr:
            self._reset_link()
            self.synced = True
            if self.on_swr is not None:
                self.on_swr()
            return self._send(t1.s_pcb(t, True),
                              self.cip_bytes if p.swr_response_has_cip else b"")
        return self._r(t1.R_OTHER_ERROR)  # WTX request from the host, unused types

    def _reset_link_keep_ifsd(self):
        ifsd = self.ifsd
        self._reset_link()
        self.ifsd = ifsd

    def _on_r(self, blk):
        if self._resp is not None and blk.nr == self._ns:
            return self._next_chunk()  # acknowledgement of our last chunk
        if self._last_i is not None and blk.nr == self._last_i_ns:
            self._last = self._last_i
            return self._last_i  # the host lost our last I-block
        return self._r(t1.R_OK)

    def _on_i(self, blk):
        if blk.ns != self._nr:
            self.duplicates += 1
            return self._r(t1.R_OTHER_ERROR)
        if self._resp is not None:
            # The host may not send while we chain (ISO/IEC 7816-3:2006 11.6.2.3).
            return self._r(t1.R_OTHER_ERROR)
        if len(blk.inf) > self.ifsc or len(self._rx) + len(blk.inf) > _MAX_APDU:
            return self._r(t1.R_OTHER_ERROR)
        self._nr ^= 1
        self._rx.extend(blk.inf)
        if blk.more:
            return self._r(t1.R_OK)
        apdu = bytes(self._rx)
        self._rx = bytearray()
        self.last_apdu = apdu
        self.executed += 1
        try:
            resp = bytes(self.handler(apdu))
        except self.fatal:
            self.power_on_reset()
            raise
        except Exception:  # the applet must never take the link down
            resp = _SW_UNKNOWN
        self._resp = resp
        self._resp_off = 0
        return self._next_chunk()
