# A compact revocation set's delta merged as a stream (common/revset.py has the format):
# the new set's exact wire bytes handed to a sink in 256-byte chunks, never held whole,
# so a device merging into a file (or hashing the result) holds the old set and one
# chunk instead of both sets side by side.  Portable: CPython and MicroPython.  A module
# of its own: workflows that only look sets up do not load its bytecode.

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
    MAGIC,
    REASON_MALFORMED,
    SERIAL_MAX,
    SIG_MAX,
    RevsetError,
    _code_bits,
    _checked_layout,
    _index_count,
    _Merged,
)

_INDEX_ENTRY = const(8)  # an index entry: serial u32, body bit offset u32 (revset.py)


class _ByteSink:
    # Bits MSB first into a small chunk buffer, handed to write() when full: the
    # streamed merge never holds the new set.
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


def _count(merged, k, universe):
    """Pass 1: (count, body bits) of the merged serials, checked sorted, distinct and in
    range as _encode() does."""
    count = 0
    body_bits = 0
    prev = 0
    for s in merged:
        if s <= prev or s > universe:
            raise ValueError("serials must be sorted, distinct, in 1..universe")
        body_bits += _code_bits(s - prev, k)
        prev = s
        count += 1
    return count, body_bits


def _write_index(out, merged, k, stride, count):
    """Pass 2: the index (it precedes the body): every stride-th serial and the body bit
    offset just after its code."""
    pos = 0
    prev = 0
    j = 0
    for s in merged:
        pos += _code_bits(s - prev, k)
        prev = s
        j += 1
        if j % stride == 0 and j < count:
            out.put(struct.pack(">II", s, pos))


def write_delta_merge(base, delta, write, max_len=1 << 20):
    """revset.apply_delta() streamed: the new set's exact wire bytes handed to `write` in
    chunks (a bytes-like each, only valid during the call: copy or hash it), never held
    whole, so the heap needs the old set and a 256-byte chunk instead of both sets.

    Params: base: RevSet.  delta: RevDelta.  write: callable(chunk).  max_len: the
        largest result accepted (checked before the first write).
    Returns: the number of bytes written.  The result is NOT verified here.
    Raises: as revset.apply_delta(); a RevsetError from a malformed base or delta is raised
        before anything is written (the serials are walked in full first).
    """
    if delta.base_number != base.number:
        raise RevsetError(REASON_MALFORMED, "delta for set %d, have %d"
                          % (delta.base_number, base.number))
    signature = delta.signature
    if not 8 <= len(signature) <= SIG_MAX:
        raise ValueError("signature length")
    if delta.universe > SERIAL_MAX or len(delta.fleet_id) != 8:
        raise ValueError("universe / fleet_id")
    k = delta.k
    stride = delta.stride
    merged = _Merged(base, delta)
    count, body_bits = _count(merged, k, delta.universe)
    ca_ids = _checked_layout(delta.ca_ids, stride, k)
    index_len = _index_count(count, stride) * _INDEX_ENTRY
    total = (HEADER_LEN + CA_ID_LEN * len(ca_ids) + index_len + (body_bits + 7) // 8
             + len(signature) + 1)
    if total > max_len:
        raise ValueError("set of %d bytes over the limit" % total)
    out = _ByteSink(write)
    out.put(struct.pack(_HEADER, MAGIC, FORMAT_VERSION, 0, bytes(delta.fleet_id),
                        delta.number, delta.this_update, delta.next_update,
                        delta.universe, count, k, stride, len(ca_ids), body_bits))
    for c in ca_ids:
        out.put(c)
    _write_index(out, merged, k, stride, count)
    # Pass 3: the body.
    prev = 0
    low = (1 << k) - 1
    for s in merged:
        v = s - prev - 1
        out.ones(v >> k)
        out.bits(v & low, k + 1)  # the terminating zero, then the k low bits
        prev = s
    out.flush()
    out.put(signature)
    out.put(bytes((len(signature),)))
    out.flush()
    return total
