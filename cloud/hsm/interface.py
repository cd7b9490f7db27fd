"""The one HSM interface the factory line uses, and the byte formats every backend shares.

Stations call an `HsmBackend`; they never see a CA private key, an SCP03 master key, a
transport key or a per-device static key.  What crosses the interface to the host:

- public keys and DER ECDSA signatures (CA keys);
- opaque `KeySetHandle`s naming SCP03 static key sets held by the backend;
- PUT KEY data fields whose key components are encrypted under the card's current DEK;
- SCP03 *session* keys (ephemeral, one card session; GP Amd D 6.2.1), which the host's
  secure-channel code needs to MAC and encrypt APDUs;
- the public half of the transport wrapping key, for chip vendors; what comes in from
  them is wrapped (a shipment KEK under that key, transport keys under the KEK) and is
  unwrapped inside (`import_transport_kek`, `unwrap_transport_keys`).

Backends: `fleetid.cloud.hsm.pkcs11_backend.Pkcs11Backend` (SoftHSM2 in tests, a vendor
HSM in production) and `fleetid.cloud.hsm.soft_backend.SoftBackend` (encrypted keystore
file, the embedded default).  For the same key material both produce the same bytes; see
README.md in this folder for which step runs where.

Per-device key diversification (this project's scheme, version 1)
-----------------------------------------------------------------
For a chip with identifier `se_uid` (the SE's GET DATA DATA_SE_UID, 16 bytes on our SE)
and key component `c` (0x01 ENC, 0x02 MAC, 0x03 DEK):

    uid_digest   = SHA-256(b"fleetid/scp03-div/v1" || se_uid)[0:15]      (host; UID is public)
    div_block_c  = uid_digest || c                                         (16 bytes)
    K_c          = AES-ECB-Encrypt(master, div_block_c)                    (inside the token:
                   C_DeriveKey, CKM_AES_ECB_ENCRYPT_DATA, CKA_VALUE_LEN = 16)

`master` is an AES-128 or AES-256 key.  Why one block and not `se_uid || constant`:
ECB encrypts blocks independently and the token keeps the first 16 bytes of the result, so
a 32-byte input would give all three components the same key.  Hashing the UID keeps all
of its bytes in play (UIDs of one wafer lot often differ in a few trailing bytes) while
leaving room for the component byte; AES is a permutation, so distinct blocks give
distinct keys.  A vendor HSM with an SP 800-108 derive mechanism would use
KDF(master, label = c, context = se_uid) instead (README.md).
"""

import hashlib
import struct

from fleetid.common import se_consts
from fleetid.cloud.hsm.errors import HsmError

# Key components of an SCP03 static key set, in PUT KEY order (GP Amd D 7.2).
COMPONENT_ENC = 0x01
COMPONENT_MAC = 0x02
COMPONENT_DEK = 0x03
COMPONENTS = (COMPONENT_ENC, COMPONENT_MAC, COMPONENT_DEK)
COMPONENT_NAMES = {COMPONENT_ENC: "enc", COMPONENT_MAC: "mac", COMPONENT_DEK: "dek"}

DIVERSIFICATION_DOMAIN = b"fleetid/scp03-div/v1"
SE_UID_MIN = 4
SE_UID_MAX = 64

SCP03_KEY_BYTES = 16  # static keys are AES-128: PUT KEY key-length byte 0x10 (se_consts)

# Key check value input: GP Amd D 7.2 / GP CS 2.3 11.8.2.3, AES keys: KCV = first 3 bytes
# of AES-ECB(key, 16 x 0x01).
KCV_INPUT_BLOCK = b"\x01" * 16
KCV_BYTES = 3

# PUT KEY key data block (GP CS 2.3 11.8.2.3; Amd D 7.2 for AES):
#   key type 0x88 (AES) | length 0x11 | key length 0x10 | 16 B encrypted key | 0x03 | KCV 3 B
PUT_KEY_TYPE_AES = 0x88
PUT_KEY_COMPONENT_LEN = 0x11
PUT_KEY_COMPONENT_SIZE = 1 + 1 + 1 + SCP03_KEY_BYTES + 1 + KCV_BYTES  # 23 bytes
PUT_KEY_DATA_SIZE = 1 + 3 * PUT_KEY_COMPONENT_SIZE  # 70 bytes

# SCP03 data derivation constants, GP Amd D 6.2.1 Table 6-1.
KDF_CARD_CRYPTOGRAM = 0x00
KDF_HOST_CRYPTOGRAM = 0x01
KDF_CARD_CHALLENGE = 0x02
KDF_S_ENC = 0x04
KDF_S_MAC = 0x06
KDF_S_RMAC = 0x07

# ECDSA over P-256 with SHA-256: the only signing profile CA keys use.
DIGEST_BYTES = 32

# Transport-key delivery (a chip vendor's shipment wrapped for the line's HSM):
#   the line's transport wrapping key   RSA-3072, private half unwrap-only in the HSM
#   the shipment's key-encryption key   AES-256, RSAES-OAEP (RFC 8017 7.1) with SHA-1 and
#                                       MGF1-SHA-1 under the wrapping key: SoftHSM2 2.6.1
#                                       offers OAEP with SHA-1 only (OAEP's security does not
#                                       rest on collision resistance; AWS KMS import offers
#                                       the same RSAES_OAEP_SHA_1)
#   each transport key                  AES key wrap, RFC 3394 (CKM_AES_KEY_WRAP) under the
#                                       KEK: 16-byte key -> 24 bytes, integrity-checked
TRANSPORT_WRAPPING_BITS = 3072
TRANSPORT_KEK_BYTES = 32
TRANSPORT_KEY_WRAPPED_BYTES = SCP03_KEY_BYTES + 8
TRANSPORT_KEK_WRAPPED_BYTES = TRANSPORT_WRAPPING_BITS // 8



class Scp03SessionKeys:
    """What scp03_session_keys returns: S-ENC, S-MAC, S-RMAC (16 bytes each).

    Field names match fleetid.common.scp03.SessionKeys.  Iterable and comparable like a
    3-tuple; the repr never shows the keys (they are secrets for the card session's life).
    """

    __slots__ = ("s_enc", "s_mac", "s_rmac")

    def __init__(self, s_enc, s_mac, s_rmac):
        self.s_enc = s_enc
        self.s_mac = s_mac
        self.s_rmac = s_rmac

    def __iter__(self):
        return iter((self.s_enc, self.s_mac, self.s_rmac))

    def __len__(self):
        return 3

    def __eq__(self, other):
        if isinstance(other, Scp03SessionKeys):
            other = tuple(other)
        return isinstance(other, tuple) and tuple(self) == other

    __hash__ = None

    def __repr__(self):
        return "Scp03SessionKeys(<redacted>)"


def check_se_uid(se_uid):
    """Return `se_uid` as bytes; raise HsmError(BAD_INPUT) unless it is 4..64 bytes."""
    if not isinstance(se_uid, (bytes, bytearray, memoryview)):
        raise HsmError(HsmError.BAD_INPUT, "se_uid must be bytes")
    se_uid = bytes(se_uid)
    if not SE_UID_MIN <= len(se_uid) <= SE_UID_MAX:
        raise HsmError(HsmError.BAD_INPUT, "se_uid length %d" % len(se_uid))
    return se_uid


def check_kvn(kvn):
    """Return `kvn`; raise HsmError(BAD_INPUT) unless 0x01 <= kvn <= 0x7F (GP CS 11.8.2.2)."""
    if not isinstance(kvn, int) or not 0x01 <= kvn <= 0x7F:
        raise HsmError(HsmError.BAD_INPUT, "key version number %r" % (kvn,))
    return kvn


def check_wrapped_transport_keys(wrapped_keys, expected_kcvs):
    """Return (3 wrapped keys, 3 KCVs) as bytes; raise HsmError(BAD_INPUT) unless there are
    three of each, 24 and 3 bytes long."""
    try:
        wrapped = tuple(bytes(w) for w in wrapped_keys)
        kcvs = tuple(bytes(k) for k in expected_kcvs)
    except TypeError:
        raise HsmError(HsmError.BAD_INPUT, "wrapped keys and KCVs must be bytes") from None
    if len(wrapped) != 3 or len(kcvs) != 3:
        raise HsmError(HsmError.BAD_INPUT, "need three wrapped keys and three KCVs")
    if any(len(w) != TRANSPORT_KEY_WRAPPED_BYTES for w in wrapped) or \
            any(len(k) != KCV_BYTES for k in kcvs):
        raise HsmError(HsmError.BAD_INPUT, "wrapped key or KCV size")
    return wrapped, kcvs


def check_digest(digest):
    """Return `digest` as bytes; raise HsmError(BAD_INPUT) unless it is 32 bytes."""
    if not isinstance(digest, (bytes, bytearray, memoryview)) or len(digest) != DIGEST_BYTES:
        raise HsmError(HsmError.BAD_INPUT, "digest must be 32 bytes (SHA-256)")
    return bytes(digest)


def diversification_block(se_uid, component):
    """The 16-byte ECB input that diversifies `component` of the key set for `se_uid`.

    See the module docstring for the scheme.  Raises HsmError(BAD_INPUT).
    """
    se_uid = check_se_uid(se_uid)
    if component not in COMPONENTS:
        raise HsmError(HsmError.BAD_INPUT, "component %r" % (component,))
    uid_digest = hashlib.sha256(DIVERSIFICATION_DOMAIN + se_uid).digest()[:15]
    return uid_digest + bytes((component,))


def check_challenges(host_challenge, card_challenge):
    """Return host || card challenge (the KDF context); raise HsmError(BAD_INPUT).

    Both are 8 bytes (S8 mode) or both 16 bytes (S16 mode), GP Amd D 6.2.2.
    """
    for name, value in (("host", host_challenge), ("card", card_challenge)):
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise HsmError(HsmError.BAD_INPUT, name + " challenge must be bytes")
    if len(host_challenge) not in (8, 16) or len(card_challenge) != len(host_challenge):
        raise HsmError(
            HsmError.BAD_INPUT,
            "challenge lengths %d/%d" % (len(host_challenge), len(card_challenge)),
        )
    return bytes(host_challenge) + bytes(card_challenge)


def scp03_kdf_inputs(constant, context, bits):
    """The AES-CMAC inputs of the SCP03 KDF, one per 128-bit output block.

    NIST SP 800-108 KDF in counter mode with the counter in the middle, as profiled by
    GP Amd D 6.2.1:
        label (11 x 0x00 || constant) | separator 0x00 | L (u16 BE, bits) | i (u8) | context
    Output = CMAC(key, input_1) || CMAC(key, input_2) || ..., truncated to `bits`.
    """
    if bits <= 0 or bits % 8 or bits > 0xFFFF:
        raise HsmError(HsmError.BAD_INPUT, "KDF output length %d bits" % bits)
    blocks = (bits + 127) // 128
    if blocks > 0xFF:
        raise HsmError(HsmError.BAD_INPUT, "KDF output too long")
    return [
        b"\x00" * 11 + struct.pack(">BBHB", constant, 0x00, bits, i) + bytes(context)
        for i in range(1, blocks + 1)
    ]


def assemble_put_key_data(new_kvn, wrapped_keys, kcvs):
    """Build the PUT KEY data field from already-encrypted key components.

    Format (se_consts, GP CS 2.3 11.8.2.3, Amd D 7.2), 70 bytes:
        new KVN | 3 x (0x88 0x11 0x10 <16 B key encrypted with the current DEK> 0x03 <KCV>)
    in the order ENC, MAC, DEK.

    Params: new_kvn int; wrapped_keys 3 x 16 bytes; kcvs 3 x 3 bytes.
    Raises HsmError(BAD_INPUT) on wrong sizes.
    """
    check_kvn(new_kvn)
    if len(wrapped_keys) != 3 or len(kcvs) != 3:
        raise HsmError(HsmError.BAD_INPUT, "need three key components")
    out = bytearray((new_kvn,))
    for wrapped, kcv in zip(wrapped_keys, kcvs):
        if len(wrapped) != SCP03_KEY_BYTES or len(kcv) != KCV_BYTES:
            raise HsmError(HsmError.BAD_INPUT, "wrapped key or KCV size")
        out += bytes((PUT_KEY_TYPE_AES, PUT_KEY_COMPONENT_LEN, SCP03_KEY_BYTES))
        out += wrapped
        out += bytes((KCV_BYTES,))
        out += kcv
    if len(out) != PUT_KEY_DATA_SIZE:
        raise HsmError(HsmError.BACKEND, "PUT KEY data size %d" % len(out))
    return bytes(out)


def put_key_response_expected(put_key_data):
    """What the card answers to a PUT KEY with this data field: new KVN || 3 KCVs.

    The line compares the card's response with this (constant-time not needed: public).
    """
    if len(put_key_data) != PUT_KEY_DATA_SIZE:
        raise HsmError(HsmError.BAD_INPUT, "PUT KEY data size %d" % len(put_key_data))
    out = bytearray(put_key_data[:1])
    for n in range(3):
        end = 1 + (n + 1) * PUT_KEY_COMPONENT_SIZE
        out += put_key_data[end - KCV_BYTES : end]
    return bytes(out)


class KeySetHandle:
    """An opaque reference to an SCP03 static key set held by one backend.

    Holds no key bytes.  Attributes:
      kind   "transport" (imported from the vendor's fab record, persistent), "device"
             (diversified for one chip, ephemeral: lives until `release()`) or
             "chip-transport" (one chip's transport keys unwrapped from the vendor's
             shipment, ephemeral like a device set)
      name   the batch id (transport) or the SE UID in hex (device, chip-transport)
      kvn    the key version number the set has (or will have) on the card
      kcvs   (kcv_enc, kcv_mac, kcv_dek), 3 bytes each, for device and chip-transport
             sets (public values, computed inside the backend); None for transport sets

    A device handle is a context manager: leaving the block releases the per-device key
    objects (`with hsm.diversify(master, uid) as device_keys: ...`).
    """

    TRANSPORT = "transport"
    DEVICE = "device"
    CHIP_TRANSPORT = "chip-transport"
    __slots__ = ("kind", "name", "kvn", "kcvs", "_owner", "_ref", "_released")

    def __init__(self, owner, kind, name, kvn, ref, kcvs=None):
        self.kind = kind
        self.name = name
        self.kvn = kvn
        self.kcvs = kcvs
        self._owner = owner
        self._ref = ref
        self._released = False

    def __repr__(self):
        return "KeySetHandle(%s %s kvn=0x%02X%s)" % (
            self.kind,
            self.name,
            self.kvn,
            " released" if self._released else "",
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._owner.release(self)
        return False


class HsmBackend:
    """The HSM interface.  Backends subclass this; every method below is implemented by both.

    Thread safety: every method may be called from many threads at once.  Each call runs
    on one session taken from a bounded pool (`max_sessions`); when none is free within
    `acquire_timeout` seconds the call raises HsmBusy.  `session()` pins one pooled
    session to the calling thread for a whole device (what a line station does).

    Errors: HsmError (with `reason`), HsmBusy, KeyNotFound; nothing backend-native.

    Optional: `sign_certificate(label, builder)` (a backend whose keys live in this
    process signs a whole x509.CertificateBuilder with one signature; SoftBackend has it,
    Pkcs11Backend does not: fleetid.cloud.pki.signing, "Native signing").
    """

    # -- lifecycle -----------------------------------------------------------------

    def close(self):
        """Close every session (and log out / wipe the in-memory storage key).  Idempotent."""
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def session(self, timeout=None):
        """Context manager: hold one pooled session for the calling thread.

        Operations the thread makes inside the block use that session, so a station's
        per-device work counts once against the HSM's session bound, and per-device key
        objects stay on the session that made them.
        Params: timeout seconds (None = the backend's acquire_timeout).
        Raises: HsmBusy when no session frees up in time.
        """
        raise NotImplementedError

    def pool_stats(self):
        """Dict: max_sessions, open, in_use, idle, created, discarded, busy_timeouts,
        device_key_sets (live diversified sets not yet released)."""
        raise NotImplementedError

    # -- CA signing keys (EC P-256) ------------------------------------------------

    def generate_signing_key(self, label):
        """Generate a persistent, non-extractable EC P-256 key pair named `label`.

        Returns: the public key (cryptography EllipticCurvePublicKey).
        Raises: HsmError(EXISTS) if any key already has that label.
        """
        raise NotImplementedError

    def public_key(self, label):
        """Return the cryptography EllipticCurvePublicKey of signing key `label`.

        Raises: KeyNotFound.
        """
        raise NotImplementedError

    def sign_digest(self, label, digest):
        """ECDSA-sign a 32-byte SHA-256 digest with key `label` inside the backend.

        Returns: DER ECDSA-Sig-Value (SEQUENCE { r, s }).
        Raises: KeyNotFound, HsmError(BAD_INPUT) if the digest is not 32 bytes.
        """
        raise NotImplementedError

    def sign(self, label, data):
        """ECDSA-SHA256 over `data`: hashes on the host (data are public), signs inside.

        Returns: DER ECDSA-Sig-Value.  Raises: KeyNotFound.
        """
        return self.sign_digest(label, hashlib.sha256(bytes(data)).digest())

    # -- SCP03 master and transport keys -------------------------------------------

    def create_master_key(self, label, bits=256):
        """Generate a persistent AES master key (128 or 256 bits) for diversification.

        The key is sensitive, non-extractable and derive-only.
        Raises: HsmError(EXISTS), HsmError(BAD_INPUT) for other sizes.
        """
        raise NotImplementedError

    def import_master_key(self, label, key_material):
        """Import a known AES master key (key ceremony restore, or tests).

        Same attributes as create_master_key.  When `key_material` is a bytearray it is
        overwritten with zeros once the key is stored (bytes objects cannot be wiped:
        pass a bytearray).
        Raises: HsmError(EXISTS), HsmError(BAD_INPUT).
        """
        raise NotImplementedError

    def import_transport_keys(self, batch, enc, mac, dek, kvn=se_consts.SCP03_KVN_TRANSPORT,
                              expected_kcvs=None):
        """Import the SCP03 transport key set of a chip batch from the vendor's fab record.

        The keys arrive in plaintext; they are stored as persistent, sensitive,
        non-extractable objects (ENC and MAC: CMAC-sign only; DEK: wrap only), and every
        bytearray argument is zeroed afterwards.  If `expected_kcvs` (the fab record's
        three KCVs) is given, the import is refused unless the keys match it.
        Returns: a transport KeySetHandle.
        Raises: HsmError(EXISTS), HsmError(BAD_INPUT), HsmError(KCV_MISMATCH).
        """
        raise NotImplementedError

    def transport_keys(self, batch):
        """Return the transport KeySetHandle imported for `batch`.  Raises KeyNotFound."""
        raise NotImplementedError

    # -- transport keys delivered wrapped (the chip vendor's shipment) -------------------

    def create_transport_wrapping_key(self, label):
        """Generate the line's transport wrapping key pair (RSA-3072) named `label`.

        The private key is persistent, sensitive, non-extractable and UNWRAP-only: chip
        vendors wrap each shipment's key-encryption key for its public half (RSAES-OAEP,
        the constants above), and only this backend can unwrap it.
        Returns: the public key (cryptography RSAPublicKey).
        Raises: HsmError(EXISTS).
        """
        raise NotImplementedError

    def transport_wrapping_public_key(self, label):
        """The RSAPublicKey of transport wrapping key `label`.  Raises KeyNotFound."""
        raise NotImplementedError

    def import_transport_kek(self, label, wrapping_label, wrapped_kek):
        """Unwrap a shipment's AES-256 key-encryption key inside the backend and keep it
        as `label` (persistent, sensitive, non-extractable, UNWRAP-only; the soft
        keystore keeps it encrypted at rest).

        Params: wrapped_kek: RSAES-OAEP ciphertext under `wrapping_label`'s public key.
        Raises: HsmError(EXISTS), KeyNotFound (no wrapping key),
            HsmError(WRAPPED_KEY_INVALID) when the ciphertext does not decrypt to an
            AES-256 key (tampered, or wrapped for another key).
        """
        raise NotImplementedError

    def unwrap_transport_keys(self, kek_label, se_uid, wrapped_keys, expected_kcvs,
                              kvn=se_consts.SCP03_KVN_TRANSPORT):
        """Unwrap one chip's SCP03 transport keys (RFC 3394 AES key wrap under the
        shipment's KEK `kek_label`) inside the backend, as ephemeral key objects with the
        usage of transport keys (ENC/MAC: CMAC; DEK: wrap), and check their KCVs.

        The plaintext keys never reach the host with the PKCS#11 backend (C_UnwrapKey,
        KCVs with C_Encrypt inside the token).
        Params: wrapped_keys: (enc, mac, dek), 24 bytes each.  expected_kcvs: the
            vendor's three KCVs (3 bytes each, GP Amd D 7.2).
        Returns: a chip-transport KeySetHandle (release it, or use it as a context manager).
        Raises: HsmError(WRAPPED_KEY_INVALID) for a wrapped key that fails the RFC 3394
            integrity check, HsmError(KCV_MISMATCH) when the unwrapped keys are not the
            ones the vendor names (both: nothing kept), KeyNotFound (no such KEK),
            HsmError(BAD_INPUT).
        """
        raise NotImplementedError

    # -- per-device SCP03 operations -------------------------------------------------

    def diversify(self, master_label, se_uid, kvn=se_consts.SCP03_KVN_DEVICE):
        """Derive the per-device ENC/MAC/DEK static keys for `se_uid` inside the backend.

        Scheme: module docstring.  The keys are ephemeral (PKCS#11 session objects),
        sensitive, usable only to be wrapped (PUT KEY), to CMAC (session keys) and, for
        the DEK, to wrap; their KCVs are computed at derivation and carried in the handle.
        Returns: a device KeySetHandle (release it, or use it as a context manager).
        Raises: KeyNotFound (no master), HsmError(BAD_INPUT).
        """
        raise NotImplementedError

    def put_key_payload(self, device_keys_handle, transport_dek_handle, new_kvn):
        """The PUT KEY data field that loads `device_keys_handle` onto a card.

        `transport_dek_handle` is the key set the card holds now (the batch's transport
        set, or a device set when rotating): its DEK encrypts the new keys, AES-CBC with a
        zero ICV over one 16-byte key (= C_WrapKey, CKM_AES_CBC).  Format:
        `assemble_put_key_data`.  Built only from wrap outputs and the handle's KCVs.
        Returns: 70 bytes.
        Raises: HsmError(BAD_HANDLE) if the first handle is not a device set, KeyNotFound.
        """
        raise NotImplementedError

    def scp03_session_keys(self, static_keys_handle, host_challenge, card_challenge):
        """Compute the SCP03 session keys for one card session with the backend's AES-CMAC.

        S-ENC = KDF(ENC, 0x04), S-MAC = KDF(MAC, 0x06), S-RMAC = KDF(MAC, 0x07), each
        128 bits, context = host_challenge || card_challenge (`scp03_kdf_inputs`).  The
        static keys never leave the backend; the session keys do (they are ephemeral).
        Returns: Scp03SessionKeys(s_enc, s_mac, s_rmac), 16 bytes each.
        Raises: HsmError(BAD_INPUT) for challenge sizes, KeyNotFound, HsmError(BAD_HANDLE).
        """
        raise NotImplementedError

    def release(self, handle):
        """Destroy the per-device key objects behind a device or chip-transport handle.
        Idempotent; a no-op for transport handles (those are persistent)."""
        raise NotImplementedError
