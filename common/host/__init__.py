"""CPython-only helpers shared by the emulator, the cloud and the CLI.

Nothing in the portable core (`fleetid.common`, `fleetid.device`) may import this
package: it uses `cryptography` and `asn1crypto`, which MicroPython does not have.
"""
