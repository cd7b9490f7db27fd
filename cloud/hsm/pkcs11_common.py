"""What the PKCS#11 backend's modules share: the native errors that mean a lost session,
a missing key or a usage policy, their translation into the HsmError tree, and the AES
secret-key template with every usage flag explicit."""

import contextlib

from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11e

from fleetid.cloud.hsm.errors import HsmError, KeyNotFound, SessionLost

# Native errors that mean "this session is gone": the pool discards it, the op retries.
SESSION_LOST = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceRemoved,
    p11e.DeviceError,
    p11e.TokenNotPresent,
)
_NOT_FOUND = (
    p11e.NoSuchKey,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.WrappingKeyHandleInvalid,
)
_POLICY = (
    p11e.KeyNotWrappable,
    p11e.KeyUnextractable,
    p11e.AttributeSensitive,
    p11e.AttributeReadOnly,
    p11e.KeyTypeInconsistent,
    p11e.MechanismInvalid,
)



@contextlib.contextmanager
def native_errors(what=""):
    """Translate python-pkcs11 exceptions into the HsmError tree."""
    try:
        yield
    except SESSION_LOST as exc:
        raise SessionLost(type(exc).__name__) from None
    except _NOT_FOUND:
        raise KeyNotFound(what) from None
    except p11e.MultipleObjectsReturned:
        raise HsmError(HsmError.BACKEND, "several objects labelled " + what) from None
    except _POLICY as exc:
        raise HsmError(HsmError.POLICY, "%s: %s" % (what, type(exc).__name__)) from None
    except p11e.UserNotLoggedIn:
        raise HsmError(HsmError.LOGIN, "not logged in") from None
    except p11e.PKCS11Error as exc:
        raise HsmError(HsmError.BACKEND, "%s: %s" % (what, type(exc).__name__)) from None


def secret_template(label, token, key_id=None, **usage):
    """A complete AES secret-key template: every usage flag explicit, default False."""
    template = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.TOKEN: token,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: usage.pop("extractable", False),
        Attribute.LABEL: label,
    }
    for name in ("encrypt", "decrypt", "sign", "verify", "wrap", "unwrap", "derive"):
        template[getattr(Attribute, name.upper())] = usage.pop(name, False)
    if token:
        template[Attribute.MODIFIABLE] = False
    if key_id is not None:
        template[Attribute.ID] = key_id
    if usage:
        raise TypeError("unknown usage flags %r" % sorted(usage))
    return template


