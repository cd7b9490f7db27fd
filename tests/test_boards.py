"""The board files hold only their constants: boards/<board>/main.py is the import of the
shared agent entry point, literal assignments and one `run_constants(globals())`
(fleetid.device.board), so a change to the agent loop, or to how constants reach it,
happens in one place, for every board."""

import ast
import inspect
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOARD_MAINS = sorted(ROOT.glob("boards/*/main.py"))
INTEGRATING = ROOT / "docs" / "INTEGRATING.md"


def _doc_mains():
    """The `main.py` examples of docs/INTEGRATING.md: its python blocks that call
    run_constants, less the lines `...` that mark an elision."""
    blocks = [b.split("```")[0] for b in INTEGRATING.read_text().split("```python\n")[1:]]
    return ["\n".join(line for line in b.splitlines() if line != "...")
            for b in blocks if "run_constants(" in b]


def _literal(node):
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def test_every_micropython_board_has_a_main():
    assert [p.parent.name for p in BOARD_MAINS] == ["esp32", "rp2040"]


def test_the_integration_guide_shows_a_main_of_constants():
    assert len(_doc_mains()) == 2  # the board's and the unix port's


@pytest.mark.parametrize(
    "main", BOARD_MAINS + _doc_mains(),
    ids=lambda p: p.parent.name if isinstance(p, pathlib.Path) else "INTEGRATING")
def test_board_main_is_constants_and_one_call_of_the_shared_entry_point(main):
    from fleetid.device import board

    text = main.read_text() if isinstance(main, pathlib.Path) else main
    source = main.name if isinstance(main, pathlib.Path) else "INTEGRATING.md"
    tree = ast.parse(text, source)
    constants = set()
    calls = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            assert (node.module, [a.name for a in node.names]) == (
                "fleetid.device.board", ["run_constants"]), ast.dump(node)
        elif isinstance(node, ast.Assign):
            assert len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            name = node.targets[0].id
            assert name.isupper() and _literal(node.value), "%s is not a literal" % name
            constants.add(name)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            calls.append(node.value)
        else:
            pytest.fail("%s:%d: %s is neither a constant nor the call" % (
                source, node.lineno, type(node).__name__))
    assert [ast.dump(c) for c in calls] == [ast.dump(ast.parse(
        "run_constants(globals())", mode="eval").body)]
    # Every constant is a parameter of the entry point (run_constants lowercases the name).
    parameters = inspect.signature(board.run).parameters
    assert {"bus", "t1_profile", "interval_s"} <= {c.lower() for c in constants}
    assert {c.lower() for c in constants} <= set(parameters)


def test_board_mains_differ_only_in_comments_and_constant_values():
    shapes = set()
    for main in BOARD_MAINS:
        tree = ast.parse(main.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                node.value = ast.Constant(None)
        shapes.add(ast.dump(tree))
    assert len(shapes) == 1
