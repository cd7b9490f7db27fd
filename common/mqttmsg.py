# The fleet's MQTT topics and message formats, shared by the cloud (fleetid.cloud.mqtt)
# and the device adapters (device/mqtt.py).  Portable: CPython and MicroPython.
#
# Topics (PREFIX/<device>/...: <device> is the device serial, which is the CN of its
# certificate and, with mosquitto's use_identity_as_username, its MQTT user name; the
# broker ACL lets a device use only its own subtree, so a message on a device's topic is
# tied to the TLS identity that sent it):
#
#   fleet/<device>/telemetry   device -> cloud   {"seq": n, "t": unix s, "m": {metrics}}
#   fleet/<device>/cmd         cloud -> device   {"seq": n, "t": unix s, "kind": K, ...}
#   fleet/<device>/reply       device -> cloud   {"seq": n, "re": command seq, "ok": bool,
#                                                  "kind": K, ...}
#   fleet/crl/<label>          cloud -> all      the DER CRL of issuing CA <label>, retained
#
# Replay: every JSON message carries `seq`, strictly increasing per sender and topic; the
# receiver keeps the highest it accepted (SeqWindow) and refuses anything not above it.
# CRLs need no sequence: they are signed by their CA and the device keeps the highest
# cRLNumber it verified (device/crl_cache.py).  Command kinds:
#
#   "apdu"    {"apdu": hex}: one SCP03-wrapped command APDU for the SE, relayed verbatim;
#             reply {"resp": hex}: the SE's response as it came out (R-MAC / R-ENC'd)
#   "rotate"  ask the agent to renew its operational credential now
#   "ping"    reply only (liveness)

import json

from fleetid.common.errors import FleetidError

PREFIX = "fleet"
TELEMETRY = "telemetry"
COMMAND = "cmd"
REPLY = "reply"
CRL = "crl"

KIND_APDU = "apdu"
KIND_ROTATE = "rotate"
KIND_PING = "ping"

MAX_MESSAGE = 8192  # bytes: larger JSON payloads are refused before parsing
# Deepest nesting of arrays/objects a decoded document may have.  The fleet's messages nest
# 3 deep ({"m": {"agent": {...}}}); CPython's json recurses once per level and raises
# RecursionError (not ValueError) near 1,000, MicroPython's runs out of C stack sooner,
# so the depth is checked by a scan of the bytes *before* json.loads.
MAX_DEPTH = 16


class MessageError(FleetidError):
    """A message is malformed, oversized, too deeply nested or replayed.
    reason: MALFORMED, TOO_LARGE, TOO_DEEP, REPLAY."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    TOO_DEEP = "too_deep"
    REPLAY = "replay"

    def __init__(self, reason, detail=""):
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail


def topic(device, leaf):
    """fleet/<device>/<leaf>."""
    return PREFIX + "/" + device + "/" + leaf


def crl_topic(label):
    """fleet/crl/<label> (retained)."""
    return PREFIX + "/" + CRL + "/" + label


def split_topic(name):
    """(device or None, leaf) of a fleet topic; (None, label) for a CRL topic.
    Raises: MessageError(MALFORMED) for anything else."""
    if isinstance(name, (bytes, bytearray)):
        try:
            name = bytes(name).decode()
        except UnicodeError:
            raise MessageError(MessageError.MALFORMED, "topic")
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        raise MessageError(MessageError.MALFORMED, "topic")
    if parts[1] == CRL:
        return None, parts[2]
    return parts[1], parts[2]


def encode(fields):
    """A message: compact JSON of `fields` (a dict with at least "seq"), UTF-8 bytes."""
    return json.dumps(fields, separators=(",", ":")).encode()


_QUOTE = 0x22
_BACKSLASH = 0x5C
_OPENERS = (0x5B, 0x7B)  # [ {
_CLOSERS = (0x5D, 0x7D)  # ] }


def check_depth(data, max_depth=MAX_DEPTH):
    """Refuse JSON text nested deeper than `max_depth` (arrays and objects), by one pass
    over its bytes that skips string contents (RFC 8259 7: inside a string only `\\` escapes
    and `"` ends it).  Cheap (no allocation) and portable: MicroPython's json has no hook.
    Params: data: bytes-like UTF-8 JSON text.
    Raises: MessageError(TOO_DEEP)."""
    depth = 0
    in_string = False
    escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPENERS:
            depth += 1
            if depth > max_depth:
                raise MessageError(MessageError.TOO_DEEP, "nested deeper than %d" % max_depth)
        elif byte in _CLOSERS:
            depth -= 1


def decode_document(payload, max_size=MAX_MESSAGE, max_depth=MAX_DEPTH):
    """THE bounded JSON decoder of the fleet (MQTT messages on both sides, the verifier's
    /v1/telemetry): size checked first, then nesting depth, then json.loads.
    Params: payload: bytes-like (or str) JSON text.
    Returns: the decoded value.
    Raises: MessageError(TOO_LARGE / TOO_DEEP / MALFORMED), never anything else."""
    if isinstance(payload, str):
        payload = payload.encode()
    if len(payload) > max_size:
        raise MessageError(MessageError.TOO_LARGE, "over %d bytes" % max_size)
    if not isinstance(payload, bytes):  # no copy of what is bytes already (device heap)
        payload = bytes(payload)
    check_depth(payload, max_depth)
    try:
        return json.loads(payload.decode())
    except (ValueError, UnicodeError, RuntimeError, MemoryError):
        # RuntimeError: recursion (CPython's RecursionError is one), should the scan and
        # the parser ever disagree; MemoryError: a small heap on a device.
        raise MessageError(MessageError.MALFORMED, "not JSON")


def decode(payload):
    """Parse a JSON message (decode_document's bounds).  Returns: dict with an int "seq".
    Raises: MessageError(MALFORMED, TOO_LARGE, TOO_DEEP)."""
    fields = decode_document(payload)
    if not isinstance(fields, dict):
        raise MessageError(MessageError.MALFORMED, "not an object")
    seq = fields.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise MessageError(MessageError.MALFORMED, "seq")
    return fields


class SeqWindow:
    """The highest sequence number accepted from each sender; anything not above refused.

    Params: load: optional fn(key) -> int or None (persisted highest, e.g. an SE data
        object); store: optional fn(key, int) called after each accepted number.
    """

    def __init__(self, load=None, store=None):
        self._highest = {}
        self._load = load
        self._store = store

    def highest(self, key):
        value = self._highest.get(key)
        if value is None and self._load is not None:
            value = self._load(key)
            if value is not None:
                self._highest[key] = value
        return value or 0

    def accept(self, key, seq):
        """Record `seq` from `key`.  Raises: MessageError(REPLAY) unless seq > highest."""
        if seq <= self.highest(key):
            raise MessageError(MessageError.REPLAY, "seq %d" % seq)
        self._highest[key] = seq
        if self._store is not None:
            self._store(key, seq)
