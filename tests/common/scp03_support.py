"""The OpenSCP SCP03 transcript (tests/vectors/scp03/openscp-aes128-s8.json: AES-128, S8,
level 0x33), parsed once for the host tests (tests/common/test_scp03.py) and the card
tests (tests/sim/test_scp03_card.py)."""

from fleetid.common import scp03
from fleetid.common.host.hostcrypto import CryptographyPrimitives
from tests.conftest import load_vectors

PRIMS = CryptographyPrimitives()
VECTOR = load_vectors("scp03/openscp-aes128-s8.json")
# The vector's static ENC and MAC keys (its DEK is not exercised), key version 0x30.
STATIC = scp03.StaticKeys(
    bytes.fromhex(VECTOR["static_keys"]["enc"]),
    bytes.fromhex(VECTOR["static_keys"]["mac"]),
    bytes(16),
    0x30,
)
HOST_CHALLENGE = bytes.fromhex(VECTOR["host_challenge"])
INIT_UPDATE_DATA = bytes.fromhex(VECTOR["initialize_update_response_data"])
# INITIALIZE UPDATE response data (GP Amd D 7.1.1.6): diversification data(10) | key
# info(3) | card challenge(8) | card cryptogram(8) | sequence counter(3).
CARD_CHALLENGE = INIT_UPDATE_DATA[13:21]
EXT_AUTH = bytes.fromhex(VECTOR["external_authenticate_command"])
GET_STATUS_WRAPPED = bytes.fromhex(VECTOR["wrapped_commands"][0]["c_apdu"])
GET_STATUS_RESPONSE = bytes.fromhex(VECTOR["wrapped_commands"][0]["r_apdu"])
