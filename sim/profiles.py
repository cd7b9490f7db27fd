"""Latency profiles of secure-element classes, for the emulator's bus endpoint.

The endpoint charges `op_ms(name)` for each command (name from se_consts.INS_NAMES),
`nvm_write_ms(nbytes)` for what the command wrote, and bus transfer time at `bus_hz`
(9 clocks per byte on I2C: 8 data bits + ACK).

Figures are typical execution times of the chip classes, rounded; they model orders of
magnitude for benchmarks, not a particular part's datasheet maximums:

- "atecc608": Microchip ATECC608-class (datasheet command execution-time table, typical
  values): Sign 115 ms, Verify 105 ms, GenKey 115 ms, ECDH 75 ms; Random, Counter, Info,
  Read ~ 1-25 ms; NVM Write ~ 26 ms per 32-byte block; I2C fast-mode plus 1 MHz.
- "optiga": Infineon OPTIGA Trust M-class (datasheet performance table, typical):
  sign ~ 60 ms, verify ~ 85 ms, key-pair generation ~ 75 ms, ECDH ~ 60 ms; ~ 18 ms per
  100 bytes of NVM data-object write; I2C 400 kHz.
- "se050": NXP SE050-class (application-note performance figures, approximate):
  ECDSA P-256 sign ~ 50 ms, verify ~ 50 ms, key generation ~ 60 ms, ECDH ~ 40 ms;
  ~ 10 ms per 100 B NVM write; I2C fast-mode plus 1 MHz (3.4 MHz high-speed mode exists
  but is not modelled).
- "none": zero latency, for measuring host-side cost only; bus_hz 0 means "no bus time".
"""

import math


class LatencyProfile:
    """Latency figures of one SE class.

    Attributes: name, bus_hz (I2C clock in Hz; 0 = instantaneous bus).
    """

    def __init__(self, name, bus_hz, ops_ms, nvm_ms_per_100_bytes=0.0, nvm_ms_min=0.0):
        self.name = name
        self.bus_hz = bus_hz
        self._ops_ms = dict(ops_ms)
        self._nvm_ms_per_100 = float(nvm_ms_per_100_bytes)
        self._nvm_ms_min = float(nvm_ms_min)

    def op_ms(self, op_name):
        """Execution time of a command, in ms (0.0 for commands the profile does not know)."""
        return float(self._ops_ms.get(op_name, 0.0))

    def nvm_write_ms(self, nbytes):
        """Time to write `nbytes` of NVM, in ms (0.0 for no bytes)."""
        if nbytes <= 0 or self._nvm_ms_per_100 == 0.0:
            return 0.0
        return max(self._nvm_ms_min, self._nvm_ms_per_100 * math.ceil(nbytes / 100.0))

    def bus_ms(self, nbytes):
        """Time to move `nbytes` over I2C (9 clocks per byte), in ms."""
        if self.bus_hz <= 0:
            return 0.0
        return nbytes * 9 * 1000.0 / self.bus_hz

    def __repr__(self):
        return "LatencyProfile(%r)" % self.name


# Small operations common to every class (a few ms or less).
_SMALL_OPS = {
    "select": 1.0,
    "get_data": 1.0,
    "get_public_key": 2.0,
    "get_cert": 2.0,
    "read_data_object": 2.0,
    "counter": 3.0,
    "get_random": 3.0,
    "delete_key": 5.0,
    "put_cert": 5.0,
    "write_data_object": 5.0,
    "initialize_update": 5.0,
    "external_authenticate": 5.0,
    "put_key": 10.0,
    "store_data": 5.0,
    "set_status": 5.0,
}


def _ops(**big):
    ops = dict(_SMALL_OPS)
    ops.update(big)
    return ops


_PROFILES = {
    "none": LatencyProfile("none", 0, {}),
    # Microchip ATECC608-class, typical execution times; I2C 1 MHz.  Its NVM writes are
    # per 32-byte block (~ 26 ms): ~ 80 ms per 100 B, floor one block.
    "atecc608": LatencyProfile(
        "atecc608",
        1_000_000,
        _ops(sign=115.0, verify=105.0, generate_key=115.0, ecdh=75.0, attest=115.0,
             get_random=23.0, counter=20.0),
        nvm_ms_per_100_bytes=80.0,
        nvm_ms_min=26.0,
    ),
    # Infineon OPTIGA Trust M-class; I2C 400 kHz; ~ 18 ms per 100 B of NVM write.
    "optiga": LatencyProfile(
        "optiga",
        400_000,
        _ops(sign=60.0, verify=85.0, generate_key=75.0, ecdh=60.0, attest=60.0),
        nvm_ms_per_100_bytes=18.0,
    ),
    # NXP SE050-class, approximate published-order figures; I2C 1 MHz.
    "se050": LatencyProfile(
        "se050",
        1_000_000,
        _ops(sign=50.0, verify=50.0, generate_key=60.0, ecdh=40.0, attest=50.0),
        nvm_ms_per_100_bytes=10.0,
    ),
}

NAMES = tuple(sorted(_PROFILES))


def get(name):
    """The LatencyProfile called `name` (one of NAMES).

    Raises: ValueError for an unknown name (the message lists the known ones)."""
    try:
        return _PROFILES[name]
    except (KeyError, TypeError):
        known = ", ".join(NAMES)
        raise ValueError("unknown latency profile %r (known: %s)" % (name, known)) from None
