"""Configuration of the fleet cloud (`fleetid cloud serve`): a TOML file, then the
environment, then built-in defaults (the embedded demo set-up: software keystore,
SQLite registry, everything under one state directory).

File (all keys optional; paths relative to the file's folder):

    [cloud]
    state_dir = "var/cloud"          # embedded PKI, keystore, registry, TLS key live here
    host = "127.0.0.1"               # listen address of both TLS listeners
    verifier_port = 8443             # mTLS, client certificate REQUIRED
    est_port = 8444                  # EST, client certificate optional (401 without)
    metrics_port = 9464              # plain HTTP /metrics on 127.0.0.1; 0 = off
    crl_port = 8446                  # plain HTTP CRLs, GET /crl/<label>.crl, one per
                                     # label's CA (cloud/revocation/); 0 (the default) = off
    crl_base_url = "http://ca.example.net:8446"  # what new certificates name as their CRL
                                     # distribution point (+ /crl/<label>.crl); default
                                     # http://<host>:<crl_port> when crl_port is set, else
                                     # none (no CRL distribution point)
    crl_next_update_hours = 24       # nextUpdate - thisUpdate of each CRL
    registry = "sqlite:var/cloud/registry.db"   # or postgresql://user@host/db
    registry_timeout = 0             # seconds one registry operation may take before the
                                     # request fails "unavailable" (503), also while
                                     # PostgreSQL is paused; 0 = the backend's defaults
                                     # (SQLite busy 10 s; PostgreSQL 31 s)
    hsm = "soft:var/cloud/keystore.json;pass-env=FLEETID_KEYSTORE_PASS"
    vendor_roots = ["var/vendor/vendor_root.pem"]   # trusted SE vendor roots (PEM)
    roots = ["var/cloud/ceremony/root.pem"]         # fleet roots (PEM)
    intermediates = []                              # fleet issuing CAs (PEM), all labels'
                                                    # CAs are added automatically
    revoked_cas = []                 # SHA-256 fingerprints (hex) of revoked CAs
    revoked_cas_file = "..."         # default <state_dir>/revoked-cas.jsonl: the CAs
                                     # `fleetid cloud revoke-ca` revoked, one JSON line
                                     # each (fleetid/cloud/verifier/revoked_cas.py);
                                     # running servers re-read it when it changes
    overlap_days = 7                 # re-enrolment overlap window
    accept_identity = true           # factory identity certs authenticate at the verifier
    tls_cert = "..."  tls_key = "..."  # server certificate (default: made at bootstrap)
    log_level = "info"
    event_loop = "auto"              # "uvloop" (faster TLS accept path), "asyncio", or
                                     # "auto": uvloop when installed
    audit_line_key = "audit-line"    # HSM labels of the audit checkpoint keys: with both,
    audit_witness_key = "audit-witness"  # the server signs a checkpoint of the registry's
                                     # audit chain while it runs (256 new entries or an
                                     # hour) and at shutdown; the embedded set-up makes
                                     # them (public keys in <state_dir>/audit/)
    audit_witness_hsm = "..."        # the witness's own keystore or token (HSM URI; never
                                     # the cloud's `hsm`): required with audit_witness_key;
                                     # the embedded set-up makes a soft keystore of its
                                     # own, <state_dir>/witness/keystore.json
    witness_anchor = "..."           # default <state_dir>/witness/anchor.json: the
                                     # witness's latest signed checkpoint

    [[cloud.labels]]                 # one per EST label (product / batch CA)
    name = "widget-b42"
    ca_key = "ca-widget-b42-eu"      # the CA key's label in the HSM
    ca_cert = "pki/ca-widget-b42-eu.pem"
    require_approval = false
    profile = "operational"          # or "operational-short" (24 h: short-lived
                                     # certificates; agents renew at --renew-margin)
    default = true

Environment (override the file): FLEETID_CLOUD_<KEY> for each scalar key above, e.g.
FLEETID_CLOUD_VERIFIER_PORT=9443, FLEETID_CLOUD_REGISTRY=postgresql://...; list keys
(vendor_roots, roots, intermediates, revoked_cas) take a comma-separated list.
FLEETID_CLOUD_CONFIG names the file when --config is not given; without either,
<state_dir>/cloud.toml is read when it exists (what `fleetid line cloud-config --out`
writes), so every cloud command run beside it finds the same cloud.  Secrets are never in the
file: the HSM URI names the environment variable that holds them.
"""

import os
import tomllib

from fleetid.common.errors import FleetidError

DEFAULTS = {
    "state_dir": "var/cloud",
    "host": "127.0.0.1",
    "verifier_port": 8443,
    "est_port": 8444,
    "metrics_port": 9464,
    "crl_port": 0,
    "crl_base_url": None,  # default: http://<host>:<crl_port>
    "crl_next_update_hours": 24,
    "registry": None,  # default: sqlite:<state_dir>/registry.db
    "registry_timeout": 0,  # seconds; 0 = the registry backend's defaults
    "hsm": None,  # default: soft:<state_dir>/keystore.json;pass-env=FLEETID_KEYSTORE_PASS
    "vendor_roots": [],
    "roots": [],
    "intermediates": [],
    "revoked_cas": [],
    "revoked_cas_file": None,  # default: <state_dir>/revoked-cas.jsonl
    "overlap_days": 7,
    "accept_identity": True,
    "tls_cert": None,
    "tls_key": None,
    "log_level": "info",
    "event_loop": "auto",
    "audit_line_key": None,
    "audit_witness_key": None,
    "audit_witness_hsm": None,
    "witness_anchor": None,  # default: <state_dir>/witness/anchor.json
    "labels": [],
}
LIST_KEYS = ("vendor_roots", "roots", "intermediates", "revoked_cas")
PATH_KEYS = ("state_dir", "tls_cert", "tls_key", "revoked_cas_file", "witness_anchor")
ENV_PREFIX = "FLEETID_CLOUD_"


def embedded_hsm_uri(state_dir):
    """The embedded set-up's HSM: a soft keystore in state_dir (the only HSM on which
    `fleetid cloud serve` creates a root and an issuing CA itself)."""
    return "soft:%s;pass-env=FLEETID_KEYSTORE_PASS" % os.path.join(state_dir, "keystore.json")


class ConfigError(FleetidError, ValueError):
    """The configuration is unusable (message names the key).  Also a ValueError: a bad
    value the operator gave, and callers of load_config / build_context catch it as one."""


class CloudConfig:
    """Resolved configuration: one attribute per key of DEFAULTS."""

    def __init__(self, values):
        for key, value in values.items():
            setattr(self, key, value)

    def as_dict(self):
        return {key: getattr(self, key) for key in DEFAULTS}


def _convert(key, value):
    default = DEFAULTS[key]
    if key in LIST_KEYS:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError("%s must be a list of strings" % key)
        return value
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError("%s must be true or false" % key)
        return bool(value)
    if isinstance(default, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError("%s must be an integer" % key) from None
    if value is not None and not isinstance(value, str):
        raise ConfigError("%s must be a string" % key)
    return value


def _beside_state(environ):
    """<state_dir>/cloud.toml (state_dir from the environment, else the default) when it
    exists, else None."""
    state_dir = environ.get(ENV_PREFIX + "STATE_DIR") or DEFAULTS["state_dir"]
    candidate = os.path.join(state_dir, "cloud.toml")
    return candidate if os.path.isfile(candidate) else None


def load_config(path=None, environ=None):
    """Resolve the configuration: defaults < file (`path`, else $FLEETID_CLOUD_CONFIG, else
    <state_dir>/cloud.toml when it exists) < environment.  Returns CloudConfig.  Raises
    ConfigError."""
    environ = os.environ if environ is None else environ
    values = {k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()}
    path = path or environ.get(ENV_PREFIX + "CONFIG") or _beside_state(environ)
    base = os.getcwd()
    if path:
        section = _cloud_section(path)
        base = os.path.dirname(os.path.abspath(path))
        for key, value in section.items():
            values[key] = value if key == "labels" else _convert(key, value)
    for key in DEFAULTS:
        if key == "labels":
            continue
        env = environ.get(ENV_PREFIX + key.upper())
        if env is not None:
            values[key] = _convert(key, env)
    _resolve_paths(values, base)
    _derive_and_check(values)
    return CloudConfig(values)


def _cloud_section(path):
    """The [cloud] table of the TOML file at path, its keys checked against DEFAULTS."""
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("cannot read %s: %s" % (path, exc.strerror)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("%s: %s" % (path, exc)) from None
    section = document.get("cloud", {})
    if not isinstance(section, dict):
        raise ConfigError("[cloud] must be a table")
    unknown = set(section) - set(DEFAULTS)
    if unknown:
        raise ConfigError("unknown key(s) in [cloud]: %s" % ", ".join(sorted(unknown)))
    return section


def _resolve_paths(values, base):
    """Make every path in values (the labels' CA certificates, PATH_KEYS, the lists of
    roots) absolute, relative to base (the configuration file's folder, else the cwd)."""
    labels = []
    for entry in values["labels"]:
        if not isinstance(entry, dict) or not {"name", "ca_key", "ca_cert"} <= set(entry):
            raise ConfigError("each [[cloud.labels]] needs name, ca_key and ca_cert")
        label = dict(entry)
        label["ca_cert"] = _abs(base, label["ca_cert"])
        labels.append(label)
    values["labels"] = labels
    for key in PATH_KEYS:
        if values[key]:
            values[key] = _abs(base, values[key])
    for key in ("vendor_roots", "roots", "intermediates"):
        values[key] = [_abs(base, p) for p in values[key]]


def _derive_and_check(values):
    """Fill the values that default from others (the registry, files and HSM under
    state_dir, the CRL base URL) and refuse combinations that cannot work."""
    state = values["state_dir"]
    if not values["registry"]:
        values["registry"] = "sqlite:" + os.path.join(state, "registry.db")
    if not values["revoked_cas_file"]:
        values["revoked_cas_file"] = os.path.join(state, "revoked-cas.jsonl")
    if not values["witness_anchor"]:
        values["witness_anchor"] = os.path.join(state, "witness", "anchor.json")
    if bool(values["audit_line_key"]) != bool(values["audit_witness_key"]):
        raise ConfigError("audit_line_key and audit_witness_key go together")
    if not values["hsm"]:
        values["hsm"] = embedded_hsm_uri(state)
    if values["audit_witness_key"] and not values["audit_witness_hsm"]:
        raise ConfigError("audit_witness_key needs audit_witness_hsm: the witness's own "
                          "keystore or token")
    if values["audit_witness_hsm"] and values["audit_witness_hsm"] == values["hsm"]:
        raise ConfigError("audit_witness_hsm must not be the cloud's hsm (the witness "
                          "key lives in a keystore or token of its own)")
    if values["crl_port"] and not values["crl_base_url"]:
        values["crl_base_url"] = "http://%s:%d" % (values["host"], values["crl_port"])
    if values["crl_next_update_hours"] < 1:
        raise ConfigError("crl_next_update_hours must be >= 1")
    if values["registry_timeout"] < 0:
        raise ConfigError("registry_timeout must be >= 0")
    for key in ("verifier_port", "est_port", "metrics_port", "crl_port"):
        if not 0 <= values[key] <= 65535:
            raise ConfigError("%s out of range" % key)
    if values["event_loop"] not in ("auto", "uvloop", "asyncio"):
        raise ConfigError("event_loop must be auto, uvloop or asyncio")


def _abs(base, path):
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(base, path)
