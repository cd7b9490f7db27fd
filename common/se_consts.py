# fleetid SE applet: the command set, as both sides (emulator applet in sim/,
# SE client in device/) must agree on it. Portable: CPython and MicroPython.
#
# Conventions (ISO/IEC 7816-4 section 5):
#   CLA 0x80 proprietary, 0x84 when wrapped by SCP03 (GP Amd D 6.2.1, bit b3 = secure messaging).
#   Short and extended APDUs are both accepted; responses larger than 256 bytes need an
#   extended Le (0x000000).  The client picks extended encoding automatically.
#
# Command table (P1/P2 and data layout per command; all integers big-endian):
#
#   SELECT            00 A4 04 00 Lc=AID Le        -> TLV 0x6F FCI (tag 0x84 AID, tag 0x85 applet version u16)
#   GET DATA          80 CA  tag(hi) tag(lo)  Le   -> value of DATA_* tag below
#   GENERATE KEY      80 46  slot  CURVE_P256  Lc=1 policy  -> 65-byte uncompressed point 04||X||Y
#   GET PUBLIC KEY    80 48  slot  00          Le  -> 1-byte policy || 65-byte point
#   DELETE KEY        80 4A  slot  00              -> (empty)
#   SIGN              80 2A  slot  00  Lc=32 digest -> DER ECDSA-Sig-Value (SEQUENCE{r,s})
#   VERIFY            80 2C  slot|VERIFY_WITH_POINT  00  data = TLVs (1-byte tag, 1-byte len):
#                         TAG_POINT (65 B, only with VERIFY_WITH_POINT), TAG_DIGEST (32 B),
#                         and exactly one of TAG_SIG_DER (DER) / TAG_SIG_RAW (64 B r||s)
#                     -> 9000 valid, SW_VERIFY_FAILED (0x6300) does not verify, 0x6A80 malformed
#                        (bad DER, point not on the curve, r or s out of [1, n-1])
#   ECDH              80 86  slot  00  Lc=65 peer point -> 32-byte shared X coordinate
#   ATTEST            80 3A  slot  00  Lc=nonce (1..64 B)  -> DER SignedAttestation (see
#                     common/attestation.py and common/host/asn1.py), signed by the MAK
#   PUT CERT          80 DA  slot  00  Lc=DER cert (extended if > 255) -> (empty)
#   GET CERT          80 CB  slot  00  Le          -> DER cert
#   COUNTER           80 32  counter-id  COUNTER_READ|COUNTER_INCREMENT|COUNTER_ADVANCE
#                         data: empty, or (ADVANCE) u32 target; advance to max(cur, target),
#                         a target below the current value is refused 0x6A80
#                     -> u32 value after the operation
#   READ DATA OBJECT  80 B0  object-id  00  Le     -> stored bytes (0x6A88 if never written)
#   WRITE DATA OBJECT 80 D6  object-id  00  Lc=data (<= DATA_OBJECT_MAX) -> (empty); atomic
#   GET RANDOM        80 84  00 00  Le=n (1..256 short, up to 1024 extended) -> n random bytes
#   INITIALIZE UPDATE 80 50  KVN(0=any) 00  Lc=8 host challenge  Le -> 32 B (GP Amd D 7.1.1)
#   EXT AUTHENTICATE  84 82  security level 00  Lc=16 host cryptogram || C-MAC (GP Amd D 7.1.2)
#   PUT KEY           84 D8  old KVN (0 = add)  0x81  (GP CS 2.3 11.8; Amd D 7.2 for AES)
#                         data: new KVN || 3 x (0x88 0x11 0x10 <16 B key encrypted with DEK,
#                         AES-CBC, zero ICV> 0x03 <KCV 3 B>); KCV = first 3 B of
#                         AES(key, 16 x 0x01)  -> new KVN || 3 KCVs
#   STORE DATA        84 E2  P1 (bit 0x80 = last block)  block#  data = DGI(2) len(1) value
#                         DGIs below: trust anchors; refused once SECURED
#   SET STATUS        84 F0  0x80 (card)  new life-cycle state  (GP CS 2.3 11.10)
#
# PUT KEY, STORE DATA and SET STATUS are accepted only inside an authenticated SCP03
# session (C-MAC at least).  Before SECURED that is personalisation.  Once SECURED (SET
# STATUS may still move a SECURED card to CARD_LOCKED or TERMINATED), PUT KEY and STORE
# DATA are over-the-air administration: the session must be at SCP_LEVEL_OTA (0x33) and
# opened with the card's current (highest) key set, else 0x6982; PUT KEY must replace
# that set (P1 = its KVN, else 0x6985), in one atomic NVM commit.  Anything sent while
# TERMINATED gets 0x6985 except GET DATA of DATA_LIFE_CYCLE.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


# Applet identifier: proprietary RID 0xF0 (ISO/IEC 7816-5 "unregistered") + "fleetid" + 01.
AID = b"\xf0fleetid\x01"
APPLET_VERSION = const(0x0100)

CLA_ISO = const(0x00)
CLA_PROPRIETARY = const(0x80)
CLA_SECURE_MESSAGING = const(0x04)  # GP Amd D 6.2.1: CLA bit b3 set when wrapped

INS_SELECT = const(0xA4)
INS_GET_DATA = const(0xCA)
INS_GENERATE_KEY = const(0x46)
INS_GET_PUBLIC_KEY = const(0x48)
INS_DELETE_KEY = const(0x4A)
INS_SIGN = const(0x2A)
INS_VERIFY = const(0x2C)
INS_ECDH = const(0x86)
INS_ATTEST = const(0x3A)
INS_PUT_CERT = const(0xDA)
INS_GET_CERT = const(0xCB)
INS_COUNTER = const(0x32)
INS_READ_DATA_OBJECT = const(0xB0)
INS_WRITE_DATA_OBJECT = const(0xD6)
INS_GET_RANDOM = const(0x84)
INS_INITIALIZE_UPDATE = const(0x50)  # GP Amd D 7.1.1
INS_EXTERNAL_AUTHENTICATE = const(0x82)  # GP Amd D 7.1.2
INS_PUT_KEY = const(0xD8)  # GP CS 2.3 11.8
INS_STORE_DATA = const(0xE2)  # GP CS 2.3 11.11
INS_SET_STATUS = const(0xF0)  # GP CS 2.3 11.10

# Names used by latency profiles, logs and the CLI.
INS_NAMES = {
    INS_SELECT: "select",
    INS_GET_DATA: "get_data",
    INS_GENERATE_KEY: "generate_key",
    INS_GET_PUBLIC_KEY: "get_public_key",
    INS_DELETE_KEY: "delete_key",
    INS_SIGN: "sign",
    INS_VERIFY: "verify",
    INS_ECDH: "ecdh",
    INS_ATTEST: "attest",
    INS_PUT_CERT: "put_cert",
    INS_GET_CERT: "get_cert",
    INS_COUNTER: "counter",
    INS_READ_DATA_OBJECT: "read_data_object",
    INS_WRITE_DATA_OBJECT: "write_data_object",
    INS_GET_RANDOM: "get_random",
    INS_INITIALIZE_UPDATE: "initialize_update",
    INS_EXTERNAL_AUTHENTICATE: "external_authenticate",
    INS_PUT_KEY: "put_key",
    INS_STORE_DATA: "store_data",
    INS_SET_STATUS: "set_status",
}

# GET DATA tags (P1||P2).
DATA_SE_UID = const(0x0101)  # 16 bytes
DATA_FIRMWARE_VERSION = const(0x0102)  # 3 bytes: major, minor, patch
DATA_LIFE_CYCLE = const(0x0103)  # 1 byte, LC_* below
DATA_ATTESTATION_CHAIN = const(0x0104)  # DER certs concatenated: MAK cert first, then up to the vendor root
DATA_FREE_SLOTS = const(0x0105)  # 1 byte count of free key slots
DATA_SCP_INFO = const(0x0106)  # KVN list (1 B each) of loaded SCP03 key sets
DATA_SCP_FAILURES = const(0x0107)  # u16 count of refused SCP03 authentications (cryptogram or MAC)
DATA_SEQUENCE_COUNTER = const(0x0108)  # u24 SCP03 sequence counter
DATA_TRUST_FLEET_ROOT = const(0x0111)  # value of DGI_FLEET_ROOT
DATA_TRUST_FIRMWARE_KEY = const(0x0112)  # value of DGI_FIRMWARE_KEY
DATA_TRUST_SERVER_ROOT = const(0x0113)  # value of DGI_SERVER_ROOT
DATA_TRUST_FIRMWARE_CERT_A = const(0x0114)  # value of DGI_FIRMWARE_CERT_A
DATA_TRUST_FIRMWARE_CERT_B = const(0x0115)  # value of DGI_FIRMWARE_CERT_B

# STORE DATA DGIs (trust anchors, public).
DGI_FLEET_ROOT = const(0x7F01)  # DER certificate of the fleet root CA
DGI_FIRMWARE_KEY = const(0x7F02)  # 65-byte uncompressed P-256 point of the firmware-signing key
DGI_SERVER_ROOT = const(0x7F03)  # DER certificate of the server root CA
# Firmware-signing certificates under the fleet root (device/fwkeys.py): two places, so a
# rotation installs the new one beside the old (both accepted) before the old is revoked.
# Once either is written, signed boot ignores the bare DGI_FIRMWARE_KEY point.
DGI_FIRMWARE_CERT_A = const(0x7F04)
DGI_FIRMWARE_CERT_B = const(0x7F05)

# Key slots.  Slot 0 holds the MAK (made at chip fab; ATTEST-only, never SIGN from the host).
SLOT_MAK = const(0x00)
SLOT_IDENTITY = const(0x01)  # device identity key (factory line)
SLOT_OPERATIONAL_A = const(0x02)  # operational keys: rotation uses A and B alternately
SLOT_OPERATIONAL_B = const(0x03)
SLOT_COUNT = const(16)  # slots 0..15
CURVE_P256 = const(0x03)
VERIFY_WITH_POINT = const(0xFF)  # VERIFY P1: public key given in the data field

# Key policy flags (1 byte), also carried in the attestation statement.
POLICY_SIGN = const(0x01)
POLICY_ECDH = const(0x02)
POLICY_ATTEST = const(0x04)  # only the MAK has it
POLICY_NON_EXPORTABLE = const(0x40)  # always set: no command exports a private key
POLICY_GENERATED_ON_CHIP = const(0x80)  # set by GENERATE KEY; the MAK has it too

# VERIFY data TLV tags.
TAG_POINT = const(0x41)
TAG_DIGEST = const(0x42)
TAG_SIG_DER = const(0x43)
TAG_SIG_RAW = const(0x44)

# COUNTER P2.
COUNTER_READ = const(0x00)
COUNTER_INCREMENT = const(0x01)
COUNTER_ADVANCE = const(0x02)
COUNTER_COUNT = const(4)  # counters 0..3
COUNTER_FIRMWARE = const(0x00)  # anti-rollback counter for signed boot

DATA_OBJECT_COUNT = const(16)  # objects 0..15
DATA_OBJECT_MAX = const(1024)  # bytes per object
DATA_OBJECT_ROTATION_JOURNAL = const(0x00)
DATA_OBJECT_CRL_NUMBER = const(0x01)  # highest verified cRLNumber (device/crl_cache.py)
DATA_OBJECT_MQTT_SEQ = const(0x02)  # highest cloud command number taken (device/mqtt.py)
DATA_OBJECT_REVSET_NUMBER = const(0x03)  # highest verified compact set (device/revset_cache.py)
DATA_OBJECT_ROOT_CRL_NUMBER = const(0x04)  # the fleet root's CRL (device/board.root_crl_cache)
ATTEST_NONCE_MAX = const(64)
CERT_MAX = const(2048)
GET_RANDOM_MAX = const(1024)

# GlobalPlatform card life cycle (GP CS 2.3 11.1.1, Table 11-3).
LC_OP_READY = const(0x01)
LC_INITIALIZED = const(0x07)
LC_SECURED = const(0x0F)
LC_CARD_LOCKED = const(0x7F)
LC_TERMINATED = const(0xFF)
LC_NAMES = {
    LC_OP_READY: "OP_READY",
    LC_INITIALIZED: "INITIALIZED",
    LC_SECURED: "SECURED",
    LC_CARD_LOCKED: "CARD_LOCKED",
    LC_TERMINATED: "TERMINATED",
}

# SCP03 (GP Amd D).
SCP03_KVN_TRANSPORT = const(0x30)  # key set loaded at chip fab
SCP03_KVN_DEVICE = const(0x31)  # per-device key set put by the factory line
SCP_LEVEL_CMAC = const(0x01)
SCP_LEVEL_CDEC = const(0x02)
SCP_LEVEL_RMAC = const(0x10)
SCP_LEVEL_RENC = const(0x20)
SCP_LEVEL_OTA = const(0x33)  # C-MAC | C-DEC | R-MAC | R-ENC: required for admin once SECURED
SCP03_FAILURE_LIMIT = const(80)  # refused authentications before INITIALIZE UPDATE answers 0x6983

# Status words (ISO/IEC 7816-4 5.1.3, GP CS 2.3 11.1.3).
SW_OK = const(0x9000)
SW_VERIFY_FAILED = const(0x6300)
SW_WRONG_LENGTH = const(0x6700)
SW_SECURITY_STATUS = const(0x6982)
SW_AUTH_BLOCKED = const(0x6983)
SW_CONDITIONS = const(0x6985)
SW_SM_MISSING = const(0x6987)
SW_SM_INCORRECT = const(0x6988)
SW_WRONG_DATA = const(0x6A80)
SW_FUNC_NOT_SUPPORTED = const(0x6A81)
SW_NOT_ENOUGH_MEMORY = const(0x6A84)
SW_INCORRECT_P1P2 = const(0x6A86)
SW_REF_NOT_FOUND = const(0x6A88)
SW_ALREADY_EXISTS = const(0x6A89)
SW_WRONG_P1P2 = const(0x6B00)
SW_INS_NOT_SUPPORTED = const(0x6D00)
SW_CLA_NOT_SUPPORTED = const(0x6E00)
SW_UNKNOWN = const(0x6F00)

# Transient key object (RAM only, as real SEs have): GENERATE KEY / ECDH / GET PUBLIC KEY /
# DELETE KEY with P1 = SLOT_TRANSIENT address one P-256 key pair held in the applet's RAM,
# never in NVM.  GENERATE KEY replaces it (no ALREADY_EXISTS: it is ephemeral by design);
# the policy must be ECDH only; power loss, reset or DELETE KEY erase it.  Used for the
# TLS 1.3 ECDHE share (common/tls13.py) so a handshake writes no NVM.
SLOT_TRANSIENT = const(0x80)
