"""fleetid.common.scp03 runs unchanged under MicroPython and gives CPython's bytes.

The host side is driven through the OpenSCP vector (tests/vectors/scp03/) with primitives
built on MicroPython's own `cryptolib` AES (ECB/CBC) and a CMAC written for the test (NIST
SP 800-38B subkeys), the way a board without an SE-side AES would do it.  The portable core
is staged as fleetid/common/*.mpy, as firmware carries it (tests/micropython/support.py),
at its heap budget (tests/micropython/budgets.py).
"""

import pytest

from tests.conftest import load_vectors
from tests.micropython.support import PRELUDE, Stage

pytestmark = pytest.mark.micropython

SCRIPT = r"""
import os

import cryptolib

from fleetid.common import scp03
from fleetid.common.errors import SecureChannelError

_MASK = (1 << 128) - 1


def _dbl(block):
    n = int.from_bytes(block, "big") << 1
    if n >> 128:
        n = (n & _MASK) ^ 0x87
    return n.to_bytes(16, "big")


class CryptolibPrimitives:
    def aes_ecb_encrypt(self, key, block):
        return cryptolib.aes(key, 1).encrypt(block)

    def aes_cbc_encrypt(self, key, iv, data):
        return cryptolib.aes(key, 2, iv).encrypt(data)

    def aes_cbc_decrypt(self, key, iv, data):
        return cryptolib.aes(key, 2, iv).decrypt(data)

    def cmac(self, key, data):
        k1 = _dbl(self.aes_ecb_encrypt(key, bytes(16)))
        n = (len(data) + 15) // 16
        if n and len(data) % 16 == 0:
            last = bytes(a ^ b for a, b in zip(data[16 * (n - 1):], k1))
        else:
            k2 = _dbl(k1)
            n = max(n, 1)
            tail = bytearray(data[16 * (n - 1):])
            tail.append(0x80)
            while len(tail) < 16:
                tail.append(0)
            last = bytes(a ^ b for a, b in zip(tail, k2))
        ecb = cryptolib.aes(key, 1)
        x = bytes(16)
        for i in range(n - 1):
            x = ecb.encrypt(bytes(a ^ b for a, b in zip(x, data[16 * i:16 * i + 16])))
        return cryptolib.aes(key, 1).encrypt(bytes(a ^ b for a, b in zip(x, last)))

    def random(self, n):
        return os.urandom(n)


class Link:
    def __init__(self, responses):
        self.responses = responses
        self.sent = []

    def transceive(self, apdu):
        self.sent.append(apdu)
        return self.responses.pop(0)


prims = CryptolibPrimitives()
print("cmac-rfc4493", h(prims.cmac(u("2b7e151628aed2a6abf7158809cf4f3c"),
                                   u("6bc1bee22e409f96e93d7e117393172a"))))
static = scp03.StaticKeys(u(ENC), u(MAC), bytes(16), 0x30)
link = Link([u(INIT) + b"\x90\x00", b"\x90\x00", u(RESP)])
host = scp03.Scp03Host(link, prims, scp03.static_session_keys_fn(prims, static), 0x33,
                       u(HOST_CHALLENGE))
host.open()
plain = host.transceive(u("80F22000024F00"))
print("ext-auth", h(link.sent[1]))
print("wrapped", h(link.sent[2]))
print("plain", h(plain))
print("counter", host.counter)
gc.collect()
bad = bytearray(u(INIT))
bad[25] ^= 1
try:
    scp03.Scp03Host(Link([bytes(bad) + b"\x90\x00"]), prims,
                    scp03.static_session_keys_fn(prims, static), 0x33, u(HOST_CHALLENGE)).open()
    print("bad-cryptogram accepted")
except SecureChannelError as e:
    print("bad-cryptogram", e.reason)
gc.collect()
print("done", gc.mem_free())
"""


def test_scp03_host_gives_openscp_bytes_under_micropython(tmp_path):
    stage = Stage(tmp_path)
    vector = load_vectors("scp03/openscp-aes128-s8.json")
    header = "ENC = %r\nMAC = %r\nINIT = %r\nRESP = %r\nHOST_CHALLENGE = %r\n" % (
        vector["static_keys"]["enc"], vector["static_keys"]["mac"],
        vector["initialize_update_response_data"], vector["wrapped_commands"][0]["r_apdu"],
        vector["host_challenge"])
    stdout = stage.run("run_scp03", header + PRELUDE + SCRIPT)
    out = dict(line.split(" ", 1) for line in stdout.splitlines())
    assert out["cmac-rfc4493"] == "070a16b46b4d4144f79bdd9dd04a287c"  # RFC 4493 example 2
    assert out["ext-auth"] == vector["external_authenticate_command"].lower()
    assert out["wrapped"] == vector["wrapped_commands"][0]["c_apdu"].lower()
    assert out["plain"].startswith("08a00000015141434c") and out["plain"].endswith("9000")
    assert out["counter"] == "2"
    assert out["bad-cryptogram"] == "card_cryptogram"
    assert int(out["done"]) > 0
