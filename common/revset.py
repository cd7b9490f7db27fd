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
# device applies an incremental update by streaming the merge into its store and then
# verifying the signature the cloud made over the same bytes (device/revset_cache.py).
# The encoder (whole sets and merges) is common/revset_merge.py; this module decodes.

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


def _index_count(count, stride):
    return (count - 1) // stride if count else 0


# -- wire form (the encoder is common/revset_merge.py) -----------------------------------


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
# (revset_merge.write_delta_merge: the encoding is canonical) and verifies the new
# signature through the SE: a delta needs
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
