# The fleetid device agent on an RP2040 (MicroPython, fleetid frozen in with manifest.py).
# Copy to the board's file system as main.py.  The loop, the SE stack, the signed-boot
# check, the CRL cache and the network are all in the firmware (fleetid.device.board.run
# with fleetid.device.board_net: HTTPS over the portable TLS 1.3 client whose keys stay in
# the SE); this file holds only this board's constants, which run_constants hands to it.
# The board's boot.py brings the network interface up and sets the clock by NTP first
# (docs/INTEGRATING.md).
# NET_MODULE names the network module: an integrator's own (a board_net.py beside this
# file, the contract at the top of fleetid/device/board.py) replaces the shipped one.
# A Pico without Wi-Fi has no `socket`: use a Pico W, or an integrator's NET_MODULE.

from fleetid.device.board import run_constants

BUS = "machine:i2c:0:0x48"  # machine.I2C(0) (GP4 SDA, GP5 SCL on a Pico); SE050-class at 0x48
T1_PROFILE = "se05x"
INTERVAL_S = 3600  # at most this long between agent cycles
RENEW_FRACTION = 0.66  # renew when this fraction of the certificate's validity has passed
RENEW_MARGIN_S = 0  # ... or this many seconds before notAfter (0: off)
BOOT_IMAGE = None  # path of the MCUboot image to check before connecting (None: off)
BOOT_MAX_SIZE = None  # its slot size (None: fleetid.device.boot.DEFAULT_MAX_SIZE)
CRL_ISSUER = None  # issuing CA certificate (DER file) whose CRL is cached (None: off)
CRL_CACHE_PATH = None  # file holding the cached CRL (required with CRL_ISSUER)
CRL_GRACE_S = 86400  # seconds a CRL stays usable after its nextUpdate
CRL_FAIL_OPEN = False  # with no fresh CRL, do not treat peers as revoked
NET_MODULE = "fleetid.device.board_net"  # the shipped network (socket + SE-keyed TLS 1.3)
VERIFIER_URL = "https://fleet.example.net:8443"  # fleetid cloud serve: the verifier
EST_URL = "https://fleet.example.net:8444"  # ... and EST (RFC 7030)
SERVER_NAME = None  # name or IP the servers' certificates carry (None: the URLs' host)

run_constants(globals())  # each NAME is fleetid.device.board.run's parameter `name`
