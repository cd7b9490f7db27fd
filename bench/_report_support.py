"""The machine-readable output of the benchmarks (`--json FILE`), which bench/report.py
collects into one report.

    write_json(path, "est", raw_figures, [
        figure("attested re-enrolments, in-process", 364.5, "/s",
               "raw cryptography issuance", 1720.0),
    ])

File format (JSON object): "bench" (name), "written" (UTC, RFC 3339), "figures" (a list:
each a figure beside its baseline from the same run: name, value, unit, baseline name,
baseline value, ratio = value / baseline; baseline fields null when a figure has none) and
"raw" (whatever the benchmark measured, for the curious).  No tests/ imports.
"""

import datetime
import json
import os


def figure(name, value, unit, baseline=None, baseline_value=None, higher_is_better=True):
    """One row of the report: a figure and, when there is one, its baseline."""
    ratio = None
    if baseline_value not in (None, 0) and value is not None:
        ratio = value / baseline_value
    return {"name": name, "value": value, "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": ratio,
            "higher_is_better": higher_is_better}


def write_json(path, bench, raw, figures=()):
    """Write the benchmark's figures to `path` (atomically: temp file, rename)."""
    document = {"bench": bench,
                "written": datetime.datetime.now(datetime.timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ"),
                "figures": list(figures), "raw": raw}
    temporary = "%s.tmp-%d" % (path, os.getpid())
    with open(temporary, "w") as f:
        json.dump(document, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    os.replace(temporary, path)
    return document
