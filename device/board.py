# The device agent's one entry point on a MicroPython board.  boards/<board>/main.py holds
# the board's constants and calls run() once; everything else is here, the same on every
# board.  Portable: runs unchanged under MicroPython (the boards) and CPython (tests).
#
#     from fleetid.device.board import run
#     run("machine:i2c:0:0x48", "se05x", 3600)      # never returns on a board
#
# What run() does: opens the SE stack on the bus URI (device/stack.open_se), builds the
# agent (device/agent.Agent) with the board's network and clock, the optional signed-boot
# check (device/boot.check_image with the firmware keys the SE holds, device/fwkeys) and
# the optional CRL cache (device/crl_cache.CrlCache), and runs device/agent.run_forever:
# one cycle, then sleep until the next renewal or `interval_s`, whichever is first.
#
# The board's network: a module (default name "board_net", a board_net.py beside main.py)
# defining
#
#     make_clock() -> clock       clock.now() -> int seconds since 1970 UTC (set by NTP);
#                                 clock.sleep(seconds) (the agent bounds every sleep)
#     make_net(se) -> net         the agent's `net` (device/agent.py, module header), every
#                                 call authenticated by mutual TLS with the key in SE slot
#                                 `slot`, the server checked against the fleet root in the SE:
#         whoami(slot) -> dict                   GET /v1/whoami (its "commands" list may
#                                                ask for "rotate")
#         cacerts(slot) -> [certificate DER]     GET /.well-known/est/<label>/cacerts
#                                                (RFC 7030 4.1; the agent keeps those
#                                                that chain to the fleet root in the SE)
#         nonce(slot) -> bytes                   GET /.well-known/est/<label>/nonce
#         enroll(slot, csr_der, reenroll) -> certificate DER
#                                                POST simpleenroll / simplereenroll
#         ack(slot) -> None                      POST /v1/rotation/ack
#         fetch_revocation(slot) -> CRL DER      GET the CRL distribution point of the
#                                                certificate in `slot` (only called when
#                                                the CRL cache is on)
#       each raising fleetid.device.agent.NetError on failure: LINK / TIMEOUT / SERVER /
#       PENDING (with retry_after) are retried within the agent's bounds, REFUSED (with
#       server_reason) is not.  device/host/agent_net.HostNetwork is the CPython
#       implementation (the reference for paths, bodies and error mapping).
#
# fleetid.device.board_net ships that module for every board with `socket`: HTTP/1.1
# (device/https.py) over the portable TLS 1.3 client whose CertificateVerify is signed in
# the SE (common/tls13.py, device/tls13_keys.py; MicroPython's `ssl` cannot use an SE
# key).  The board's constants reach it through run(): verifier_url, est_url and, when
# set, server_name, est_label, crl_url, passed as make_net(se, **those).  A module given
# without them is called as make_net(se) (an integrator's own network).
#
# Options (all off by default; the board's main.py sets them as constants):
#     boot_image      path of the running MCUboot image on the board's file system: check
#                     it (signature by an installed firmware key, hash, security counter)
#                     before the first connection, confirm it after the first accepted one.
#                     A refused image stops every cycle (the agent does not connect).
#     boot_max_size   the image slot's size (None: device/boot.DEFAULT_MAX_SIZE).
#     crl_issuer      path of the issuing CA's certificate (DER) whose CRL the device
#     crl_cache       caches, and the file the cache lives in: both or neither.
#     crl_grace_s, crl_fail_open   device/crl_cache.CrlPolicy.
#     renew_fraction, renew_margin_s   device/agent.AgentPolicy.
# Modules of an option that is off are never imported (the board's heap).

from fleetid.device.agent import Agent, AgentPolicy, run_forever
from fleetid.device.stack import open_se


def _urandom_fraction():
    # Backoff jitter in [0, 1) (device/agent.py `rand`).
    import os

    return int.from_bytes(os.urandom(2), "big") / 65536


def _read_file(path):
    with open(path, "rb") as f:
        return f.read()


def issuer_key_and_name(cert_der):
    """The public point and the subject Name (DER, the whole SEQUENCE) of an issuing CA's
    certificate: what CrlCache checks a CRL's signature and issuer against.

    Returns: (65-byte P-256 point, Name DER).  Raises: DerError.
    """
    from fleetid.common import der

    tbs = der.DerReader(cert_der).read_sequence().read_sequence()
    if tbs.peek_tag() == 0xA0:
        tbs.read_tlv(0xA0)  # version
    tbs.read_integer()  # serialNumber
    tbs.read_raw(der.TAG_SEQUENCE)  # signature algorithm
    tbs.read_raw(der.TAG_SEQUENCE)  # issuer
    tbs.read_raw(der.TAG_SEQUENCE)  # validity
    name = bytes(tbs.read_raw(der.TAG_SEQUENCE))
    return bytes(der.read_p256_spki(tbs)), name


def crl_cache(se, issuer_path, cache_path, grace_s=86400, fail_open=False):
    """device/crl_cache.CrlCache on the board's file system.

    Params: se: SeSession.  issuer_path: the issuing CA's certificate (DER).  cache_path:
        the file holding the cached CRL.  grace_s, fail_open: CrlPolicy.
    Returns: CrlCache.  Raises: OSError (no issuer file), DerError.
    """
    from fleetid.device.crl_cache import CrlCache, CrlPolicy, FileStore

    point, name = issuer_key_and_name(_read_file(issuer_path))
    return CrlCache(se, FileStore(cache_path), point, name,
                    CrlPolicy(grace_s=grace_s, fail_open=fail_open))


def signed_boot(se, image_path, clock, max_size=None, log=None):
    """device/agent.SignedBoot over device/boot.py with the firmware keys installed in the
    SE (device/fwkeys.FirmwareKeys: the factory key until a firmware certificate is
    installed), certificate validity checked at clock.now().

    Params: se: SeSession.  image_path: the image file (opened here; close
        `.reader`).  clock: now().  max_size: the slot size or None.  log: fn(str) or None.
    Returns: SignedBoot.
    """
    from fleetid.device import boot
    from fleetid.device.agent import SignedBoot
    from fleetid.device.fwkeys import FirmwareKeys

    def check(se, reader, max_size=boot.DEFAULT_MAX_SIZE):
        now = int(clock.now())
        report = boot.check_image(se, reader, max_size=max_size, now=now,
                                  firmware_keys=FirmwareKeys(se, now=now))
        if log is not None:
            log("signed boot: image %s, security counter %d, key serial %s" % (
                report.version_string(), report.security_counter,
                "factory" if report.key_serial is None else "%x" % report.key_serial))
        return report

    return SignedBoot(check, boot.confirm_boot, se, open(image_path, "rb"), max_size)


def run(bus, t1_profile="gp", interval_s=3600, net_module="board_net", boot_image=None,
        boot_max_size=None, crl_issuer=None, crl_cache_path=None, crl_grace_s=86400,
        crl_fail_open=False, renew_fraction=0.66, renew_margin_s=0, log=print,
        cycles=None, verifier_url=None, est_url=None, server_name=None, est_label=None,
        crl_url=None):
    """Run the device agent on a board (module header).

    Params: bus: bus URI (device/bus.py).  t1_profile: "gp" or "se05x".  interval_s:
        seconds between cycles at most.  net_module: the board's network module, by name
        or as the module itself.  boot_image ... renew_margin_s: the options in the module
        header (off by default).  log: fn(str).  cycles: stop after this many (tests;
        None: run forever).  verifier_url ... crl_url: the network's constants, passed
        to make_net(se, ...) when any is set (fleetid.device.board_net takes them).
    Returns: the last AgentReport (only when `cycles` ends the loop).
    Raises: ValueError (crl_issuer without crl_cache_path or the other way round), and
        what opening the SE raises (BusUriError, BusError, LinkError, ApduError): a board
        without its SE has nothing to run.  Failures inside a cycle are logged and the
        cycle retried after the interval (the journal in the SE keeps the progress).
    """
    if (crl_issuer is None) != (crl_cache_path is None):
        raise ValueError("crl_issuer and crl_cache_path go together")
    if isinstance(net_module, str):
        # A non-empty fromlist makes __import__ return the named (dotted) module itself.
        net_module = __import__(net_module, None, None, ("make_net",))
    net_options = {}
    for name, value in (("verifier_url", verifier_url), ("est_url", est_url),
                        ("server_name", server_name), ("est_label", est_label),
                        ("crl_url", crl_url)):
        if value is not None:
            net_options[name] = value
    policy = AgentPolicy(renew_fraction=renew_fraction, renew_margin_s=renew_margin_s)
    clock = net_module.make_clock()
    stack = open_se(bus, profile=t1_profile)
    boot = None
    try:
        se = stack.se
        if boot_image is not None:
            boot = signed_boot(se, boot_image, clock, boot_max_size, log)
        revocation = None
        if crl_issuer is not None:
            revocation = crl_cache(se, crl_issuer, crl_cache_path, crl_grace_s,
                                   crl_fail_open)
        net = net_module.make_net(se, **net_options) if net_options else \
            net_module.make_net(se)
        agent = Agent(se, net, clock, _urandom_fraction, boot=boot,
                      revocation=revocation, policy=policy, log=log)

        def wait(seconds):
            clock.sleep(seconds)  # None: never asks to stop

        return run_forever(agent, wait, interval_s, log=log, cycles=cycles)
    finally:
        if boot is not None:
            boot.reader.close()
        stack.close()
