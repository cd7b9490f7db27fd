# The `machine` bus backends: MicroPython machine.I2C / machine.SPI.  Portable in the
# duck-typed sense: the adaptors take any object with the machine.I2C / machine.SPI
# methods (so CPython tests drive them with fakes); only open_i2c()/open_spi() import
# `machine`.
#
# I2C: writeto(addr, buf) and readfrom_into(addr, buf) are each one START..STOP
# transaction.  A NACK of the address phase surfaces as OSError: ENODEV on esp32 and the
# software I2C, EIO on rp2 (its SDK reports a generic error), ENXIO on some ports; a
# writeto() that returns fewer ACKed bytes than it sent is a NACK in the data phase.
# ETIMEDOUT (clock stretching too long, a stuck bus) is a bus failure.
#
# SPI: no NACK; as in device/host/bus_linux.py, the first read after a write polls, and a first
# byte of 0x00 or 0xFF (filler: no frame ready) is reported as BusNack.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.errors import BusError, BusNack

I2C_DEFAULT_HZ = const(400000)
SPI_DEFAULT_HZ = const(1000000)

_EIO = const(5)
_ENXIO = const(6)
_ENODEV = const(19)
_NACK_ERRNOS = (_EIO, _ENXIO, _ENODEV)
_SPI_FILLER_0 = const(0x00)
_SPI_FILLER_1 = const(0xFF)


def _errno(exc):
    if exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return getattr(exc, "errno", None)


class MachineI2cBus:
    """A Bus on a machine.I2C-like object.

    Params: i2c: object with writeto(addr, buf) and readfrom_into(addr, buf).
        address: 7-bit SE address.  reset_pin: optional machine.Pin-like (value(v)) on the
        SE's active-low reset; reset_fn: optional callable used instead of the pin.
    """

    def __init__(self, i2c, address, reset_pin=None, reset_fn=None):
        self.i2c = i2c
        self.address = address
        self._reset_pin = reset_pin
        self._reset_fn = reset_fn

    def _fail(self, exc):
        if _errno(exc) in _NACK_ERRNOS:
            return BusNack()
        return BusError("i2c error %s" % (exc,))

    def write(self, frame):
        """One write transaction.  Raises BusNack (busy), BusError."""
        try:
            acked = self.i2c.writeto(self.address, frame)
        except OSError as exc:
            raise self._fail(exc)
        # Ports that return the ACK count: fewer than sent means a NACK mid-frame.
        if isinstance(acked, int) and acked < len(frame):
            raise BusNack()

    def read(self, n):
        """One read transaction of exactly n bytes.  Raises BusNack (busy), BusError."""
        buf = bytearray(n)
        try:
            self.i2c.readfrom_into(self.address, buf)
        except OSError as exc:
            raise self._fail(exc)
        return bytes(buf)

    def reset(self):
        """Pulse the reset pin (or call reset_fn) when given; otherwise a no-op."""
        _pulse(self._reset_pin, self._reset_fn)

    def close(self):
        """Nothing to release (the machine.I2C object belongs to the caller)."""


class MachineSpiBus:
    """A Bus on a machine.SPI-like object with a chip-select pin.

    Params: spi: object with write(buf) and readinto(buf, write_byte).
        cs: machine.Pin-like with value(v), active low.  reset_pin / reset_fn: as I2C.
    """

    def __init__(self, spi, cs, reset_pin=None, reset_fn=None):
        self.spi = spi
        self.cs = cs
        self._reset_pin = reset_pin
        self._reset_fn = reset_fn
        self._expect_start = True
        cs.value(1)

    def write(self, frame):
        """One transaction clocking the frame out.  Raises BusError."""
        self.cs.value(0)
        try:
            self.spi.write(frame)
        except OSError as exc:
            raise BusError("spi error %s" % (exc,))
        finally:
            self.cs.value(1)
        self._expect_start = True

    def read(self, n):
        """One transaction of n bytes clocked with 0xFF.

        Raises: BusNack when the first read after a write sees filler, BusError.
        """
        buf = bytearray(n)
        self.cs.value(0)
        try:
            self.spi.readinto(buf, 0xFF)
        except OSError as exc:
            raise BusError("spi error %s" % (exc,))
        finally:
            self.cs.value(1)
        if self._expect_start:
            if buf[0] == _SPI_FILLER_0 or buf[0] == _SPI_FILLER_1:
                raise BusNack()
            self._expect_start = False
        return bytes(buf)

    def reset(self):
        """Pulse the reset pin (or call reset_fn) when given; otherwise a no-op."""
        self._expect_start = True
        _pulse(self._reset_pin, self._reset_fn)

    def close(self):
        """Release chip select (the machine.SPI object belongs to the caller)."""
        self.cs.value(1)


def _pulse(pin, fn):
    if fn is not None:
        fn()
    elif pin is not None:
        import time

        pin.value(0)
        # Reset pulse: 1 ms is well above the minimum of SE05x/OPTIGA-class parts.
        if hasattr(time, "sleep_ms"):
            time.sleep_ms(1)
        else:
            time.sleep(0.001)
        pin.value(1)


def open_i2c(bus_id, address, freq=I2C_DEFAULT_HZ):
    """Open machine.I2C(bus_id, freq=freq) and wrap it (MicroPython only).

    Raises: BusError when `machine` is unavailable or the bus cannot be made.
    """
    try:
        import machine
    except ImportError:
        raise BusError("machine buses need MicroPython on a board")
    try:
        return MachineI2cBus(machine.I2C(bus_id, freq=freq), address)
    except (OSError, ValueError) as exc:
        raise BusError("cannot open machine.I2C(%d): %s" % (bus_id, exc))


def open_spi(bus_id, cs_pin, freq=SPI_DEFAULT_HZ):
    """Open machine.SPI(bus_id) with chip select on Pin(cs_pin) (MicroPython only).

    Raises: BusError when `machine` is unavailable or the bus cannot be made.
    """
    try:
        import machine
    except ImportError:
        raise BusError("machine buses need MicroPython on a board")
    try:
        spi = machine.SPI(bus_id, baudrate=freq, polarity=0, phase=0)
        cs = machine.Pin(cs_pin, machine.Pin.OUT, value=1)
    except (OSError, ValueError) as exc:
        raise BusError("cannot open machine.SPI(%d): %s" % (bus_id, exc))
    return MachineSpiBus(spi, cs)
