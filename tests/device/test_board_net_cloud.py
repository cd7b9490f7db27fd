"""device/board_net.py on CPython against the project's own cloud (EST + verifier on a
line's PKI, in process), the SE key of a personalised chip for every handshake: the calls
answer as the CPython reference does, a cycle's later connections resume with the ticket,
a ticket is never offered for a slot whose certificate changed, and a server whose
certificate does not carry the configured name is refused.  (The same module under
MicroPython, through processes: tests/micropython/test_board_net_micropython.py.)"""

import time

import pytest
from cryptography import x509

from fleetid.common import se_consts as C
from fleetid.common.host.tls13_host import CryptographyTls13Primitives
from fleetid.device import board_net
from fleetid.device.agent import NetError
from tests.device.device_cloud_support import LineAndCloud


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = LineAndCloud(tmp_path_factory.mktemp("boardnet"), devices=1)
    yield env
    env.close()


def _net(env, se, server_name=None):
    net = board_net.BoardNetwork(se, "https://127.0.0.1:%d" % env.ports["verifier"],
                                 "https://127.0.0.1:%d" % env.ports["est"],
                                 lambda: int(time.time()), server_name=server_name)
    net.https.prims = CryptographyTls13Primitives()  # CPython has no cryptolib
    return net


def test_calls_answer_and_later_connections_resume(env):
    se = env.session(0)
    net = _net(env, se)
    identity = net.whoami(C.SLOT_IDENTITY)
    assert identity["kind"] == "identity"
    cas = [x509.load_der_x509_certificate(der) for der in net.cacerts(C.SLOT_IDENTITY)]
    assert env.line.ca_cert in cas
    assert 1 <= len(net.nonce(C.SLOT_IDENTITY)) <= 64
    # Tickets are kept per server name, and the verifier and EST share one session
    # cache: whoami (verifier) is the one full handshake, cacerts and nonce (EST) resume.
    assert (net.https.handshakes, net.https.resumed) == (3, 2)
    net.whoami(C.SLOT_IDENTITY)
    assert (net.https.handshakes, net.https.resumed) == (4, 3)
    assert net.https.se_operations == 8  # GENERATE + ECDH in the transient key, each


def test_a_ticket_is_not_offered_once_the_slots_certificate_changed(env):
    se = env.session(0)
    net = _net(env, se)
    net.whoami(C.SLOT_IDENTITY)
    ((key, (digest, ticket)),) = net.https._tickets.items()
    # As after a rotation into the same slot: the stored digest no longer matches.
    net.https._tickets[key] = (bytes(32), ticket)
    net.whoami(C.SLOT_IDENTITY)
    assert (net.https.handshakes, net.https.resumed) == (2, 0)


def test_a_server_without_the_configured_name_is_refused(env):
    se = env.session(0)
    with pytest.raises(NetError) as refused:
        _net(env, se, server_name="fleet.example.net").whoami(C.SLOT_IDENTITY)
    assert refused.value.reason == NetError.REFUSED and "name" in refused.value.detail
