"""Test support for the HSM tests: throwaway SoftHSM2 tokens, soft keystores, and an
independent reference of the crypto the backends must reproduce.

The reference functions are written from the specs and the documented scheme (not by
calling fleetid.cloud.hsm.interface), so a mistake shared by both backends still shows.
"""

import hashlib
import os
import shutil
import struct
import subprocess

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFCMAC, CounterLocation, Mode

# The soft keystores' passphrase and scrypt cost: one definition, shared with the benches.
from bench._support import KEYSTORE_PASS  # noqa: F401 (re-exported)
from bench._support import SCRYPT_N as TEST_SCRYPT_N  # noqa: F401 (re-exported)
from tests.conftest import require

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN_LABEL = "fleetid"
USER_PIN = "user-pin-4711"
SO_PIN = "so-pin-0815"

# Known test key material (never use outside tests).
MASTER_KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
TRANSPORT_ENC = bytes.fromhex("404142434445464748494a4b4c4d4e4f")
TRANSPORT_MAC = bytes.fromhex("505152535455565758595a5b5c5d5e5f")
TRANSPORT_DEK = bytes.fromhex("606162636465666768696a6b6c6d6e6f")
UID_A = bytes.fromhex("0490a1b2c3d4e5f60718293a4b5c6d7e")
UID_B = bytes.fromhex("0490a1b2c3d4e5f60718293a4b5c6d7f")  # differs in the last bit only


def softhsm_present():
    return os.path.exists(SOFTHSM_MODULE) and shutil.which("softhsm2-util") is not None


def init_softhsm_token(directory, monkeypatch, label=TOKEN_LABEL, pin=USER_PIN):
    """Create a SoftHSM2 config + token under `directory`; point SOFTHSM2_CONF at it.

    Skips locally (fails under CI=true) when SoftHSM2 is not installed.
    Returns the token directory.
    """
    require(softhsm_present(), "SoftHSM2 (softhsm2-util and " + SOFTHSM_MODULE + ")")
    tokendir = directory / "tokens"
    tokendir.mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(
        "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n" % tokendir
    )
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label,
         "--so-pin", SO_PIN, "--pin", pin],
        check=True, capture_output=True, env=dict(os.environ, SOFTHSM2_CONF=str(conf)),
    )
    return tokendir


def files_bytes(path):
    """Concatenated contents of a file, or of every file under a directory."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read()
    out = b""
    for root, _dirs, names in os.walk(path):
        for name in sorted(names):
            with open(os.path.join(root, name), "rb") as f:
                out += f.read()
    return out


# -- reference crypto -----------------------------------------------------------------------


def aes_ecb(key, block):
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def aes_ecb_decrypt(key, block):
    dec = Cipher(algorithms.AES(key), modes.ECB()).decryptor()
    return dec.update(block) + dec.finalize()


def kcv(key):
    """GP Amd D 7.2: first 3 bytes of AES(key, 16 x 0x01)."""
    return aes_ecb(key, b"\x01" * 16)[:3]


def reference_device_keys(master, se_uid):
    """The documented scheme (cloud/hsm/interface.py), written out independently."""
    digest = hashlib.sha256(b"fleetid/scp03-div/v1" + se_uid).digest()[:15]
    return tuple(aes_ecb(master, digest + bytes((c,))) for c in (1, 2, 3))


def reference_kdf(key, constant, context, bits):
    """GP Amd D 6.2.1 KDF via cryptography's SP 800-108 KBKDF (counter in the middle)."""
    fixed = b"\x00" * 11 + bytes((constant, 0)) + struct.pack(">H", bits) + context
    kdf = KBKDFCMAC(algorithms.AES, Mode.CounterMode, bits // 8, 1, None,
                    CounterLocation.MiddleFixed, None, None, fixed, break_location=15)
    return kdf.derive(key)


def reference_session_keys(enc, mac, host_challenge, card_challenge):
    ctx = host_challenge + card_challenge
    return (reference_kdf(enc, 0x04, ctx, 128), reference_kdf(mac, 0x06, ctx, 128),
            reference_kdf(mac, 0x07, ctx, 128))


def decode_put_key(payload, dek):
    """Parse and decrypt a PUT KEY data field.  Returns (kvn, [(key, kcv), x3])."""
    assert len(payload) == 70, len(payload)
    kvn, out, pos = payload[0], [], 1
    for _ in range(3):
        assert payload[pos:pos + 3] == b"\x88\x11\x10", payload[pos:pos + 3].hex()
        key = aes_ecb_decrypt(dek, payload[pos + 3:pos + 19])
        assert payload[pos + 19] == 0x03
        out.append((key, payload[pos + 20:pos + 23]))
        pos += 23
    return kvn, out
