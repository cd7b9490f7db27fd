# GlobalPlatform T=1' blocks (GPC_SPE_172 "APDU Transport over SPI/I2C") and the NXP SE05x
# "T=1 over I2C" variant (UM11225).  Portable: CPython and MicroPython.  Sans-I/O: bytes in,
# Block / bytes out; the protocol engine is common/t1link.py (host) and sim/t1_card.py (SE).
#
# Block layout (GPC_SPE_172 4, after ISO/IEC 7816-3:2006 11.3):
#
#     prologue                        information        epilogue
#     NAD(1) PCB(1) LEN(2 BE | 1)     INF(LEN bytes)     CRC(2)
#
#   GP profile:    NAD 0x21 host->SE, 0x12 SE->host, LEN 2 bytes big-endian (IFS up to
#                  0xFF9), CRC-16/X-25 over NAD..INF sent most significant byte first.
#   SE05x profile: NAD 0x5A host->SE, 0xA5 SE->host, LEN 1 byte (INF up to 254),
#                  the same CRC sent least significant byte first.
#
# PCB (ISO/IEC 7816-3:2006 11.3.2.2, kept by GPC_SPE_172 4):
#   I-block  0 N(S) M 0 0000       N(S) send sequence number, M = more data (chaining)
#   R-block  1 0 0 N(R) eeee       N(R) = number of the I-block expected;
#                                  e = 0 error free, 1 CRC error, 2 other error
#   S-block  1 1 r ttttt           r = 0 request, 1 response; t = type:
#     GP:    RESYNCH 0, IFS 1, ABORT 2, WTX 3, CIP 4, RELEASE 6, SWR 15
#     SE05x: RESYNCH 0, IFS 1, ABORT 2, WTX 3, END OF APDU SESSION 5, CHIP RESET 6,
#            GET ATR 7, INTERFACE SOFT RESET 15 (its response carries the ATR)
# Every profile object names its codes (s_cip, s_release, s_swr ...), so the engines never
# hard-code a type number.
#
# CIP, Communication Interface Parameters (GPC_SPE_172 4.3), GP layout:
#   version(1) | IIN len(1) IIN | PLID(1: 01 SPI, 02 I2C) | PLP len(1) PLP |
#   DLLP len(1) DLLP (BWT u16 ms, IFSC u16, big-endian) | HB len(1) HB
# I2C PLP (8 bytes): configuration(1) PWT ms(1) MCF kHz(u16) PST ms(1) MPOT x100us(1)
#   RWGT us(u16).
# SE05x ATR (UM11225), a CIP-like structure in NXP's order:
#   version(1) | VID(5) | DLLP len(1) DLLP (BWT u16 ms, IFSC u16) | PLID(1) |
#   PLP len(1) PLP (MCF kHz u16, configuration(1), MPOT ms(1), RFU(3), SEGT us u16,
#   WUT us u16) | HB len(1) HB

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.crc16 import crc16
from fleetid.common.errors import FrameError

BLOCK_I = const(0)
BLOCK_R = const(1)
BLOCK_S = const(2)

# PCB bits (ISO/IEC 7816-3:2006 11.3.2.2).
_PCB_R = const(0x80)
_PCB_S = const(0xC0)
_PCB_TYPE_MASK = const(0xC0)
_PCB_I_NS = const(0x40)
_PCB_I_MORE = const(0x20)
_PCB_I_RFU = const(0x1F)
_PCB_R_NR = const(0x10)
_PCB_R_RFU = const(0x20)
_PCB_R_ERR = const(0x0F)
_PCB_S_RESPONSE = const(0x20)
_PCB_S_TYPE = const(0x1F)

# R-block error codes (ISO/IEC 7816-3:2006 11.3.2.2).
R_OK = const(0)
R_CRC_ERROR = const(1)
R_OTHER_ERROR = const(2)

# Information field size limits: GP allows up to 0xFF9 (GPC_SPE_172 4, two-byte LEN);
# the one-byte LEN of the SE05x profile caps INF at 254 (0xFF is not a valid length).
GP_MAX_IFS = const(0xFF9)
SE05X_MAX_IFS = const(254)

# CIP physical layer identifiers (GPC_SPE_172 4.3).
PLID_SPI = const(0x01)
PLID_I2C = const(0x02)

# FrameError reasons.
ERR_SHORT = "short"  # fewer bytes than a prologue + epilogue
ERR_LENGTH = "length"  # LEN disagrees with the frame, or exceeds the profile maximum
ERR_CRC = "crc"
ERR_NAD = "nad"
ERR_PCB = "pcb"  # RFU bits set, unknown S type, or an INF the block type forbids
ERR_CIP = "cip"  # malformed CIP / ATR structure

_LAYOUT_GP = "gp"
_LAYOUT_NXP = "nxp"


class Profile:
    """A framing profile: NADs, LEN width, CRC byte order, S-block type codes, defaults.

    Attributes: name, nad_host (host->SE), nad_se (SE->host), len_bytes (1 or 2),
    crc_msb_first, max_ifs, prologue_len, s_resynch, s_ifs, s_abort, s_wtx, s_cip,
    s_release, s_swr, s_known (tuple of every S type the profile accepts), cip_layout,
    swr_response_has_cip, default_ifsc, default_bwt_ms, default_poll_ms.
    """

    def __init__(
        self,
        name,
        nad_host,
        nad_se,
        len_bytes,
        crc_msb_first,
        max_ifs,
        s_types,
        s_known,
        cip_layout,
        swr_response_has_cip,
        default_ifsc,
        default_bwt_ms,
        default_poll_ms,
    ):
        self.name = name
        self.nad_host = nad_host
        self.nad_se = nad_se
        self.len_bytes = len_bytes
        self.crc_msb_first = crc_msb_first
        self.max_ifs = max_ifs
        self.prologue_len = 2 + len_bytes
        self.s_resynch, self.s_ifs, self.s_abort, self.s_wtx = s_types[:4]
        self.s_cip, self.s_release, self.s_swr = s_types[4:]
        self.s_known = s_known
        self.cip_layout = cip_layout
        self.swr_response_has_cip = swr_response_has_cip
        self.default_ifsc = default_ifsc
        self.default_bwt_ms = default_bwt_ms
        self.default_poll_ms = default_poll_ms


# GP: defaults before CIP (IFSC 8, BWT 300 ms, MPOT 1 ms) are those of the reference host
# recorded in tests/vectors/t1/frames.json ("defaults").
PROFILE_GP = Profile(
    "gp",
    0x21,  # GPC_SPE_172 4: NAD host -> SE
    0x12,  # GPC_SPE_172 4: NAD SE -> host
    2,
    True,
    GP_MAX_IFS,
    (0x00, 0x01, 0x02, 0x03, 0x04, 0x06, 0x0F),  # RESYNCH IFS ABORT WTX CIP RELEASE SWR
    (0x00, 0x01, 0x02, 0x03, 0x04, 0x06, 0x0F),
    _LAYOUT_GP,
    False,
    8,
    300,
    1,
)

# NXP SE05x T=1 over I2C (UM11225): the CIP role is GET ATR (7), RELEASE is END OF APDU
# SESSION (5), SWR is INTERFACE SOFT RESET (15); CHIP RESET (6) is known but unused here.
PROFILE_SE05X = Profile(
    "se05x",
    0x5A,  # UM11225: NAD host -> SE
    0xA5,  # UM11225: NAD SE -> host
    1,
    False,
    SE05X_MAX_IFS,
    (0x00, 0x01, 0x02, 0x03, 0x07, 0x05, 0x0F),
    (0x00, 0x01, 0x02, 0x03, 0x05, 0x06, 0x07, 0x0F),
    _LAYOUT_NXP,
    True,
    254,  # UM11225 default IFSC
    1000,  # the SE050 ATR of frames.json announces BWT 1000 ms
    1,
)

PROFILES = {"gp": PROFILE_GP, "se05x": PROFILE_SE05X}


def i_pcb(ns, more):
    """Return the PCB of I(N(S), M)."""
    return (_PCB_I_NS if ns else 0) | (_PCB_I_MORE if more else 0)


def r_pcb(nr, error=R_OK):
    """Return the PCB of R(N(R)) with error code 0 (ok), 1 (CRC) or 2 (other)."""
    return _PCB_R | (_PCB_R_NR if nr else 0) | (error & _PCB_R_ERR)


def s_pcb(stype, response=False):
    """Return the PCB of an S-block request (or response) of type `stype`."""
    return _PCB_S | (_PCB_S_RESPONSE if response else 0) | (stype & _PCB_S_TYPE)


class Block:
    """A decoded T=1' block.

    Attributes: nad, pcb, inf (bytes), kind (BLOCK_I / BLOCK_R / BLOCK_S) and, by kind:
    I: ns (0/1), more (bool); R: nr (0/1), error (R_OK / R_CRC_ERROR / R_OTHER_ERROR);
    S: stype (int), response (bool).  Fields of other kinds read None (class defaults, so
    an instance stores only its own: blocks are made on every exchange on a small heap).
    """

    ns = more = nr = error = stype = response = None

    def __init__(self, nad, pcb, inf):
        self.nad = nad
        self.pcb = pcb
        self.inf = inf
        t = pcb & _PCB_TYPE_MASK
        if not (pcb & 0x80):
            self.kind = BLOCK_I
            self.ns = 1 if pcb & _PCB_I_NS else 0
            self.more = bool(pcb & _PCB_I_MORE)
        elif t == _PCB_R:
            self.kind = BLOCK_R
            self.nr = 1 if pcb & _PCB_R_NR else 0
            self.error = pcb & _PCB_R_ERR
        else:
            self.kind = BLOCK_S
            self.stype = pcb & _PCB_S_TYPE
            self.response = bool(pcb & _PCB_S_RESPONSE)


def encode_block_into(profile, buf, nad, pcb, inf=b"", start=0, end=None):
    """Write a block into the preallocated bytearray `buf`; return its length.

    Params: inf[start:end] is the information field (a memoryview avoids copies).
    Raises FrameError(ERR_LENGTH) when the INF exceeds the profile maximum or `buf`.
    """
    if end is None:
        end = len(inf)
    n = end - start
    if n < 0 or n > profile.max_ifs:
        raise FrameError(ERR_LENGTH, "INF of %d bytes" % n)
    p = profile.prologue_len
    total = p + n + 2
    if total > len(buf):
        raise FrameError(ERR_LENGTH, "buffer too small")
    buf[0] = nad
    buf[1] = pcb
    if profile.len_bytes == 2:
        buf[2] = n >> 8
        buf[3] = n & 0xFF
    else:
        buf[2] = n
    if n:
        buf[p : p + n] = inf[start:end]
    crc = crc16(buf, 0, p + n)
    if profile.crc_msb_first:
        buf[p + n] = crc >> 8
        buf[p + n + 1] = crc & 0xFF
    else:
        buf[p + n] = crc & 0xFF
        buf[p + n + 1] = crc >> 8
    return total


def encode_block(profile, nad, pcb, inf=b""):
    """Return the wire bytes of one block (prologue, INF, CRC in the profile's order).

    Raises FrameError(ERR_LENGTH) when the INF is longer than the profile allows.
    """
    buf = bytearray(profile.prologue_len + len(inf) + 2)
    encode_block_into(profile, buf, nad, pcb, inf)
    return bytes(buf)


def prologue_inf_len(profile, prologue):
    """Return LEN from a block prologue (NAD PCB LEN), checked against the profile maximum.

    Lets a host read the prologue first, then exactly LEN + 2 more bytes.
    Raises FrameError(ERR_SHORT / ERR_NAD / ERR_LENGTH).
    """
    if len(prologue) < profile.prologue_len:
        raise FrameError(ERR_SHORT)
    nad = prologue[0]
    if nad != profile.nad_host and nad != profile.nad_se:
        raise FrameError(ERR_NAD, "%02X" % nad)
    if profile.len_bytes == 2:
        n = (prologue[2] << 8) | prologue[3]
    else:
        n = prologue[2]
    if n > profile.max_ifs:
        raise FrameError(ERR_LENGTH, "LEN %d" % n)
    return n


def _check_pcb(profile, blk):
    pcb = blk.pcb
    n = len(blk.inf)
    if blk.kind == BLOCK_I:
        if pcb & _PCB_I_RFU:
            raise FrameError(ERR_PCB, "I-block RFU bits")
        return
    if blk.kind == BLOCK_R:
        if pcb & _PCB_R_RFU or blk.error > R_OTHER_ERROR:
            raise FrameError(ERR_PCB, "R-block %02X" % pcb)
        if n:
            raise FrameError(ERR_PCB, "R-block with INF")
        return
    t = blk.stype
    if t not in profile.s_known:
        raise FrameError(ERR_PCB, "S type %02X" % t)
    if t == profile.s_wtx:
        if n != 1:
            raise FrameError(ERR_PCB, "WTX INF")
    elif t == profile.s_ifs:
        if n not in (1, 2) or decode_ifs(blk.inf) == 0:
            raise FrameError(ERR_PCB, "IFS INF")
    elif blk.response and (t == profile.s_cip or t == profile.s_swr or t not in
                           (profile.s_resynch, profile.s_abort, profile.s_release)):
        return  # CIP / ATR carrying responses, and proprietary ones: INF checked later
    elif n:
        raise FrameError(ERR_PCB, "S type %02X with INF" % t)


def decode_block(profile, frame):
    """Decode and check one complete block.

    Params: frame: bytes, bytearray or memoryview holding exactly one block.
    Returns: Block.
    Raises FrameError(reason) for every malformed frame: ERR_SHORT, ERR_LENGTH, ERR_NAD,
    ERR_CRC, ERR_PCB.  The CRC is checked before the PCB, so a corrupted block reports
    "crc" (what the R-block error code needs).
    """
    p = profile.prologue_len
    total = len(frame)
    if total < p + 2:
        raise FrameError(ERR_SHORT, "%d bytes" % total)
    n = prologue_inf_len(profile, frame)
    if p + n + 2 != total:
        raise FrameError(ERR_LENGTH, "LEN %d, frame %d" % (n, total))
    crc = crc16(frame, 0, p + n)
    hi = frame[p + n]
    lo = frame[p + n + 1]
    if not profile.crc_msb_first:
        hi, lo = lo, hi
    if (hi << 8) | lo != crc:
        raise FrameError(ERR_CRC)
    blk = Block(frame[0], frame[1], bytes(frame[p : p + n]))
    _check_pcb(profile, blk)
    return blk


def encode_ifs(ifs):
    """Return the INF of S(IFS): one byte up to 254, else two bytes big-endian."""
    if ifs < 1 or ifs > GP_MAX_IFS:
        raise FrameError(ERR_PCB, "IFS %d" % ifs)
    if ifs <= 0xFE:
        return bytes((ifs,))
    return bytes((ifs >> 8, ifs & 0xFF))


def decode_ifs(inf):
    """Return the IFS value of an S(IFS) INF (1 or 2 bytes, big-endian); 0 if invalid."""
    if len(inf) == 1:
        return inf[0]
    if len(inf) == 2:
        v = (inf[0] << 8) | inf[1]
        return v if v <= GP_MAX_IFS else 0
    return 0


class Cip:
    """Communication Interface Parameters (GP CIP, or the SE05x ATR in NXP's order).

    Attributes: version, iin (bytes; the 5-byte VID for SE05x), plid, plp (bytes),
    bwt_ms, ifsc, dllp_extra (DLLP bytes after BWT and IFSC), hb (historical bytes).
    """

    def __init__(self, version=1, iin=b"", plid=PLID_I2C, plp=b"", bwt_ms=300, ifsc=254,
                 hb=b"", dllp_extra=b""):
        self.version = version
        self.iin = bytes(iin)
        self.plid = plid
        self.plp = bytes(plp)
        self.bwt_ms = bwt_ms
        self.ifsc = ifsc
        self.hb = bytes(hb)
        self.dllp_extra = bytes(dllp_extra)


def _dllp(cip):
    return bytes((cip.bwt_ms >> 8, cip.bwt_ms & 0xFF, cip.ifsc >> 8, cip.ifsc & 0xFF)) + \
        cip.dllp_extra


def _lv(value):
    if len(value) > 0xFF:
        raise FrameError(ERR_CIP, "field too long")
    return bytes((len(value),)) + value


_NXP_VID_LEN = const(5)


def encode_cip(profile, cip):
    """Return the CIP (GP) or ATR (SE05x) bytes of `cip` in the profile's layout."""
    if cip.bwt_ms < 0 or cip.bwt_ms > 0xFFFF or cip.ifsc < 1 or cip.ifsc > profile.max_ifs:
        raise FrameError(ERR_CIP, "BWT/IFSC out of range")
    if profile.cip_layout == _LAYOUT_NXP:
        if len(cip.iin) != _NXP_VID_LEN:
            raise FrameError(ERR_CIP, "VID must be 5 bytes")
        return (bytes((cip.version,)) + cip.iin + _lv(_dllp(cip)) + bytes((cip.plid,)) +
                _lv(cip.plp) + _lv(cip.hb))
    return (bytes((cip.version,)) + _lv(cip.iin) + bytes((cip.plid,)) + _lv(cip.plp) +
            _lv(_dllp(cip)) + _lv(cip.hb))


class _Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise FrameError(ERR_CIP, "truncated")
        v = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return v

    def byte(self):
        return self.take(1)[0]

    def lv(self):
        return self.take(self.byte())


def decode_cip(profile, data):
    """Parse a CIP (GP layout) or an SE05x ATR (NXP layout) into a Cip.

    Raises FrameError(ERR_CIP) when a length runs past the end, bytes are left over, the
    DLLP is shorter than BWT + IFSC, or IFSC is 0 or above the profile maximum.
    """
    r = _Reader(data)
    version = r.byte()
    if profile.cip_layout == _LAYOUT_NXP:
        iin = r.take(_NXP_VID_LEN)
        dllp = r.lv()
        plid = r.byte()
        plp = r.lv()
    else:
        iin = r.lv()
        plid = r.byte()
        plp = r.lv()
        dllp = r.lv()
    hb = r.lv()
    if r.pos != len(data):
        raise FrameError(ERR_CIP, "trailing bytes")
    if len(dllp) < 4:
        raise FrameError(ERR_CIP, "DLLP too short")
    bwt = (dllp[0] << 8) | dllp[1]
    ifsc = (dllp[2] << 8) | dllp[3]
    if ifsc < 1 or ifsc > profile.max_ifs:
        raise FrameError(ERR_CIP, "IFSC %d" % ifsc)
    return Cip(version, iin, plid, plp, bwt, ifsc, hb, dllp[4:])


def cip_poll_ms(profile, cip):
    """Return the minimum polling time (MPOT) from the CIP's PLP in whole ms (>= 1).

    GP I2C PLP byte 5 counts 100 us units; the SE05x PLP byte 3 counts ms.  Falls back to
    the profile default when the PLP is too short to carry it.
    """
    plp = cip.plp
    if profile.cip_layout == _LAYOUT_NXP:
        if len(plp) >= 4:
            return max(1, plp[3])
    elif len(plp) >= 6:
        return max(1, (plp[5] * 100 + 999) // 1000)
    return profile.default_poll_ms
