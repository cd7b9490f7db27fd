# One way to open an SE: bus -> T=1' link -> APDU protocol -> (optional SCP03) -> SeSession.
# Portable: CPython and MicroPython.
#
#     stack = open_se("sim:unix:/tmp/se.sock")           # or a Bus object already open
#     with stack:                                        # CPython; MicroPython: close()
#         stack.se.uid()
#         secure = stack.secure(prims, session_keys_fn, level=0x33, kvn=0x31)
#         secure.put_cert(...)                           # wrapped by SCP03
#
# Every wait below is bounded: the sim bus by its socket timeout (`timeout_ms`, default
# device/bus_sim.DEFAULT_TIMEOUT_MS), the link by BWT x retries and `max_wait_ms` per block
# (common/t1link.py), the APDU layer by a bounded number of GET RESPONSE rounds.  Nothing
# here retries an APDU: one that fails may already have executed (the caller decides).
#
# Layers (docs/ARCHITECTURE.md "Layers", the SE stack): this module only composes them.  It
# never builds a frame or an APDU itself.

from fleetid.common import t1
from fleetid.common.apdu import ApduProtocol
from fleetid.common.errors import FleetidError
from fleetid.common.t1link import DEFAULT_IFSD, DEFAULT_MAX_WAIT_MS, T1Link
from fleetid.device.se import SeSession


class SeStack:
    """The layers of one open SE connection.

    Attributes: bus (write/read/reset/close), link (T1Link), protocol (ApduProtocol),
        se (SeSession over the plain link; selected unless open_se(select=False)),
        scp (the open Scp03Host after secure(), else None).
    close() is idempotent; the object is a context manager.
    """

    def __init__(self, bus, link):
        self.bus = bus
        self.link = link
        self.protocol = ApduProtocol(link.transceive)
        self.se = SeSession(self.protocol)
        self.scp = None

    def secure(self, prims, session_keys_fn, level=0x33, kvn=0, host_challenge=None):
        """Open an SCP03 session (GP Amd D) over the link and return a SeSession on it.

        Params: prims: crypto primitives (common/scp03.py).  session_keys_fn: fn(host
            challenge, card challenge, key info) -> session keys (an HSM's, or
            scp03.static_session_keys_fn).  level, kvn, host_challenge: as Scp03Host.
        Returns: SeSession whose APDUs are wrapped (the plain `se` stays usable for
            commands outside the session after close_secure()).
        Raises: SecureChannelError, LinkError, ApduError.
        """
        from fleetid.common.scp03 import Scp03Host

        self.close_secure()
        host = Scp03Host(self.link.transceive, prims, session_keys_fn, level=level,
                         host_challenge=host_challenge, kvn=kvn)
        host.open()
        self.scp = host
        return SeSession(ApduProtocol(host.transceive))

    def close_secure(self):
        """Forget the SCP03 session keys (no-op without one)."""
        host, self.scp = self.scp, None
        if host is not None:
            host.close()

    def close(self):
        """Close SCP03 (keys forgotten), the link and the bus.  Never raises a FleetidError
        (the bus may be gone already); idempotent."""
        self.close_secure()
        link, bus = self.link, self.bus
        self.link = self.bus = None
        if link is not None:
            try:
                link.close()
            except FleetidError:
                pass
        if bus is not None:
            try:
                bus.close()
            except (FleetidError, OSError):
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def profile_named(name):
    """The T=1' profile for a name ("gp", "se05x") or a Profile passed through.

    Raises: ValueError for an unknown name."""
    if not isinstance(name, str):
        return name
    try:
        return t1.PROFILES[name]
    except KeyError:
        raise ValueError("unknown T=1' profile %r (gp, se05x)" % name)


def open_link(bus, profile="gp", clock=None, ifsd=DEFAULT_IFSD, max_wait_ms=None):
    """An opened T=1' link on an open bus (CIP exchange, S(IFS) with our IFSD).

    Params: bus: an open Bus.  profile: name or t1.Profile.  clock: link clock (None:
        SystemClock).  ifsd: the largest INF we accept (None: the profile's maximum).
        max_wait_ms: bound on one block's wait, WTX included (None: the link's default,
            t1link.DEFAULT_MAX_WAIT_MS, 60 s).
    Returns: T1Link.  Raises: LinkError (the bus is left open: the caller owns it).
    """
    profile = profile_named(profile)
    link = T1Link(bus, profile, clock, ifsd=profile.max_ifs if ifsd is None else ifsd,
                  max_wait_ms=DEFAULT_MAX_WAIT_MS if max_wait_ms is None else max_wait_ms)
    link.open()
    return link


def open_se(bus, profile="gp", clock=None, ifsd=DEFAULT_IFSD, timeout_ms=None,
            max_wait_ms=None, select=True):
    """Open the whole stack on a bus URI or an open Bus.

    Params: bus: a bus URI (device/bus.py grammar) or an open Bus object (then closing the
            stack closes it too).  profile: T=1' profile name or object.  clock: link
            clock.  ifsd: see open_link.  timeout_ms: the sim socket's timeout when the
            URI does not say (None: the backend default).  max_wait_ms: the link's bound
            per block.  select: SELECT the applet (the usual case).
    Returns: SeStack (close it; a context manager on CPython).
    Raises: BusUriError, BusError (cannot open), LinkError, ApduError (SELECT refused).
        Whatever was opened before the failure is closed again.
    """
    if isinstance(bus, str):
        from fleetid.device.bus import open_bus, parse_bus_uri

        parsed = parse_bus_uri(bus)
        if timeout_ms is not None and parsed.backend == "sim" \
                and "timeout_ms" not in parsed.options:
            parsed.options["timeout_ms"] = str(timeout_ms)
        bus = open_bus(parsed)
    try:
        link = open_link(bus, profile, clock, ifsd, max_wait_ms)
    except BaseException:
        bus.close()
        raise
    stack = SeStack(bus, link)
    if select:
        try:
            stack.se.select()
        except BaseException:
            stack.close()
            raise
    return stack
