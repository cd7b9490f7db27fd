"""device/bus.py (URI parsing) and device/bus_machine.py (the machine.I2C / machine.SPI
adaptors) under the real MicroPython interpreter: OSError numbering, bytearray and
exception behaviour are MicroPython's own here, not CPython's.  Fakes stand in for
machine.I2C / machine.SPI (the unix port has no `machine.I2C`)."""

import pytest

from tests.micropython.support import Stage

pytestmark = pytest.mark.micropython

SCRIPT = r"""
from fleetid.common.errors import BusError, BusNack, FleetidError
from fleetid.device.bus import BusUriError, parse_bus_uri
from fleetid.device.bus_machine import MachineI2cBus, MachineSpiBus

for uri in ("sim:unix:/tmp/se.sock", "sim:tcp:[::1]:7050", "linux:i2c:/dev/i2c-1:0x48",
            "machine:i2c:0:0x48?freq=1000000", "machine:spi:1:17"):
    u = parse_bus_uri(uri)
    print("uri", u.backend, u.transport, u.path, u.host, u.port, u.bus_id, u.address,
          u.cs_pin, u.option_int("freq", 0))
for uri in ("bogus", "linux:i2c:/dev/i2c-1:0x78", "sim:tcp:h:99999", "usb:x:y"):
    try:
        parse_bus_uri(uri)
        print("bad-uri accepted", uri)
    except BusUriError as e:
        print("bad-uri refused", isinstance(e, FleetidError))


class FakeI2C:
    def __init__(self):
        self.errno = None
        self.queue = list(b"\xa5\xe1\x00\x02")
        self.log = []

    def writeto(self, addr, buf):
        self.log.append(("w", addr, len(buf)))
        if self.errno:
            raise OSError(self.errno)
        return len(buf)

    def readfrom_into(self, addr, buf):
        self.log.append(("r", addr, len(buf)))
        if self.errno:
            raise OSError(self.errno)
        for i in range(len(buf)):
            buf[i] = self.queue.pop(0)


i2c = FakeI2C()
bus = MachineI2cBus(i2c, 0x48)
bus.write(b"\x5a\xc1\x00\x00")
print("i2c-read", bus.read(4) == b"\xa5\xe1\x00\x02", i2c.log)
for code in (19, 5, 6, 110):
    i2c.errno = code
    try:
        bus.read(1)
    except BusNack:
        print("i2c-errno", code, "nack")
    except BusError:
        print("i2c-errno", code, "error")


class Pin:
    def __init__(self):
        self.v = []

    def value(self, v=None):
        if v is not None:
            self.v.append(v)


class FakeSPI:
    def __init__(self):
        self.miso = [b"\x00\x00\x00", b"\xa5\xe1\x01", b"\xff\x12\x34"]

    def write(self, buf):
        pass

    def readinto(self, buf, fill):
        data = self.miso.pop(0)
        for i in range(len(buf)):
            buf[i] = data[i]


cs = Pin()
spi = MachineSpiBus(FakeSPI(), cs)
spi.write(b"\x5a\xc1\x00")
try:
    spi.read(3)
except BusNack:
    print("spi-filler nack")
print("spi-frame", spi.read(3) == b"\xa5\xe1\x01", spi.read(3) == b"\xff\x12\x34", cs.v)
"""


def test_bus_uris_and_machine_adaptors_under_micropython(tmp_path):
    lines = Stage(tmp_path, opt=3).run("run_buses", SCRIPT).splitlines()
    assert lines[:5] == [
        "uri sim unix /tmp/se.sock None None None None None 0",
        "uri sim tcp None ::1 7050 None None None 0",
        "uri linux i2c /dev/i2c-1 None None None 72 None 0",
        "uri machine i2c None None None 0 72 None 1000000",
        "uri machine spi None None None 1 None 17 0",
    ]
    assert lines[5:9] == ["bad-uri refused True"] * 4
    assert lines[9] == "i2c-read True [('w', 72, 4), ('r', 72, 4)]"
    # ENODEV (esp32, soft I2C), EIO (rp2), ENXIO: NACK; ETIMEDOUT: a bus failure.
    assert lines[10:14] == ["i2c-errno 19 nack", "i2c-errno 5 nack", "i2c-errno 6 nack",
                            "i2c-errno 110 error"]
    assert lines[14:] == ["spi-filler nack", "spi-frame True True [1, 0, 1, 0, 1, 0, 1, 0, 1]"]
