# The compact revocation set's encoder (common/revset.py has the format and the
# decoder), one streamed writer for both of its uses: the cloud's whole sets (encode,
# cloud/revocation/revset_publisher.py) and the device's delta merge (write_delta_merge,
# device/revset_cache.py).
# The wire bytes go to a sink in 256-byte chunks and are never held whole, so a device
# merging into its store holds the old set and one chunk instead of both sets side by
# side.  Portable: CPython and MicroPython.  A module of its own: verifiers that only look
# sets up do not load its bytecode.

import struct

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.revset import (
    _HEADER,
    CA_ID_LEN,
    FORMAT_VERSION,
    HEADER_LEN,
    K_MAX,
    MAGIC,
    REASON_MALFORMED,
    SERIAL_MAX,
    SIG_MAX,
    RevsetError,
    _index_count,
)

_INDEX_ENTRY = const(8)  # an index entry: serial u32, body bit offset u32 (revset.py)


class _ByteSink:
    # Bits MSB first into a small chunk buffer, handed to write() when full: the
    # encoder never holds the set.
    def __init__(self, write, size=256):
        self.write = write
        self.chunk = bytearray(size)
        self.view = memoryview(self.chunk)
        self.n = 0
        self.acc = 0
        self.nacc = 0  # pending bits in acc (< 8 between calls)

    def put(self, data):
        # Whole bytes (only when no bits are pending).
        for b in data:
            self._byte(b)

    def _byte(self, b):
        self.chunk[self.n] = b
        self.n += 1
        if self.n == len(self.chunk):
            self.write(self.view)
            self.n = 0

    def bits(self, value, width):
        # width <= 16 per step keeps acc a small int on 32-bit ports too.
        while width:
            step = width if width <= 16 else 16
            width -= step
            self.acc = (self.acc << step) | ((value >> width) & ((1 << step) - 1))
            self.nacc += step
            while self.nacc >= 8:
                self.nacc -= 8
                self._byte((self.acc >> self.nacc) & 0xFF)
            self.acc &= (1 << self.nacc) - 1

    def ones(self, count):
        while count >= 16:
            self.bits(0xFFFF, 16)
            count -= 16
        if count:
            self.bits((1 << count) - 1, count)

    def flush(self):
        # Pads the last byte with zero bits, then hands over what is buffered.
        if self.nacc:
            self._byte((self.acc << (8 - self.nacc)) & 0xFF)
            self.acc = 0
            self.nacc = 0
        if self.n:
            self.write(self.view[: self.n])
            self.n = 0


def _code_bits(gap, k):
    return ((gap - 1) >> k) + 1 + k


def _count(serials, k, universe):
    """Pass 1: (count, body bits at k) of the serials, checked sorted, distinct and in
    1..universe."""
    count = 0
    body_bits = 0
    prev = 0
    for s in serials:
        if s <= prev or s > universe:
            raise ValueError("serials must be sorted, distinct, in 1..universe")
        body_bits += _code_bits(s - prev, k)
        prev = s
        count += 1
    return count, body_bits


def _best_k(serials, count):
    # The k that minimises the body (exact count for each candidate around the mean
    # gap's); serials: a list.  Returns (k, body bits).
    if not count:
        return 0, 0
    mean = (serials[-1] + count - 1) // count
    k0 = 0
    while (1 << (k0 + 1)) <= mean and k0 < K_MAX:
        k0 += 1
    best_k, best_bits = 0, None
    for k in range(max(0, k0 - 2), min(K_MAX, k0 + 2) + 1):
        total = 0
        prev = 0
        for s in serials:
            total += ((s - prev - 1) >> k) + 1 + k
            prev = s
        if best_bits is None or total < best_bits:
            best_k, best_bits = k, total
    return best_k, best_bits


def _pick_stride(count, body_bits):
    # Smallest power of two >= 16 keeping the index <= 1 % of the body.
    stride = 16
    while stride < 32768 and stride < count and (
            _index_count(count, stride) * 64 * 100 > body_bits):
        stride *= 2
    return stride


def _checked_layout(ca_ids, stride, k):
    """The CA key identifiers sorted (bytes), after checking them, the stride and k."""
    ca_ids = sorted(bytes(c) for c in ca_ids)
    for c in ca_ids:
        if len(c) != CA_ID_LEN:
            raise ValueError("CA key identifier length")
    if len(ca_ids) > 255 or not 1 <= stride <= 0xFFFF or not 0 <= k <= K_MAX:
        raise ValueError("ca_count / stride / k")
    return ca_ids


def _write_index(out, serials, k, stride, count):
    """Pass 2: the index (it precedes the body): every stride-th serial and the body bit
    offset just after its code."""
    pos = 0
    prev = 0
    j = 0
    for s in serials:
        pos += _code_bits(s - prev, k)
        prev = s
        j += 1
        if j % stride == 0 and j < count:
            out.put(struct.pack(">II", s, pos))


def _write_set(write, fleet, number, this_update, next_update, universe, serials, ca_ids=(),
              k=None, stride=None, signature=None, max_len=None):
    """A set's wire bytes handed to `write` in chunks (a bytes-like each, only valid
    during the call: copy or hash it): the signed part, then the signature and its length
    byte when `signature` (DER) is given.

    Params: as encode() (serials walked three times).  max_len: the largest result
        accepted, checked before the first write.
    Returns: the number of bytes written.
    Raises: ValueError (unsorted, out-of-range or bad fields, over max_len) and whatever
        iterating `serials` raises, both before anything is written.
    """
    if universe > SERIAL_MAX or len(fleet) != 8:
        raise ValueError("universe / fleet_id")
    tail = 0
    if signature is not None:
        if not 8 <= len(signature) <= SIG_MAX:
            raise ValueError("signature length")
        tail = len(signature) + 1
    count, body_bits = _count(serials, 0 if k is None else k, universe)
    if k is None:
        k, body_bits = _best_k(serials, count)
    if stride is None:
        stride = _pick_stride(count, body_bits)
    ca_ids = _checked_layout(ca_ids, stride, k)
    total = (HEADER_LEN + CA_ID_LEN * len(ca_ids) + _index_count(count, stride) * _INDEX_ENTRY
             + (body_bits + 7) // 8 + tail)
    if max_len is not None and total > max_len:
        # A delta's k (unsigned until the result is verified) could ask for a huge set:
        # refused before anything is written.
        raise ValueError("set of %d bytes over the limit" % total)
    out = _ByteSink(write)
    out.put(struct.pack(_HEADER, MAGIC, FORMAT_VERSION, 0, bytes(fleet), number,
                        this_update, next_update, universe, count, k, stride,
                        len(ca_ids), body_bits))
    for c in ca_ids:
        out.put(c)
    _write_index(out, serials, k, stride, count)
    # Pass 3: the body (gap - 1: unary quotient, a 0 bit, k-bit remainder).
    prev = 0
    low = (1 << k) - 1
    for s in serials:
        v = s - prev - 1
        out.ones(v >> k)
        out.bits(v & low, k + 1)  # the terminating zero, then the k low bits
        prev = s
    out.flush()
    if signature is not None:
        out.put(signature)
        out.put(bytes((len(signature),)))
        out.flush()
    return total


def encode(fleet, number, this_update, next_update, universe, serials, ca_ids=(), k=None,
           stride=None):
    """The signed part of a set (without the signature: revset.sign_part adds it).

    Params: fleet: 8-byte fleet_id.  number: u64.  this_update / next_update: epoch s.
        universe: highest serial allocated.  serials: sorted, distinct ints in
        1..universe (a list, or any re-iterable sorted sequence when k is given).
        ca_ids: 20-byte key identifiers of revoked issuing CAs.  k / stride: None picks
        the best.
    Returns: bytes.  Raises: ValueError for unsorted, out-of-range or bad fields.
    """
    return _gathered(lambda write: _write_set(write, fleet, number, this_update, next_update,
                                              universe, serials, ca_ids, k, stride))


def _gathered(emit):
    # What emit(write) streams, as one bytes object (for callers that hold it anyway).
    parts = []
    emit(lambda chunk: parts.append(bytes(chunk)))
    return b"".join(parts)


class _Merged:
    # Sorted union of a set's serials and a delta's additions, re-iterable (the encoder
    # walks it three times), never materialised.
    def __init__(self, base, delta):
        self.base = base
        self.delta = delta

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


def write_delta_merge(base, delta, write, max_len=1 << 20):
    """The new set of a delta, streamed: base (a RevSet) merged with delta (a RevDelta)
    into the new set's exact wire bytes (the encoding is canonical), handed to `write` in
    chunks as _write_set() does; the heap needs the old set and a 256-byte chunk, not both
    sets.  The result is NOT verified here: the caller verifies its signature.

    Params: base: RevSet.  delta: RevDelta.  write: callable(chunk).  max_len: the
        largest result accepted (checked before the first write).
    Returns: the number of bytes written.
    Raises: RevsetError (base number mismatch, bad additions, a malformed base) and
        ValueError (over max_len, bad fields), before anything is written (the serials are
        walked in full first).
    """
    if delta.base_number != base.number:
        raise RevsetError(REASON_MALFORMED, "delta for set %d, have %d"
                          % (delta.base_number, base.number))
    return _write_set(write, delta.fleet_id, delta.number, delta.this_update,
                     delta.next_update, delta.universe, _Merged(base, delta), delta.ca_ids,
                     delta.k, delta.stride, delta.signature, max_len)


def apply_delta(base, delta, max_len=1 << 20):
    """write_delta_merge() into memory: the new set's wire bytes, for tools that hold both
    sets anyway (bench/revocation.py, tests); a device streams the merge into its store
    (device/revset_cache.py).  NOT verified here.  Raises: as write_delta_merge()."""
    return _gathered(lambda write: write_delta_merge(base, delta, write, max_len))
