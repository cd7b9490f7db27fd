"""The heap-budget table keeps its own rule: every MicroPython workflow runs with headroom.

tests/micropython/budgets.py records, per workflow, the smallest heap it was measured to
pass at (bench/micropython.py) and the heap the tests run it at.  These checks keep the
table honest: a budget below 1.25 x its measured minimum, a workflow with no measurement,
or a workflow pointing at a test that does not exist fails here, before a patch release
of the interpreter can turn a scrape-through into a red main.
"""

import pytest

from tests.micropython import budgets
from tests.micropython.support import ROOT


@pytest.mark.parametrize("name", sorted(budgets.WORKFLOWS))
def test_every_workflow_budget_keeps_a_quarter_of_headroom_over_its_measured_minimum(name):
    node, modules, opt, minimum, budget = budgets.WORKFLOWS[name]
    assert minimum > 0, "%s has no measured minimum: run bench/micropython.py" % name
    assert budget >= budgets.HEADROOM * minimum, (name, minimum, budget)
    path, _, function = node.partition("::")
    source = (ROOT / path).read_text()
    assert "def %s(" % function in source, node
    assert '"%s"' % name in source, "%s is not run by %s" % (name, path)
    assert modules and all(m.startswith("fleetid.") or m in budgets.MICROPYTHON_LIB_MODULES
                           for m in modules)


def test_heap_override_is_per_workflow_and_budget_otherwise(monkeypatch):
    monkeypatch.setenv("FLEETID_MP_HEAP", "run_se=40K, run_info=50000")
    assert budgets.heap_for("run_se") == str(40 * 1024)
    assert budgets.heap_for("run_info") == "50000"
    assert budgets.heap_for("run_der") == str(budgets.WORKFLOWS["run_der"][4])
    monkeypatch.delenv("FLEETID_MP_HEAP")
    assert budgets.heap_for("run_se") == str(budgets.WORKFLOWS["run_se"][4])
    with pytest.raises(KeyError):
        budgets.heap_for("run_unbudgeted")


def test_bench_minimum_is_the_highest_of_several_bisections(monkeypatch, capsys):
    """Single bisections move by 1-2 K (fragmentation): the bench takes the highest of
    --runs (default 3) of them, and a workflow that fails in any run is reported broken."""
    from bench import micropython as bench

    found = iter([85 * 1024, 87 * 1024, 86 * 1024])
    monkeypatch.setattr(bench, "minimum_heap", lambda name: next(found))
    assert bench.highest_minimum("run_revset", 3) == (87 * 1024, [85 * 1024, 87 * 1024,
                                                                   86 * 1024])
    assert "run_revset: 85 K 87 K 86 K" in capsys.readouterr().out
    broken = iter([85 * 1024, None])
    monkeypatch.setattr(bench, "minimum_heap", lambda name: next(broken))
    assert bench.highest_minimum("run_revset", 3) == (None, [85 * 1024, None])
    source = (ROOT / "bench" / "micropython.py").read_text()
    assert '"--runs", type=int, default=3' in source
