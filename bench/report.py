"""One benchmark report: run every benchmark in bench/ (quick by default, --full for their
full runs), collect their figures, and write Markdown with a plot per benchmark in which
each figure sits beside its baseline from the same run.

    .venv/bin/python bench/report.py [--full] [--only est,mtls] [--out docs]

Each benchmark runs as its own process (bounded by --timeout), with `--json FILE` when it
has that option (bench/_report_support.py: figures beside their baselines); its printed
output goes into the report too, so a benchmark without --json still reports what it
printed.  Writes OUT/BENCHMARKS.md and OUT/benchmarks/<name>.png (the plots need
matplotlib, fleetid's [bench] extra, which `scripts/setup.sh --test` installs; without it
the report has the tables only and says so).  Exit status: 0 when every benchmark ran
(an unmet target is a figure, not a failure), 1 when one failed or timed out.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# name: (arguments of its quick run, arguments of its full run, what it compares).  The
# quick runs are each benchmark's own --quick (or the smallest run it has).
BENCHES = {
    "link": (["--quick"], [], "T=1' round trips/s and goodput vs the modelled bus rate"),
    "line": (["--quick"], [], "factory line host CPU vs raw crypto; ATECC608 cycle vs "
             "SE-only time"),
    "est": (["--quick"], [], "EST attested re-enrolments vs raw cryptography issuance"),
    "mtls": (["--quick"], [], "mTLS connections per server CPU-second vs nginx"),
    "revocation": (["--quick", "--no-mp"], [], "compact set vs CRL vs the "
                   "information-theoretic bound; OCSP rates"),
    "revocation_bulk": (["--bulk", "400", "--bulk-rounds", "1"], ["--bulk", "2000"],
                        "bulk revocation's registry writes: chunks of devices per "
                        "transaction vs one transaction per certificate"),
    "mqtt": (["--quick"], [], "telemetry into the cloud; retained CRL delivery"),
    "tls": (["--handshakes", "3"], [], "SE-keyed TLS 1.3 handshake vs openssl s_client and "
            "vs its SE-only time"),
    "agent": (["--quick"], [], "device agent rotation: SE / network / host split"),
    "agent_campaign": (["--quick"], [], "rotations under random faults"),
    "fleet": (["--quick"], [], "rotation storm through N EST processes over PostgreSQL, "
              "revocation propagation"),
    "micropython": (["run_apdu", "--runs", "1"], [], "MicroPython heap per workflow vs the "
                    "test budgets"),
    "faults": (["--quick"], [], "fault table: broker restarted, HSM session lost, PostgreSQL "
               "restarted / paused, a worker killed, slow clients (requests ok / typed error "
               "/ wrong accept, records lost or forked, time to recover)"),
}
# Entries run by another benchmark's script (a mode of it): name -> bench/<script>.py.
SCRIPTS = {"revocation_bulk": "revocation"}
QUICK_TIMEOUT = 900.0  # s per benchmark
FULL_TIMEOUT = 5400.0
OUTPUT_TAIL = 60  # printed lines kept per benchmark


def _label(name):
    """bench/<script>.py, with the entry's name when it is a mode of another script."""
    script = SCRIPTS.get(name, name)
    return "bench/%s.py" % script + (" (%s)" % name if script != name else "")


def has_json_option(name):
    """True when bench/<name>.py takes --json (read from its source: no process)."""
    with open(os.path.join(BENCH, name + ".py")) as f:
        return '"--json"' in f.read()


def run_bench(name, args, timeout, workdir):
    """Run one benchmark.  Returns a dict: name, argv, status (exit code, or "timeout"),
    seconds, output (its last printed lines, stderr after stdout), json (or None)."""
    script = SCRIPTS.get(name, name)
    argv = [sys.executable, os.path.join("bench", script + ".py")] + list(args)
    json_path = os.path.join(workdir, name + ".json")
    shown = ["bench/%s.py" % script] + list(args)
    if has_json_option(script):
        argv += ["--json", json_path]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        status, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        status = "timeout"
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or "")
        err = "timed out after %.0f s" % timeout
    seconds = time.monotonic() - started
    document = None
    if os.path.exists(json_path):
        with open(json_path) as f:
            document = json.load(f)
    lines = (out.rstrip("\n").splitlines() + (err.rstrip("\n").splitlines() if err else []))
    return {"name": name, "argv": shown, "status": status,
            "seconds": seconds, "output": lines[-OUTPUT_TAIL:], "json": document}


def _number(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return "{:,.0f}".format(value)
        return "%.3g" % value
    return "{:,}".format(value) if isinstance(value, int) else str(value)


def figures_table(figures):
    """Markdown table of a benchmark's figures beside their baselines."""
    lines = ["| figure | value | baseline (same run) | baseline value | ratio |",
             "|---|---|---|---|---|"]
    for row in figures:
        unit = " " + row["unit"] if row.get("unit") else ""
        ratio = "-" if row.get("ratio") is None else "%.2fx" % row["ratio"]
        if row.get("ratio") is not None and not row.get("higher_is_better", True):
            ratio += " (lower is better)"
        lines.append("| %s | %s%s | %s | %s | %s |" % (
            row["name"], _number(row["value"]), unit, row.get("baseline") or "-",
            "-" if row.get("baseline_value") is None else _number(row["baseline_value"]) + unit,
            ratio))
    return "\n".join(lines)


def plot(name, figures, path):
    """One PNG per benchmark: for each figure with a baseline, a pair of bars (the figure,
    its baseline) on its own axis.  Returns the path, or None when there is nothing to
    draw.  Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [row for row in figures if row.get("baseline_value") is not None
             and row.get("value") is not None]
    if not pairs:
        return None
    columns = 2 if len(pairs) > 1 else 1
    rows = (len(pairs) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 1.6 * rows + 0.6),
                             squeeze=False)
    for axis, row in zip([a for line in axes for a in line], pairs):
        labels = [_short(row["name"]), _short(row["baseline"])]
        values = [row["value"], row["baseline_value"]]
        bars = axis.barh(labels, values, color=["#1f77b4", "#999999"])
        axis.bar_label(bars, labels=[_number(v) for v in values], padding=3, fontsize=8)
        axis.set_xlabel(row.get("unit") or "", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.invert_yaxis()
        axis.set_xlim(0, max(values) * 1.3 or 1)
        axis.set_title("%s: %.2fx%s" % (_short(row["name"], 60), row["ratio"],
                                        "" if row.get("higher_is_better", True)
                                        else " (lower is better)"), fontsize=9)
    for axis in [a for line in axes for a in line][len(pairs):]:
        axis.set_visible(False)
    fig.suptitle(_label(name), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _short(text, limit=38):
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _section(result, out_dir, plots):
    name = result["name"]
    lines = ["## %s" % name, "", "`%s` (%s): %s in %.0f s." % (
        " ".join(result["argv"]), BENCHES.get(name, ("", "", ""))[2],
        "exit status %s" % result["status"] if result["status"] != 0 else "ran",
        result["seconds"]), ""]
    figures = (result["json"] or {}).get("figures") or []
    if figures:
        lines += [figures_table(figures), ""]
        if plots:
            path = plot(name, figures, os.path.join(out_dir, "benchmarks", name + ".png"))
            if path:
                lines += ["![bench/%s.py](benchmarks/%s.png)" % (SCRIPTS.get(name, name),
                                                                  name), ""]
    elif result["json"] is None:
        lines += ["No machine-readable figures (no `--json` in this benchmark): its printed "
                  "output below.", ""]
    lines += ["<details><summary>printed output (last %d lines)</summary>" % OUTPUT_TAIL, "",
              "```", *result["output"], "```", "", "</details>", ""]
    return lines


def write_report(results, out_dir, full):
    """Write OUT/BENCHMARKS.md (and the plots).  Returns its path."""
    os.makedirs(os.path.join(out_dir, "benchmarks"), exist_ok=True)
    try:
        import matplotlib  # noqa: F401
        plots, note = True, ""
    except ImportError:
        plots, note = False, ("Plots: not drawn (matplotlib is missing: `pip install "
                              "'fleetid[bench]'` or `bash scripts/setup.sh --test`).")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Benchmark report", "",
             "Written by `bench/report.py%s` on %s: %s, %d cores, Python %s. Every ratio is "
             "against a baseline measured in the same run of the same benchmark; single "
             "runs on a shared machine vary by about 10 %%." % (
                 " --full" if full else "", when, platform.machine(), os.cpu_count() or 0,
                 platform.python_version()), ""]
    if note:
        lines += [note, ""]
    lines += ["| benchmark | status | seconds | figures |", "|---|---|---|---|"]
    for result in results:
        count = len(((result["json"] or {}).get("figures")) or [])
        lines.append("| [%s](#%s) | %s | %.0f | %s |" % (
            result["name"], result["name"], "ok" if result["status"] == 0
            else "exit %s" % result["status"], result["seconds"], count or "printed only"))
    lines.append("")
    for result in results:
        lines += _section(result, out_dir, plots)
    path = os.path.join(out_dir, "BENCHMARKS.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every benchmark's full run")
    parser.add_argument("--only", default=None,
                        help="comma-separated benchmark names (default: all of %s)"
                             % ", ".join(BENCHES))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"),
                        help="folder for BENCHMARKS.md and benchmarks/*.png (default docs/)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per benchmark (default %.0f quick, %.0f full)"
                             % (QUICK_TIMEOUT, FULL_TIMEOUT))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error("unknown benchmark(s): %s" % ", ".join(unknown))
    timeout = args.timeout or (FULL_TIMEOUT if args.full else QUICK_TIMEOUT)
    results = []
    with tempfile.TemporaryDirectory(prefix="fleetid-report-") as workdir:
        for name in names:
            quick_args, full_args, _what = BENCHES[name]
            print("report: %s ..." % _label(name), flush=True)
            result = run_bench(name, full_args if args.full else quick_args, timeout, workdir)
            print("report: %s %s in %.0f s" % (
                _label(name), "ok" if result["status"] == 0 else "status %s" % result["status"],
                result["seconds"]), flush=True)
            results.append(result)
    path = write_report(results, args.out, args.full)
    print("report: %s" % path)
    return 0 if all(r["status"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
