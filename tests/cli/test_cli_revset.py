"""`fleetid agent check-peer-offline`: an offline device decides on a peer from the
compact set it received by any channel (--load), verified through its SE (the emulator
on a Unix socket); a revoked peer is refused after the next set or delta, and refused
data leaves the old set in place."""

import pytest
from click.testing import CliRunner

from fleetid.cli.main import cli
from fleetid.common import revset
from tests.cloud.cloud_support import Fleet, pem
from tests.cloud.revset_support import revset_publisher, revocation_signer


@pytest.fixture
def world(tmp_path):
    from fleetid.common import t1
    from fleetid.sim import profiles
    from fleetid.sim.chip import Chip
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.fab import fab_chip
    from fleetid.sim.nvm import Nvm
    from fleetid.sim.server import serve_in_thread

    fleet = Fleet(tmp_path / "fleet")
    fab_chip(str(tmp_path / "vendor"), str(tmp_path / "chip.nvm"))
    server = serve_in_thread(BusEndpoint(Chip(Nvm(str(tmp_path / "chip.nvm"))),
                                         profile=t1.PROFILE_GP, latency=profiles.get("none")),
                             "unix:" + str(tmp_path / "se.sock"), idle_timeout_s=30)
    try:
        yield fleet, server, tmp_path
    finally:
        server.stop()
        fleet.close()


def _check(tmp_path, server, peer, load=None):
    args = ["agent", "check-peer-offline", str(peer), "--bus", server.bus_uri,
            "--root", str(tmp_path / "root.pem"), "--signer", str(tmp_path / "signer.pem"),
            "--cache", str(tmp_path / "cache.frs")]
    if load is not None:
        args += ["--load", str(load)]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_offline_peer_check_takes_sets_and_deltas_and_keeps_the_old_set(world):
    fleet, server, tmp_path = world
    kept, revoked = fleet.provision("b42"), fleet.provision("b42")
    (tmp_path / "root.pem").write_bytes(pem(fleet.root))
    (tmp_path / "signer.pem").write_bytes(pem(revocation_signer(fleet).certificate))
    for name, device in (("kept.pem", kept), ("revoked.pem", revoked)):
        (tmp_path / name).write_bytes(pem(device.identity_cert))
    publisher = revset_publisher(fleet)
    first = publisher.current()
    (tmp_path / "first.frs").write_bytes(first)
    result = _check(tmp_path, server, tmp_path / "revoked.pem", tmp_path / "first.frs")
    assert result.exit_code == 0 and "not revoked" in result.output, result.output

    cert = revoked.identity_cert
    fleet.registry.mark_revoked(cert.serial_number, "keyCompromise",
                                issuer=cert.issuer.rfc4514_string())
    publisher.invalidate()
    fleet.clock.advance(seconds=2)
    second = publisher.current()
    delta = publisher.delta(revset.parse(first).number)
    tampered = bytearray(delta)
    tampered[-20] ^= 0x01
    (tmp_path / "tampered.frd").write_bytes(bytes(tampered))
    (tmp_path / "next.frd").write_bytes(delta)
    result = _check(tmp_path, server, tmp_path / "revoked.pem", tmp_path / "tampered.frd")
    assert result.exit_code == 1 and "refused, the old set stays" in result.output
    result = _check(tmp_path, server, tmp_path / "revoked.pem")  # the old set still says
    assert result.exit_code == 0, result.output
    result = _check(tmp_path, server, tmp_path / "revoked.pem", tmp_path / "next.frd")
    assert result.exit_code == 1 and "REFUSED" in result.output, result.output
    assert (tmp_path / "cache.frs").read_bytes() == second
    result = _check(tmp_path, server, tmp_path / "kept.pem")
    assert result.exit_code == 0 and "1 revoked" in result.output, result.output
    # The first set again (a late copy from another channel): set aside, the newer set
    # still decides (the revoked peer stays refused).
    result = _check(tmp_path, server, tmp_path / "revoked.pem", tmp_path / "first.frs")
    assert "load: older than cached, kept cached" in result.output, result.output
    assert result.exit_code == 1 and "REFUSED" in result.output, result.output
    assert (tmp_path / "cache.frs").read_bytes() == second


def test_the_set_is_fetched_over_https_with_the_device_tls13_client(world):
    """--fetch https://...: the set comes over the device's TLS 1.3 client (ECDHE and the
    server chain's check in the SE, no client certificate), then is verified and cached as
    --load would; a failed fetch leaves the old set."""
    import http.server
    import ssl
    import threading

    fleet, server, tmp_path = world
    peer = fleet.provision("b42")
    (tmp_path / "root.pem").write_bytes(pem(fleet.root))
    (tmp_path / "signer.pem").write_bytes(pem(revocation_signer(fleet).certificate))
    (tmp_path / "peer.pem").write_bytes(pem(peer.identity_cert))
    current = compact_publisher(fleet).current()
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 http.server's name
            requests.append(self.path)
            body = current if self.path == "/revset/current.frs" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    https = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(fleet.server_cert, fleet.server_key)
    https.socket = context.wrap_socket(https.socket, server_side=True)
    thread = threading.Thread(target=https.serve_forever, daemon=True)
    thread.start()
    base = "https://localhost:%d" % https.server_address[1]
    try:
        args = ["agent", "check-peer-offline", str(tmp_path / "peer.pem"), "--bus",
                server.bus_uri, "--root", str(tmp_path / "root.pem"), "--signer",
                str(tmp_path / "signer.pem"), "--cache", str(tmp_path / "cache.frs")]
        result = CliRunner().invoke(cli, args + ["--fetch", base + "/revset/current.frs"],
                                    catch_exceptions=False)
        assert result.exit_code == 0 and "not revoked" in result.output, result.output
        assert (tmp_path / "cache.frs").read_bytes() == current
        result = CliRunner().invoke(cli, args + ["--fetch", base + "/revset/none.frs"],
                                    catch_exceptions=False)
        assert result.exit_code == 1 and "the old set stays" in result.output, result.output
        assert (tmp_path / "cache.frs").read_bytes() == current
        assert requests == ["/revset/current.frs", "/revset/none.frs"]
    finally:
        https.shutdown()
        https.server_close()
        thread.join(5)
