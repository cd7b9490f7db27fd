"""Parallel stations: `run_line` provisions a list of devices on K station threads that
share one LineResources (HSM session pool, registry, issuing CA, journal, checkpointer).

    summary = run_line(line.resources_for(batch), devices, bus_factory, stations=8)

`bus_factory(device)` returns the Bus (write / read / reset / close) of the programmer
holding `device`: a real I2C programmer, or the emulator's metered endpoint
(fleetid.sim.metering.EmulatedBuses, which the CLI, the tests and the bench wire in).
When the bus has `measurements()` -> (se_ms, emulator_ms, emulator_cpu_ms, apdus), those
figures go into the device's DeviceRun; a real programmer's bus reports none (zeros).
The factory's `profile` attribute (if any) names the SE latency profile in the report.

Measurements per device (`DeviceRun`): cycle time (wall, station clock); SE time and
emulator time as the bus measured them (sim/metering.py defines them for the emulator);
host cost = cycle time minus emulator time.
"""

import datetime
import math
import queue
import threading
import time

from fleetid.cloud.line.station import Station


# -- parallel stations ------------------------------------------------------------------------


class DeviceRun:
    """One device's run: the station's DeviceResult plus cycle / SE / emulator times (ms)
    and finished_at (aware UTC datetime: when the station was done with it)."""

    __slots__ = ("result", "cycle_ms", "se_ms", "emulator_ms", "host_cpu_ms", "apdus",
                 "finished_at")

    def __init__(self, result, cycle_ms, se_ms, emulator_ms, host_cpu_ms, apdus,
                 finished_at=None):
        self.finished_at = finished_at
        self.result = result
        self.cycle_ms = cycle_ms
        self.se_ms = se_ms
        self.emulator_ms = emulator_ms
        self.host_cpu_ms = host_cpu_ms
        self.apdus = apdus


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a list; 0.0 for an empty list."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, int(math.ceil(p / 100.0 * len(ordered))))
    return ordered[min(rank, len(ordered)) - 1]


class RunSummary:
    """What one run of K stations over N chips did.

    Attributes: stations, devices, profile, runs (list of DeviceRun), wall_s, audit_bytes
    (bytes the audit chain grew by), pool (HSM pool stats at the end), batch.
    """

    def __init__(self, stations, profile, runs, wall_s, audit_bytes, audit_entries, pool,
                 batch):
        self.stations = stations
        self.profile = profile
        self.runs = runs
        self.devices = len(runs)
        self.wall_s = wall_s
        self.audit_bytes = audit_bytes
        self.audit_entries = audit_entries
        self.pool = pool
        self.batch = batch

    @property
    def ok(self):
        return [r for r in self.runs if r.result.ok]

    @property
    def yield_pct(self):
        return 100.0 * len(self.ok) / self.devices if self.devices else 0.0

    @property
    def throughput(self):
        """Committed devices per second of wall time."""
        return len(self.ok) / self.wall_s if self.wall_s > 0 else 0.0

    def cycle_ms(self, p):
        return percentile([r.cycle_ms for r in self.ok], p)

    def failures(self):
        """{cause: count} of failed devices, most frequent first."""
        counts = {}
        for run in self.runs:
            if not run.result.ok:
                counts[run.result.cause] = counts.get(run.result.cause, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def mean(self, attr, ok_only=True):
        runs = self.ok if ok_only else self.runs
        return sum(getattr(r, attr) for r in runs) / len(runs) if runs else 0.0

    def step_means_ms(self):
        """{step: mean ms} over committed devices."""
        sums = {}
        for run in self.ok:
            for step, seconds in run.result.timings.items():
                sums[step] = sums.get(step, 0.0) + seconds * 1000.0
        n = len(self.ok) or 1
        return {step: total / n for step, total in sums.items()}

    def as_dict(self):
        return {
            "stations": self.stations, "devices": self.devices, "profile": self.profile,
            "batch": self.batch, "committed": len(self.ok), "yield_pct": self.yield_pct,
            "wall_s": self.wall_s, "throughput_per_s": self.throughput,
            "cycle_ms": {"p50": self.cycle_ms(50), "p95": self.cycle_ms(95),
                         "p99": self.cycle_ms(99), "mean": self.mean("cycle_ms")},
            "se_ms_mean": self.mean("se_ms"), "emulator_ms_mean": self.mean("emulator_ms"),
            "host_cpu_ms_mean": self.mean("host_cpu_ms"),
            "failures": self.failures(), "steps_ms": self.step_means_ms(),
            "audit_bytes_per_device": (self.audit_bytes / len(self.ok)) if self.ok else 0.0,
            "hsm_pool": self.pool,
        }


def _audit_size(registry):
    count, _head = registry.head()
    total = 0
    for line in registry.iter_audit_lines(0):
        total += len(line) + (0 if line.endswith(b"\n") else 1)
    return count, total


def run_line(resources, devices, bus_factory, stations=1, progress=None, link_clock=None,
             step_hook=None, measure_audit=True):
    """Provision `devices` on `stations` parallel stations (threads) sharing `resources`.

    Params: resources: LineResources.  devices: list of what bus_factory takes (an
        emulated chip, a programmer socket, ...).  bus_factory: callable(device) -> Bus
        (see the module docstring).  stations: K >= 1.
        progress: optional callable(done, total, DeviceRun) (called from station threads).
        link_clock: the stations' T=1' clock (default SystemClock: real waits).
        step_hook: passed to every Station (fault injection).
    Returns: RunSummary.
    """
    run = _StationThreads(resources, devices, bus_factory, progress, link_clock, step_hook)
    audit_before = _audit_size(resources.registry) if measure_audit else (0, 0)
    wall = run.run(max(1, stations))
    audit_after = _audit_size(resources.registry) if measure_audit else (0, 0)
    return RunSummary(stations, getattr(bus_factory, "profile", "programmer"), run.runs, wall,
                      audit_after[1] - audit_before[1], audit_after[0] - audit_before[0],
                      resources.hsm.pool_stats(), resources.config.batch)


def _measure(result, bus, cpu_s):
    """DeviceRun of one device from the station's result and the bus's measurements."""
    measurements = getattr(bus, "measurements", None)
    se_ms, emulator_ms, emulator_cpu_ms, apdus = (
        measurements() if measurements is not None else (0.0, 0.0, 0.0, 0))
    return DeviceRun(result, result.cycle_s * 1000.0, se_ms, emulator_ms,
                     max(0.0, cpu_s * 1000.0 - emulator_cpu_ms), apdus,
                     datetime.datetime.now(datetime.timezone.utc))


class _StationThreads:
    """The threads of one run_line call and what they share: the work queue, the runs
    done so far, the first error, and the stop / all-stopped events."""

    def __init__(self, resources, devices, bus_factory, progress, link_clock, step_hook):
        self.resources = resources
        self.bus_factory = bus_factory
        self.progress = progress
        self.link_clock = link_clock
        self.step_hook = step_hook
        self.work = queue.Queue()
        for item in devices:
            self.work.put(item)
        self.total = len(devices)
        self.runs = []
        self.errors = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.all_stopped = threading.Event()
        self.running = 0

    def station_loop(self, index):
        station = Station("st-%02d" % (index + 1), self.resources, step_hook=self.step_hook,
                          link_clock=self.link_clock)
        while not self.stopping.is_set():
            try:
                item = self.work.get_nowait()
            except queue.Empty:
                return
            bus = self.bus_factory(item)
            cpu0 = time.thread_time()
            result = station.provision(bus)
            run = _measure(result, bus, time.thread_time() - cpu0)
            with self.lock:
                self.runs.append(run)
                done = len(self.runs)
            if self.progress is not None:
                self.progress(done, self.total, run)

    def guarded(self, index):
        try:
            self.station_loop(index)
        except BaseException as exc:  # noqa: BLE001 - reported after join
            self.errors.append(exc)
        finally:
            with self.lock:
                self.running -= 1
                if not self.running:
                    self.all_stopped.set()

    def run(self, stations):
        """Run `stations` threads to the end of the work; returns the wall time (s)."""
        checkpointer = self.resources.checkpointer
        self.running = stations
        started = time.perf_counter()
        threads = [threading.Thread(target=self.guarded, args=(i,), name="station-%d" % (i + 1),
                                    daemon=True) for i in range(stations)]
        # Shutdown (the end of the lot, an error, Ctrl-C or SIGTERM turned into
        # KeyboardInterrupt / SystemExit): stations finish the device in hand and take no
        # more, then one signed checkpoint covers everything this run appended.  Only a
        # SIGKILL skips it; `fleetid line reconcile` checkpoints after that.
        # (Waiting on an Event, not Thread.join: a join interrupted by a signal can leave
        # is_alive() False for a thread still running, and the last checkpoint must come
        # after the last station's last entry.)
        for thread in threads:
            thread.start()
        try:
            self.all_stopped.wait()
        except BaseException:
            self.stopping.set()
            self.all_stopped.wait()
            if checkpointer is not None:
                try:
                    checkpointer.checkpoint()
                except Exception:  # noqa: BLE001, S110 - the interruption is what the caller sees
                    pass
            raise
        for thread in threads:
            thread.join()
        if checkpointer is not None:
            checkpointer.checkpoint()
        wall = time.perf_counter() - started
        if self.errors:
            raise self.errors[0]
        return wall
