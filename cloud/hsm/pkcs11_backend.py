"""The PKCS#11 backend (python-pkcs11): SoftHSM2 in tests and on developer machines, a
vendor HSM in production.

Every key the line depends on stays inside the token; the host gets public keys, DER
signatures, wrapped key components, KCVs and SCP03 session keys.  Mechanisms (all offered
by SoftHSM2 2.6.1):

  CA keys           CKM_EC_KEY_PAIR_GEN (P-256), CKM_ECDSA over a host-computed SHA-256
  master key        CKM_AES_KEY_GEN, derive-only
  diversification   C_DeriveKey CKM_AES_ECB_ENCRYPT_DATA (interface.py documents the data)
  KCV               C_Encrypt CKM_AES_ECB of 16 x 0x01 (first 3 bytes kept)
  PUT KEY           C_WrapKey CKM_AES_CBC, zero IV, one 16-byte key (= ECB of one block)
  session keys      C_Sign CKM_AES_CMAC over the SCP03 KDF inputs (interface.py)
  wrapped delivery  RSA-OAEP / AES key wrap unwraps (pkcs11_delivery.py)

Object attributes (all CKA_PRIVATE, CKA_SENSITIVE):
  EC private key    token, non-extractable, non-modifiable, SIGN only
  master key        token, non-extractable, non-modifiable, DERIVE only
  transport ENC/MAC token, non-extractable, non-modifiable, SIGN (CMAC) only
  transport DEK     token, non-extractable, non-modifiable, WRAP only
  device ENC/MAC    session object, extractable (to be wrapped), SIGN; ENCRYPT only while
                    the KCV is computed
  device DEK        session object, extractable, WRAP (for a later rotation PUT KEY)
  (wrapping key, shipment KEK, chip transport keys: pkcs11_delivery.py)

Login: one dedicated session logs the user in (PKCS#11 login state is per application and
token, so every pooled session shares it); pooled sessions never log in or out themselves,
so discarding one cannot log the others out.  The login state ends with the application's
last session (PKCS#11 v2.40 5.6, C_CloseAllSessions; a token reset or a daemon restart
does the same): when a lost session turns out to have taken the login session with it,
the backend logs in again once (`_session_lost`), discards the dead idle sessions, and
the operation's one retry runs on a fresh session.  So the PIN is kept in this object's
memory (never logged, never in repr) for that re-login; a failed re-login is HsmError.

Threads: python-pkcs11 always calls C_Initialize(NULL), and with NULL arguments PKCS#11
(v2.40 section 5.4, C_Initialize) lets the library assume no concurrent calls; SoftHSM2
then disables its mutexes (concurrent calls abort the process).  So every call into a
module is serialised by one lock per module, held for the whole operation.  The session
pool still bounds and accounts sessions (the HSM resource the line shares); a vendor
module that is thread-safe whatever the arguments can drop the lock with
`dangerous_assume_thread_safe_module=True`.

One backend per token per process: C_Finalize runs when the last backend on a module
closes, so a later open re-reads the module's configuration (SOFTHSM2_CONF).
"""

import contextlib
import logging
import os
import threading

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from fleetid.common import se_consts
from fleetid.cloud.hsm import interface
from fleetid.cloud.hsm.errors import HsmError, KeyNotFound
from fleetid.cloud.hsm.interface import KeySetHandle
from fleetid.cloud.hsm.pkcs11_common import native_errors, secret_template
from fleetid.cloud.hsm.pkcs11_delivery import Pkcs11TransportDelivery
from fleetid.cloud.hsm.pool import DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_MAX_SESSIONS, PooledBackend

log = logging.getLogger("fleetid.cloud.hsm.pkcs11")

_TRANSPORT_LABEL = "scp03-transport:%s:%s"  # batch, component name
_TRANSPORT_ID = b"scp03-transport"  # || kvn || component
_DEVICE_LABEL = "scp03-device:%s:%s"  # se_uid hex, component name

# -- one initialised library per module path ------------------------------------------------

_LIBS_LOCK = threading.Lock()
_LIB_USERS = {}  # module path -> number of open backends
_CALL_LOCKS = {}  # module path -> RLock serialising every call into that module


def _call_lock(module):
    with _LIBS_LOCK:
        return _CALL_LOCKS.setdefault(module, threading.RLock())


def _acquire_lib(module):
    with _call_lock(module), _LIBS_LOCK:
        try:
            lib = pkcs11.lib(module)  # cached per path by python-pkcs11; initialises it
        except p11e.PKCS11Error as exc:
            raise HsmError(HsmError.TOKEN, "cannot load PKCS#11 module " + module) from exc
        _LIB_USERS[module] = _LIB_USERS.get(module, 0) + 1
        return lib


def _release_lib(module, lib):
    with _call_lock(module), _LIBS_LOCK:
        _LIB_USERS[module] -= 1
        if _LIB_USERS[module] == 0:
            del _LIB_USERS[module]
            try:
                lib.finalize()  # C_Finalize closes every session; never dlclose (SoftHSM
            except p11e.PKCS11Error:  # crashes when reloaded in one process)
                pass


class Pkcs11Backend(Pkcs11TransportDelivery, PooledBackend):
    """HsmBackend over a PKCS#11 token.

    Params:
      module           path of the PKCS#11 library (/usr/lib/softhsm/libsofthsm2.so)
      token_label      CKA token label
      pin              user PIN (from config / env; for C_Login, again after a lost login;
                       never logged)
      max_sessions     pool bound (keep below the HSM's session limit / number of lines)
      acquire_timeout  seconds to wait for a session before HsmBusy
      dangerous_assume_thread_safe_module
                       skip the per-module call lock (see the module docstring); only for
                       a vendor module documented as safe with C_Initialize(NULL)
    Raises: HsmError(TOKEN) module or token not found; HsmError(LOGIN) wrong PIN / locked;
    HsmError(CONFIG) token already logged in by another backend of this process.
    """

    def __init__(self, module, token_label, pin, max_sessions=DEFAULT_MAX_SESSIONS,
                 acquire_timeout=DEFAULT_ACQUIRE_TIMEOUT,
                 dangerous_assume_thread_safe_module=False):
        if not pin:
            raise HsmError(HsmError.CONFIG, "empty PIN")
        self.module = module
        self._call_lock = (contextlib.nullcontext() if dangerous_assume_thread_safe_module
                           else _call_lock(module))
        self.token_label = token_label
        self._closed = False
        self._create_lock = threading.Lock()
        self._login_lock = threading.Lock()  # one re-login at a time
        self._lib = _acquire_lib(module)
        try:
            try:
                with _call_lock(module):
                    self._token = self._lib.get_token(token_label=token_label)
            except (p11e.NoSuchToken, p11e.MultipleTokensReturned) as exc:
                raise HsmError(HsmError.TOKEN, "token %r: %s" % (token_label, type(exc).__name__))
            try:
                with _call_lock(module):
                    self._login_session = self._token.open(rw=True, user_pin=pin)
            except (p11e.PinIncorrect, p11e.PinLocked, p11e.PinExpired, p11e.PinLenRange,
                    p11e.PinInvalid, p11e.UserPinNotInitialized) as exc:
                raise HsmError(HsmError.LOGIN, type(exc).__name__) from None
            except p11e.UserAlreadyLoggedIn:
                raise HsmError(HsmError.CONFIG, "token already logged in in this process")
            except p11e.PKCS11Error as exc:
                raise HsmError(HsmError.TOKEN, type(exc).__name__) from None
        except BaseException:
            _release_lib(module, self._lib)
            raise
        self._pin = pin
        self._login_lost = False
        self.relogins = 0
        self._init_pool(self._open_session, self._close_session, max_sessions, acquire_timeout)
        log.info("PKCS#11 token %r opened (max %d sessions)", token_label, max_sessions)

    def __repr__(self):
        return "Pkcs11Backend(%r, token=%r)" % (self.module, self.token_label)

    def _open_session(self):
        if self._closed:
            raise HsmError(HsmError.CLOSED, "backend closed")
        if self._login_lost:  # a re-login failed earlier: try again first
            self._relogin()
        with _call_lock(self.module), native_errors("open session"):
            return self._token.open(rw=True)  # no PIN: shares the login session's state

    def _close_session(self, raw):
        with _call_lock(self.module):
            raw.close()

    def _invoke(self, operation, raw):
        with self._call_lock:
            return operation(raw)

    def _session_lost(self):
        """A pooled session was lost: if the login session is gone too, every session of
        this application is (the login state went with them): discard the idle sessions
        and log in again.  Raises: HsmError(LOGIN / TOKEN) when the re-login fails (the
        next session opened tries once more: one login attempt per operation, bounded)."""
        with self._login_lock, _call_lock(self.module):
            if not self._login_lost:
                try:
                    self._login_session.generate_random(64)  # cheap probe: still open?
                    return
                except p11e.PKCS11Error:
                    self._login_lost = True
        discarded = self._pool.discard_idle()
        log.warning("PKCS#11 token %r: the login went with the sessions; %d idle "
                    "session(s) discarded, logging in again", self.token_label, discarded)
        self._relogin()

    def _relogin(self):
        """Log in again on a new login session, once the old one is known lost."""
        with self._login_lock, _call_lock(self.module):
            if not self._login_lost:
                return  # another thread did
            try:
                self._login_session.close()
            except p11e.PKCS11Error:  # already invalid
                pass
            try:
                # python-pkcs11 leaves the session open when C_Login fails: one handle per
                # refused attempt, at most one attempt per operation.
                self._login_session = self._token.open(rw=True, user_pin=self._pin)
            except (p11e.PinIncorrect, p11e.PinLocked, p11e.PinExpired) as exc:
                raise HsmError(HsmError.LOGIN, "re-login: " + type(exc).__name__) from None
            except p11e.PKCS11Error as exc:
                raise HsmError(HsmError.TOKEN, "re-login: %s" % type(exc).__name__) from None
            self._login_lost = False
            self.relogins += 1

    def close(self):
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        try:
            with _call_lock(self.module):
                self._login_session.close()  # C_Logout + C_CloseSession
        except p11e.PKCS11Error:
            pass
        _release_lib(self.module, self._lib)
        log.info("PKCS#11 token %r closed", self.token_label)

    # -- helpers ------------------------------------------------------------------------

    def _check_label(self, label):
        if not isinstance(label, str) or not label or len(label) > 128:
            raise HsmError(HsmError.BAD_INPUT, "label must be a 1..128 character string")
        return label

    @staticmethod
    def _label_taken(session, label):
        # Exhaust the search so C_FindObjectsFinal runs now, not whenever it is collected.
        return len(list(session.get_objects({Attribute.LABEL: label}))) > 0

    @staticmethod
    def _find_secret(session, what, label=None, key_id=None):
        with native_errors(what):
            return session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES,
                                   label=label, id=key_id)

    def _component(self, session, handle, component):
        """The token object of one component of a live key-set handle."""
        name = interface.COMPONENT_NAMES[component]
        if handle.kind == KeySetHandle.TRANSPORT:
            return self._find_secret(session, "transport %s %s" % (handle.name, name),
                                     label=_TRANSPORT_LABEL % (handle.name, name))
        return self._find_secret(session, "device %s %s" % (handle.name, name),
                                 key_id=handle._ref + bytes((component,)))

    # -- CA signing keys -------------------------------------------------------------------

    def generate_signing_key(self, label):
        self._check_label(label)

        def op(session):
            with self._create_lock, native_errors(label):
                if self._label_taken(session, label):
                    raise HsmError(HsmError.EXISTS, label)
                public, _private = session.generate_keypair(
                    KeyType.EC,
                    store=True,
                    label=label,
                    public_template={
                        Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1"),
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: False,
                        Attribute.VERIFY: True,
                        Attribute.ENCRYPT: False,
                        Attribute.WRAP: False,
                        Attribute.DERIVE: False,
                    },
                    private_template={
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.MODIFIABLE: False,
                        Attribute.SIGN: True,
                        Attribute.DECRYPT: False,
                        Attribute.UNWRAP: False,
                        Attribute.DERIVE: False,
                    },
                )
                spki = encode_ec_public_key(public)
            log.info("generated EC P-256 signing key %s", label)
            return serialization.load_der_public_key(spki)

        return self._run(op)

    def public_key(self, label):
        def op(session):
            with native_errors(label):
                public = session.get_key(object_class=ObjectClass.PUBLIC_KEY,
                                         key_type=KeyType.EC, label=label)
                return serialization.load_der_public_key(encode_ec_public_key(public))

        return self._run(op)

    def sign_digest(self, label, digest):
        digest = interface.check_digest(digest)

        def op(session):
            with native_errors(label):
                private = session.get_key(object_class=ObjectClass.PRIVATE_KEY,
                                          key_type=KeyType.EC, label=label)
                raw = private.sign(digest, mechanism=Mechanism.ECDSA)  # r || s, 32 B each
            return utils.encode_dss_signature(
                int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
            )

        return self._run(op)

    # -- master and transport keys -----------------------------------------------------------

    def create_master_key(self, label, bits=256):
        self._check_label(label)
        if bits not in (128, 256):
            raise HsmError(HsmError.BAD_INPUT, "master key size %r" % (bits,))

        def op(session):
            with self._create_lock, native_errors(label):
                if self._label_taken(session, label):
                    raise HsmError(HsmError.EXISTS, label)
                template = secret_template(label, token=True, derive=True)
                del template[Attribute.CLASS], template[Attribute.KEY_TYPE]
                session.generate_key(KeyType.AES, bits, label=label, store=True,
                                     template=template)
            log.info("generated AES-%d master key %s", bits, label)

        self._run(op)

    def import_master_key(self, label, key_material):
        try:
            self._check_label(label)
            if not isinstance(key_material, (bytes, bytearray)) or \
                    len(key_material) not in (16, 32):
                raise HsmError(HsmError.BAD_INPUT, "master key must be 16 or 32 bytes")

            def op(session):
                with self._create_lock, native_errors(label):
                    if self._label_taken(session, label):
                        raise HsmError(HsmError.EXISTS, label)
                    template = secret_template(label, token=True, derive=True)
                    template[Attribute.VALUE] = bytes(key_material)
                    session.create_object(template)
                log.info("imported AES master key %s", label)

            self._run(op)
        finally:
            if isinstance(key_material, bytearray):
                key_material[:] = bytes(len(key_material))

    def import_transport_keys(self, batch, enc, mac, dek, kvn=se_consts.SCP03_KVN_TRANSPORT,
                              expected_kcvs=None):
        keys = (enc, mac, dek)
        try:
            self._check_label(batch)
            interface.check_kvn(kvn)
            for key in keys:
                if not isinstance(key, (bytes, bytearray)) or len(key) != interface.SCP03_KEY_BYTES:
                    raise HsmError(HsmError.BAD_INPUT, "transport keys must be 16 bytes each")
            if expected_kcvs is not None:
                # The plaintext is on the host for this call anyway; check before storing.
                kcvs = []
                for key in keys:
                    encryptor = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()
                    kcvs.append(encryptor.update(interface.KCV_INPUT_BLOCK)[:3])
                if tuple(bytes(x) for x in expected_kcvs) != tuple(kcvs):
                    raise HsmError(HsmError.KCV_MISMATCH, batch)

            def op(session):
                created = []
                with self._create_lock, native_errors(batch):
                    labels = [_TRANSPORT_LABEL % (batch, interface.COMPONENT_NAMES[c])
                              for c in interface.COMPONENTS]
                    if any(self._label_taken(session, label) for label in labels):
                        raise HsmError(HsmError.EXISTS, batch)
                    try:
                        for component, label, key in zip(interface.COMPONENTS, labels, keys):
                            if component == interface.COMPONENT_DEK:
                                usage = {"wrap": True}
                            else:
                                usage = {"sign": True}
                            template = secret_template(
                                label, token=True,
                                key_id=_TRANSPORT_ID + bytes((kvn, component)), **usage)
                            template[Attribute.VALUE] = bytes(key)
                            created.append(session.create_object(template))
                    except BaseException:
                        for obj in created:  # all three or none
                            with contextlib.suppress(p11e.PKCS11Error):
                                obj.destroy()
                        raise

            self._run(op)
            log.info("imported transport key set %s kvn 0x%02X", batch, kvn)
            return KeySetHandle(self, KeySetHandle.TRANSPORT, batch, kvn, None)
        finally:
            for key in keys:
                if isinstance(key, bytearray):
                    key[:] = bytes(len(key))

    def transport_keys(self, batch):
        self._check_label(batch)

        def op(session):
            enc = self._find_secret(session, "transport " + batch,
                                    label=_TRANSPORT_LABEL % (batch, "enc"))
            with native_errors(batch):
                key_id = enc[Attribute.ID]
            if len(key_id) != len(_TRANSPORT_ID) + 2 or not key_id.startswith(_TRANSPORT_ID):
                raise HsmError(HsmError.BACKEND, "transport key %s has a foreign CKA_ID" % batch)
            return KeySetHandle(self, KeySetHandle.TRANSPORT, batch, key_id[-2], None)

        return self._run(op)

    # -- per-device SCP03 ---------------------------------------------------------------

    def diversify(self, master_label, se_uid, kvn=se_consts.SCP03_KVN_DEVICE):
        blocks = {c: interface.diversification_block(se_uid, c) for c in interface.COMPONENTS}
        interface.check_kvn(kvn)
        uid_hex = bytes(se_uid).hex()

        def op(session):
            master = self._find_secret(session, master_label, label=master_label)
            handle_id = os.urandom(8)
            derived = []
            with native_errors(master_label):
                try:
                    for component in interface.COMPONENTS:
                        name = interface.COMPONENT_NAMES[component]
                        usage = {"extractable": True, "encrypt": True}
                        if component == interface.COMPONENT_DEK:
                            usage["wrap"] = True
                        else:
                            usage["sign"] = True
                        template = secret_template(
                            _DEVICE_LABEL % (uid_hex, name), token=False,
                            key_id=handle_id + bytes((component,)), **usage)
                        template[Attribute.VALUE_LEN] = interface.SCP03_KEY_BYTES
                        derived.append(master.derive_key(
                            KeyType.AES, 8 * interface.SCP03_KEY_BYTES,
                            mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                            mechanism_param=blocks[component], template=template))
                    kcvs = tuple(
                        key.encrypt(interface.KCV_INPUT_BLOCK, mechanism=Mechanism.AES_ECB)
                        [:interface.KCV_BYTES] for key in derived)
                    # Hygiene, not a barrier: the KCV was the only reason for ENCRYPT.
                    for key in derived:
                        key[Attribute.ENCRYPT] = False
                except BaseException:
                    for key in derived:
                        with contextlib.suppress(p11e.PKCS11Error):
                            key.destroy()
                    raise
            self._count_device_set(+1)
            return KeySetHandle(self, KeySetHandle.DEVICE, uid_hex, kvn, handle_id, kcvs)

        return self._run(op)

    def put_key_payload(self, device_keys_handle, transport_dek_handle, new_kvn):
        self._check_handle(device_keys_handle, KeySetHandle.DEVICE)
        self._check_handle(transport_dek_handle)
        interface.check_kvn(new_kvn)

        def op(session):
            dek = self._component(session, transport_dek_handle, interface.COMPONENT_DEK)
            wrapped = []
            for component in interface.COMPONENTS:
                key = self._component(session, device_keys_handle, component)
                with native_errors("wrap " + interface.COMPONENT_NAMES[component]):
                    wrapped.append(dek.wrap_key(key, mechanism=Mechanism.AES_CBC,
                                                mechanism_param=bytes(16)))
            return interface.assemble_put_key_data(new_kvn, wrapped, device_keys_handle.kcvs)

        return self._run(op)

    def scp03_session_keys(self, static_keys_handle, host_challenge, card_challenge):
        self._check_handle(static_keys_handle)
        context = interface.check_challenges(host_challenge, card_challenge)
        bits = 8 * interface.SCP03_KEY_BYTES

        def kdf(key, constant):
            with native_errors("cmac"):
                return b"".join(
                    key.sign(block, mechanism=Mechanism.AES_CMAC)
                    for block in interface.scp03_kdf_inputs(constant, context, bits)
                )[:bits // 8]

        def op(session):
            enc = self._component(session, static_keys_handle, interface.COMPONENT_ENC)
            mac = self._component(session, static_keys_handle, interface.COMPONENT_MAC)
            return interface.Scp03SessionKeys(
                kdf(enc, interface.KDF_S_ENC),
                kdf(mac, interface.KDF_S_MAC),
                kdf(mac, interface.KDF_S_RMAC),
            )

        return self._run(op)

    def release(self, handle):
        if not isinstance(handle, KeySetHandle) or handle._owner is not self:
            raise HsmError(HsmError.BAD_HANDLE, "not a key set of this backend")
        if handle.kind == KeySetHandle.TRANSPORT or handle._released:
            return
        handle._released = True
        self._count_device_set(-1)
        if self._closed:
            return  # the objects died with their session

        def op(session):
            for component in interface.COMPONENTS:
                try:
                    key = self._component(session, handle, component)
                except KeyNotFound:
                    continue  # its session is gone, and the object with it
                with native_errors("destroy"):
                    key.destroy()

        self._run(op)
