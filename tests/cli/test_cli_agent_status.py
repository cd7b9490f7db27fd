"""`fleetid agent status` shows the fleet root's CRL cache (device/board.root_crl_cache,
what `agent run --root-crl-cache` keeps): the cached root CRL's number, this and next
update, and the high-water mark in SE data object 4, in its text and in --json; without
--root-crl-cache the SE's mark alone.  A personalised emulated chip on a Unix socket, the
root CRL signed by the line's fleet root."""

import json
import time

import pytest
from click.testing import CliRunner
from cryptography import x509

from fleetid.cli.main import cli
from fleetid.cloud.revocation.crl import CrlIssuer, CrlPublisher
from fleetid.device.board import root_crl_cache
from tests.device.device_cloud_support import LineAndCloud


@pytest.fixture(scope="module")
def chip(tmp_path_factory):
    """(bus URI, root CRL DER, its number, the cache file) once the root CRL is cached
    through the SE as the agent caches it."""
    from fleetid.common import t1
    from fleetid.sim import profiles
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.server import serve_in_thread

    tmp = tmp_path_factory.mktemp("agentstatus")
    world = LineAndCloud(tmp / "world", devices=1)
    server = None
    try:
        line = world.line
        publisher = CrlPublisher(line.registry, [
            CrlIssuer("root", line.hsm, line.labels["root"], line.root_cert)])
        der = publisher.current_der("root")
        number = x509.load_der_x509_crl(der).extensions.get_extension_for_class(
            x509.CRLNumber).value.crl_number
        cache = str(tmp / "root.crl")
        assert root_crl_cache(world.session(0), cache).refresh(
            lambda: der, int(time.time())) == "updated"
        world.chips[0].chip.power_loss()
        server = serve_in_thread(BusEndpoint(world.chips[0].chip, profile=t1.PROFILE_GP,
                                             latency=profiles.get("none")),
                                 "unix:" + str(tmp / "se.sock"), idle_timeout_s=60)
        yield server.bus_uri, der, number, cache
    finally:
        if server is not None:
            server.stop()
        world.close()


def _status(bus, *args):
    result = CliRunner().invoke(cli, ["agent", "status", "--bus", bus] + list(args),
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_status_shows_the_cached_root_crl_and_its_se_high_water_mark(chip):
    bus, _der, number, cache = chip
    lines = _status(bus, "--root-crl-cache", cache).splitlines()
    root = [line for line in lines if line.startswith("root CRL: ")]
    assert len(root) == 1, lines
    assert root[0].startswith("root CRL: #%d fresh (this update 20" % number), root
    assert root[0].endswith("; SE high-water mark #%d (data object 4)" % number), root
    state = json.loads(_status(bus, "--root-crl-cache", cache, "--json"))
    root = state["root_revocation"]
    assert (root["number"], root["high_water"], root["state"]) == (number, number, "fresh")
    assert root["this_update"] <= int(time.time()) < root["next_update"]
    assert root["revoked"] == 0 and root["cache_file"] == cache
    assert "policy" not in root  # no fresh root CRL refuses no server (server_revocation)


def test_without_the_cache_file_status_shows_the_se_mark_alone(chip, tmp_path):
    bus, _der, number, _cache = chip
    assert ("root CRL: no cache file given (--root-crl-cache); SE high-water mark #%d "
            "(data object 4)" % number) in _status(bus).splitlines()
    root = json.loads(_status(bus, "--json"))["root_revocation"]
    assert (root["number"], root["high_water"], root["cache_file"]) == (None, number, None)
    # A file that holds nothing yet: none cached, the SE's mark still shown.
    empty = str(tmp_path / "none.crl")
    assert ("root CRL: none cached in %s; SE high-water mark #%d (data object 4)"
            % (empty, number)) in _status(bus, "--root-crl-cache", empty).splitlines()
