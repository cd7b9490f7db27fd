# A small, strict DER reader and writer (ITU-T X.690 clause 10 over clause 8).
# Portable: CPython and MicroPython.
#
# Only what fleetid's wire structures need: single-byte tags (tag numbers 0..30), definite
# minimal lengths, INTEGER, BOOLEAN, NULL, OCTET/BIT STRING, OBJECT IDENTIFIER,
# UTF8String, PrintableString, IA5String, SEQUENCE, SET (OF), context-specific tags; plus
# the P-256 pieces built on them: ECDSA-Sig-Value <-> raw r||s, SubjectPublicKeyInfo,
# the ecdsa-with-SHA256 AlgorithmIdentifier.  The PKCS#10 CSR is built by common/csr.py.
#
# Strictness is the point: every parse either returns exactly what a DER encoder would
# have produced for the value, or raises DerError with a `reason` (the REASON_* strings
# below).  No BER: no indefinite lengths, no non-minimal lengths or integers, no
# constructed strings, no trailing bytes (unless a caller reads a sequence of elements
# with DerReader on purpose).
#
# TLV layout (X.690 8.1):  identifier(1) | length | contents
#     identifier: class b8..b7, constructed b6, tag number b5..b1 (11111 = high-tag form,
#                 refused here)
#     length:     0xxxxxxx (0..127), or 1nnnnnnn + n big-endian bytes (n = 1..4 here);
#                 0x80 (indefinite) is BER only (X.690 10.1); DER needs the shortest form.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.errors import DerError
from fleetid.common.oids import (
    OID_EC_PUBLIC_KEY,
    OID_ECDSA_WITH_SHA256,
    OID_PRIME256V1,
)

# Universal tags (X.680 8.4, Table 1), with the constructed bit where DER requires it.
TAG_BOOLEAN = const(0x01)
TAG_INTEGER = const(0x02)
TAG_BIT_STRING = const(0x03)
TAG_OCTET_STRING = const(0x04)
TAG_NULL = const(0x05)
TAG_OID = const(0x06)
TAG_UTF8_STRING = const(0x0C)
TAG_PRINTABLE_STRING = const(0x13)
TAG_IA5_STRING = const(0x16)
TAG_SEQUENCE = const(0x30)
TAG_SET = const(0x31)

_CLASS_CONTEXT = const(0x80)
_CONSTRUCTED = const(0x20)
_HIGH_TAG = const(0x1F)
_MAX_LENGTH_OCTETS = const(4)  # 4 GB: far above anything an SE or a CSR carries

# DerError.reason values.
REASON_TRUNCATED = "truncated"  # a TLV runs past the end of its container
REASON_TAG = "tag"  # unexpected or unsupported tag
REASON_LENGTH = "length"  # indefinite, non-minimal or oversized length
REASON_TRAILING = "trailing"  # bytes after the last expected element
REASON_VALUE = "value"  # contents not the DER of a value of that type
REASON_RANGE = "range"  # a well-formed value outside what the structure allows
REASON_ALGORITHM = "algorithm"  # unexpected AlgorithmIdentifier
REASON_POINT = "point"  # not an uncompressed P-256 point on the curve

# NIST P-256 (FIPS 186-4 D.1.2.3 / SEC 2 2.4.2): field prime, curve b, group order.
# (Plain names: const() of a multi-word integer would need long-int support at compile
# time on every port.)
P256_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P256_POINT_LEN = const(65)  # SEC 1 2.3.3 uncompressed: 04 || X(32) || Y(32)
P256_SCALAR_LEN = const(32)

# X.680 41.4 Table 10: the PrintableString repertoire.
_PRINTABLE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?"


def _is_bytes(value):
    return isinstance(value, (bytes, bytearray, memoryview))


# ---------------------------------------------------------------------------------------
# Reader


class DerReader:
    """Reads consecutive DER elements from `data[start:end]`.

    A reader over the contents of a SEQUENCE/SET is what read_sequence() returns; call
    finish() when done so trailing elements are refused.  Values come back as bytes
    copies; sub-readers share the parent's buffer.

    Params: data: bytes-like.  start, end: the window to read (default: all of data).
    Raises (every read_*): DerError with a REASON_* reason.
    """

    def __init__(self, data, start=0, end=None):
        if not _is_bytes(data):
            raise DerError(REASON_VALUE, "not bytes")
        if not isinstance(data, bytes):
            data = bytes(data)
        self._buf = data
        self._pos = start
        self._end = len(data) if end is None else end

    def at_end(self):
        """True when every byte of the window has been read."""
        return self._pos >= self._end

    def finish(self):
        """Raise DerError(REASON_TRAILING) unless every byte has been read."""
        if self._pos != self._end:
            raise DerError(REASON_TRAILING, "%d bytes" % (self._end - self._pos))

    def span(self):
        """(position, end): offsets in the underlying buffer of what is left to read
        (to hash a signed element in place, or walk a part again later, without copying)."""
        return self._pos, self._end

    def peek_tag(self):
        """Return the next identifier byte, or None at the end."""
        if self._pos >= self._end:
            return None
        return self._buf[self._pos]

    def _header(self):
        # Returns (tag, content_start, content_end) and advances past the element.
        buf = self._buf
        pos = self._pos
        end = self._end
        if pos >= end:
            raise DerError(REASON_TRUNCATED, "no element")
        tag = buf[pos]
        if tag & _HIGH_TAG == _HIGH_TAG:
            raise DerError(REASON_TAG, "high tag number form")
        if tag == 0:
            raise DerError(REASON_TAG, "end-of-contents")  # BER indefinite terminator
        pos += 1
        if pos >= end:
            raise DerError(REASON_TRUNCATED, "no length")
        first = buf[pos]
        pos += 1
        if first < 0x80:
            length = first
        elif first == 0x80:
            raise DerError(REASON_LENGTH, "indefinite")  # X.690 10.1
        else:
            count = first & 0x7F
            if count > _MAX_LENGTH_OCTETS:
                raise DerError(REASON_LENGTH, "too many length octets")
            if pos + count > end:
                raise DerError(REASON_TRUNCATED, "length octets")
            if buf[pos] == 0:
                raise DerError(REASON_LENGTH, "non-minimal")  # X.690 10.1: shortest form
            length = 0
            for i in range(count):
                length = (length << 8) | buf[pos + i]
            pos += count
            if length < 0x80:
                raise DerError(REASON_LENGTH, "non-minimal")
        if length > end - pos:
            raise DerError(REASON_TRUNCATED, "contents")
        self._pos = pos + length
        return tag, pos, pos + length

    def _expect(self, tag):
        got, start, end = self._header()
        if tag is not None and got != tag:
            raise DerError(REASON_TAG, "expected %02X, got %02X" % (tag, got))
        return got, start, end

    def read_tlv(self, tag=None):
        """Read one element.  Params: tag: expected identifier byte, or None for any.
        Returns: (tag, contents bytes)."""
        got, start, end = self._expect(tag)
        return got, self._buf[start:end]

    def read_raw(self, tag=None):
        """Read one element and return its complete encoding (identifier..contents)."""
        begin = self._pos
        self._expect(tag)
        return self._buf[begin : self._pos]

    def skip(self, tag=None):
        """Read one element without copying it (the header and length are checked)."""
        self._expect(tag)

    def read_sequence(self):
        """Read a SEQUENCE; returns a DerReader over its contents."""
        _, start, end = self._expect(TAG_SEQUENCE)
        return DerReader(self._buf, start, end)

    def read_set(self):
        """Read a SET / SET OF; returns a DerReader over its contents.

        The caller checks element order where it matters (set_elements() does)."""
        _, start, end = self._expect(TAG_SET)
        return DerReader(self._buf, start, end)

    def read_context(self, number, constructed=True):
        """Read a context-specific [number] element.

        Returns: a DerReader over the contents when constructed, else the contents bytes.
        """
        tag = _context_tag(number, constructed)
        _, start, end = self._expect(tag)
        if constructed:
            return DerReader(self._buf, start, end)
        return self._buf[start:end]

    def read_optional_context(self, number, constructed=True):
        """As read_context(), but returns None when the next element is not [number]."""
        if self.peek_tag() != _context_tag(number, constructed):
            return None
        return self.read_context(number, constructed)

    def read_integer(self):
        """Read an INTEGER (any sign, any size).  Returns: int."""
        return decode_integer(self.read_tlv(TAG_INTEGER)[1])

    def read_small_integer(self, low, high):
        """Read an INTEGER that must lie in [low, high] (REASON_RANGE otherwise)."""
        value = self.read_integer()
        if value < low or value > high:
            raise DerError(REASON_RANGE, "integer outside %d..%d" % (low, high))
        return value

    def read_boolean(self):
        """Read a BOOLEAN (DER: contents exactly 00 or FF, X.690 11.1)."""
        contents = self.read_tlv(TAG_BOOLEAN)[1]
        if len(contents) != 1 or contents[0] not in (0x00, 0xFF):
            raise DerError(REASON_VALUE, "BOOLEAN")
        return contents[0] == 0xFF

    def read_null(self):
        """Read a NULL (empty contents)."""
        if self.read_tlv(TAG_NULL)[1]:
            raise DerError(REASON_VALUE, "NULL with contents")

    def read_octet_string(self):
        """Read a primitive OCTET STRING.  Returns: bytes."""
        return self.read_tlv(TAG_OCTET_STRING)[1]

    def read_bit_string_bits(self):
        """Read a BIT STRING.  Returns: (bytes, unused_bit_count)."""
        return decode_bit_string(self.read_tlv(TAG_BIT_STRING)[1])

    def read_bit_string(self):
        """Read an octet-aligned BIT STRING (0 unused bits, as keys and signatures are).
        Returns: bytes."""
        value, unused = self.read_bit_string_bits()
        if unused:
            raise DerError(REASON_VALUE, "BIT STRING not octet-aligned")
        return value

    def read_oid(self):
        """Read an OBJECT IDENTIFIER.  Returns: dotted string."""
        return decode_oid(self.read_tlv(TAG_OID)[1])

    def read_utf8_string(self):
        """Read a UTF8String (well-formed UTF-8, RFC 3629).  Returns: str."""
        return _decode_utf8(self.read_tlv(TAG_UTF8_STRING)[1])

    def read_printable_string(self):
        """Read a PrintableString (X.680 41.4 repertoire).  Returns: str."""
        contents = self.read_tlv(TAG_PRINTABLE_STRING)[1]
        _check_repertoire(contents, _PRINTABLE)
        return contents.decode()

    def read_ia5_string(self):
        """Read an IA5String (7-bit).  Returns: str."""
        contents = self.read_tlv(TAG_IA5_STRING)[1]
        _check_ascii(contents)
        return contents.decode()


def read_single(data, tag=None):
    """Parse bytes that must be exactly one DER element.

    Params: data: bytes-like.  tag: expected identifier byte, or None.
    Returns: (tag, contents bytes).
    Raises: DerError (malformed, wrong tag, trailing bytes).
    """
    reader = DerReader(data)
    result = reader.read_tlv(tag)
    reader.finish()
    return result


def check_single(data, tag=None):
    """Raise DerError unless `data` is exactly one DER element (header-level check).

    Returns: bytes(data)."""
    read_single(data, tag)
    return bytes(data)


def set_elements(reader):
    """Read every element of a SET OF reader, checking DER order (X.690 11.6).

    Returns: list of complete element encodings.
    Raises: DerError(REASON_VALUE) if the elements are not in ascending order.
    """
    elements = []
    while not reader.at_end():
        element = reader.read_raw()
        if elements and element < elements[-1]:
            raise DerError(REASON_VALUE, "SET OF not sorted")
        elements.append(element)
    return elements


def decode_integer(contents):
    """Decode INTEGER contents (X.690 8.3): two's complement, minimal.  Returns: int."""
    n = len(contents)
    if n == 0:
        raise DerError(REASON_VALUE, "empty INTEGER")
    if n > 1:
        # X.690 8.3.2: the first 9 bits may not be all 0 or all 1.
        if (contents[0] == 0x00 and not contents[1] & 0x80) or (
            contents[0] == 0xFF and contents[1] & 0x80
        ):
            raise DerError(REASON_VALUE, "non-minimal INTEGER")
    value = int.from_bytes(bytes(contents), "big")
    if contents[0] & 0x80:
        value -= 1 << (8 * n)
    return value


def decode_bit_string(contents):
    """Decode BIT STRING contents (X.690 8.6, 11.2).  Returns: (bytes, unused)."""
    if len(contents) == 0:
        raise DerError(REASON_VALUE, "empty BIT STRING")
    unused = contents[0]
    if unused > 7 or (unused and len(contents) == 1):
        raise DerError(REASON_VALUE, "BIT STRING unused count")
    if unused and contents[-1] & ((1 << unused) - 1):
        raise DerError(REASON_VALUE, "BIT STRING unused bits not zero")  # X.690 11.2.1
    return bytes(contents[1:]), unused


def decode_oid(contents):
    """Decode OBJECT IDENTIFIER contents (X.690 8.19).  Returns: dotted string."""
    if len(contents) == 0:
        raise DerError(REASON_VALUE, "empty OID")
    if contents[-1] & 0x80:
        raise DerError(REASON_VALUE, "OID truncated")
    arcs = []
    value = 0
    at_start = True
    for b in contents:
        if at_start and b == 0x80:
            raise DerError(REASON_VALUE, "OID subidentifier not minimal")  # X.690 8.19.2
        value = (value << 7) | (b & 0x7F)
        if b & 0x80:
            at_start = False
        else:
            arcs.append(value)
            value = 0
            at_start = True
    first = arcs[0]
    # X.690 8.19.4: the first subidentifier packs the first two arcs as 40 * X + Y.
    if first < 40:
        parts = ["0", str(first)]
    elif first < 80:
        parts = ["1", str(first - 40)]
    else:
        parts = ["2", str(first - 80)]
    for arc in arcs[1:]:
        parts.append(str(arc))
    return ".".join(parts)


def _check_repertoire(contents, allowed):
    for b in contents:
        if allowed.find(bytes((b,))) < 0:
            raise DerError(REASON_VALUE, "character outside the string type")


def _check_ascii(contents):
    for b in contents:
        if b > 0x7F:
            raise DerError(REASON_VALUE, "non-ASCII in IA5String")


def _decode_utf8(contents):
    # RFC 3629 section 4 well-formedness, checked here so CPython and MicroPython (whose
    # decoder accepts surrogates) refuse the same inputs.
    i = 0
    n = len(contents)
    while i < n:
        c = contents[i]
        if c < 0x80:
            i += 1
            continue
        lo = 0x80
        hi = 0xBF
        if 0xC2 <= c <= 0xDF:
            need = 1
        elif c == 0xE0:
            need = 2
            lo = 0xA0  # no overlong 3-byte forms
        elif 0xE1 <= c <= 0xEC or c == 0xEE or c == 0xEF:
            need = 2
        elif c == 0xED:
            need = 2
            hi = 0x9F  # no UTF-16 surrogates
        elif c == 0xF0:
            need = 3
            lo = 0x90  # no overlong 4-byte forms
        elif 0xF1 <= c <= 0xF3:
            need = 3
        elif c == 0xF4:
            need = 3
            hi = 0x8F  # nothing above U+10FFFF
        else:
            raise DerError(REASON_VALUE, "invalid UTF-8")
        if i + need >= n:
            raise DerError(REASON_VALUE, "truncated UTF-8")
        second = contents[i + 1]
        if second < lo or second > hi:
            raise DerError(REASON_VALUE, "invalid UTF-8")
        for k in range(2, need + 1):
            if contents[i + k] & 0xC0 != 0x80:
                raise DerError(REASON_VALUE, "invalid UTF-8")
        i += need + 1
    return bytes(contents).decode("utf-8")


def _context_tag(number, constructed):
    if not isinstance(number, int) or number < 0 or number >= _HIGH_TAG:
        raise DerError(REASON_TAG, "context tag number 0..30")
    return _CLASS_CONTEXT | (_CONSTRUCTED if constructed else 0) | number


# ---------------------------------------------------------------------------------------
# Writer


def encode_length(length):
    """DER length octets for `length` (X.690 10.1: shortest form)."""
    if length < 0:
        raise DerError(REASON_LENGTH, "negative")
    if length < 0x80:
        return bytes((length,))
    count = 0
    rest = length
    while rest:
        count += 1
        rest >>= 8
    if count > _MAX_LENGTH_OCTETS:
        raise DerError(REASON_LENGTH, "too long")
    return bytes((0x80 | count,)) + length.to_bytes(count, "big")


def encode_tlv(tag, contents):
    """One element: identifier byte, DER length, contents."""
    if not isinstance(tag, int) or tag < 1 or tag > 0xFF or tag & _HIGH_TAG == _HIGH_TAG:
        raise DerError(REASON_TAG, "unsupported identifier")
    if not _is_bytes(contents):
        raise DerError(REASON_VALUE, "contents must be bytes")
    if isinstance(contents, memoryview):
        contents = bytes(contents)
    # One allocation of the final size: a constrained heap has little contiguous room.
    return b"".join((bytes((tag,)), encode_length(len(contents)), contents))


def encode_integer(value):
    """INTEGER of any sign, minimal two's complement (X.690 8.3)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise DerError(REASON_VALUE, "INTEGER needs an int")
    # Smallest n with -2^(8n-1) <= value < 2^(8n-1).
    magnitude = value if value >= 0 else -value - 1
    n = 1
    rest = magnitude >> 7
    while rest:
        n += 1
        rest >>= 8
    if value < 0:
        value += 1 << (8 * n)
    return encode_tlv(TAG_INTEGER, value.to_bytes(n, "big"))


def encode_boolean(value):
    """BOOLEAN (DER: FF for true, X.690 11.1)."""
    return encode_tlv(TAG_BOOLEAN, b"\xff" if value else b"\x00")


def encode_null():
    """NULL."""
    return b"\x05\x00"


def encode_octet_string(value):
    """Primitive OCTET STRING."""
    return encode_tlv(TAG_OCTET_STRING, value)


def encode_bit_string(value, unused=0):
    """BIT STRING from bytes; `unused` trailing bits of the last byte must be zero."""
    if not _is_bytes(value):
        raise DerError(REASON_VALUE, "BIT STRING needs bytes")
    value = bytes(value)
    if unused < 0 or unused > 7 or (unused and not value):
        raise DerError(REASON_VALUE, "BIT STRING unused count")
    if unused and value[-1] & ((1 << unused) - 1):
        raise DerError(REASON_VALUE, "BIT STRING unused bits not zero")
    return encode_tlv(TAG_BIT_STRING, bytes((unused,)) + value)


def _parse_arc(text):
    if not text or (len(text) > 1 and text[0] == "0"):
        raise DerError(REASON_VALUE, "OID arc")
    for ch in text:
        if ch < "0" or ch > "9":
            raise DerError(REASON_VALUE, "OID arc")
    return int(text)


def _base128(value, out):
    # X.690 8.19.2: big-endian base-128, high bit set on all but the last octet.
    count = 1
    rest = value >> 7
    while rest:
        count += 1
        rest >>= 7
    for shift in range(7 * (count - 1), 0, -7):
        out.append(0x80 | ((value >> shift) & 0x7F))
    out.append(value & 0x7F)


def encode_oid_contents(dotted):
    """OBJECT IDENTIFIER contents octets for a dotted string (X.690 8.19)."""
    if not isinstance(dotted, str):
        raise DerError(REASON_VALUE, "OID must be a dotted string")
    arcs = [_parse_arc(part) for part in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise DerError(REASON_VALUE, "OID first arcs")
    out = bytearray()
    _base128(40 * arcs[0] + arcs[1], out)
    for arc in arcs[2:]:
        _base128(arc, out)
    return bytes(out)


_OID_CACHE = {}  # dotted -> encoding, for the few OIDs a program uses over and over
_OID_CACHE_MAX = const(64)


def encode_oid(dotted):
    """OBJECT IDENTIFIER element from a dotted string."""
    if isinstance(dotted, str):
        cached = _OID_CACHE.get(dotted)
        if cached is not None:
            return cached
    encoded = encode_tlv(TAG_OID, encode_oid_contents(dotted))
    if len(_OID_CACHE) < _OID_CACHE_MAX:
        _OID_CACHE[dotted] = encoded
    return encoded


def encode_utf8_string(text):
    """UTF8String."""
    if not isinstance(text, str):
        raise DerError(REASON_VALUE, "UTF8String needs str")
    return encode_tlv(TAG_UTF8_STRING, text.encode("utf-8"))


def encode_printable_string(text):
    """PrintableString; refuses characters outside X.680 41.4."""
    if not isinstance(text, str):
        raise DerError(REASON_VALUE, "PrintableString needs str")
    contents = text.encode()
    _check_repertoire(contents, _PRINTABLE)
    return encode_tlv(TAG_PRINTABLE_STRING, contents)


def encode_ia5_string(text):
    """IA5String; refuses non-ASCII."""
    if not isinstance(text, str):
        raise DerError(REASON_VALUE, "IA5String needs str")
    contents = text.encode()
    _check_ascii(contents)
    return encode_tlv(TAG_IA5_STRING, contents)


def _parts(elements):
    parts = []
    for element in elements:
        if not _is_bytes(element):
            raise DerError(REASON_VALUE, "element must be bytes")
        parts.append(element if isinstance(element, bytes) else bytes(element))
    return parts


def _constructed(tag, parts):
    # Header, then the parts, joined once (no intermediate copy of the contents).
    total = 0
    for part in parts:
        total += len(part)
    parts.insert(0, bytes((tag,)) + encode_length(total))
    return b"".join(parts)


def encode_sequence(elements):
    """SEQUENCE of already-encoded elements (list of bytes), in the order given."""
    return _constructed(TAG_SEQUENCE, _parts(elements))


def encode_set(elements):
    """SET / SET OF of already-encoded elements, sorted into DER order (X.690 11.6)."""
    parts = _parts(elements)
    parts.sort()
    return _constructed(TAG_SET, parts)


def encode_context(number, contents, constructed=True):
    """Context-specific [number] element (IMPLICIT: `contents` are the inner contents;
    for EXPLICIT tagging pass the inner element's full encoding, constructed=True)."""
    return encode_tlv(_context_tag(number, constructed), contents)


# ---------------------------------------------------------------------------------------
# ECDSA P-256 signatures (RFC 3279 2.2.3 / SEC 1 C.5: ECDSA-Sig-Value ::= SEQUENCE { r, s })


def _scalar(value):
    return value.to_bytes(P256_SCALAR_LEN, "big")


def ecdsa_der_to_raw(signature_der):
    """Parse a DER ECDSA-Sig-Value strictly and return raw r || s (64 bytes).

    Refuses BER (non-minimal lengths or integers, indefinite length), trailing bytes,
    extra fields, negative values and r or s outside [1, n-1] of P-256.
    Params: signature_der: bytes-like.
    Returns: bytes (64).
    Raises: DerError (REASON_RANGE for out-of-range r or s).
    """
    outer = DerReader(signature_der)
    seq = outer.read_sequence()
    outer.finish()
    r = seq.read_integer()
    s = seq.read_integer()
    seq.finish()
    if r < 1 or r >= P256_N or s < 1 or s >= P256_N:
        raise DerError(REASON_RANGE, "r or s outside [1, n-1]")
    return _scalar(r) + _scalar(s)


def ecdsa_raw_to_der(signature_raw):
    """Encode raw r || s (64 bytes, IEEE P1363) as a DER ECDSA-Sig-Value.

    Raises: DerError if the length is not 64 or r or s is outside [1, n-1].
    """
    if not _is_bytes(signature_raw) or len(signature_raw) != 2 * P256_SCALAR_LEN:
        raise DerError(REASON_VALUE, "raw signature must be 64 bytes")
    raw = bytes(signature_raw)
    r = int.from_bytes(raw[:P256_SCALAR_LEN], "big")
    s = int.from_bytes(raw[P256_SCALAR_LEN:], "big")
    if r < 1 or r >= P256_N or s < 1 or s >= P256_N:
        raise DerError(REASON_RANGE, "r or s outside [1, n-1]")
    return encode_sequence([encode_integer(r), encode_integer(s)])


# ---------------------------------------------------------------------------------------
# P-256 SubjectPublicKeyInfo (RFC 5480 2)


def check_p256_point(point):
    """Check an uncompressed P-256 point (SEC 1 2.3.4): 04 || X || Y, both coordinates
    below p, on y^2 = x^3 - 3x + b.  Compressed forms and infinity (00) are refused.

    Returns: bytes(point).
    Raises: DerError(REASON_POINT).
    """
    if not _is_bytes(point) or len(point) != P256_POINT_LEN or point[0] != 0x04:
        raise DerError(REASON_POINT, "not an uncompressed P-256 point")
    point = bytes(point)
    x = int.from_bytes(point[1:33], "big")
    y = int.from_bytes(point[33:65], "big")
    if x >= P256_P or y >= P256_P:
        raise DerError(REASON_POINT, "coordinate not below p")
    if (y * y - (x * x * x - 3 * x + P256_B)) % P256_P != 0:
        raise DerError(REASON_POINT, "not on the curve")
    return point


def ec_p256_algorithm():
    """AlgorithmIdentifier id-ecPublicKey with namedCurve prime256v1 (RFC 5480 2.1.1)."""
    return encode_sequence([encode_oid(OID_EC_PUBLIC_KEY), encode_oid(OID_PRIME256V1)])


def encode_p256_spki(point):
    """SubjectPublicKeyInfo for an uncompressed P-256 point (namedCurve prime256v1).

    Raises: DerError(REASON_POINT) if the point is not valid."""
    point = check_p256_point(point)
    return encode_sequence([ec_p256_algorithm(), encode_bit_string(point)])


def read_p256_spki(reader):
    """Read a P-256 SubjectPublicKeyInfo from a reader.  Returns: the 65-byte point."""
    seq = reader.read_sequence()
    algorithm = seq.read_sequence()
    if algorithm.read_oid() != OID_EC_PUBLIC_KEY:
        raise DerError(REASON_ALGORITHM, "not id-ecPublicKey")
    if algorithm.peek_tag() != TAG_OID:
        # RFC 5480 2.1.1: only namedCurve; implicitCurve and specifiedCurve are refused.
        raise DerError(REASON_ALGORITHM, "curve not named")
    if algorithm.read_oid() != OID_PRIME256V1:
        raise DerError(REASON_ALGORITHM, "not prime256v1")
    algorithm.finish()
    point = seq.read_bit_string()
    seq.finish()
    return check_p256_point(point)


def parse_p256_spki(spki_der):
    """Parse DER SubjectPublicKeyInfo that must hold a valid uncompressed P-256 key.

    Returns: the 65-byte point.
    Raises: DerError (REASON_ALGORITHM wrong key type or curve, REASON_POINT bad point).
    """
    reader = DerReader(spki_der)
    point = read_p256_spki(reader)
    reader.finish()
    return point


# ---------------------------------------------------------------------------------------
# The signature algorithm of PKCS#10, X.509 and the SE's statements


def ecdsa_with_sha256_algorithm():
    """AlgorithmIdentifier ecdsa-with-SHA256, parameters absent (RFC 5758 3.2)."""
    return encode_sequence([encode_oid(OID_ECDSA_WITH_SHA256)])


def read_ecdsa_with_sha256_algorithm(reader):
    """Read an AlgorithmIdentifier that must be ecdsa-with-SHA256 with no parameters."""
    algorithm = reader.read_sequence()
    if algorithm.read_oid() != OID_ECDSA_WITH_SHA256:
        raise DerError(REASON_ALGORITHM, "not ecdsa-with-SHA256")
    if not algorithm.at_end():
        raise DerError(REASON_ALGORITHM, "parameters present")  # RFC 5758 3.2
    algorithm.finish()
