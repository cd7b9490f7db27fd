# Compact revocation set: the revoked device serials of a fleet, Golomb-Rice coded over
# serial gaps with a sampled index, for offline and constrained verifiers.  Portable:
# CPython and MicroPython (struct, hashlib; no crypto: the SE verifies the signature).
#
# Why this code: the line allocates device serials monotonically from 1, so the revoked
# set is R serials out of 1..N, and no exact representation can beat log2 C(N, R) bits
# in general.  For a random R-subset the gaps are close to geometric, and a Rice code
# with the best k (tried exhaustively by the encoder) is within about 1-3 % of that
# bound; the index adds 64 bits per `stride` entries, and the encoder picks the stride
# so that the index stays under about 1 % of the body.  Lookups decode at most
# `stride` codes from the nearest index entry, in place: the set is never expanded.
#
# Layout (all integers big-endian; "signed part" = everything before the signature):
#
#   offset size field
#   0      4    magic "FRS1"
#   4      1    format version (1)
#   5      1    flags (0; any other value is refused)
#   6      8    fleet_id: SHA-256(fleet root public point, 65 bytes uncompressed)[:8]
#   14     8    number: set number, strictly increasing (ms since the epoch at build)
#   22     4    this_update (s since the epoch, UTC)
#   26     4    next_update (s since the epoch, UTC)
#   30     4    universe: the highest serial allocated when the set was built
#   34     4    count: R, revoked serials in the set
#   38     1    k: Rice parameter (0..24)
#   39     2    stride: index sampling interval (entries), >= 1
#   41     1    ca_count: revoked issuing CAs (batch revocation, one entry each)
#   42     4    body_bits: bits used in the body
#   46     20*ca_count  key identifiers (SKI / AKI keyIdentifier) of revoked CAs, sorted
#   ..     8*floor((R-1)/stride)  index, for blocks i = 1, 2, ...: the decoder state
#                               before entry i*stride (serial u32 of entry i*stride - 1,
#                               bit offset u32 just after its code); block 0 starts at
#                               (0, 0) and needs no entry
#   ..     ceil(body_bits/8)  body: for entry j, gap g = s_j - s_(j-1) (s_(-1) = 0),
#                               Rice(g - 1): q = (g-1) >> k one-bits, a zero bit, then the
#                               k low bits; MSB first; the last byte's padding is zero
#   ..     n    signature: DER ECDSA-Sig-Value, P-256, over SHA-256(signed part)
#   end-1  1    n
#
# The encoding is canonical (one byte string per (header fields, serial set)): the
# device applies an incremental update by merging in place into a new buffer and then
# verifying the signature the cloud made over the same bytes (device/revset_cache.py).

import hashlib
import struct

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.errors import FleetidError

MAGIC = b"FRS1"
DELTA_MAGIC = b"FRD1"
FORMAT_VERSION = const(1)
HEADER_LEN = const(46)
_HEADER = ">4sBB8sQIIIIBHBI"
CA_ID_LEN = const(20)
_INDEX_ENTRY = const(8)
SERIAL_MAX = const(0xFFFFFFFF)
K_MAX = const(24)
SIG_MAX = const(72)

# RevsetError.reason values.
REASON_TRUNCATED = "truncated"
REASON_MALFORMED = "malformed"
REASON_VERSION = "version"


class RevsetError(FleetidError):
    """A compact set (or delta) that does not parse; `reason`: REASON_*."""

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


def fleet_id(root_point):
    """The 8-byte fleet identifier: SHA-256 of the fleet root's uncompressed point."""
    return hashlib.sha256(bytes(root_point)).digest()[:8]


# -- bit I/O ---------------------------------------------------------------------------


class _BitWriter:
    # Into a preallocated bytearray (sized by a counting pass); MSB first.
    def __init__(self, size):
        self.buf = bytearray(size)
        self.pos = 0

    def ones(self, count):
        pos = self.pos
        buf = self.buf
        while count and pos & 7:
            buf[pos >> 3] |= 0x80 >> (pos & 7)
            pos += 1
            count -= 1
        while count >= 8:
            buf[pos >> 3] = 0xFF
            pos += 8
            count -= 8
        while count:
            buf[pos >> 3] |= 0x80 >> (pos & 7)
            pos += 1
            count -= 1
        self.pos = pos

    def bits(self, value, width):
        pos = self.pos
        buf = self.buf
        while width:
            width -= 1
            if (value >> width) & 1:
                buf[pos >> 3] |= 0x80 >> (pos & 7)
            pos += 1
        self.pos = pos


def _index_count(count, stride):
    return (count - 1) // stride if count else 0


def _code_bits(gap, k):
    return ((gap - 1) >> k) + 1 + k


def _best_k(serials):
    # The k that minimises the body (exact count for each candidate).
    best_k, best_bits = 0, None
    count = len(serials)
    if not count:
        return 0, 0
    mean = (serials[-1] + count - 1) // count
    k0 = 0
    while (1 << (k0 + 1)) <= mean and k0 < K_MAX:
        k0 += 1
    for k in range(max(0, k0 - 2), min(K_MAX, k0 + 2) + 1):
        total = 0
        prev = 0
        for s in serials:
            total += ((s - prev - 1) >> k) + 1 + k
            prev = s
        if best_bits is None or total < best_bits:
            best_k, best_bits = k, total
    return best_k, best_bits


def _checked_layout(ca_ids, stride, k):
    """The CA key identifiers sorted (bytes), after checking them, the stride and k."""
    ca_ids = sorted(bytes(c) for c in ca_ids)
    for c in ca_ids:
        if len(c) != CA_ID_LEN:
            raise ValueError("CA key identifier length")
    if len(ca_ids) > 255 or not 1 <= stride <= 0xFFFF or not 0 <= k <= K_MAX:
        raise ValueError("ca_count / stride / k")
    return ca_ids


def _pick_stride(count, body_bits):
    # Smallest power of two >= 16 keeping the index <= 1 % of the body.
    stride = 16
    while stride < 32768 and stride < count and (
            _index_count(count, stride) * 64 * 100 > body_bits):
        stride *= 2
    return stride


# -- encoding (cloud and device merge) ---------------------------------------------------


def encode(fleet, number, this_update, next_update, universe, serials, ca_ids=(),
           k=None, stride=None):
    """The signed part of a set (without the signature).

    Params: fleet: 8-byte fleet_id.  number: u64.  this_update / next_update: epoch s.
        universe: highest serial allocated.  serials: sorted, distinct ints in
        1..universe (a list, or any re-iterable sorted sequence).  ca_ids: 20-byte key
        identifiers of revoked issuing CAs.  k / stride: None picks the best.
    Returns: bytes.  Raises: ValueError for unsorted, out-of-range or bad fields.
    """
    return bytes(_encode(fleet, number, this_update, next_update, universe, serials,
                         ca_ids, k, stride, 0))


def _encode(fleet, number, this_update, next_update, universe, serials, ca_ids, k, stride,
            tail, max_len=None):
    # encode() into a bytearray with `tail` spare bytes at the end (the device's merge
    # puts the signature there: one buffer for the new set, no copies).
    count = _count_serials(serials, universe)
    if universe > SERIAL_MAX or len(fleet) != 8:
        raise ValueError("universe / fleet_id")
    if k is None:
        k, body_bits = _best_k(serials)
    else:
        body_bits = 0
        prev = 0
        for s in serials:
            body_bits += _code_bits(s - prev, k)
            prev = s
    if stride is None:
        stride = _pick_stride(count, body_bits)
    ca_ids = _checked_layout(ca_ids, stride, k)
    index_len = _index_count(count, stride) * _INDEX_ENTRY
    body_len = (body_bits + 7) // 8
    head = struct.pack(_HEADER, MAGIC, FORMAT_VERSION, 0, bytes(fleet), number,
                       this_update, next_update, universe, count, k, stride,
                       len(ca_ids), body_bits)
    total = HEADER_LEN + CA_ID_LEN * len(ca_ids) + index_len + body_len + tail
    if max_len is not None and total > max_len:
        # A delta's k (unsigned until the result is verified) could ask for a huge
        # buffer: refuse before allocating.
        raise ValueError("set of %d bytes over the limit" % total)
    out = _BitWriter(total)
    buf = out.buf
    buf[:HEADER_LEN] = head
    pos = HEADER_LEN
    for c in ca_ids:
        buf[pos : pos + CA_ID_LEN] = c
        pos += CA_ID_LEN
    out.pos = (pos + index_len) * 8
    _write_body(out, pos, serials, count, k, stride)
    return buf


def _count_serials(serials, universe):
    # How many serials; each must be above the one before and at most `universe`.
    count = 0
    prev = 0
    for s in serials:
        if s <= prev or s > universe:
            raise ValueError("serials must be sorted, distinct, in 1..universe")
        prev = s
        count += 1
    return count


def _write_body(out, index_pos, serials, count, k, stride):
    # The Golomb-Rice body from out.pos (gap - 1: unary quotient, a 0 bit, k-bit
    # remainder), and every `stride`-th serial with its body bit offset into the index
    # at index_pos.
    buf = out.buf
    body_start = out.pos
    prev = 0
    j = 0
    for s in serials:
        v = s - prev - 1
        out.ones(v >> k)
        out.pos += 1
        out.bits(v & ((1 << k) - 1), k)
        j += 1
        if j % stride == 0 and j < count:
            struct.pack_into(">II", buf, index_pos, s, out.pos - body_start)
            index_pos += _INDEX_ENTRY
        prev = s


def sign_part(signed, signature_der):
    """signed part + signature + its length byte: the wire form of a set."""
    if not 8 <= len(signature_der) <= SIG_MAX:
        raise ValueError("signature length")
    return bytes(signed) + bytes(signature_der) + bytes((len(signature_der),))


# -- decoding (no expansion) -------------------------------------------------------------


class RevSet:
    """A parsed set: header fields as attributes, lookups decode in place.

    Attributes: fleet_id, number, this_update, next_update, universe, count, k, stride,
    ca_count, body_bits, signed_len (bytes covered by the signature), signature (DER),
    data (the whole set, bytes or memoryview).
    """

    def __init__(self, data):
        if len(data) < HEADER_LEN + 9:
            raise RevsetError(REASON_TRUNCATED, "header")
        sig_len = data[-1]
        if not 8 <= sig_len <= SIG_MAX or len(data) < HEADER_LEN + 1 + sig_len:
            raise RevsetError(REASON_MALFORMED, "signature length")
        self.data = data
        self.signed_len = len(data) - 1 - sig_len
        self.signature = bytes(data[self.signed_len : len(data) - 1])
        (magic, version, flags, self.fleet_id, self.number, self.this_update,
         self.next_update, self.universe, self.count, self.k, self.stride, self.ca_count,
         self.body_bits) = struct.unpack(_HEADER, bytes(data[:HEADER_LEN]))
        if magic != MAGIC:
            raise RevsetError(REASON_MALFORMED, "magic")
        if version != FORMAT_VERSION or flags:
            raise RevsetError(REASON_VERSION, "format %d flags %d" % (version, flags))
        if self.stride < 1 or self.k > K_MAX or self.count > self.universe:
            raise RevsetError(REASON_MALFORMED, "k / stride / count")
        self.ca_pos = HEADER_LEN
        self.index_pos = self.ca_pos + CA_ID_LEN * self.ca_count
        self.index_count = _index_count(self.count, self.stride)
        self.body_pos = self.index_pos + _INDEX_ENTRY * self.index_count
        expected = self.body_pos + (self.body_bits + 7) // 8
        if expected > self.signed_len:
            raise RevsetError(REASON_TRUNCATED, "body")
        if expected != self.signed_len:
            raise RevsetError(REASON_MALFORMED, "length")
        if self.count and self.body_bits < self.count * (1 + self.k):
            raise RevsetError(REASON_MALFORMED, "body_bits")

    def signed_digest(self):
        """SHA-256 of the signed part (what the SE verifies)."""
        return hashlib.sha256(memoryview(self.data)[: self.signed_len]).digest()

    def _index(self, i):
        return struct.unpack_from(">II", self.data, self.index_pos + i * _INDEX_ENTRY)

    def ca_revoked(self, key_id):
        """True when the CA with this 20-byte key identifier is revoked (batch)."""
        key_id = bytes(key_id)
        data = self.data
        for i in range(self.ca_count):
            pos = self.ca_pos + i * CA_ID_LEN
            if bytes(data[pos : pos + CA_ID_LEN]) == key_id:
                return True
        return False

    def ca_ids(self):
        """The revoked CAs' key identifiers (a list of bytes; ca_count is small)."""
        return [bytes(self.data[self.ca_pos + i * CA_ID_LEN : self.ca_pos + (i + 1) * CA_ID_LEN])
                for i in range(self.ca_count)]

    def _decode(self, bitpos, value):
        # One code after `value`, from body bit `bitpos`.  Returns (serial, bitpos).
        data = self.data
        base = self.body_pos
        end = self.body_bits
        q = 0
        while True:
            if bitpos >= end:
                raise RevsetError(REASON_MALFORMED, "body overrun")
            byte = data[base + (bitpos >> 3)]
            if (byte << (bitpos & 7)) & 0x80:
                q += 1
                bitpos += 1
            else:
                bitpos += 1
                break
        k = self.k
        if bitpos + k > end:
            raise RevsetError(REASON_MALFORMED, "body overrun")
        r = 0
        while k:
            r = (r << 1) | ((data[base + (bitpos >> 3)] >> (7 - (bitpos & 7))) & 1)
            bitpos += 1
            k -= 1
        return value + ((q << self.k) | r) + 1, bitpos

    def _block_start(self, i):
        # Decoder state before block i: (previous serial, body bit offset).
        if i == 0:
            return 0, 0
        return self._index(i - 1)

    def contains(self, serial):
        """True when `serial` is in the set (exact: no false positives)."""
        if serial < 1 or serial > self.universe or not self.count:
            return False
        lo, hi = 0, self.index_count  # the last block whose start state < serial
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if self._index(mid - 1)[0] < serial:
                lo = mid
            else:
                hi = mid - 1
        value, bitpos = self._block_start(lo)
        left = min(self.stride, self.count - lo * self.stride)
        # The scan, inlined (no call or tuple per code: MicroPython's hot path).  Each
        # code: count one-bits up to a zero, then read k bits through a 32-bit window.
        data = self.data
        base = self.body_pos
        end = self.body_bits
        k = self.k
        mask = (1 << k) - 1
        last = base + (end + 7) // 8  # first byte past the body
        while left > 0 and value < serial:
            q = 0
            while True:
                if bitpos >= end:
                    raise RevsetError(REASON_MALFORMED, "body overrun")
                byte = (data[base + (bitpos >> 3)] << (bitpos & 7)) & 0xFF
                if byte == 0xFF >> (bitpos & 7) << (bitpos & 7) & 0xFF and byte:
                    # the rest of this byte is all ones
                    run = 8 - (bitpos & 7)
                    q += run
                    bitpos += run
                    continue
                while byte & 0x80:
                    byte = (byte << 1) & 0xFF
                    q += 1
                    bitpos += 1
                bitpos += 1
                break
            if bitpos + k > end:
                raise RevsetError(REASON_MALFORMED, "body overrun")
            if k:
                i = base + (bitpos >> 3)
                window = 0
                for j in range(4):
                    window = (window << 8) | (data[i + j] if i + j < last else 0)
                r = (window >> (32 - (bitpos & 7) - k)) & mask
                bitpos += k
                value += ((q << k) | r) + 1
            else:
                value += q + 1
            left -= 1
        return value == serial

    def iter_serials(self):
        """Every serial in order, decoded lazily (a generator: no list)."""
        if not self.count:
            return
        value, bitpos = 0, 0
        for _ in range(self.count):
            value, bitpos = self._decode(bitpos, value)
            yield value

    def check_consistent(self):
        """Decode the whole body once and compare it with the index: a set whose index
        or body disagrees is refused (defence in depth; the signature covers both).
        Raises: RevsetError(REASON_MALFORMED)."""
        value, bitpos = 0, 0
        for j in range(self.count):
            value, bitpos = self._decode(bitpos, value)
            if value > self.universe:
                raise RevsetError(REASON_MALFORMED, "serial past universe")
            if (j + 1) % self.stride == 0 and j + 1 < self.count \
                    and self._index((j + 1) // self.stride - 1) != (value, bitpos):
                raise RevsetError(REASON_MALFORMED, "index")
        if bitpos != self.body_bits:
            raise RevsetError(REASON_MALFORMED, "body length")
        for pos in range(bitpos, ((bitpos + 7) // 8) * 8):
            if (self.data[self.body_pos + (pos >> 3)] >> (7 - (pos & 7))) & 1:
                raise RevsetError(REASON_MALFORMED, "padding")


def parse(data):
    """Parse a set (header, lengths; the body is checked by RevSet.check_consistent()).
    Returns: RevSet.  Raises: RevsetError."""
    return RevSet(data)


# -- incremental updates ---------------------------------------------------------------
#
# Delta layout (big-endian):
#   0   4  magic "FRD1"
#   4   1  format version (1)
#   5   8  base_number: the set this delta applies to
#   13  HEADER_LEN  the new set's header (its fields; count and body_bits included)
#   ..  20*ca_count  the new set's CA key identifiers
#   ..  4  added: number of serials added
#   ..  4*added  the added serials, sorted, u32 (revocations only grow)
#   ..  n  the new set's signature (DER); then 1 byte n
# The device merges its verified set with the additions into the new set's exact bytes
# (encode() is canonical) and verifies the new signature through the SE: a delta needs
# no signature of its own, and a wrong one just fails that verification.

DELTA_FIXED = const(13)


class RevDelta:
    """A parsed delta.  Attributes: base_number, header (bytes), ca_ids, added (count),
    signature, and the new set's header fields (number, this_update, next_update,
    universe, count, k, stride)."""

    def __init__(self, data):
        if len(data) < DELTA_FIXED + HEADER_LEN + 4 + 9:
            raise RevsetError(REASON_TRUNCATED, "delta header")
        if bytes(data[:4]) != DELTA_MAGIC:
            raise RevsetError(REASON_MALFORMED, "delta magic")
        if data[4] != FORMAT_VERSION:
            raise RevsetError(REASON_VERSION, "delta format")
        self.data = data
        self.base_number = struct.unpack_from(">Q", data, 5)[0]
        self.header = bytes(data[DELTA_FIXED : DELTA_FIXED + HEADER_LEN])
        (magic, version, flags, self.fleet_id, self.number, self.this_update,
         self.next_update, self.universe, self.count, self.k, self.stride, ca_count,
         self.body_bits) = struct.unpack(_HEADER, self.header)
        if magic != MAGIC or version != FORMAT_VERSION or flags or self.stride < 1 \
                or self.k > K_MAX:
            raise RevsetError(REASON_MALFORMED, "delta's set header")
        pos = DELTA_FIXED + HEADER_LEN
        self.ca_ids = []
        for _ in range(ca_count):
            self.ca_ids.append(bytes(data[pos : pos + CA_ID_LEN]))
            pos += CA_ID_LEN
        if pos + 4 > len(data):
            raise RevsetError(REASON_TRUNCATED, "delta")
        self.added = struct.unpack_from(">I", data, pos)[0]
        self.added_pos = pos + 4
        end = self.added_pos + 4 * self.added
        sig_len = data[-1]
        if end + sig_len + 1 != len(data) or not 8 <= sig_len <= SIG_MAX:
            raise RevsetError(REASON_TRUNCATED if end + sig_len + 1 > len(data)
                              else REASON_MALFORMED, "delta length")
        self.signature = bytes(data[end : end + sig_len])

    def iter_added(self):
        prev = 0
        for i in range(self.added):
            s = struct.unpack_from(">I", self.data, self.added_pos + 4 * i)[0]
            if s <= prev:
                raise RevsetError(REASON_MALFORMED, "delta serials not sorted")
            prev = s
            yield s


def encode_delta(base_number, new_set, added):
    """A delta from the set numbered `base_number` to `new_set` (signed wire bytes).
    added: the sorted serials new_set has and the base has not."""
    new = RevSet(new_set)
    parts = [DELTA_MAGIC, bytes((FORMAT_VERSION,)), struct.pack(">Q", base_number),
             bytes(new.data[:HEADER_LEN])]
    parts.extend(new.ca_ids())
    parts.append(struct.pack(">I", len(added)))
    for s in added:
        parts.append(struct.pack(">I", s))
    parts.append(new.signature)
    parts.append(bytes((len(new.signature),)))
    return b"".join(parts)


class _Merged:
    # Sorted union of a set's serials and a delta's additions, re-iterable (encode()
    # walks it twice or three times), never materialised.
    def __init__(self, base, delta):
        self.base = base
        self.delta = delta

    def __len__(self):
        return self.base.count + self.delta.added

    def __iter__(self):
        a = self.base.iter_serials()
        b = self.delta.iter_added()
        x = next(a, None)
        y = next(b, None)
        while x is not None or y is not None:
            if y is None or (x is not None and x < y):
                yield x
                x = next(a, None)
            elif x is None or y < x:
                yield y
                y = next(b, None)
            else:
                raise RevsetError(REASON_MALFORMED, "delta re-adds a serial")


def apply_delta(base, delta, max_len=1 << 20):
    """The new set's wire bytes (a bytearray, built in place): base (a RevSet) merged
    with delta (a RevDelta).  The result is NOT verified here: the caller verifies its
    signature.  max_len: the largest result accepted (checked before allocating).
    Raises: RevsetError (base number mismatch, bad additions), ValueError (over max_len,
        bad fields)."""
    if delta.base_number != base.number:
        raise RevsetError(REASON_MALFORMED, "delta for set %d, have %d"
                          % (delta.base_number, base.number))
    merged = _Merged(base, delta)
    signature = delta.signature
    if not 8 <= len(signature) <= SIG_MAX:
        raise ValueError("signature length")
    tail = len(signature) + 1
    buf = _encode(delta.fleet_id, delta.number, delta.this_update, delta.next_update,
                  delta.universe, merged, delta.ca_ids, delta.k, delta.stride, tail, max_len)
    end = len(buf) - tail
    buf[end : end + len(signature)] = signature
    buf[-1] = len(signature)
    return buf
