"""One error root, one meaning per name (issue 17, build item 5).

Every exception class defined in cli/, cloud/, common/, device/ and sim/ derives from
common/errors.FleetidError, so a caller catches fleetid's errors with one base and never
with a bare `except Exception`; and no two exception classes share a name, so a name in a
log line, a report or an `except` clause means one thing.  Classes are found with `ast`
and resolved by importing their module (a base defined in another module is followed
through the real class, not guessed from its spelling)."""

import ast
import importlib
import inspect
import pathlib

from fleetid.common.errors import FleetidError

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "cloud", "common", "device", "sim")

# Exceptions deliberately outside the tree, each with its reason.
NOT_FLEETID = {
    # Fault injection, not an error: a simulated power cut must pass through every
    # `except FleetidError` in the device code under test (tests/device/test_agent.py
    # expects it to reach the test), as a real power cut would stop that code.
    ("sim.nvm", "PowerLoss"),
}

# Modules that exist only on MicroPython: a file importing one of them is read with ast only.
_MICROPYTHON_ONLY = {"machine", "network", "micropython", "esp", "esp32", "rp2", "pyb"}


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "fleetid." + ".".join(parts)


def _class_defs():
    # (module name, ClassDef, top-level?) for every class in the packages.
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            top = {id(node) for node in tree.body if isinstance(node, ast.ClassDef)}
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    yield _module_name(path), node, id(node) in top


def exception_classes():
    """Returns: list of (module name, class name, class or None, ClassDef).  The class is
    None when its module cannot be imported on CPython (MicroPython-only) or the class is
    not at module level; such classes are then checked by the names of their bases."""
    found = []
    modules = {}
    for module_name, node, top in _class_defs():
        if module_name not in modules:
            try:
                modules[module_name] = importlib.import_module(module_name)
            except ImportError as exc:
                if (exc.name or "").split(".")[0] not in _MICROPYTHON_ONLY:
                    raise
                modules[module_name] = None
        module = modules[module_name]
        cls = getattr(module, node.name, None) if (module is not None and top) else None
        if cls is not None:
            if inspect.isclass(cls) and issubclass(cls, BaseException):
                found.append((module_name, node.name, cls, node))
        elif any(_base_name(base).endswith(("Error", "Exception")) for base in node.bases):
            found.append((module_name, node.name, None, node))
    return found


def _base_name(expr):
    return ast.unparse(expr).rsplit(".", 1)[-1]


def test_every_exception_class_derives_from_fleetid_error():
    classes = exception_classes()
    assert len(classes) > 80  # the scan sees the tree (the error modules alone hold more)
    tree_names = {name for _, name, cls, _ in classes
                  if cls is not None and issubclass(cls, FleetidError)}
    outside = []
    for module_name, name, cls, node in classes:
        if (module_name[len("fleetid."):], name) in NOT_FLEETID:
            continue
        if cls is not None:
            ok = issubclass(cls, FleetidError)
        else:
            ok = all(_base_name(base) in tree_names | {"FleetidError"} for base in node.bases)
        if not ok:
            outside.append("%s.%s" % (module_name, name))
    assert outside == []


def test_the_exemptions_are_still_exceptions_outside_the_tree():
    # An exemption that no longer applies (class gone, renamed or moved under the root)
    # must leave the list, so the list stays the true set of exceptions.
    classes = {(m[len("fleetid."):], n): cls for m, n, cls, _ in exception_classes()}
    for key in NOT_FLEETID:
        assert key in classes, key
        assert not issubclass(classes[key], FleetidError), key


def test_no_two_exception_classes_share_a_name():
    where = {}
    for module_name, name, _, _ in exception_classes():
        where.setdefault(name, []).append(module_name)
    assert {name: mods for name, mods in where.items() if len(mods) > 1} == {}
