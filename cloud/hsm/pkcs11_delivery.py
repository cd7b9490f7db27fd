"""The PKCS#11 backend's transport-key delivery (interface.py, "transport keys delivered
wrapped"): the line's RSA wrapping key, a shipment's KEK unwrapped into the token, and one
chip's transport keys unwrapped from it as session objects.  Mixed into Pkcs11Backend.

    wrapping key      CKM_RSA_PKCS_KEY_PAIR_GEN, RSA-3072; private half token,
                      non-extractable, non-modifiable, UNWRAP only
    shipment KEK      C_UnwrapKey CKM_RSA_PKCS_OAEP (SHA-1, MGF1-SHA-1) -> AES-256 token
                      object, non-extractable, non-modifiable, UNWRAP only
    chip transport    C_UnwrapKey CKM_AES_KEY_WRAP (RFC 3394) -> session objects,
                      non-extractable; ENC/MAC SIGN (CMAC), DEK WRAP; KCVs with C_Encrypt
                      CKM_AES_ECB, then CKA_ENCRYPT cleared

The plaintext transport keys never reach host memory: the host handles the wrapped blobs
and the KCVs (public) only.
"""

import contextlib
import logging
import os

from cryptography.hazmat.primitives import serialization
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.rsa import encode_rsa_public_key

from fleetid.common import se_consts
from fleetid.cloud.hsm import interface
from fleetid.cloud.hsm.errors import HsmError, SessionLost
from fleetid.cloud.hsm.interface import KeySetHandle
from fleetid.cloud.hsm.pkcs11_common import SESSION_LOST, native_errors, secret_template

log = logging.getLogger("fleetid.cloud.hsm.pkcs11")

CHIP_TRANSPORT_LABEL = "scp03-chip-transport:%s:%s"  # se_uid hex, component name
# interface.py: the shipment KEK is RSAES-OAEP with SHA-1 / MGF1-SHA-1 (SoftHSM2 2.6.1
# refuses other OAEP hashes with CKR_ARGUMENTS_BAD).
_OAEP_PARAMS = (Mechanism.SHA_1, MGF.SHA1, None)


class Pkcs11TransportDelivery:
    """Mixin: needs the backend's _run, _check_label, _label_taken, _find_secret,
    _create_lock and _count_device_set."""

    def create_transport_wrapping_key(self, label):
        self._check_label(label)

        def op(session):
            with self._create_lock, native_errors(label):
                if self._label_taken(session, label):
                    raise HsmError(HsmError.EXISTS, label)
                public, _private = session.generate_keypair(
                    KeyType.RSA, interface.TRANSPORT_WRAPPING_BITS, store=True, label=label,
                    public_template={
                        Attribute.TOKEN: True, Attribute.PRIVATE: False,
                        Attribute.WRAP: True, Attribute.ENCRYPT: False,
                        Attribute.VERIFY: False,
                    },
                    private_template={
                        Attribute.TOKEN: True, Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                        Attribute.MODIFIABLE: False, Attribute.UNWRAP: True,
                        Attribute.DECRYPT: False, Attribute.SIGN: False,
                        Attribute.DERIVE: False,
                    },
                )
                der = encode_rsa_public_key(public)
            log.info("generated RSA-%d transport wrapping key %s",
                     interface.TRANSPORT_WRAPPING_BITS, label)
            return serialization.load_der_public_key(der)

        return self._run(op)

    def transport_wrapping_public_key(self, label):
        def op(session):
            with native_errors(label):
                public = session.get_key(object_class=ObjectClass.PUBLIC_KEY,
                                         key_type=KeyType.RSA, label=label)
                return serialization.load_der_public_key(encode_rsa_public_key(public))

        return self._run(op)

    def import_transport_kek(self, label, wrapping_label, wrapped_kek):
        self._check_label(label)
        if not isinstance(wrapped_kek, (bytes, bytearray)):
            raise HsmError(HsmError.BAD_INPUT, "wrapped KEK must be bytes")

        def op(session):
            with self._create_lock:
                with native_errors(wrapping_label):
                    if self._label_taken(session, label):
                        raise HsmError(HsmError.EXISTS, label)
                    private = session.get_key(object_class=ObjectClass.PRIVATE_KEY,
                                              key_type=KeyType.RSA, label=wrapping_label)
                template = secret_template(label, token=True, unwrap=True)
                del template[Attribute.CLASS], template[Attribute.KEY_TYPE]
                try:
                    kek = private.unwrap_key(
                        ObjectClass.SECRET_KEY, KeyType.AES, bytes(wrapped_kek),
                        label=label, store=True, mechanism=Mechanism.RSA_PKCS_OAEP,
                        mechanism_param=_OAEP_PARAMS, template=template)
                except SESSION_LOST as exc:
                    raise SessionLost(type(exc).__name__) from None
                except p11e.PKCS11Error as exc:
                    # OAEP decoding failures come back as CKR_ENCRYPTED_DATA_INVALID,
                    # _LEN_RANGE or (SoftHSM2) CKR_GENERAL_ERROR.
                    raise HsmError(HsmError.WRAPPED_KEY_INVALID, "%s: %s" % (
                        label, type(exc).__name__)) from None
                with native_errors(label):
                    # SoftHSM2 2.6.1 leaves CKA_VALUE_LEN 0 on unwrapped keys (and refuses
                    # it in the unwrap template): checked where the token reports it.
                    length = kek[Attribute.VALUE_LEN]
                    if length and length != interface.TRANSPORT_KEK_BYTES:
                        kek.destroy()
                        raise HsmError(HsmError.WRAPPED_KEY_INVALID,
                                       "%s: not an AES-256 key" % label)
            log.info("imported transport KEK %s (unwrapped with %s)", label, wrapping_label)

        self._run(op)

    def unwrap_transport_keys(self, kek_label, se_uid, wrapped_keys, expected_kcvs,
                              kvn=se_consts.SCP03_KVN_TRANSPORT):
        se_uid = interface.check_se_uid(se_uid)
        interface.check_kvn(kvn)
        wrapped, expected = interface.check_wrapped_transport_keys(wrapped_keys, expected_kcvs)
        uid_hex = se_uid.hex()

        def op(session):
            kek = self._find_secret(session, kek_label, label=kek_label)
            handle_id = os.urandom(8)
            unwrapped = []
            try:
                for component, blob in zip(interface.COMPONENTS, wrapped):
                    name = interface.COMPONENT_NAMES[component]
                    usage = {"encrypt": True}
                    if component == interface.COMPONENT_DEK:
                        usage["wrap"] = True
                    else:
                        usage["sign"] = True
                    template = secret_template(
                        CHIP_TRANSPORT_LABEL % (uid_hex, name), token=False,
                        key_id=handle_id + bytes((component,)), **usage)
                    del template[Attribute.CLASS], template[Attribute.KEY_TYPE]
                    try:
                        unwrapped.append(kek.unwrap_key(
                            ObjectClass.SECRET_KEY, KeyType.AES, blob, store=False,
                            mechanism=Mechanism.AES_KEY_WRAP, template=template))
                    except SESSION_LOST as exc:
                        raise SessionLost(type(exc).__name__) from None
                    except p11e.PKCS11Error as exc:
                        # RFC 3394 2.2.3 integrity check failed (SoftHSM2: GeneralError).
                        raise HsmError(HsmError.WRAPPED_KEY_INVALID, "%s %s: %s" % (
                            uid_hex, name, type(exc).__name__)) from None
                with native_errors("transport KCV"):
                    kcvs = tuple(
                        key.encrypt(interface.KCV_INPUT_BLOCK, mechanism=Mechanism.AES_ECB)
                        [:interface.KCV_BYTES] for key in unwrapped)
                    for key in unwrapped:
                        key[Attribute.ENCRYPT] = False  # the KCV was the only reason
                if kcvs != expected:
                    raise HsmError(HsmError.KCV_MISMATCH, uid_hex)
            except BaseException:
                for key in unwrapped:
                    with contextlib.suppress(p11e.PKCS11Error):
                        key.destroy()
                raise
            self._count_device_set(+1)
            return KeySetHandle(self, KeySetHandle.CHIP_TRANSPORT, uid_hex, kvn, handle_id,
                                kcvs)

        return self._run(op)
