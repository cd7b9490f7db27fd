import json
import os
import pathlib

import pytest

VECTORS = pathlib.Path(__file__).parent / "vectors"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def load_vectors(relpath):
    """Load a JSON vector file from tests/vectors/."""
    with open(VECTORS / relpath) as f:
        return json.load(f)


def require(condition, what):
    """Skip when a local prerequisite (service, tool) is missing; fail under CI=true.

    CI installs every service the suite needs, so a missing one there is a broken
    pipeline, not a reason to skip.
    """
    if condition:
        return
    if IN_CI:
        pytest.fail("required under CI but missing: " + what)
    pytest.skip("missing locally: " + what)


@pytest.fixture
def vectors():
    return load_vectors
