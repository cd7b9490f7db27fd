"""Fixtures shared by the cloud tests: a fleet (PKI, registry, vendor) and its running cloud.

A test module that needs a differently built fleet defines its own `fleet` fixture, which
takes precedence over this one.
"""

import pytest

from tests.cloud.cloud_support import Fleet, RunningCloud


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.close()


@pytest.fixture
def cloud(fleet):
    with RunningCloud(fleet) as running:
        yield running
