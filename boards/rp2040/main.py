# The fleetid device agent on an RP2040 (MicroPython, fleetid frozen in with manifest.py).
# Copy to the board's file system as main.py, beside a board_net.py that provides the
# network and the clock: make_net(se) and make_clock(), the contract at the top of
# fleetid/device/board.py (device/board.py in this repository).  The loop, the SE stack,
# the signed-boot check and the CRL cache are all in the firmware (fleetid.device.board.run);
# this file holds only this board's constants.
#
# No board_net.py ships here: its TLS client must sign the CertificateVerify in the SE,
# which MicroPython's ssl cannot; a portable TLS 1.3 client for that is being written
# separately, and a board_net on top of it comes with it.

from fleetid.device.board import run

BUS = "machine:i2c:0:0x48"  # machine.I2C(0) (GP4 SDA, GP5 SCL on a Pico); SE050-class at 0x48
T1_PROFILE = "se05x"
INTERVAL_S = 3600  # at most this long between agent cycles
RENEW_FRACTION = 0.66  # renew when this fraction of the certificate's validity has passed
RENEW_MARGIN_S = 0  # ... or this many seconds before notAfter (0: off)
BOOT_IMAGE = None  # path of the MCUboot image to check before connecting (None: off)
BOOT_MAX_SIZE = None  # its slot size (None: fleetid.device.boot.DEFAULT_MAX_SIZE)
CRL_ISSUER = None  # issuing CA certificate (DER file) whose CRL is cached (None: off)
CRL_CACHE = None  # file holding the cached CRL (required with CRL_ISSUER)
CRL_GRACE_S = 86400  # seconds a CRL stays usable after its nextUpdate
CRL_FAIL_OPEN = False  # with no fresh CRL, do not treat peers as revoked

run(BUS, T1_PROFILE, INTERVAL_S, boot_image=BOOT_IMAGE, boot_max_size=BOOT_MAX_SIZE,
    crl_issuer=CRL_ISSUER, crl_cache_path=CRL_CACHE, crl_grace_s=CRL_GRACE_S,
    crl_fail_open=CRL_FAIL_OPEN, renew_fraction=RENEW_FRACTION, renew_margin_s=RENEW_MARGIN_S)
