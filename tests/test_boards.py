"""The board files hold only their constants: boards/<board>/main.py is imports, literal
assignments and one call of the shared agent entry point (fleetid.device.board.run), so a
change to the agent loop happens in one place, for every board."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOARD_MAINS = sorted(ROOT.glob("boards/*/main.py"))


def _literal(node):
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def test_every_micropython_board_has_a_main():
    assert [p.parent.name for p in BOARD_MAINS] == ["esp32", "rp2040"]


@pytest.mark.parametrize("main", BOARD_MAINS, ids=lambda p: p.parent.name)
def test_board_main_is_constants_and_one_call_of_the_shared_entry_point(main):
    tree = ast.parse(main.read_text(), str(main))
    constants = set()
    calls = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            assert (node.module, [a.name for a in node.names]) == ("fleetid.device.board",
                                                                   ["run"]), ast.dump(node)
        elif isinstance(node, ast.Assign):
            assert len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            name = node.targets[0].id
            assert name.isupper() and _literal(node.value), "%s is not a literal" % name
            constants.add(name)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            calls.append(node.value)
        else:
            pytest.fail("%s:%d: %s is neither a constant nor the call" % (
                main.name, node.lineno, type(node).__name__))
    assert len(calls) == 1
    call = calls[0]
    assert isinstance(call.func, ast.Name) and call.func.id == "run"
    arguments = list(call.args) + [k.value for k in call.keywords]
    # Every argument is one of the file's constants: no expression, no logic.
    assert all(isinstance(a, ast.Name) and a.id in constants for a in arguments)
    assert {a.id for a in arguments} == constants  # and every constant is used


def test_board_mains_differ_only_in_comments_and_constant_values():
    shapes = set()
    for main in BOARD_MAINS:
        tree = ast.parse(main.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                node.value = ast.Constant(None)
        shapes.add(ast.dump(tree))
    assert len(shapes) == 1
