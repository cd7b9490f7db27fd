"""bench/report.py runs benchmarks and writes one Markdown report with each figure beside
its baseline from the same run (issue 19 item 7), here in a reduced mode: two cheap
benchmarks, one with --json figures (est: attested re-enrolments vs raw issuance) and one
that only prints (link), in the demo's environment (no tests/, pytest or hypothesis)."""

import importlib.util

from tests.test_bench_imports import BENCH, _run_without_test_extras


def test_report_runs_two_benchmarks_and_sets_each_figure_beside_its_baseline(tmp_path):
    proc = _run_without_test_extras(BENCH / "report.py", "--only", "link,est", "--out",
                                    tmp_path, "--timeout", "300", timeout=400)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    report = (tmp_path / "BENCHMARKS.md").read_text()
    # est wrote --json: its figures are a table, each beside the raw-issuance baseline.
    rows = [line for line in report.splitlines()
            if line.startswith("| attested re-enrolments")]
    assert len(rows) == 3, report  # in-process; HTTPS with 1 and with 2 server workers
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[2] == "raw cryptography issuance"
        value, baseline = (float(c.split()[0].replace(",", "")) for c in cells[1:4:2])
        # The ratio is of the unrounded figures; the cells show them rounded.
        assert abs(float(cells[4].rstrip("x")) - value / baseline) <= 0.011, cells
    # link only prints: its printed figures are in the report as printed.
    assert "| [link](#link) | ok |" in report and "round trips/s" in report
    assert "`bench/est.py --quick` (" in report  # the temporary --json file is not shown
    if importlib.util.find_spec("matplotlib") is not None:
        png = (tmp_path / "benchmarks" / "est.png").read_bytes()
        assert png.startswith(b"\x89PNG") and "![bench/est.py](benchmarks/est.png)" in report
    else:
        assert "matplotlib is missing" in report

