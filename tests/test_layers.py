"""The code's layering, checked from the source: who may import whom, module and function size.

docs/ARCHITECTURE.md ("Layers") draws the diagram and cites the rules below.
Every check reads the source with `ast` (nothing is imported), so a violation is reported
with the module and line that makes it, and a function-level (lazy) import counts the same
as one at module top.

1. Layers.  Every non-test module belongs to a unit: its package (`fleetid.device`,
   `fleetid.cloud.line`, ...), except the modules directly in `fleetid.cloud`, which are
   each a unit of their own (`fleetid.cloud.config`, ...).  `SITS_ON` names, for each unit,
   the units directly below it; a unit may import itself and anything reachable downward
   through `SITS_ON` (a layer may skip the ones in between), and nothing else.  An import
   of any other unit is an edge from a lower layer to a higher one, or sideways.
2. No import cycle between units, whatever the table says (checked on the real graph),
   nor between modules (e.g. two modules of common/ that import each other).
3. No module in cloud/ over 600 lines.
4. No function over 60 lines (docstring included) outside tests/ and bench/.
5. click is imported in cli/ only (library code never depends on the CLI framework).
6. The device side never imports the cloud.
7. The layer table in docs/ARCHITECTURE.md is SITS_ON.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Source folders and the import names they install under (pyproject.toml package-dir).
SOURCE_DIRS = {"common": "fleetid.common", "device": "fleetid.device", "sim": "fleetid.sim",
               "cloud": "fleetid.cloud", "cli": "fleetid.cli"}

# The layer table: each unit and the units it sits directly on (short names: "cloud.ca"
# is fleetid.cloud.ca).  Read from the bottom up.
SITS_ON = {
    # The portable core imports nothing of fleetid outside itself; its CPython-only
    # helpers (cryptography, asn1crypto) sit on it.
    "common": (),
    "common.host": ("common",),
    # The device side (bus backends, SE stack and session, agent core) on the portable
    # core; its CPython adapters (TLS, EST client, the agent's network) above it.
    "device": ("common",),
    "device.host": ("device", "common.host"),
    # The SE emulator: the chip, its lot and metering.  Nothing imports it but the CLI.
    "sim": ("common.host",),
    # The cloud, bottom up (cloud/__init__.py itself only names the namespace).
    "cloud": (),
    "cloud.hsm": ("common.host",),
    "cloud.pki": ("cloud.hsm",),
    "cloud.audit": ("common.host",),
    "cloud.registry": ("cloud.audit",),
    "cloud.ca": ("cloud.pki",),
    "cloud.verifier": ("cloud.ca", "cloud.registry"),
    "cloud.est": ("cloud.verifier",),
    # Revocation publishing (CRLs, OCSP, compact sets) reads what the verifier trusts
    # (its revoked-CA file); the verifier checks revocation in the registry, never here.
    "cloud.revocation": ("cloud.verifier",),
    # The line drives real or emulated SEs through device/ (stack, enrol), never sim/.
    "cloud.line": ("cloud.ca", "cloud.registry", "cloud.audit", "device"),
    # The MQTT broker side and OTA SE administration: HSM-held keys, SE commands built
    # with device/ (the relay never sees plaintext).
    "cloud.mqtt": ("cloud.pki", "cloud.registry", "device"),
    # The cloud's configuration (cloud/config.py) and the HTTP layer: the error table, the
    # middleware and the one module that composes verifier + EST + CRL routes.
    "cloud.config": ("common",),  # its ConfigError is a common/errors.FleetidError
    "cloud.http": ("cloud.est", "cloud.revocation", "cloud.config"),
    "cloud.server": ("cloud.http", "cloud.mqtt"),
    # `cloud serve --workers N`: the same composition in N supervised processes.
    "cloud.serve_workers": ("cloud.server",),
    # The CLI, the only place click lives, on everything.
    "cli": ("cloud.serve_workers", "cloud.line", "device.host", "sim"),
}

CLOUD_MODULE_MAX_LINES = 600
FUNCTION_MAX_LINES = 60

# Functions allowed over FUNCTION_MAX_LINES for now, each with why (empty: none is).
LONG_FUNCTIONS_PENDING = set()


def _source_modules():
    """{module name: path} for every non-test module of the fleetid packages."""
    out = {}
    for folder, name in SOURCE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([name] + parts)] = path
    return out


MODULES = _source_modules()
PACKAGES = {m for m, p in MODULES.items() if p.name == "__init__.py"}


def unit_of(module):
    """The layer unit of a fleetid module (short name, without "fleetid.")."""
    package = max((p for p in PACKAGES if module == p or module.startswith(p + ".")), key=len)
    if package == "fleetid.cloud" and module != package:
        package = module  # cloud/config.py and its siblings are units of their own
    return package[len("fleetid."):]


def _imported_modules(module, path):
    """Yield (line, imported fleetid module) for every import in the module's source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import name` imports pkg.name when name is a module.
            names = [target] + [target + "." + alias.name for alias in node.names]
        else:
            continue
        found = set()
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("fleetid."):
                found.add(name)
        # Report the most specific module: `from fleetid.cloud import config` is an import
        # of fleetid.cloud.config, not of the fleetid.cloud namespace package as well.
        for name in sorted(found):
            if not any(other.startswith(name + ".") for other in found):
                yield node.lineno, name


def unit_edges():
    """{(from unit, to unit): [where, ...]} for every import across units."""
    edges = {}
    for module, path in MODULES.items():
        for line, target in _imported_modules(module, path):
            a, b = unit_of(module), unit_of(target)
            if a != b:
                where = "%s:%d imports %s" % (path.relative_to(ROOT), line, target)
                edges.setdefault((a, b), []).append(where)
    return edges


def allowed_below(unit):
    """Every unit `unit` may import: all reachable downward through SITS_ON."""
    seen = set()
    todo = list(SITS_ON[unit])
    while todo:
        below = todo.pop()
        if below not in seen:
            seen.add(below)
            todo.extend(SITS_ON[below])
    return seen


def test_the_layer_table_is_a_dag_over_known_units():
    for unit, below in SITS_ON.items():
        for b in below:
            assert b in SITS_ON, "%s sits on an unknown unit %s" % (unit, b)
        assert unit not in allowed_below(unit), "the layer table loops through " + unit


def _documented_layer_table():
    """{unit: (units it sits on)} from the table in docs/ARCHITECTURE.md ("Layers")."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    rows = text.split("| unit | sits directly on |", 1)[1].split("\n\n", 1)[0]
    table = {}
    for line in rows.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue  # the header's rule
        unit = cells[0].strip("`")
        below = cells[1].split(" (")[0]  # a note in brackets may follow the units
        table[unit] = tuple(sorted(u.strip().strip("`") for u in below.split(",")
                                   if u.strip().startswith("`")))
    return table


def test_the_documented_layer_table_is_the_tested_one():
    # The doc's table names every unit but the `cloud` namespace package (which holds
    # no code and sits on nothing); each row must say what SITS_ON says.
    documented = _documented_layer_table()
    tested = {unit: tuple(sorted(below)) for unit, below in SITS_ON.items() if unit != "cloud"}
    differ = ["%s: doc %s, test %s" % (unit, documented.get(unit), tested.get(unit))
              for unit in sorted(set(documented) | set(tested))
              if documented.get(unit) != tested.get(unit)]
    assert not differ, "docs/ARCHITECTURE.md's layer table and SITS_ON differ:\n" + \
        "\n".join(differ)


def test_every_source_unit_has_a_place_in_the_layer_table():
    missing = sorted({unit_of(m) for m in MODULES} - set(SITS_ON))
    assert not missing, "units with no place in SITS_ON (add them, and to the doc): %s" % missing


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = []
    for (a, b), where in sorted(unit_edges().items()):
        if a in SITS_ON and b not in allowed_below(a):
            bad.append("%s -> %s: %s" % (a, b, "; ".join(where)))
    assert not bad, "imports against the layer table:\n" + "\n".join(bad)


def strongly_connected(graph):
    """The strongly connected components of {node: {successors}} with more than one node."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_import_cycle_between_units():
    edges = unit_edges()
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    report = []
    for component in strongly_connected(graph):
        inside = ["%s -> %s: %s" % (a, b, "; ".join(where))
                  for (a, b), where in sorted(edges.items())
                  if a in component and b in component]
        report.append("cycle through %s:\n  %s" % (", ".join(component), "\n  ".join(inside)))
    assert not report, "import cycles between units:\n" + "\n".join(report)


def test_no_import_cycle_between_modules():
    graph = {}
    for module, path in MODULES.items():
        for _, target in _imported_modules(module, path):
            if target != module:
                graph.setdefault(module, set()).add(target)
    cycles = [", ".join(c) for c in strongly_connected(graph)]
    assert not cycles, "modules that import each other:\n" + "\n".join(cycles)


def test_no_module_in_cloud_over_600_lines():
    long = []
    for path in sorted((ROOT / "cloud").rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > CLOUD_MODULE_MAX_LINES:
            long.append("%s: %d lines" % (path.relative_to(ROOT), lines))
    assert not long, "cloud/ modules over %d lines:\n%s" % (CLOUD_MODULE_MAX_LINES, "\n".join(long))


def _non_test_python_files():
    # Every tracked kind of source folder at the top (not tests/, bench/, .venv, var/ ...).
    for top in sorted(ROOT.iterdir()):
        if top.is_dir() and top.name not in ("tests", "bench", "build", "var") \
                and not top.name.startswith(".") and not top.name.endswith(".egg-info"):
            yield from sorted(top.rglob("*.py"))


def _function_lengths():
    """Yield (file, line, name, lines) for every def and async def outside tests/ and
    bench/ (methods and nested functions too; the docstring counts)."""
    for path in _non_test_python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield (path.relative_to(ROOT).as_posix(), node.lineno, node.name,
                       node.end_lineno - node.lineno + 1)


def test_no_function_over_60_lines_outside_tests_and_bench():
    long = ["%s:%d %s: %d lines" % (path, line, name, lines)
            for path, line, name, lines in _function_lengths()
            if lines > FUNCTION_MAX_LINES and (path, name) not in LONG_FUNCTIONS_PENDING]
    assert not long, "functions over %d lines:\n%s" % (FUNCTION_MAX_LINES, "\n".join(long))


def test_every_pending_long_function_is_still_long():
    # Once a pending function is split (or renamed, or moved) its entry must go, so the
    # list only shrinks and cannot hide a new long function under an old name.
    still_long = {(path, name) for path, _, name, lines in _function_lengths()
                  if lines > FUNCTION_MAX_LINES}
    done = sorted("%s %s" % pending for pending in LONG_FUNCTIONS_PENDING - still_long)
    assert not done, "remove from LONG_FUNCTIONS_PENDING (no longer over %d lines): %s" % (
        FUNCTION_MAX_LINES, ", ".join(done))


def test_click_is_imported_in_cli_only():
    bad = []
    for module, path in MODULES.items():
        if unit_of(module) == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            if any(name == "click" or name.startswith("click.") for name in names):
                bad.append("%s:%d" % (path.relative_to(ROOT), node.lineno))
    assert not bad, "click imported outside cli/: " + ", ".join(bad)


def _absolute_imports(path):
    """Yield (line, dotted name) for every absolute import in a file (lazy ones too)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and not node.level:
            base = node.module or ""
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, base + "." + alias.name


def test_the_device_never_imports_the_cloud():
    # The device side (device/, device/host/, the boards and the CLI's device commands,
    # cli/agent*.py) runs without the cloud's code: an OID or a helper it needs lives in
    # common/ or device/ (issue 17: the peer check once imported cloud/revocation).
    files = sorted((ROOT / "device").rglob("*.py")) + sorted((ROOT / "boards").rglob("*.py"))
    files += sorted((ROOT / "cli").glob("agent*.py"))
    bad = ["%s:%d imports %s" % (path.relative_to(ROOT), line, name)
           for path in files for line, name in _absolute_imports(path)
           if name == "fleetid.cloud" or name.startswith("fleetid.cloud.")]
    assert not bad, "the device imports the cloud:\n" + "\n".join(sorted(set(bad)))


def test_click_is_imported_in_cli_only_anywhere_outside_tests():
    # Library code, boards and scripts alike (test_click_is_imported_in_cli_only reads the
    # packages; this reads every source file but tests/ and bench/).
    bad = ["%s:%d" % (path.relative_to(ROOT), line)
           for path in _non_test_python_files() if path.parts[len(ROOT.parts)] != "cli"
           for line, name in _absolute_imports(path)
           if name == "click" or name.startswith("click.")]
    assert not bad, "click imported outside cli/: " + ", ".join(sorted(set(bad)))
