"""A revoked server is refused by the device agents, through processes: `fleetid line run`
+ `fleetid line cloud-config` + `fleetid cloud serve --crl-port` (verifier, EST, the CRLs
with the fleet root's), `fleetid sim serve` for the chips, and `fleetid agent run` on
either runtime.

The operator revokes the cloud's own TLS certificate (issued by the fleet root) with
`fleetid revoke --server-cert`: the root's CRL (/crl/root.crl) lists it.  An agent with a
root CRL cache (--root-crl-cache; verified in the SE against the fleet root) then:

1. with nothing cached yet, connects all the same (no fresh CRL refuses no server: the CRL
   is fetched over these connections), enrols, and caches the root CRL from root.crl
   beside its new certificate's CRL distribution point;
2. at its next run refuses the verifier at the first handshake (alert certificate_revoked,
   NetError REFUSED with server_reason "certificate_revoked"), and writes nothing: the
   journal, the slots and the cached CRL are as before.

The CPython agent (device/host) and the board agent under the MicroPython unix port
(--runtime micropython) do it with the same hook, device/board.server_revocation.
"""

import glob
import json
import os
import time
import urllib.request

import pytest
from cryptography import x509

from bench.mtls import free_port
from tests.cli.test_agent_processes import (_Background, _fleetid, _ok,
                                            _serve_chip, _wait_for)


def _text(path):
    with open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def revoked_cloud(tmp_path_factory):
    """A running cloud whose TLS certificate the operator revoked, its root CRL listing
    it.  Yields: (env, tmp dir, cloud ports, [chip NVM files])."""
    tmp = tmp_path_factory.mktemp("srvrev")
    env = dict(os.environ, FLEETID_KEYSTORE_PASS="server revocation process test passphrase")
    line, cloud = str(tmp / "line"), str(tmp / "cloud")
    _ok(_fleetid("line", "run", "--devices", "2", "--stations", "1", "--keep-chips",
                 "--out", line, env=env))
    _ok(_fleetid("line", "cloud-config", "--line", line, "--out", cloud, env=env))
    serve_out, crl_port = str(tmp / "serve.out"), free_port()
    config = os.path.join(cloud, "cloud.toml")
    server = _Background(["cloud", "serve", "--config", config, "--crl-port", str(crl_port)],
                         env, serve_out)
    try:
        _wait_for(lambda: '"listening"' in _text(serve_out), server.proc, "cloud server")
        ports = json.loads([t for t in _text(serve_out).splitlines()
                            if '"listening"' in t][0])["listening"]
        server_pem = os.path.join(cloud, "tls", "server.pem")
        out = json.loads(_ok(_fleetid("revoke", "--config", config, "--server-cert",
                                      server_pem, "--reason", "keyCompromise",
                                      "--operator", "test", env=env)))
        assert out["revoked_server"] and out["new"]
        with open(server_pem, "rb") as f:
            serial = x509.load_pem_x509_certificate(f.read()).serial_number
        url = "http://127.0.0.1:%d/crl/root.crl" % crl_port
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(url, timeout=5) as answer:
                crl = x509.load_der_x509_crl(answer.read())
            if crl.get_revoked_certificate_by_serial_number(serial) is not None:
                break
            assert time.monotonic() < deadline, "root CRL does not list the server"
            time.sleep(0.5)
        yield env, tmp, ports, sorted(glob.glob(os.path.join(line, "chips", "*", "se-*.nvm")))
    finally:
        server.stop()


def _refused_twice(revoked_cloud, chip_index, runtime_args):
    # Steps 1 and 2 of the module docstring on one chip; returns the refused run.
    env, tmp, ports, chips = revoked_cloud
    sock = str(tmp / ("se%d.sock" % chip_index))
    bus = "sim:unix:" + sock
    se = _serve_chip(chips[chip_index], sock, env, str(tmp / ("se%d.log" % chip_index)))
    try:
        cache = str(tmp / ("root%d.crl" % chip_index))
        agent = ["agent", "run", "--bus", bus, "--once", "--max-attempts", "2",
                 "--max-delay", "1", "--cloud", "https://127.0.0.1:%d" % ports["verifier"],
                 "--est", "https://127.0.0.1:%d" % ports["est"],
                 "--root-crl-cache", cache] + runtime_args
        out = _ok(_fleetid(*agent, env=env, timeout=240))
        assert "root revocation list updated" in out and "journal BASE" in out, out
        status = _ok(_fleetid("agent", "status", "--bus", bus, env=env))
        cached = open(cache, "rb").read()
        refused = _fleetid(*agent, env=env, timeout=240)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert _ok(_fleetid("agent", "status", "--bus", bus, env=env)) == status
        assert open(cache, "rb").read() == cached
        return refused
    finally:
        se.stop()


def test_the_cpython_agent_refuses_a_server_on_the_root_crl_and_writes_nothing(
        revoked_cloud):
    refused = _refused_twice(revoked_cloud, 0, ["--rotate"])
    assert "FAILED network: refused: certificate_revoked: " in refused.stderr, refused.stderr
    assert "RevokedError" in refused.stderr and "BEGIN" not in refused.stdout


@pytest.mark.micropython
@pytest.mark.timeout(400)
def test_the_board_agent_under_micropython_refuses_it_the_same_way(revoked_cloud):
    from tests.micropython.support import tools

    tools()
    refused = _refused_twice(revoked_cloud, 1, ["--runtime", "micropython"])
    assert "certificate_revoked" in refused.stderr and "RevokedError" in refused.stderr, (
        refused.stdout + refused.stderr)
