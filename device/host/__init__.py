"""CPython-only adapters of the device agent (Linux host process): TLS and HTTP clients
whose private-key operations run in the secure element.  Not part of the portable core:
these modules use tlslite-ng and `cryptography`, which MicroPython does not have.
"""
