"""fleetid.cloud.hsm: the HSM interface of the factory line and its two backends.

    hsm = open_hsm("pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=fleetid;"
                   "pin-env=FLEETID_HSM_PIN")
    hsm = open_hsm("soft:/var/lib/fleetid/keystore.json;pass-env=FLEETID_KEYSTORE_PASS")

Interface: fleetid.cloud.hsm.interface.HsmBackend.  Errors: fleetid.cloud.hsm.errors.
Which operation runs where, and with which mechanism: README.md in this folder.
"""

import os

from fleetid.cloud.hsm.errors import HsmBusy, HsmError, KeyNotFound
from fleetid.cloud.hsm.interface import HsmBackend, KeySetHandle, Scp03SessionKeys

__all__ = [
    "open_hsm",
    "secret_variable",
    "HsmBackend",
    "HsmBusy",
    "HsmError",
    "KeyNotFound",
    "KeySetHandle",
    "Scp03SessionKeys",
]

# Attributes common to both schemes: pool sizing.
_POOL_ATTRS = {"max-sessions": ("max_sessions", int), "acquire-timeout": ("acquire_timeout", float)}


def _parse_attrs(parts, allowed):
    attrs = {}
    for part in parts:
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or name not in allowed:
            raise HsmError(HsmError.CONFIG, "unknown HSM URI attribute %r" % name)
        if name in attrs:
            raise HsmError(HsmError.CONFIG, "repeated HSM URI attribute %r" % name)
        attrs[name] = value
    return attrs


def _secret_from_env(attrs, key, environ):
    variable = attrs.get(key)
    if not variable:
        raise HsmError(HsmError.CONFIG, "the URI needs %s=<environment variable>" % key)
    value = environ.get(variable)
    if not value:
        raise HsmError(HsmError.CONFIG, "environment variable %s is unset or empty" % variable)
    return value


def _pool_kwargs(attrs):
    kwargs = {}
    for name, (kwarg, convert) in _POOL_ATTRS.items():
        if name in attrs:
            try:
                kwargs[kwarg] = convert(attrs[name])
            except ValueError:
                raise HsmError(HsmError.CONFIG, "bad %s %r" % (name, attrs[name])) from None
    return kwargs


def secret_variable(uri):
    """The environment variable an HSM URI takes its secret from (`pass-env=` of a soft
    keystore, `pin-env=` of a PKCS#11 token), or None when it names none."""
    _scheme, _sep, rest = uri.partition(":")
    for part in rest.split(";"):
        name, sep, value = part.partition("=")
        if sep and name.strip() in ("pass-env", "pin-env") and value.strip():
            return value.strip()
    return None


def open_hsm(uri, environ=None):
    """Open an HSM backend from a URI.

    URIs (attributes separated by ';'; secrets only by environment-variable name):
      pkcs11:module=<path to the PKCS#11 library>;token=<token label>;pin-env=<VAR>
             [;max-sessions=N][;acquire-timeout=S]
      soft:<keystore path>;pass-env=<VAR>[;max-sessions=N][;acquire-timeout=S]

    Params: uri str; environ mapping (default os.environ, injectable for tests).
    Returns: an HsmBackend (use it as a context manager, or call close()).
    Raises: HsmError(CONFIG) for a malformed URI or unset variable, and whatever the
    backend raises on open (HsmError(LOGIN) for a wrong PIN / passphrase, ...).
    """
    environ = os.environ if environ is None else environ
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise HsmError(HsmError.CONFIG, "HSM URI needs a scheme (pkcs11: or soft:)")
    parts = rest.split(";")
    if scheme == "pkcs11":
        allowed = {"module", "module-path", "token", "pin-env"} | set(_POOL_ATTRS)
        attrs = _parse_attrs(parts, allowed)
        module = attrs.get("module") or attrs.get("module-path")
        if not module or not attrs.get("token"):
            raise HsmError(HsmError.CONFIG, "pkcs11 URI needs module= and token=")
        from fleetid.cloud.hsm.pkcs11_backend import Pkcs11Backend

        return Pkcs11Backend(module, attrs["token"], _secret_from_env(attrs, "pin-env", environ),
                             **_pool_kwargs(attrs))
    if scheme == "soft":
        path, parts = parts[0], parts[1:]
        if not path:
            raise HsmError(HsmError.CONFIG, "soft URI needs a keystore path")
        attrs = _parse_attrs(parts, {"pass-env"} | set(_POOL_ATTRS))
        from fleetid.cloud.hsm.soft_backend import SoftBackend

        return SoftBackend(path, _secret_from_env(attrs, "pass-env", environ),
                           **_pool_kwargs(attrs))
    raise HsmError(HsmError.CONFIG, "unknown HSM URI scheme %r" % scheme)
