"""The --profile summaries of bench/line.py and bench/est.py: a cProfile's own time by
area of the repository (each bench names its areas), library and built-in time counted
for its callers' areas.  Imports nothing from fleetid or tests/."""

import cProfile
import io
import os
import pstats
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def profiled(run):
    """run() under cProfile on this thread's CPU time (waits do not count).  Returns
    (pstats.Stats, the StringIO it prints to)."""
    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    run()
    prof.disable()
    out = io.StringIO()
    return pstats.Stats(prof, stream=out), out


def _rel(filename):
    """A repository file's path from the repository's top ("cloud/line/station.py"),
    None for a library or built-in function."""
    if not filename.startswith(REPO) or os.sep + ".venv" + os.sep in filename:
        return None
    return filename[len(REPO):].replace(os.sep, "/")


def area_of(filename, areas):
    """The area of a repository file (the first (prefix, area) of `areas` whose prefix
    its path starts with, else "other"), None for a library or built-in function."""
    rel = _rel(filename)
    if rel is None:
        return None
    return next((area for prefix, area in areas if rel.startswith(prefix)), "other")


def profile_areas(stats, areas, shared=(), caller_area=None):
    """{area: own CPU seconds} from pstats' raw stats.  A library or built-in function
    counts for its callers' areas, in proportion to the time spent in it per caller.  A
    repository function under a `shared` prefix counts for `caller_area` as far as its
    calls came from that area (through any chain of shared or library functions), else
    for its own area (bench/line.py: common/ code the emulator runs too)."""
    memo = {}

    def weights(func, depth=0):
        # {area: share of func's time}
        if func in memo:
            return memo[func]
        own = area_of(func[0], areas)
        if own is not None and not (shared and _rel(func[0]).startswith(shared)):
            memo[func] = {own: 1.0}
            return memo[func]
        memo[func] = {own or "other": 1.0}  # a cycle ends here
        callers = stats[func][4]
        total = sum(v[2] for v in callers.values()) if callers else 0.0
        if not callers or depth > 60 or total <= 0:
            return memo[func]
        mix = {}
        for caller, value in callers.items():
            share = value[2] / total
            for name, w in weights(caller, depth + 1).items():
                if own is not None and name != caller_area:
                    name = own  # a shared function's other calls count for its own area
                mix[name] = mix.get(name, 0.0) + share * w
        memo[func] = mix
        return mix

    totals = {}
    for func, (_cc, _nc, tottime, _ct, _callers) in stats.items():
        for name, w in weights(func).items():
            totals[name] = totals.get(name, 0.0) + tottime * w
    return totals


def write_areas(out, totals, per, width):
    """The summary's lines: each area's CPU ms per unit (`per` units), largest first."""
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        out.write("  %-*s %7.3f\n" % (width, name, seconds * 1000.0 / per))
