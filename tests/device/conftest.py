import pytest


@pytest.fixture(scope="session")
def vendor_dir(tmp_path_factory):
    """One SE-vendor CA for the whole test session (chips are fabbed per test)."""
    from fleetid.sim.fab import load_or_create_vendor_ca

    path = tmp_path_factory.mktemp("vendor")
    load_or_create_vendor_ca(str(path))
    return str(path)


@pytest.fixture
def fabbed(vendor_dir, tmp_path):
    """A freshly fabbed chip: (FabRecord, Chip over its NVM file)."""
    from fleetid.sim.chip import Chip
    from fleetid.sim.fab import fab_chip
    from fleetid.sim.nvm import Nvm

    record = fab_chip(vendor_dir, str(tmp_path / "chip.nvm"))
    return record, Chip(Nvm(str(tmp_path / "chip.nvm")))
