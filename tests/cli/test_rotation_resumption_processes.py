"""A rotation costs one full TLS handshake: the device agent (device/agent.Agent on the
CPython network adapter, as `fleetid agent run` builds it) against `fleetid cloud serve`
and `fleetid sim serve` in their own processes, every command the SE receives counted.

A full handshake costs the SE GENERATE (transient) + ECDH + SIGN (CertificateVerify) +
VERIFY (the server's CertificateVerify; the chain's signature once per agent); a resumed
one GENERATE + ECDH.  A rotation's requests: whoami (verifier), nonce and simplereenroll
(EST, one connection) with the old key, ack (verifier) with the new key.  Only the
acknowledgement, which proves the new key, may be a full handshake: the verifier and EST
share one session cache and tickets are kept per server name."""

import glob
import json
import os
import random

from fleetid.common import se_consts as C
from tests.cli.test_agent_processes import _Background, _fleetid, _ok, _serve_chip, _wait_for


class _CountingLink:
    # Counts the APDUs that reach the SE by (INS, P1): P1 0x80 is the transient key.
    def __init__(self, transceive):
        self._transceive = transceive
        self.counts = {}

    def __call__(self, apdu):
        key = (apdu[1], apdu[2])
        self.counts[key] = self.counts.get(key, 0) + 1
        return self._transceive(apdu)

    def count(self, ins, p1=None):
        return sum(n for (i, p), n in self.counts.items() if i == ins and p1 in (None, p))


def test_a_rotation_does_one_full_handshake_and_resumes_the_rest(tmp_path):
    from fleetid.common.apdu import ApduProtocol
    from fleetid.device.agent import Agent, AgentPolicy
    from fleetid.device.host.agent_net import HostNetwork, SystemClock
    from fleetid.device.se import SeSession
    from fleetid.device.stack import open_se

    env = dict(os.environ, FLEETID_KEYSTORE_PASS="resumption process test passphrase")
    line, cloud = str(tmp_path / "line"), str(tmp_path / "cloud")
    _ok(_fleetid("line", "run", "--devices", "1", "--stations", "1", "--keep-chips",
                 "--out", line, env=env))
    _ok(_fleetid("line", "cloud-config", "--line", line, "--out", cloud, env=env))
    serve_out = str(tmp_path / "serve.out")
    servers = [_Background(["cloud", "serve", "--config", os.path.join(cloud, "cloud.toml")],
                           env, serve_out)]
    stack = None
    try:
        _wait_for(lambda: '"listening"' in open(serve_out).read(), servers[0].proc,
                  "cloud server")
        ports = json.loads([t for t in open(serve_out).read().splitlines()
                            if '"listening"' in t][0])["listening"]
        (chip,) = glob.glob(os.path.join(line, "chips", "*", "se-*.nvm"))
        sock = str(tmp_path / "se.sock")
        servers.append(_serve_chip(chip, sock, env, str(tmp_path / "se.log")))
        stack = open_se("sim:unix:" + sock)
        link = _CountingLink(stack.link.transceive)
        se = SeSession(ApduProtocol(link))
        root = bytes(se.get_data(C.DATA_TRUST_FLEET_ROOT, -1, 65536))
        net = HostNetwork(se, "https://127.0.0.1:%d" % ports["verifier"],
                          "https://127.0.0.1:%d" % ports["est"], [root])
        agent = Agent(se, net, SystemClock(), random.Random(7).random,
                      policy=AgentPolicy(max_attempts=2, max_delay=1))
        assert agent.run_once().journal == "BASE"  # enrolment
        for _ in range(2):
            link.counts.clear()
            handshakes, resumed, se_operations = net.handshakes, net.resumed, net.se_operations
            assert agent.run_once(command="rotate").journal == "BASE"
            # whoami, nonce + simplereenroll (old key), ack (new key).
            assert (net.handshakes - handshakes, net.resumed - resumed) == (3, 2)
            assert link.count(C.INS_GENERATE_KEY, C.SLOT_TRANSIENT) == 3
            assert link.count(C.INS_ECDH) == 3
            # The CSR's signature and the one CertificateVerify of the new key.
            assert link.count(C.INS_SIGN) == 2
            # 3 x (GENERATE + ECDH), one SIGN, one VERIFY (the server's CertificateVerify).
            assert net.se_operations - se_operations == 8
    finally:
        if stack is not None:
            stack.close()
        for server in reversed(servers):
            server.stop()
