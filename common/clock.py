# Time source for every bounded wait.  Portable: CPython and MicroPython.
#
# Everything that waits (the T=1' link polling the SE, the emulator's busy model, retry
# back-off) takes a clock object instead of calling `time` directly, so tests run on
# virtual time (FakeClock: sleeping advances the clock instantly and deterministically)
# and the same code runs on a board with SystemClock.
#
# Interface (duck-typed):  now_ms() -> int, sleep_ms(ms), and the finer now_us() -> int,
# sleep_us(us) used by the emulator's bus-time model.  now_ms()/now_us() never go back and
# never wrap (MicroPython's ticks_* wrap; SystemClock accumulates ticks_diff into an int).

import time

try:
    _ticks_us = time.ticks_us  # MicroPython
    _ticks_diff = time.ticks_diff
    _sleep_us = time.sleep_us
    _MICROPYTHON = True
except AttributeError:  # CPython
    _MICROPYTHON = False


class SystemClock:
    """The real monotonic clock (time.monotonic on CPython, ticks_us on MicroPython)."""

    def __init__(self):
        if _MICROPYTHON:
            self._last = _ticks_us()
            self._acc_us = 0

    def now_us(self):
        """Return monotonic microseconds since an arbitrary origin (never wraps)."""
        if _MICROPYTHON:
            t = _ticks_us()
            self._acc_us += _ticks_diff(t, self._last)
            self._last = t
            return self._acc_us
        return int(time.monotonic() * 1000000)

    def now_ms(self):
        """Return monotonic milliseconds since an arbitrary origin (never wraps)."""
        if _MICROPYTHON:
            return self.now_us() // 1000
        return int(time.monotonic() * 1000000) // 1000  # now_us() // 1000, one call less

    def sleep_us(self, us):
        """Block for `us` microseconds (no-op when us <= 0)."""
        if us <= 0:
            return
        if _MICROPYTHON:
            _sleep_us(int(us))
        else:
            time.sleep(us / 1000000.0)

    def sleep_ms(self, ms):
        """Block for `ms` milliseconds (no-op when ms <= 0)."""
        self.sleep_us(ms * 1000)


class FakeClock:
    """Virtual time for tests and simulations: sleeping advances the clock instantly.

    Params: start_ms: initial reading.  Attributes: slept_ms (total time slept, for
    reports).  Time is kept in microseconds so sub-millisecond bus transfers add up.
    """

    def __init__(self, start_ms=0):
        self._us = int(start_ms) * 1000
        self.slept_ms = 0

    def now_us(self):
        """Return the virtual time in microseconds."""
        return self._us

    def now_ms(self):
        """Return the virtual time in whole milliseconds."""
        return self._us // 1000

    def advance(self, ms):
        """Move virtual time forward by `ms` milliseconds (negative values are refused)."""
        if ms < 0:
            raise ValueError("time cannot go back")
        self._us += int(ms * 1000)

    def sleep_us(self, us):
        """Advance virtual time by `us` microseconds."""
        if us > 0:
            self._us += int(us)
            self.slept_ms += us / 1000.0

    def sleep_ms(self, ms):
        """Advance virtual time by `ms` milliseconds."""
        if ms > 0:
            self.sleep_us(ms * 1000)
