"""CPython-only adapters of the device agent (Linux host process): TLS and HTTP clients
whose private-key operations run in the secure element, and the `linux` bus backend
(bus_linux.py: i2c-dev and spidev ioctls).  Not part of the portable core: these modules
use tlslite-ng, `cryptography`, fcntl and ctypes, which MicroPython does not have; being a
sub-package, this folder is never frozen into board firmware (boards/fleetid_manifest.py).
"""
