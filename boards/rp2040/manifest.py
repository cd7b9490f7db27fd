# RP2040 (Raspberry Pi Pico / Pico W) firmware with fleetid frozen in.  Build from a
# MicroPython checkout:
#   make -C ports/rp2 BOARD=RPI_PICO FROZEN_MANIFEST=/path/to/fleetid/boards/rp2040/manifest.py
# The port's own manifest first, then fleetid.common and fleetid.device (see
# ../fleetid_manifest.py).  The SE is reached with fleetid.device.bus_machine
# (machine.I2C(0, scl=Pin(5), sda=Pin(4), freq=400000) or machine.SPI + a CS pin).
include("$(PORT_DIR)/boards/manifest.py")
include("../fleetid_manifest.py")
