"""The software keystore: the embedded default HSM backend (demo, single line host).

Same interface, same pool semantics and, for the same key material, the same output bytes
as the PKCS#11 backend (the contract tests compare them).  What differs is where keys live:

- **In use, keys are in this process's memory.**  A key's entry is decrypted on first use;
  the plaintext and its `cryptography` key object stay cached (never written anywhere)
  until close(), so a signature pays no GCM decryption or key re-derivation.  Per-device
  key sets stay in memory until released.  Python cannot reliably wipe memory, so a
  process dump can reveal keys; the PKCS#11 backend never has CA, master, transport or
  per-device keys in host memory.  Use this one for the demo and development only.
- **At rest, the file never holds plaintext key bytes.**  Each entry is AES-256-GCM
  encrypted under a storage key derived with scrypt from a passphrase (config / env), with
  the entry's label, kind and metadata as associated data (entries cannot be swapped or
  relabelled).  The file is written atomically (temp file, fsync, rename, fsync of the
  directory) with mode 0600, and a keystore readable by group or others is refused.

File format (JSON, `fleetid-keystore/1`):
    {"format": "fleetid-keystore/1",
     "kdf": {"name": "scrypt", "n": 32768, "r": 8, "p": 1, "salt": hex(16)},
     "check": {"nonce": hex(12), "ct": hex},       # GCM of a fixed marker: wrong passphrase
     "keys": {label: {"kind": k, "meta": {...}, "nonce": hex(12), "ct": hex}}}
kinds: "ec-p256" (32-byte private scalar), "aes-master" (16/32 bytes),
"scp03-transport" (ENC || MAC || DEK, meta {"kvn": n}; label "scp03-transport:<batch>"),
"rsa-unwrap" (the transport wrapping key: PKCS#8 DER), "aes-kek" (a shipment's 32-byte
key-encryption key, unwrapped from the vendor's RSAES-OAEP ciphertext).  A chip's
transport keys delivered in a shipment are never stored here: they stay wrapped under the
KEK in the shipment file and are unwrapped in memory for one device (like a per-device
set, until released).

One process writes a keystore at a time (no cross-process locking).
"""

import binascii
import itertools
import json
import logging
import os
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import cmac, hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fleetid.common import se_consts
from fleetid.cloud.hsm import interface
from fleetid.cloud.hsm.errors import HsmError, KeyNotFound, SessionLost
from fleetid.cloud.hsm.interface import KeySetHandle
from fleetid.cloud.hsm.pool import DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_MAX_SESSIONS, PooledBackend

log = logging.getLogger("fleetid.cloud.hsm.soft")

FORMAT = "fleetid-keystore/1"
SCRYPT_N_DEFAULT = 2**15  # ~32 MiB, ~0.1 s: the passphrase is derived once per open
SCRYPT_N_MIN = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_CHECK_MARKER = b"fleetid keystore passphrase check"

KIND_EC = "ec-p256"
KIND_MASTER = "aes-master"
KIND_TRANSPORT = "scp03-transport"
KIND_RSA_UNWRAP = "rsa-unwrap"
KIND_KEK = "aes-kek"
_TRANSPORT_PREFIX = "scp03-transport:"
# interface.py: the shipment KEK is RSAES-OAEP with SHA-1 / MGF1-SHA-1.
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def _aes_ecb_encrypt(key, block):
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return encryptor.update(block) + encryptor.finalize()


def _wipe(value):
    if isinstance(value, bytearray):
        value[:] = bytes(len(value))


def _aad(label, kind, meta):
    return json.dumps([FORMAT, label, kind, meta], sort_keys=True, separators=(",", ":")).encode()


class _SoftSession:
    """A simulated HSM session: it can be closed under an operation, like a real one."""

    _serials = itertools.count(1)

    def __init__(self):
        self.serial = next(self._serials)
        self.closed = False

    def ensure_open(self):
        if self.closed:
            raise SessionLost("soft session %d closed" % self.serial)

    def close(self):
        self.closed = True


class SoftBackend(PooledBackend):
    """HsmBackend over an encrypted keystore file.

    Params:
      path             keystore file; created (empty) if missing and `create` is true
      passphrase       str or bytes (from config / env; never logged)
      max_sessions     simulated session bound (the pool is the same as PKCS#11's)
      acquire_timeout  seconds to wait for a session before HsmBusy
      create           allow creating a new keystore at `path`
      scrypt_n         scrypt cost for a *new* keystore (>= 2**14); existing files keep theirs
    Raises: HsmError(LOGIN) for a wrong passphrase, HsmError(KEYSTORE) for a corrupt,
    missing (create=False) or group/other-accessible file, HsmError(CONFIG).
    """

    def __init__(self, path, passphrase, max_sessions=DEFAULT_MAX_SESSIONS,
                 acquire_timeout=DEFAULT_ACQUIRE_TIMEOUT, create=True, scrypt_n=SCRYPT_N_DEFAULT):
        if passphrase is None or len(passphrase) == 0:
            raise HsmError(HsmError.CONFIG, "empty keystore passphrase")
        passphrase = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
        self.path = os.path.abspath(path)
        self._lock = threading.RLock()
        self._device_keys = {}  # handle id -> (creating session, {component: key bytes})
        # Decrypted once, kept until close(): (label, kind) -> (meta, plaintext) / key object.
        self._plain = {}
        self._key_objects = {}
        self._next_device_id = itertools.count(1)
        self._closed = False
        if os.path.exists(self.path):
            self._load(passphrase)
        elif create:
            self._create(passphrase, scrypt_n)
        else:
            raise HsmError(HsmError.KEYSTORE, "no keystore at " + self.path)
        self._init_pool(_SoftSession, lambda raw: raw.close(), max_sessions, acquire_timeout)
        log.info("soft keystore %s opened, %d keys", self.path, len(self._doc["keys"]))

    def __repr__(self):
        return "SoftBackend(%r)" % self.path

    # -- keystore file -------------------------------------------------------------------

    def _derive_storage_key(self, passphrase, kdf):
        try:
            scrypt = Scrypt(salt=binascii.unhexlify(kdf["salt"]), length=32, n=int(kdf["n"]),
                            r=int(kdf["r"]), p=int(kdf["p"]))
            return AESGCM(scrypt.derive(passphrase))
        except (KeyError, ValueError, TypeError, binascii.Error) as exc:
            raise HsmError(HsmError.KEYSTORE, "bad kdf parameters") from exc

    def _create(self, passphrase, scrypt_n):
        if not isinstance(scrypt_n, int) or scrypt_n < SCRYPT_N_MIN or scrypt_n & (scrypt_n - 1):
            raise HsmError(HsmError.CONFIG, "scrypt_n must be a power of two >= 2**14")
        kdf = {"name": "scrypt", "n": scrypt_n, "r": SCRYPT_R, "p": SCRYPT_P,
               "salt": os.urandom(16).hex()}
        self._gcm = self._derive_storage_key(passphrase, kdf)
        nonce = os.urandom(12)
        check = {"nonce": nonce.hex(),
                 "ct": self._gcm.encrypt(nonce, _CHECK_MARKER, FORMAT.encode()).hex()}
        self._doc = {"format": FORMAT, "kdf": kdf, "check": check, "keys": {}}
        self._write()

    def _load(self, passphrase):
        try:
            mode = os.stat(self.path).st_mode
            if mode & 0o077:
                raise HsmError(HsmError.KEYSTORE, "keystore is accessible to group/others")
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise HsmError(HsmError.KEYSTORE, "not a %s file" % FORMAT)
            if doc["kdf"].get("name") != "scrypt" or not isinstance(doc["keys"], dict):
                raise HsmError(HsmError.KEYSTORE, "unsupported keystore")
            check = doc["check"]
            gcm = self._derive_storage_key(passphrase, doc["kdf"])
            nonce, ct = bytes.fromhex(check["nonce"]), bytes.fromhex(check["ct"])
        except OSError as exc:
            raise HsmError(HsmError.KEYSTORE, "cannot read keystore") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HsmError(HsmError.KEYSTORE, "malformed keystore") from exc
        try:
            if gcm.decrypt(nonce, ct, FORMAT.encode()) != _CHECK_MARKER:
                raise InvalidTag()
        except InvalidTag:
            raise HsmError(HsmError.LOGIN, "wrong keystore passphrase") from None
        self._gcm = gcm
        self._doc = doc

    def _write(self):
        """Atomically replace the keystore file (mode 0600)."""
        data = json.dumps(self._doc, sort_keys=True, indent=1).encode()
        directory = os.path.dirname(self.path)
        tmp = "%s.tmp-%d-%s" % (self.path, os.getpid(), os.urandom(4).hex())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise HsmError(HsmError.KEYSTORE, "cannot write keystore") from exc

    def _put_entry(self, label, kind, meta, secret):
        """Encrypt and persist one entry.  Caller holds self._lock."""
        if label in self._doc["keys"]:
            raise HsmError(HsmError.EXISTS, label)
        nonce = os.urandom(12)
        entry = {"kind": kind, "meta": meta, "nonce": nonce.hex(),
                 "ct": self._gcm.encrypt(nonce, bytes(secret), _aad(label, kind, meta)).hex()}
        self._doc["keys"][label] = entry
        try:
            self._write()
        except HsmError:
            del self._doc["keys"][label]
            raise

    def _entry(self, label, kind):
        """Return (meta, plaintext secret) of entry `label`, which must be of `kind`
        (decrypted on first use, then from the in-memory cache)."""
        with self._lock:
            self._check_open()
            cached = self._plain.get((label, kind))
            if cached is not None:
                return cached
            entry = self._doc["keys"].get(label)
        if entry is None or entry.get("kind") != kind:
            raise KeyNotFound(label)
        try:
            secret = self._gcm.decrypt(bytes.fromhex(entry["nonce"]), bytes.fromhex(entry["ct"]),
                                       _aad(label, kind, entry["meta"]))
        except (InvalidTag, ValueError, KeyError) as exc:
            raise HsmError(HsmError.KEYSTORE, "entry %s does not authenticate" % label) from exc
        with self._lock:
            self._check_open()
            return self._plain.setdefault((label, kind), (entry["meta"], secret))

    def _key_object(self, label, kind, make):
        """The cryptography key object make(plaintext) of entry `label`, made once."""
        found = self._key_objects.get((label, kind))
        if found is None:
            found = make(self._entry(label, kind)[1])
            with self._lock:
                self._check_open()
                found = self._key_objects.setdefault((label, kind), found)
        return found

    def _check_open(self):
        if self._closed:
            raise HsmError(HsmError.CLOSED, "keystore closed")

    @staticmethod
    def _check_label(label):
        if not isinstance(label, str) or not label or len(label) > 128:
            raise HsmError(HsmError.BAD_INPUT, "label must be a 1..128 character string")
        return label

    # -- lifecycle -------------------------------------------------------------------------

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._gcm = None
            self._device_keys.clear()
            self._plain.clear()
            self._key_objects.clear()
        self._pool.close()

    # -- CA signing keys -------------------------------------------------------------------

    def generate_signing_key(self, label):
        self._check_label(label)

        def op(session):
            session.ensure_open()
            private = ec.generate_private_key(ec.SECP256R1())
            scalar = private.private_numbers().private_value.to_bytes(32, "big")
            with self._lock:
                self._check_open()
                self._put_entry(label, KIND_EC, {}, scalar)
            log.info("generated EC P-256 signing key %s", label)
            return private.public_key()

        return self._run(op)

    def _private_key(self, label):
        return self._key_object(label, KIND_EC, lambda scalar: ec.derive_private_key(
            int.from_bytes(scalar, "big"), ec.SECP256R1()))

    def public_key(self, label):
        def op(session):
            session.ensure_open()
            return self._private_key(label).public_key()

        return self._run(op)

    def sign_digest(self, label, digest):
        digest = interface.check_digest(digest)

        def op(session):
            session.ensure_open()
            return self._private_key(label).sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

        return self._run(op)

    def sign_certificate(self, label, builder):
        """Sign an x509.CertificateBuilder with key `label` (ecdsa-with-SHA256): one
        signature, not the TBS route's two; CertificateSigner (pki/signing.py) uses this
        optional capability and still checks the signature.  Returns x509.Certificate.
        Raises: KeyNotFound, HsmError; ValueError from an incomplete builder."""

        def op(session):
            session.ensure_open()
            return builder.sign(self._private_key(label), hashes.SHA256())

        return self._run(op)

    # -- master and transport keys ----------------------------------------------------------

    def create_master_key(self, label, bits=256):
        if bits not in (128, 256):
            raise HsmError(HsmError.BAD_INPUT, "master key size %r" % (bits,))
        self._store_master(label, bytearray(os.urandom(bits // 8)))

    def import_master_key(self, label, key_material):
        try:
            if not isinstance(key_material, (bytes, bytearray)) or \
                    len(key_material) not in (16, 32):
                raise HsmError(HsmError.BAD_INPUT, "master key must be 16 or 32 bytes")
            self._store_master(label, key_material)
        finally:
            _wipe(key_material)

    def _store_master(self, label, key_material):
        self._check_label(label)

        def op(session):
            session.ensure_open()
            with self._lock:
                self._check_open()
                self._put_entry(label, KIND_MASTER, {"bits": len(key_material) * 8},
                                key_material)
            log.info("stored AES master key %s", label)

        try:
            self._run(op)
        finally:
            _wipe(key_material)

    def import_transport_keys(self, batch, enc, mac, dek, kvn=se_consts.SCP03_KVN_TRANSPORT,
                              expected_kcvs=None):
        try:
            self._check_label(batch)
            interface.check_kvn(kvn)
            keys = (enc, mac, dek)
            for key in keys:
                if not isinstance(key, (bytes, bytearray)) or len(key) != interface.SCP03_KEY_BYTES:
                    raise HsmError(HsmError.BAD_INPUT, "transport keys must be 16 bytes each")
            if expected_kcvs is not None:
                kcvs = tuple(
                    _aes_ecb_encrypt(bytes(k), interface.KCV_INPUT_BLOCK)[:interface.KCV_BYTES]
                    for k in keys
                )
                if tuple(bytes(x) for x in expected_kcvs) != kcvs:
                    raise HsmError(HsmError.KCV_MISMATCH, batch)
            secret = bytearray(b"".join(bytes(k) for k in keys))
            label = _TRANSPORT_PREFIX + batch

            def op(session):
                session.ensure_open()
                with self._lock:
                    self._check_open()
                    self._put_entry(label, KIND_TRANSPORT, {"kvn": kvn}, secret)

            try:
                self._run(op)
            finally:
                _wipe(secret)
            log.info("imported transport key set %s kvn 0x%02X", batch, kvn)
            return KeySetHandle(self, KeySetHandle.TRANSPORT, batch, kvn, label)
        finally:
            for key in (enc, mac, dek):
                _wipe(key)

    def transport_keys(self, batch):
        self._check_label(batch)
        label = _TRANSPORT_PREFIX + batch

        def op(session):
            session.ensure_open()
            meta, _secret = self._entry(label, KIND_TRANSPORT)
            return KeySetHandle(self, KeySetHandle.TRANSPORT, batch, meta["kvn"], label)

        return self._run(op)

    # -- transport keys delivered wrapped ----------------------------------------------

    def create_transport_wrapping_key(self, label):
        self._check_label(label)

        def op(session):
            session.ensure_open()
            private = rsa.generate_private_key(65537, interface.TRANSPORT_WRAPPING_BITS)
            der = bytearray(private.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            try:
                with self._lock:
                    self._check_open()
                    self._put_entry(label, KIND_RSA_UNWRAP, {}, der)
            finally:
                _wipe(der)
            log.info("generated RSA-%d transport wrapping key %s",
                     interface.TRANSPORT_WRAPPING_BITS, label)
            return private.public_key()

        return self._run(op)

    def _unwrapping_key(self, label):
        return self._key_object(label, KIND_RSA_UNWRAP, lambda der: (
            serialization.load_der_private_key(der, password=None)))

    def transport_wrapping_public_key(self, label):
        def op(session):
            session.ensure_open()
            return self._unwrapping_key(label).public_key()

        return self._run(op)

    def import_transport_kek(self, label, wrapping_label, wrapped_kek):
        self._check_label(label)
        if not isinstance(wrapped_kek, (bytes, bytearray)):
            raise HsmError(HsmError.BAD_INPUT, "wrapped KEK must be bytes")

        def op(session):
            session.ensure_open()
            private = self._unwrapping_key(wrapping_label)
            try:
                kek = bytearray(private.decrypt(bytes(wrapped_kek), _OAEP))
            except ValueError:
                raise HsmError(HsmError.WRAPPED_KEY_INVALID, label) from None
            try:
                if len(kek) != interface.TRANSPORT_KEK_BYTES:
                    raise HsmError(HsmError.WRAPPED_KEY_INVALID, "%s: not an AES-256 key"
                                   % label)
                with self._lock:
                    self._check_open()
                    self._put_entry(label, KIND_KEK, {"wrapping_key": wrapping_label}, kek)
            finally:
                _wipe(kek)
            log.info("imported transport KEK %s (unwrapped with %s)", label, wrapping_label)

        self._run(op)

    def unwrap_transport_keys(self, kek_label, se_uid, wrapped_keys, expected_kcvs,
                              kvn=se_consts.SCP03_KVN_TRANSPORT):
        se_uid = interface.check_se_uid(se_uid)
        interface.check_kvn(kvn)
        wrapped, expected = interface.check_wrapped_transport_keys(wrapped_keys, expected_kcvs)

        def op(session):
            session.ensure_open()
            _meta, kek = self._entry(kek_label, KIND_KEK)
            keys = {}
            for component, blob in zip(interface.COMPONENTS, wrapped):
                try:
                    key = keywrap.aes_key_unwrap(kek, blob)  # RFC 3394 2.2.3 integrity check
                except keywrap.InvalidUnwrap:
                    raise HsmError(HsmError.WRAPPED_KEY_INVALID, "%s %s" % (
                        se_uid.hex(), interface.COMPONENT_NAMES[component])) from None
                if len(key) != interface.SCP03_KEY_BYTES:
                    raise HsmError(HsmError.WRAPPED_KEY_INVALID, "%s: key size" % se_uid.hex())
                keys[component] = key
            kcvs = tuple(
                _aes_ecb_encrypt(keys[c], interface.KCV_INPUT_BLOCK)[:interface.KCV_BYTES]
                for c in interface.COMPONENTS
            )
            if kcvs != expected:
                raise HsmError(HsmError.KCV_MISMATCH, se_uid.hex())
            with self._lock:
                self._check_open()
                handle_id = next(self._next_device_id)
                self._device_keys[handle_id] = (session, keys)
            self._count_device_set(+1)
            return KeySetHandle(self, KeySetHandle.CHIP_TRANSPORT, se_uid.hex(), kvn,
                                handle_id, kcvs)

        return self._run(op)

    def _key_set(self, handle, session):
        """{component: key bytes} of a live handle (decrypted for transport sets)."""
        if handle.kind == KeySetHandle.TRANSPORT:
            _meta, secret = self._entry(handle._ref, KIND_TRANSPORT)
            return {c: secret[16 * n:16 * n + 16] for n, c in enumerate(interface.COMPONENTS)}
        with self._lock:
            found = self._device_keys.get(handle._ref)
        # Like a PKCS#11 session object, a device set dies with the session that made it.
        if found is None or found[0].closed:
            raise KeyNotFound("device key set " + handle.name)
        return found[1]

    # -- per-device SCP03 ---------------------------------------------------------------

    def diversify(self, master_label, se_uid, kvn=se_consts.SCP03_KVN_DEVICE):
        blocks = {c: interface.diversification_block(se_uid, c) for c in interface.COMPONENTS}
        interface.check_kvn(kvn)

        def op(session):
            session.ensure_open()
            _meta, master = self._entry(master_label, KIND_MASTER)
            # One ECB pass over the three diversification blocks (ECB: block by block).
            derived = _aes_ecb_encrypt(master, b"".join(blocks[c] for c in interface.COMPONENTS))
            keys = {c: derived[16 * n:16 * n + 16] for n, c in enumerate(interface.COMPONENTS)}
            kcvs = tuple(
                _aes_ecb_encrypt(keys[c], interface.KCV_INPUT_BLOCK)[:interface.KCV_BYTES]
                for c in interface.COMPONENTS
            )
            with self._lock:
                self._check_open()
                handle_id = next(self._next_device_id)
                self._device_keys[handle_id] = (session, keys)
            self._count_device_set(+1)
            return KeySetHandle(self, KeySetHandle.DEVICE, bytes(se_uid).hex(), kvn, handle_id,
                                kcvs)

        return self._run(op)

    def put_key_payload(self, device_keys_handle, transport_dek_handle, new_kvn):
        self._check_handle(device_keys_handle, KeySetHandle.DEVICE)
        self._check_handle(transport_dek_handle)
        interface.check_kvn(new_kvn)

        def op(session):
            session.ensure_open()
            new_keys = self._key_set(device_keys_handle, session)
            dek = self._key_set(transport_dek_handle, session)[interface.COMPONENT_DEK]
            # AES-CBC with a zero ICV over one block is AES-ECB of that block: the three
            # keys in one ECB pass give the three CBC wraps.
            joined = _aes_ecb_encrypt(dek, b"".join(new_keys[c] for c in interface.COMPONENTS))
            wrapped = [joined[16 * n:16 * n + 16] for n in range(len(interface.COMPONENTS))]
            return interface.assemble_put_key_data(new_kvn, wrapped, device_keys_handle.kcvs)

        return self._run(op)

    def scp03_session_keys(self, static_keys_handle, host_challenge, card_challenge):
        self._check_handle(static_keys_handle)
        context = interface.check_challenges(host_challenge, card_challenge)

        def kdf(key, constant, keyed):
            # keyed: a CMAC context keyed with `key`; each block MACs a copy of it.
            inputs = interface.scp03_kdf_inputs(constant, context, 8 * len(key))
            out = []
            for block in inputs:
                mac = keyed.copy()
                mac.update(block)
                out.append(mac.finalize())
            return b"".join(out)[:len(key)]

        def op(session):
            session.ensure_open()
            keys = self._key_set(static_keys_handle, session)
            enc, mac = keys[interface.COMPONENT_ENC], keys[interface.COMPONENT_MAC]
            mac_keyed = cmac.CMAC(algorithms.AES(mac))  # used for S-MAC and S-RMAC
            return interface.Scp03SessionKeys(
                kdf(enc, interface.KDF_S_ENC, cmac.CMAC(algorithms.AES(enc))),
                kdf(mac, interface.KDF_S_MAC, mac_keyed),
                kdf(mac, interface.KDF_S_RMAC, mac_keyed),
            )

        return self._run(op)

    def release(self, handle):
        if not isinstance(handle, KeySetHandle) or handle._owner is not self:
            raise HsmError(HsmError.BAD_HANDLE, "not a key set of this backend")
        if handle.kind == KeySetHandle.TRANSPORT or handle._released:
            return
        handle._released = True
        with self._lock:
            dropped = self._device_keys.pop(handle._ref, None)
        if dropped is not None:
            self._count_device_set(-1)


