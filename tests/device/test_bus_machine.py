"""The MicroPython machine.I2C / machine.SPI adaptors, driven with fake bus objects that
behave like the ports do (OSError with ENODEV/EIO on an address NACK, ACK counts)."""

import errno

import pytest

from fleetid.common.errors import BusError, BusNack
from fleetid.device.bus_machine import MachineI2cBus, MachineSpiBus


class FakeI2C:
    """machine.I2C-like: writeto returns the ACK count, readfrom_into fills the buffer."""

    def __init__(self):
        self.log = []
        self.queue = bytearray()
        self.nack_errno = None
        self.acked_short = False

    def writeto(self, addr, buf):
        self.log.append(("w", addr, bytes(buf)))
        if self.nack_errno is not None:
            raise OSError(self.nack_errno)
        return len(buf) - 1 if self.acked_short else len(buf)

    def readfrom_into(self, addr, buf):
        self.log.append(("r", addr, len(buf)))
        if self.nack_errno is not None:
            raise OSError(self.nack_errno)
        for i in range(len(buf)):
            buf[i] = self.queue.pop(0)


def test_i2c_write_and_read_are_single_transactions_to_the_address():
    i2c = FakeI2C()
    bus = MachineI2cBus(i2c, 0x48)
    bus.write(b"\x5a\xc1\x00\x00")
    i2c.queue.extend(b"\xa5\xe1\x00\x00\x99")
    assert bus.read(4) == b"\xa5\xe1\x00\x00"
    assert bus.read(1) == b"\x99"
    assert i2c.log == [("w", 0x48, b"\x5a\xc1\x00\x00"), ("r", 0x48, 4), ("r", 0x48, 1)]
    bus.close()


@pytest.mark.parametrize("code", [errno.ENODEV, errno.EIO, errno.ENXIO])
def test_i2c_address_nack_errnos_become_bus_nack(code):
    i2c = FakeI2C()
    i2c.nack_errno = code
    bus = MachineI2cBus(i2c, 0x48)
    with pytest.raises(BusNack):
        bus.read(3)
    with pytest.raises(BusNack):
        bus.write(b"\x01")


def test_i2c_timeout_is_bus_error_and_short_ack_is_nack():
    i2c = FakeI2C()
    bus = MachineI2cBus(i2c, 0x48)
    i2c.acked_short = True
    with pytest.raises(BusNack):
        bus.write(b"\x01\x02")
    i2c.acked_short = False
    i2c.nack_errno = errno.ETIMEDOUT
    with pytest.raises(BusError):
        bus.read(1)


class FakePin:
    def __init__(self):
        self.values = []

    def value(self, v=None):
        if v is not None:
            self.values.append(v)


class FakeSPI:
    def __init__(self, cs):
        self.cs = cs
        self.sent = []
        self.miso = []

    def write(self, buf):
        assert self.cs.values[-1] == 0  # chip select asserted during the transfer
        self.sent.append(bytes(buf))

    def readinto(self, buf, write_byte):
        assert self.cs.values[-1] == 0 and write_byte == 0xFF
        data = self.miso.pop(0)
        buf[:] = data[: len(buf)]


def test_spi_asserts_cs_per_transaction_and_polls_the_prologue():
    cs = FakePin()
    spi = FakeSPI(cs)
    bus = MachineSpiBus(spi, cs)
    bus.write(b"\x5a\xc1\x00")
    assert spi.sent == [b"\x5a\xc1\x00"] and cs.values == [1, 0, 1]
    spi.miso = [b"\xff\xff\xff", b"\xa5\xe1\x01", b"\x00\x12\x34"]
    with pytest.raises(BusNack):
        bus.read(3)
    assert bus.read(3) == b"\xa5\xe1\x01"
    assert bus.read(3) == b"\x00\x12\x34"  # body bytes are never taken for filler
    assert cs.values[-1] == 1


def test_reset_pulses_the_reset_pin_low_then_high():
    pin = FakePin()
    bus = MachineI2cBus(FakeI2C(), 0x48, reset_pin=pin)
    bus.reset()
    assert pin.values == [0, 1]
    calls = []
    MachineSpiBus(FakeSPI(FakePin()), FakePin(), reset_fn=lambda: calls.append(1)).reset()
    assert calls == [1]
