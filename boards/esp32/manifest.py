# ESP32 firmware with fleetid frozen in.  Build from a MicroPython checkout:
#   make -C ports/esp32 BOARD=ESP32_GENERIC FROZEN_MANIFEST=/path/to/fleetid/boards/esp32/manifest.py
# The port's own manifest (asyncio, network helpers ...) first, then fleetid.common and
# fleetid.device (see ../fleetid_manifest.py).  The SE is reached with
# fleetid.device.bus_machine (machine.I2C, e.g. I2C(0, scl=Pin(22), sda=Pin(21), freq=400000)).
include("$(PORT_DIR)/boards/manifest.py")
include("../fleetid_manifest.py")
