"""CPython-only adapters of the device agent (Linux host process): the socket, HTTPS and
MQTT drivers of the portable TLS 1.3 client (whose private-key operations run in the
secure element), and the `linux` bus backend (bus_linux.py: i2c-dev and spidev ioctls).
Not part of the portable core: these modules use CPython's socket/threading/http.client,
`cryptography`, paho-mqtt, fcntl and ctypes, which MicroPython does not have; being a
sub-package, this folder is never frozen into board firmware (boards/fleetid_manifest.py).
"""
