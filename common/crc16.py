# CRC-16/X-25, the epilogue of GlobalPlatform T=1' blocks.  Portable: CPython and MicroPython.
#
# GPC_SPE_172 (APDU Transport over SPI/I2C) section 4, block epilogue: the CRC of
# ISO/IEC 13239 (HDLC FCS, catalogued as CRC-16/X-25): polynomial 0x1021 processed
# reflected (0x8408), initial value 0xFFFF, input and output reflected, final XOR 0xFFFF.
# Check value over b"123456789" is 0x906E.  The byte order on the wire is the framing
# profile's business (common/t1.py).
#
# Two implementations of the same function, picked once at import:
#
# * portable (MicroPython, and the reference): table-driven, one lookup per byte; the
#   table is an array of 256 u16 (512 bytes, where a list of ints would take 2-4 KB of a
#   device heap);
# * CPython fast path (common/crc16_fast.py): binascii.crc_hqx over bit-reversed bytes,
#   about 30x faster; the line host computes one CRC per T=1' block sent and received.

from array import array

try:
    from binascii import crc_hqx as _crc_hqx  # CPython; absent from MicroPython's binascii
except ImportError:
    _crc_hqx = None

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_POLY_REFLECTED = const(0x8408)  # 0x1021 bit-reversed
_INIT = const(0xFFFF)
_XOROUT = const(0xFFFF)

CHECK_VALUE = const(0x906E)  # crc16(b"123456789")


def _make_table():
    table = array("H", bytes(512))
    for i in range(256):
        crc = i
        for _ in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ _POLY_REFLECTED
            else:
                crc >>= 1
        table[i] = crc
    return table


_TABLE = _make_table()


def crc16_table(data, start=0, end=None):
    """Return the CRC-16/X-25 of data[start:end] as an int 0..0xFFFF (`crc16` is this
    function on MicroPython, the crc_hqx path below on CPython).

    Params: data: bytes, bytearray or memoryview; start/end: optional slice bounds, so a
    caller can checksum part of a preallocated buffer without copying.
    """
    if end is None:
        end = len(data)
    table = _TABLE
    crc = _INIT
    for i in range(start, end):
        crc = (crc >> 8) ^ table[(crc ^ data[i]) & 0xFF]
    return crc ^ _XOROUT


if _crc_hqx is not None:  # CPython: the fast path lives in its own module (no heap cost here)
    from fleetid.common.crc16_fast import crc16
else:
    crc16 = crc16_table
