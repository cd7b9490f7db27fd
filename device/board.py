# The device agent's one entry point on a MicroPython board.  boards/<board>/main.py holds
# the board's constants and hands them over once, run_constants(globals()); everything else
# is here, the same on every board.  Portable: runs unchanged under MicroPython (the
# boards) and CPython (tests).
#
#     from fleetid.device.board import run_constants
#     BUS = "machine:i2c:0:0x48"
#     T1_PROFILE = "se05x"
#     INTERVAL_S = 3600
#     run_constants(globals())                      # never returns on a board
#
# run_constants passes each upper-case name as run()'s parameter of that name in lower
# case (BUS -> bus, CRL_CACHE_PATH -> crl_cache_path, MQTT_URL -> mqtt_url); run() can be
# called directly too.
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
# Options (all off by default; the board's main.py sets them as constants, upper case):
#     boot_image      path of the running MCUboot image on the board's file system: check
#                     it (signature by an installed firmware key, hash, security counter)
#                     before the first connection, confirm it after the first accepted one.
#                     A refused image stops every cycle (the agent does not connect).
#     boot_max_size   the image slot's size (None: device/boot.DEFAULT_MAX_SIZE).
#     crl_issuer      path of the issuing CA's certificate (DER) whose CRL the device
#     crl_cache       caches, and the file the cache lives in: both or neither.
#     crl_grace_s, crl_fail_open   device/crl_cache.CrlPolicy.  With the cache on, the
#                     servers' chains (HTTPS and MQTT) are checked against it too
#                     (server_revocation below: a listed server is refused).
#     root_crl_cache_path  the file caching the fleet root's CRL (root_crl_cache below;
#                     its issuer is the fleet root in the SE), refreshed each cycle from
#     root_crl_url    root_crl_url, else root.crl beside the issuing CA's CRL URL.  The
#                     cloud's server certificates are issued by the root, so this is the
#                     CRL that can refuse a revoked verifier, EST server or broker: every
#                     connection's server chain is checked against both caches
#                     (server_revocation: a listed server is refused even when the CRL
#                     is stale; no fresh CRL refuses no server).
#     renew_fraction, renew_margin_s, max_attempts, max_delay   device/agent.AgentPolicy.
#     mqtt_url        mqtts://HOST[:PORT]: run() opens the MQTT session itself
#                     (device/board_mqtt.py: telemetry after every cycle, retained CRLs
#                     into the cache, rotate / SCP03 relay / ping commands), its
#                     transport from the network module's
#         make_mqtt(se, name, mqtt_url, anchors_der=, chain_der=, server_name=,
#                   timeout_s=, revocation=, now=) -> device/mqtt transport
#                     (board_net's: umqtt.simple over device/tls_socket.py, TLS 1.3 with
#                     the identity key in the SE).
#     mqtt_crl_labels retained CRL labels to take (("+",): all).
#     mqtt_roots, mqtt_chain   DER files: the broker's anchors (None: the fleet root in
#                     the SE) and certificates sent after the identity certificate.
#     mqtt_timeout_s  bound on each TLS wait of the MQTT session.
#     se_keepalive_s  a GET RANDOM to the SE at least this often while waiting (None: off;
#                     the emulator behind `fleetid sim serve` drops an idle client).
# Modules of an option that is off are never imported (the board's heap).

from fleetid.device.agent import Agent, AgentPolicy, run_forever
from fleetid.device.stack import open_se


_DATA_TRUST_FLEET_ROOT = 0x0111  # se_consts.DATA_TRUST_FLEET_ROOT
_DATA_OBJECT_ROOT_CRL_NUMBER = 4  # se_consts.DATA_OBJECT_ROOT_CRL_NUMBER


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


def root_crl_cache(se, cache_path, grace_s=86400):
    """device/crl_cache.CrlCache of the fleet root's CRL (the cloud's /crl/root.crl,
    cloud/revocation/arl.py: the root-issued certificates it revoked, issuing CAs and the
    cloud's own server certificates), the issuer being the fleet root the line stored in
    the SE, its high-water mark in SE data object 4 (se_consts.DATA_OBJECT_ROOT_CRL_NUMBER;
    object 1 is the issuing CA's).

    Params: se: SeSession.  cache_path: the file holding the cached root CRL.  grace_s:
        CrlPolicy.grace_s.
    Returns: CrlCache.  Raises: DerError (the SE holds no fleet root certificate).
    """
    from fleetid.device.crl_cache import CrlCache, CrlPolicy, FileStore

    root = bytes(se.get_data(_DATA_TRUST_FLEET_ROOT, -1, 65536))
    point, name = issuer_key_and_name(root)
    return CrlCache(se, FileStore(cache_path), point, name,
                    CrlPolicy(grace_s=grace_s, object_id=_DATA_OBJECT_ROOT_CRL_NUMBER))


def server_revocation(caches, now):
    """The `revocation(path)` hook of the agent's TLS client (common/tls13_cert.py), the
    one both runtimes pass to every connection they open (EST, verifier, CRL fetches over
    HTTPS, MQTT), from their CRL caches (the issuing CA's and the fleet root's: the
    cloud's server certificates are issued by the root, so the root's CRL is the one that
    can list them).  Policy:

    * a certificate of the server's path issued by a cached CRL's issuer and listed on it
      refuses the chain (the client sends certificate_revoked), even when that CRL is
      stale: a revocation once seen is never forgotten;
    * no CRL, or no fresh one, refuses no server, whatever the peers' policy
      (crl_fail_open): the CRLs themselves are fetched over these connections and are
      verified by their own signatures, so refusing servers for want of a fresh CRL would
      lock the device out of the very fetch that refreshes it.

    The compact revocation set keys on device serial numbers (device/revset_cache.py), so
    it says nothing about a server.

    Params: caches: a device/crl_cache.CrlCache, or a list of them.  now: now() -> epoch
        seconds.
    Returns: check(path), raising RevokedError for a listed certificate.
    """
    from fleetid.device.anchored_store import StaleRevocationError

    if not isinstance(caches, (list, tuple)):
        caches = (caches,)

    def check(path):
        for cert in path:
            for cache in caches:
                if cert.issuer == cache.issuer_name_der:
                    try:
                        cache.check_serial(cert.serial, now())
                    except StaleRevocationError:
                        pass

    return check


def _net_options(verifier_url, est_url, server_name, est_label, crl_url, root_crl_url):
    out = {}
    for name, value in (("verifier_url", verifier_url), ("est_url", est_url),
                        ("server_name", server_name), ("est_label", est_label),
                        ("crl_url", crl_url), ("root_crl_url", root_crl_url)):
        if value is not None:
            out[name] = value
    return out


def _mqtt_session(net_module, stack, agent, clock, log, revocation, mqtt):
    # device/board_mqtt.BoardMqtt with the network module's make_mqtt (board_net's:
    # umqtt.simple over the SE-keyed TLS 1.3 client).  mqtt: the run() options by name.
    from fleetid.device.board_mqtt import BoardMqtt

    make_mqtt = getattr(net_module, "make_mqtt", None)
    if make_mqtt is None:
        raise ValueError("the network module has no make_mqtt (MQTT_URL needs one)")
    anchors = [_read_file(p) for p in mqtt["mqtt_roots"]] if mqtt["mqtt_roots"] else None
    chain = [_read_file(p) for p in mqtt["mqtt_chain"] or ()]

    def make_transport(name):
        return make_mqtt(stack.se, name, mqtt["mqtt_url"], anchors_der=anchors,
                         chain_der=chain, server_name=mqtt["server_name"],
                         timeout_s=mqtt["mqtt_timeout_s"], revocation=revocation,
                         now=clock.now)

    return BoardMqtt(stack, agent, make_transport, mqtt["mqtt_crl_labels"], clock, log,
                     se_keepalive_s=mqtt["se_keepalive_s"])


def _sleeper(clock, se, se_keepalive_s):
    # run_forever's wait: the clock's sleep, in slices with a GET RANDOM between them when
    # the SE must be kept awake (se_keepalive_s; the emulator drops an idle client).
    def wait(seconds):
        while se_keepalive_s is not None and seconds > se_keepalive_s:
            clock.sleep(se_keepalive_s)
            se.get_random(1)
            seconds -= se_keepalive_s
        clock.sleep(seconds)  # None: never asks to stop

    return wait


def _revocation_caches(se, clock, crl, root_crl_cache_path):
    # (issuing CA's CrlCache or None, root's CrlCache or None, the servers' revocation
    # hook over both, or None).  crl: (crl_issuer, crl_cache_path, grace_s, fail_open).
    issuer_path, cache_path, grace_s, fail_open = crl
    revocation = root = None
    if issuer_path is not None:
        revocation = crl_cache(se, issuer_path, cache_path, grace_s, fail_open)
    if root_crl_cache_path is not None:
        root = root_crl_cache(se, root_crl_cache_path, grace_s)
    caches = [c for c in (revocation, root) if c is not None]
    return revocation, root, server_revocation(caches, clock.now) if caches else None


def _run_on_mqtt(session, interval_s, log, cycles, sleep):
    from fleetid.device.board_mqtt import run_on_mqtt

    return run_on_mqtt(session, interval_s, log, cycles, sleep)


def run(bus, t1_profile="gp", interval_s=3600, net_module="board_net", boot_image=None,
        boot_max_size=None, crl_issuer=None, crl_cache_path=None, crl_grace_s=86400,
        crl_fail_open=False, renew_fraction=0.66, renew_margin_s=0, log=print,
        cycles=None, verifier_url=None, est_url=None, server_name=None, est_label=None,
        crl_url=None, mqtt_url=None, mqtt_crl_labels=("+",), mqtt_roots=None,
        mqtt_chain=None, mqtt_timeout_s=20, max_attempts=5, max_delay=60.0,
        se_keepalive_s=None, root_crl_cache_path=None, root_crl_url=None):
    """Run the device agent on a board (module header).

    Params: bus: bus URI (device/bus.py).  t1_profile: "gp" or "se05x".  interval_s:
        seconds between cycles at most.  net_module: the board's network module (name or
        module).  log: fn(str).  cycles: stop after this many (None: forever).  The
        others: the options and network constants in the module header.
    Returns: the last AgentReport (only when `cycles` ends the loop; None when it failed).
    Raises: ValueError (crl_issuer without crl_cache_path or the other way round; MQTT_URL
        with a network module without make_mqtt), and what opening the SE raises
        (BusUriError, BusError, LinkError, ApduError).  Failures inside a cycle are
        logged and the cycle retried after the interval (the SE's journal keeps them).
    """
    if (crl_issuer is None) != (crl_cache_path is None):
        raise ValueError("crl_issuer and crl_cache_path go together")
    if isinstance(net_module, str):
        # A non-empty fromlist makes __import__ return the named (dotted) module itself.
        net_module = __import__(net_module, None, None, ("make_net",))
    net_options = _net_options(verifier_url, est_url, server_name, est_label, crl_url,
                               root_crl_url)
    policy = AgentPolicy(renew_fraction=renew_fraction, renew_margin_s=renew_margin_s,
                         max_attempts=max_attempts, max_delay=max_delay,
                         max_wait=max(max_delay * max_attempts, 60.0))
    clock = net_module.make_clock()
    stack = open_se(bus, profile=t1_profile)
    boot = None
    try:
        se = stack.se
        if boot_image is not None:
            boot = signed_boot(se, boot_image, clock, boot_max_size, log)
        revocation, root, hook = _revocation_caches(
            se, clock, (crl_issuer, crl_cache_path, crl_grace_s, crl_fail_open),
            root_crl_cache_path)
        if hook is not None and net_options:  # the shipped board_net (an integrator's
            net_options["revocation"] = hook  # make_net(se) may not take it)
        net = net_module.make_net(se, **net_options)  # none: an integrator's make_net(se)
        agent = Agent(se, net, clock, _urandom_fraction, boot=boot,
                      revocation=revocation, policy=policy, log=log,
                      root_revocation=root)
        if mqtt_url is None:
            return run_forever(agent, _sleeper(clock, se, se_keepalive_s), interval_s,
                               log=log, cycles=cycles)
        session = _mqtt_session(net_module, stack, agent, clock, log, hook, {
            "mqtt_url": mqtt_url, "mqtt_roots": mqtt_roots, "mqtt_chain": mqtt_chain,
            "server_name": None, "mqtt_timeout_s": mqtt_timeout_s,  # the broker: its host
            "mqtt_crl_labels": mqtt_crl_labels, "se_keepalive_s": se_keepalive_s})
        try:
            return _run_on_mqtt(session, interval_s, log, cycles, clock.sleep)
        finally:
            session.drop()
    finally:
        if boot is not None:
            boot.reader.close()
        stack.close()


def run_constants(constants):
    """Run the agent with a board's constants (module header): `constants` is the board's
    main.py globals(); each upper-case name is run()'s parameter of that name in lower case,
    other names (imports, dunders) are passed over.

    Returns: what run() returns.
    Raises: TypeError for a constant that names no parameter of run() (a misspelt one is
        refused, not ignored) or a missing BUS, before the SE is opened; what run() raises.
    """
    options = {}
    for name, value in constants.items():
        if name.isupper():
            options[name.lower()] = value
    return run(**options)
