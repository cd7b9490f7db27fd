# CRC-16/X-25 on CPython through binascii.crc_hqx (see common/crc16.py, which picks it at
# import when binascii has crc_hqx; MicroPython never imports this module, so its bytecode
# costs the 64 KiB device heap nothing).
#
# crc_hqx is the same CRC in its non-reflected form (poly 0x1021, MSB first, no final XOR).
# A reflected CRC of the input equals the bit-reversed non-reflected CRC of the bit-reversed
# input bytes: reverse every byte with one bytes.translate, run crc_hqx from 0xFFFF, reverse
# the 16-bit result, XOR 0xFFFF.  About 30x faster than the table loop on CPython.

from binascii import crc_hqx as _crc_hqx

_REVERSE = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))  # bit-reversed bytes


def crc16(data, start=0, end=None):
    """Return the CRC-16/X-25 of data[start:end] as an int 0..0xFFFF (the contract of
    fleetid.common.crc16.crc16_table)."""
    if start or end is not None or type(data) is memoryview:
        data = bytes(memoryview(data)[start:end])
    rev = _REVERSE
    crc = _crc_hqx(data.translate(rev), 0xFFFF)
    return ((rev[crc & 0xFF] << 8) | rev[crc >> 8]) ^ 0xFFFF
