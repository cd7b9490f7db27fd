# The fleetid device agent on an ESP32 (MicroPython, fleetid frozen in with manifest.py).
# Copy to the board's file system as main.py, with a board_net.py of your own (below).
#
# Everything portable is in the firmware: the SE stack (fleetid.device.stack), the agent's
# state machine and the rotation journal in the SE (fleetid.device.agent).  What a board
# supplies is its network: board_net.py must define make_net(se) returning an object with
#
#     whoami(slot) -> dict            GET /v1/whoami, mTLS with the key in SE slot `slot`
#     cacerts(slot) -> list of DER    GET /.well-known/est/<label>/cacerts (the agent
#                                     keeps the CAs that chain to the SE's fleet root)
#     nonce(slot) -> bytes            GET /.well-known/est/<label>/nonce (base64 body)
#     enroll(slot, csr_der, reenroll) -> certificate DER   POST simple(re)enroll (raise
#                                     fleetid.device.certcheck.CertificateRefused when
#                                     the answer is not exactly one certificate)
#     ack(slot) -> None               POST /v1/rotation/ack
#     fetch(url) -> bytes             plain GET (revocation lists)
#
# raising fleetid.device.agent.NetError on failure (LINK / TIMEOUT / SERVER / PENDING with
# retry_after / REFUSED with server_reason), and make_clock() returning an object with
# now() -> int seconds since 1970 UTC (set by NTP) and sleep(seconds).  The TLS client
# must sign its CertificateVerify with SeSession.sign(slot, digest): MicroPython's ssl
# module cannot, so a TLS client whose signature runs in the SE is the board's part (see
# docs/ARCHITECTURE.md "mTLS with an SE-held key"); it is not built in this repository.

import board_net
from fleetid.device.agent import Agent, AgentPolicy, run_forever
from fleetid.device.stack import open_se

BUS = "machine:i2c:0:0x48"  # machine.I2C(0); SE050-class chips answer at 0x48
T1_PROFILE = "se05x"
INTERVAL_S = 3600


def _rand():
    import os

    return int.from_bytes(os.urandom(2), "big") / 65536


def main():
    clock = board_net.make_clock()
    stack = open_se(BUS, profile=T1_PROFILE)
    try:
        agent = Agent(stack.se, board_net.make_net(stack.se), clock, _rand,
                      policy=AgentPolicy(), log=print)

        def wait(seconds):
            clock.sleep(seconds)

        run_forever(agent, wait, INTERVAL_S, log=print)
    finally:
        stack.close()


main()
