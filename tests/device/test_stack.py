"""device/stack.open_se: one way to open an SE (bus URI or Bus -> T=1' -> APDU -> optional
SCP03 -> SeSession), closing whatever it opened, also on failure."""

import pytest

from fleetid.common.errors import BusError, LinkError
from fleetid.common.host.hostcrypto import CryptographyPrimitives
from fleetid.common.scp03 import static_session_keys_fn
from fleetid.device.stack import open_se, profile_named
from fleetid.device.bus import BusUriError


@pytest.fixture
def served(tmp_path):
    from fleetid.sim import profiles
    from fleetid.sim.chip import Chip
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.fab import fab_chip
    from fleetid.sim.nvm import Nvm
    from fleetid.sim.server import serve_in_thread

    nvm_path = str(tmp_path / "chip.nvm")
    record = fab_chip(str(tmp_path / "vendor"), nvm_path)
    endpoint = BusEndpoint(Chip(Nvm(nvm_path)), latency=profiles.get("none"))
    server = serve_in_thread(endpoint, "unix:" + str(tmp_path / "se.sock"))
    yield server, record
    server.stop()


def test_open_se_on_a_uri_selects_the_applet_and_closes_as_a_context_manager(served):
    server, record = served
    with open_se(server.bus_uri, timeout_ms=2000) as stack:
        assert stack.se.uid() == record.se_uid
        bus = stack.bus
    assert stack.bus is None and stack.link is None
    stack.close()  # idempotent
    with pytest.raises(BusError):
        bus.write(b"\x00")


def test_secure_wraps_the_session_in_scp03_and_close_forgets_the_keys(served):
    server, record = served
    prims = CryptographyPrimitives()
    keys = record.static_keys()
    with open_se(server.bus_uri) as stack:
        secure = stack.secure(prims, static_session_keys_fn(prims, keys), level=0x33,
                              kvn=keys.kvn)
        assert stack.scp.is_open and secure.uid() == record.se_uid
        host = stack.scp
    assert not host.is_open


class _DeadBus:
    def __init__(self):
        self.closed = False

    def write(self, frame):
        raise BusError("no SE")

    def read(self, n):
        raise BusError("no SE")

    def reset(self):
        pass

    def close(self):
        self.closed = True


def test_a_link_that_cannot_open_closes_the_bus_it_was_given():
    bus = _DeadBus()
    with pytest.raises((LinkError, BusError)):
        open_se(bus)
    assert bus.closed


def test_unknown_profiles_and_uris_are_refused_before_anything_opens():
    with pytest.raises(ValueError):
        profile_named("t0")
    with pytest.raises(BusUriError):  # a FleetidError (one exception tree, issue 17)
        open_se("serial:/dev/ttyS0")
