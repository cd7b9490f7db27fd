"""Metering of emulated chips on the line: what a device's APDUs would cost on a real SE,
and how much host time went into pretending to be one.

    buses = EmulatedBuses("se050")             # a bus factory for cloud.line.runner.run_line
    bus = buses(emulated_chip)                 # MeteredBus over a BusEndpoint over the chip
    bus.measurements()                         # (se_ms, emulator_ms, emulator_cpu_ms, apdus)

SE time = what the latency profile (sim/profiles.py) charges for the APDUs the device
executed (operation + NVM write time) plus the I2C transfer time of the bytes that crossed
the bus, i.e. the time the same steps would take if the host were infinitely fast.
Emulator time = wall time spent below the Bus interface (endpoint, SE-side T=1', applet,
and the modelled bus sleeps): host CPU spent pretending to be the SE, not line cost.
"""

import time

from fleetid.common import se_consts as C
from fleetid.sim import profiles
from fleetid.sim.endpoint import BusEndpoint


class MeteredChip:
    """Wraps a Chip: adds up the SE time the latency profile charges for the APDUs it
    executes (operation + NVM write time)."""

    def __init__(self, chip, latency):
        self.chip = chip
        self.latency = latency
        self.se_ms = 0.0
        self.apdus = 0

    @property
    def last_nvm_write_bytes(self):
        return self.chip.last_nvm_write_bytes

    def process(self, apdu):
        try:
            return self.chip.process(apdu)
        finally:
            self.apdus += 1
            op = C.INS_NAMES.get(apdu[1]) if len(apdu) >= 2 else None
            if op is not None:
                self.se_ms += self.latency.op_ms(op)
            written = self.chip.last_nvm_write_bytes or 0
            if written:
                self.se_ms += self.latency.nvm_write_ms(written)

    def power_loss(self):
        self.chip.power_loss()


class MeteredBus:
    """Wraps a Bus: counts the bytes of transactions that went through (not NACKs), for
    the I2C share of the SE-only time, and the wall / CPU time spent below the Bus
    interface (the emulator: endpoint, SE-side T=1', applet), which is not line cost.

    With `chip` (a MeteredChip) and `bus_hz`, `measurements()` gives the device's
    figures for the line's DeviceRun."""

    def __init__(self, bus, chip=None, bus_hz=0):
        self.bus = bus
        self.chip = chip
        self.bus_hz = bus_hz
        self.bytes = 0
        self.transactions = 0
        self.emulator_s = 0.0
        self.emulator_cpu_s = 0.0

    def write(self, frame):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            self.bus.write(frame)
        finally:
            self.emulator_s += time.perf_counter() - wall
            self.emulator_cpu_s += time.thread_time() - cpu
        self.bytes += len(frame)
        self.transactions += 1

    def read(self, n):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            data = self.bus.read(n)
        finally:
            self.emulator_s += time.perf_counter() - wall
            self.emulator_cpu_s += time.thread_time() - cpu
        self.bytes += n
        self.transactions += 1
        return data

    def reset(self):
        self.bus.reset()

    def close(self):
        self.bus.close()

    def bus_ms(self, bus_hz):
        """Transfer time at `bus_hz`: 9 clocks per byte plus the address byte."""
        if not bus_hz:
            return 0.0
        return (self.bytes + self.transactions) * 9 * 1000.0 / bus_hz

    def measurements(self):
        """(SE ms, emulator wall ms, emulator CPU ms, APDUs) of what went through."""
        se_ms = self.chip.se_ms if self.chip is not None else 0.0
        apdus = self.chip.apdus if self.chip is not None else 0
        return (se_ms + self.bus_ms(self.bus_hz), self.emulator_s * 1000.0,
                self.emulator_cpu_s * 1000.0, apdus)


class EmulatedBuses:
    """A bus factory over emulated chips: `factory(emulated_chip)` puts the chip behind a
    BusEndpoint with the latency profile and meters both (MeteredBus.measurements()).

    Params: profile: latency profile name (sim.profiles) or a LatencyProfile.  clock: the
        endpoint's clock (None: SystemClock, real waits).  endpoint_kwargs: extra
        BusEndpoint arguments.
    Attributes: profile (the profile's name, for the line report), latency.
    """

    def __init__(self, profile="none", clock=None, **endpoint_kwargs):
        self.latency = profiles.get(profile) if isinstance(profile, str) else profile
        self.profile = self.latency.name
        self.clock = clock
        self.endpoint_kwargs = endpoint_kwargs

    def __call__(self, item):
        metered = MeteredChip(item.chip, self.latency)
        kwargs = dict(self.endpoint_kwargs)
        kwargs.setdefault("clock", self.clock)
        endpoint = BusEndpoint(metered, latency=self.latency, **kwargs)
        return MeteredBus(endpoint, metered, self.latency.bus_hz)
