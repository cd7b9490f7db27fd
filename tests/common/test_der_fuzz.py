"""Property tests: the strict DER reader raises only DerError, whatever the input."""

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetid.common import der
from fleetid.common.der import DerReader
from fleetid.common.errors import DerError

_PRIMITIVE_READERS = {
    der.TAG_BOOLEAN: "read_boolean",
    der.TAG_INTEGER: "read_integer",
    der.TAG_BIT_STRING: "read_bit_string_bits",
    der.TAG_OCTET_STRING: "read_octet_string",
    der.TAG_NULL: "read_null",
    der.TAG_OID: "read_oid",
    der.TAG_UTF8_STRING: "read_utf8_string",
    der.TAG_PRINTABLE_STRING: "read_printable_string",
    der.TAG_IA5_STRING: "read_ia5_string",
}


def walk(reader, depth=0):
    """Read every element, descending into constructed ones with the typed readers."""
    while not reader.at_end():
        tag = reader.peek_tag()
        if tag == der.TAG_SEQUENCE and depth < 16:
            walk(reader.read_sequence(), depth + 1)
        elif tag == der.TAG_SET and depth < 16:
            der.set_elements(reader.read_set())
        elif tag in _PRIMITIVE_READERS:
            getattr(reader, _PRIMITIVE_READERS[tag])()
        elif tag is not None and tag & 0xE0 == 0xA0 and depth < 16:
            inner = reader.read_context(tag & 0x1F)
            walk(inner, depth + 1)
        else:
            reader.read_tlv()


def _only_der_errors(function, data):
    try:
        function(data)
    except DerError:
        pass


PARSERS = [
    lambda data: walk(DerReader(data)),
    der.ecdsa_der_to_raw,
    der.ecdsa_raw_to_der,
    der.parse_p256_spki,
    der.check_p256_point,
    der.decode_integer,
    der.decode_oid,
    der.decode_bit_string,
    lambda data: der.read_single(data, der.TAG_SEQUENCE),
]

# Byte soup biased towards DER-looking prefixes: random bytes rarely form a header.
der_ish = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda tag, body: bytes((tag,)) + der.encode_length(len(body)) + body,
        st.sampled_from([0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x13, 0x16, 0x30, 0x31, 0xA0]),
        st.binary(max_size=150),
    ),
)


@settings(max_examples=400, deadline=None)
@given(der_ish)
def test_every_parser_raises_only_der_error_on_arbitrary_bytes(data):
    for parser in PARSERS:
        _only_der_errors(parser, data)


@st.composite
def der_trees(draw, depth=0):
    """Well-formed DER built from the writer; used as seeds for mutation."""
    kind = draw(st.integers(0, 6 if depth < 3 else 4))
    if kind == 0:
        return der.encode_integer(draw(st.integers(-(1 << 300), 1 << 300)))
    if kind == 1:
        return der.encode_octet_string(draw(st.binary(max_size=140)))
    if kind == 2:
        return der.encode_oid("1.2." + str(draw(st.integers(0, 1 << 80))))
    if kind == 3:
        return der.encode_utf8_string(draw(st.text(max_size=20).filter(_utf8_ok)))
    if kind == 4:
        return der.encode_null()
    children = draw(st.lists(der_trees(depth=depth + 1), max_size=4))
    if kind == 5:
        return der.encode_sequence(children)
    return der.encode_set(children)


def _utf8_ok(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeError:
        return False


@settings(max_examples=300, deadline=None)
@given(der_trees())
def test_writer_output_is_read_back_completely(encoded):
    walk(DerReader(encoded))


@settings(max_examples=400, deadline=None)
@given(der_trees(), st.data())
def test_mutated_der_raises_only_der_error(encoded, data):
    mutated = bytearray(encoded)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip" and mutated:
            i = data.draw(st.integers(0, len(mutated) - 1))
            mutated[i] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            i = data.draw(st.integers(0, len(mutated)))
            mutated[i:i] = bytes((data.draw(st.integers(0, 255)),))
        elif op == "delete" and mutated:
            del mutated[data.draw(st.integers(0, len(mutated) - 1))]
        elif op == "truncate":
            del mutated[data.draw(st.integers(0, len(mutated))) :]
    _only_der_errors(lambda b: walk(DerReader(b)), bytes(mutated))
