# Bus URIs and open_bus(): pick a bus backend from one string.  Portable: CPython and
# MicroPython (the backend modules are imported only when their scheme is used, so a
# MicroPython board never loads the Linux backend and the other way round).
#
# Every backend is a duck-typed Bus (device/bus_sim.py, device/host/bus_linux.py,
# device/bus_machine.py; SCHEMES below maps each backend:transport to its module):
#     bus.write(frame) -> None    one write transaction; BusNack when the SE is busy
#     bus.read(n) -> bytes        one read transaction of exactly n bytes; BusNack when busy
#     bus.reset() -> None         hardware reset / power cycle where the backend can
#     bus.close() -> None
#
# URI grammar (a query string of key=value options may follow, after "?"):
#     sim:unix:/path/to/se.sock           the emulator's Unix socket
#     sim:tcp:HOST:PORT                   the emulator on TCP (IPv6: sim:tcp:[::1]:7050)
#     linux:i2c:/dev/i2c-N:ADDR           Linux i2c-dev, 7-bit address (0x48 or 72)
#     linux:spi:/dev/spidevB.C            Linux spidev
#     machine:i2c:ID:ADDR                 MicroPython machine.I2C(ID)
#     machine:spi:ID:CS_PIN               MicroPython machine.SPI(ID), chip select on a Pin
# Options: timeout_ms (sim), hz / freq (linux:spi, machine), mode (spi).

from fleetid.common.errors import FleetidError


class BusUriError(FleetidError):
    """A bus URI that does not parse.  `uri` holds the offending string.  Not a ValueError
    (it was): MicroPython allows one native exception base, and this module is portable."""

    def __init__(self, uri, detail):
        super().__init__("bad bus URI %r: %s" % (uri, detail))
        self.uri = uri
        self.detail = detail


class BusUri:
    """A parsed bus URI.

    Attributes: uri (the original string), backend ("sim", "linux", "machine"),
    transport ("unix", "tcp", "i2c", "spi"), path (unix socket or device node, else None),
    host, port (tcp), bus_id (machine), address (7-bit I2C address), cs_pin (machine SPI),
    options (dict of str -> str from the query string).
    """

    def __init__(self, uri, backend, transport):
        self.uri = uri
        self.backend = backend
        self.transport = transport
        self.path = None
        self.host = None
        self.port = None
        self.bus_id = None
        self.address = None
        self.cs_pin = None
        self.options = {}

    def option_int(self, name, default):
        """Return integer option `name` (decimal or 0x hex), or `default` when absent.

        Raises: BusUriError when the value is not an integer.
        """
        if name not in self.options:
            return default
        return _parse_int(self.uri, name, self.options[name], 0, 0x7FFFFFFF)

    def __repr__(self):
        return "BusUri(%r)" % self.uri


def _parse_int(uri, name, text, low, high):
    try:
        if text[:2] in ("0x", "0X"):
            value = int(text[2:], 16)
        else:
            value = int(text, 10)
    except ValueError:
        raise BusUriError(uri, "%s must be an integer, got %r" % (name, text))
    if value < low or value > high:
        raise BusUriError(uri, "%s must be %d..%d" % (name, low, high))
    return value


def _split_query(uri, text):
    # "a?k=v&k2=v2" -> ("a", {"k": "v", "k2": "v2"})
    qpos = text.find("?")
    if qpos < 0:
        return text, {}
    options = {}
    for item in text[qpos + 1 :].split("&"):
        if not item:
            continue
        eq = item.find("=")
        if eq <= 0:
            raise BusUriError(uri, "option %r is not key=value" % item)
        options[item[:eq]] = item[eq + 1 :]
    return text[:qpos], options


# 7-bit I2C addresses 0x00-0x07 and 0x78-0x7F are reserved (I2C-bus spec UM10204 3.1.12).
_I2C_ADDR_MIN = 0x08
_I2C_ADDR_MAX = 0x77


def _split_last(uri, rest, what):
    pos = rest.rfind(":")
    if pos <= 0 or pos == len(rest) - 1:
        raise BusUriError(uri, "expected <%s>" % what)
    return rest[:pos], rest[pos + 1 :]


# -- the scheme table -------------------------------------------------------------------
#
# One row per (backend, transport): the module that opens it (imported by name, only when
# a URI of that scheme is opened: `__import__` with a fromlist returns the module itself on
# CPython and MicroPython alike), the function that reads the target part of the URI into
# the BusUri, and the function that opens it from the imported module.  The `linux` module
# is CPython-only and sits in device/host/ (never frozen into firmware); naming it here
# keeps the one URI grammar in one place, and a MicroPython board never imports it.
# A tuple, not a dict, so the order of the "unknown backend" message is the same on both
# interpreters.  A new backend is one module plus one row.


def _target_path(parsed, rest):
    parsed.path = rest


def _target_tcp(parsed, rest):
    uri = parsed.uri
    host, port = _split_last(uri, rest, "host>:<port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise BusUriError(uri, "empty host")
    parsed.host = host
    parsed.port = _parse_int(uri, "port", port, 1, 65535)


def _target_linux_i2c(parsed, rest):
    uri = parsed.uri
    path, addr = _split_last(uri, rest, "/dev/i2c-N>:<address")
    parsed.path = path
    parsed.address = _parse_int(uri, "address", addr, _I2C_ADDR_MIN, _I2C_ADDR_MAX)


def _target_machine_i2c(parsed, rest):
    uri = parsed.uri
    bus_id, addr = _split_last(uri, rest, "id>:<address")
    parsed.bus_id = _parse_int(uri, "bus id", bus_id, 0, 255)
    parsed.address = _parse_int(uri, "address", addr, _I2C_ADDR_MIN, _I2C_ADDR_MAX)


def _target_machine_spi(parsed, rest):
    uri = parsed.uri
    bus_id, pin = _split_last(uri, rest, "id>:<cs pin")
    parsed.bus_id = _parse_int(uri, "bus id", bus_id, 0, 255)
    parsed.cs_pin = _parse_int(uri, "cs pin", pin, 0, 255)


def _open_sim_unix(mod, parsed):
    return mod.connect_unix(parsed.path, parsed.option_int("timeout_ms", mod.DEFAULT_TIMEOUT_MS))


def _open_sim_tcp(mod, parsed):
    return mod.connect_tcp(parsed.host, parsed.port,
                           parsed.option_int("timeout_ms", mod.DEFAULT_TIMEOUT_MS))


def _open_linux_i2c(mod, parsed):
    return mod.LinuxI2cBus(parsed.path, parsed.address)


def _open_linux_spi(mod, parsed):
    return mod.LinuxSpiBus(parsed.path, speed_hz=parsed.option_int("hz", mod.SPI_DEFAULT_HZ),
                           mode=parsed.option_int("mode", 0))


def _open_machine_i2c(mod, parsed):
    return mod.open_i2c(parsed.bus_id, parsed.address,
                        parsed.option_int("freq", mod.I2C_DEFAULT_HZ))


def _open_machine_spi(mod, parsed):
    return mod.open_spi(parsed.bus_id, parsed.cs_pin,
                        parsed.option_int("freq", mod.SPI_DEFAULT_HZ))


_SIM = "fleetid.device.bus_sim"
_LINUX = "fleetid.device.host.bus_linux"
_MACHINE = "fleetid.device.bus_machine"

# (backend, transport, module, read the target, open)
SCHEMES = (
    ("sim", "unix", _SIM, _target_path, _open_sim_unix),
    ("sim", "tcp", _SIM, _target_tcp, _open_sim_tcp),
    ("linux", "i2c", _LINUX, _target_linux_i2c, _open_linux_i2c),
    ("linux", "spi", _LINUX, _target_path, _open_linux_spi),
    ("machine", "i2c", _MACHINE, _target_machine_i2c, _open_machine_i2c),
    ("machine", "spi", _MACHINE, _target_machine_spi, _open_machine_spi),
)


def _scheme(uri, backend, transport):
    for row in SCHEMES:
        if row[0] == backend and row[1] == transport:
            return row
    raise BusUriError(uri, "unknown backend/transport %s:%s (%s)" % (
        backend, transport, ", ".join(row[0] + ":" + row[1] for row in SCHEMES)))


def parse_bus_uri(uri):
    """Parse a bus URI (grammar at the top of this module).

    Params: uri: str.
    Returns: BusUri.
    Raises: BusUriError (a FleetidError) naming what is wrong.
    """
    if not isinstance(uri, str) or not uri:
        raise BusUriError(uri, "empty")
    body, options = _split_query(uri, uri)
    parts = body.split(":", 2)
    if len(parts) < 3 or not parts[2]:
        raise BusUriError(uri, "expected <backend>:<transport>:<target>")
    backend, transport, rest = parts
    scheme = _scheme(uri, backend, transport)
    parsed = BusUri(uri, backend, transport)
    parsed.options = options
    scheme[3](parsed, rest)
    return parsed


def open_bus(uri):
    """Open the bus a URI names.

    Params: uri: str (see the module header) or an already parsed BusUri.
    Returns: a Bus (write/read/reset/close).
    Raises: BusUriError for a malformed URI; BusError when the bus cannot be opened
        (no socket there, no device node, permission denied, address in use by a driver).
    """
    parsed = uri if isinstance(uri, BusUri) else parse_bus_uri(uri)
    scheme = _scheme(parsed.uri, parsed.backend, parsed.transport)
    module = __import__(scheme[2], None, None, ("_",))
    return scheme[4](module, parsed)
