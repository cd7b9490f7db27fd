"""A personalised emulated device and the fleet cloud it talks to, in one process (no
tests in this module).

`LineAndCloud` lives in bench/_support.py (the benchmarks run it without the test
extras); see its docstring there.
"""

from bench._support import LABEL, PEM, LineAndCloud  # noqa: F401 (re-exported)
