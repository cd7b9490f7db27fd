"""The audit chain's format and seal: the canonical entry encoding, the field schema, the
entry hash, and the decoding that checks one stored line.  No I/O.

Entry encoding (format v1)
--------------------------
One line per entry: a JSON object, UTF-8/ASCII only, keys sorted, no whitespace
(`json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)`), ending in "\\n".

    {"aid":"a0..","attestation_hash":"<64 hex>",...,"hash":"<64 hex>",...,"prev":"<64 hex>",
     "seq":41,"serial":1042,...,"type":"injection","v":1}

    body  = the canonical encoding of every field except "hash"
    hash  = SHA-256( b"fleetid/audit-entry/v1\\n" || body )
    line  = the canonical encoding of body's fields plus "hash"
    prev  = hash of entry seq-1; entry 0 has prev = 64 x "0"

Fields (all entries): v (int, 1), seq (int, = position in the log), prev (hex32),
type (str), time (RFC 3339 UTC with milliseconds, "2026-11-23T13:17:20.123Z").
Per type (hex = lowercase hex string, hex32 = 64 hex digits, str = printable text of at
most 256 characters, name = non-empty str):

    injection   serial int, se_uid hex, slot int, aid hex, cert_serial hex,
                cert_fingerprint hex32 (SHA-256 of the certificate DER), issuing_ca name,
                batch name, station name, operator name, hsm_session name,
                attestation_hash hex32 (SHA-256 of the attestation statement DER)
    hold        serial int, reason str, station str, operator str      [se_uid hex]
    revoke      serial int, cert_serial hex, cert_fingerprint hex32, reason str, operator str
    reconcile   serial int, outcome str, reason str, station str, operator str
                [se_uid hex, cert_serial hex, cert_fingerprint hex32]
    checkpoint  covers int, head hex32, line_key hex32, line_sig hex,
                witness_key hex32, witness_sig hex
    issuance    serial int, kind name, operation name, cert_serial hex,
                cert_fingerprint hex32, issuing_ca name, operator str
                (a certificate recorded outside an injection: EST enrolment and
                re-enrolment, a line certificate revoked before its commit)
    rotation_ack serial int, cert_fingerprint hex32, previous_fingerprint hex32
    ca_revoke   ca_fingerprint hex32, subject name, reason str, operator str

A verifier refuses unknown fields (a new field is a new format version), a line that is
not exactly its own canonical re-encoding (so *any* byte change is caught, even one JSON
would parse to the same value), and entries over MAX_ENTRY_BYTES.  An injection entry is
about 800 bytes (`stats.entry_size_stats`): within the 1-3 KB per injection the line
budgets.
"""

import binascii
import datetime
import hashlib
import json
import re
from dataclasses import dataclass, field

from fleetid.cloud.audit.errors import AuditChainBroken, AuditError

FORMAT_VERSION = 1
ENTRY_HASH_DOMAIN = b"fleetid/audit-entry/v1\n"
CHECKPOINT_DOMAIN = b"fleetid/audit-checkpoint/v1\n"
GENESIS_PREV = "0" * 64
MAX_ENTRY_BYTES = 4096  # hard ceiling per line; the budget is 1-3 KB per injection
MAX_TEXT = 256  # longest free-text field (reason, station, operator, issuing CA, ...)

INJECTION = "injection"
HOLD = "hold"
REVOKE = "revoke"
RECONCILE = "reconcile"
CHECKPOINT = "checkpoint"
ISSUANCE = "issuance"
ROTATION_ACK = "rotation_ack"
CA_REVOKE = "ca_revoke"
ENTRY_TYPES = (INJECTION, HOLD, REVOKE, RECONCILE, CHECKPOINT, ISSUANCE, ROTATION_ACK,
               CA_REVOKE)
# Entries about no single device (no `serial` field, NULL device_serial in the registry).
DEVICELESS_TYPES = (CHECKPOINT, CA_REVOKE)

# Field kinds: "int" (non-negative), "str" (<= MAX_TEXT printable), "name" (a non-empty
# "str": who / where / which, never left blank in an injection), "hex" (even-length
# lowercase hex), "hex32" (64 lowercase hex digits), "time" (RFC 3339, ms, UTC "Z").
_COMMON_FIELDS = {"v": "int", "seq": "int", "prev": "hex32", "type": "str", "time": "time"}
_REQUIRED = {
    INJECTION: {
        "serial": "int", "se_uid": "hex", "slot": "int", "aid": "hex", "cert_serial": "hex",
        "cert_fingerprint": "hex32", "issuing_ca": "name", "batch": "name", "station": "name",
        "operator": "name", "hsm_session": "name", "attestation_hash": "hex32",
    },
    HOLD: {"serial": "int", "reason": "str", "station": "str", "operator": "str"},
    REVOKE: {
        "serial": "int", "cert_serial": "hex", "cert_fingerprint": "hex32", "reason": "str",
        "operator": "str",
    },
    RECONCILE: {
        "serial": "int", "outcome": "str", "reason": "str", "station": "str", "operator": "str",
    },
    CHECKPOINT: {
        "covers": "int", "head": "hex32", "line_key": "hex32", "line_sig": "hex",
        "witness_key": "hex32", "witness_sig": "hex",
    },
    ISSUANCE: {
        "serial": "int", "kind": "name", "operation": "name", "cert_serial": "hex",
        "cert_fingerprint": "hex32", "issuing_ca": "name", "operator": "str",
    },
    ROTATION_ACK: {
        "serial": "int", "cert_fingerprint": "hex32", "previous_fingerprint": "hex32",
    },
    CA_REVOKE: {
        "ca_fingerprint": "hex32", "subject": "name", "reason": "str", "operator": "str",
    },
}
_OPTIONAL = {
    INJECTION: {},
    HOLD: {"se_uid": "hex"},
    REVOKE: {},
    RECONCILE: {"se_uid": "hex", "cert_serial": "hex", "cert_fingerprint": "hex32"},
    CHECKPOINT: {},
    ISSUANCE: {},
    ROTATION_ACK: {},
    CA_REVOKE: {},
}

_HEX_RE = re.compile(r"\A(?:[0-9a-f]{2})+\Z")
_HEX32_RE = re.compile(r"\A[0-9a-f]{64}\Z")
_TIME_RE = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")


def canonical_json(obj):
    """The canonical encoding: sorted keys, no whitespace, ASCII only.  Returns bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def format_time(when):
    """RFC 3339 UTC with milliseconds.  `when`: epoch seconds (float) or aware datetime."""
    if isinstance(when, datetime.datetime):
        if when.tzinfo is None:
            raise AuditError(AuditError.BAD_FIELDS, "naive datetime")
        moment = when.astimezone(datetime.timezone.utc)
    else:
        moment = datetime.datetime.fromtimestamp(float(when), datetime.timezone.utc)
    # Formatted by hand: strftime goes through the C library's time zone state (a stat
    # of /etc/localtime per call on glibc without TZ), several times per line device.
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (
        moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second,
        moment.microsecond // 1000)


def to_hex(value):
    """bytes -> lowercase hex; a hex string is normalised (lowercase, even length)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return binascii.hexlify(bytes(value)).decode("ascii")
    if isinstance(value, str):
        text = value.lower()
        if len(text) % 2:
            text = "0" + text
        return text
    raise AuditError(AuditError.BAD_FIELDS, "expected bytes or hex, got %s" % type(value).__name__)


def cert_serial_hex(serial_number):
    """X.509 serial number (int) -> the log's form: lowercase hex, even length."""
    if not isinstance(serial_number, int) or serial_number < 0:
        raise AuditError(AuditError.BAD_FIELDS, "certificate serial must be a non-negative int")
    text = "%x" % serial_number
    return text if len(text) % 2 == 0 else "0" + text


def valid_value(kind, value):
    """True if `value` is a valid field of `kind` ("int", "str", "name", "hex", "hex32",
    "time": the field kinds above)."""
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63
    if not isinstance(value, str):
        return False
    if kind == "str":
        return len(value) <= MAX_TEXT and value.isprintable()
    if kind == "name":
        return 0 < len(value) <= MAX_TEXT and value.isprintable()
    if kind == "hex":
        return len(value) <= 2 * MAX_TEXT and _HEX_RE.match(value) is not None
    if kind == "hex32":
        return _HEX32_RE.match(value) is not None
    if kind == "time":
        return _TIME_RE.match(value) is not None
    return False


def _schema(entry_type, sealed):
    """(field name -> kind, the required names sorted) of one entry type, sealed or not."""
    schema = dict(_COMMON_FIELDS)
    schema.update(_REQUIRED[entry_type])
    if not sealed:
        for name in ("seq", "prev"):
            schema.pop(name)
    required = tuple(sorted(schema))
    schema.update(_OPTIONAL[entry_type])
    return schema, required


# Built once: every entry of a registry write is checked twice (built, then sealed).
_SCHEMAS = {(entry_type, sealed): _schema(entry_type, sealed)
            for entry_type in _REQUIRED for sealed in (False, True)}


def _field_problem(fields, sealed):
    """None if `fields` match the schema of their type, else a short description."""
    entry_type = fields.get("type")
    if entry_type not in _REQUIRED:
        return "unknown type %r" % (entry_type,)
    schema, required = _SCHEMAS[(entry_type, sealed)]
    for name in required:
        if name not in fields:
            return "missing %s" % name
    for name, value in sorted(fields.items()):
        kind = schema.get(name)
        if kind is None:
            return "unknown field %s" % name
        if not valid_value(kind, value):
            return "bad %s" % name
    if fields["v"] != FORMAT_VERSION:
        return "format version %r" % (fields["v"],)
    return None


def free_text(text):
    """`text` made fit for a free-text ("str") field: every non-printable character
    replaced by "?", cut to MAX_TEXT characters (a hold or reconcile reason built from an
    exception message must not make the entry unsealable)."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:MAX_TEXT]


@dataclass(frozen=True)
class AuditEntry:
    """One sealed entry.  `line` is the stored bytes (with the trailing newline);
    `digest` its 32-byte hash; `fields` the decoded object (without "hash")."""

    fields: dict = field(compare=False)
    line: bytes
    digest: bytes

    @property
    def seq(self):
        return self.fields["seq"]

    @property
    def type(self):
        return self.fields["type"]

    @property
    def hash_hex(self):
        return binascii.hexlify(self.digest).decode("ascii")

    @property
    def serial(self):
        """Device serial, or None for an entry about no device (DEVICELESS_TYPES)."""
        return self.fields.get("serial")


def new_fields(entry_type, when):
    """The fields every entry starts with (v, type, time); `when` as for format_time, or
    a time already formatted."""
    return {"v": FORMAT_VERSION, "type": entry_type,
            "time": when if isinstance(when, str) else format_time(when)}


def checked_fields(fields):
    """`fields` (unsealed) if they match their type's schema.  Raises AuditError(BAD_FIELDS)."""
    problem = _field_problem(fields, sealed=False)
    if problem:
        raise AuditError(AuditError.BAD_FIELDS, problem)
    return fields


def seal(fields, seq, prev_hex):
    """Seal unsealed `fields` as entry number `seq` after the entry whose hash is `prev_hex`.

    Returns: AuditEntry.  Raises: AuditError(BAD_FIELDS) (also when over MAX_ENTRY_BYTES).
    """
    body = dict(fields)
    body.pop("hash", None)
    body["seq"] = seq
    body["prev"] = prev_hex
    problem = _field_problem(body, sealed=True)
    if problem:
        raise AuditError(AuditError.BAD_FIELDS, problem)
    digest = hashlib.sha256(ENTRY_HASH_DOMAIN + canonical_json(body)).digest()
    stored = dict(body)
    stored["hash"] = binascii.hexlify(digest).decode("ascii")
    line = canonical_json(stored) + b"\n"
    if len(line) > MAX_ENTRY_BYTES:
        raise AuditError(AuditError.BAD_FIELDS, "entry of %d bytes" % len(line))
    return AuditEntry(fields=body, line=line, digest=digest)


def _reject_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate key")
        out[key] = value
    return out


def parse_entry(line, index):
    """Decode and self-check one stored line (with or without its newline).

    Checks: ASCII JSON object, canonical encoding, schema, size, own hash, seq == index.
    Does not check the link to the previous entry (verify_log does).
    Returns: AuditEntry.  Raises: AuditChainBroken(index, reason).
    """
    raw = bytes(line)
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if len(raw) + 1 > MAX_ENTRY_BYTES:
        raise AuditChainBroken(index, AuditChainBroken.FIELDS, "entry too large")
    try:
        text = raw.decode("ascii")
        stored = json.loads(text, object_pairs_hook=_reject_duplicates,
                            parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise AuditChainBroken(index, AuditChainBroken.PARSE, type(exc).__name__) from None
    if not isinstance(stored, dict):
        raise AuditChainBroken(index, AuditChainBroken.PARSE, "not an object")
    try:
        canonical = canonical_json(stored)
    except ValueError:
        raise AuditChainBroken(index, AuditChainBroken.PARSE, "unencodable") from None
    if canonical != raw:
        raise AuditChainBroken(index, AuditChainBroken.NOT_CANONICAL)
    stored_hash = stored.pop("hash", None)
    if not isinstance(stored_hash, str) or not _HEX32_RE.match(stored_hash):
        raise AuditChainBroken(index, AuditChainBroken.FIELDS, "bad hash field")
    problem = _field_problem(stored, sealed=True)
    if problem:
        raise AuditChainBroken(index, AuditChainBroken.FIELDS, problem)
    digest = hashlib.sha256(ENTRY_HASH_DOMAIN + canonical_json(stored)).digest()
    if binascii.hexlify(digest).decode("ascii") != stored_hash:
        raise AuditChainBroken(index, AuditChainBroken.HASH)
    if stored["seq"] != index:
        raise AuditChainBroken(index, AuditChainBroken.SEQ, "seq %d" % stored["seq"])
    return AuditEntry(fields=stored, line=raw + b"\n", digest=digest)


def _refuse_constant(name):
    raise ValueError("non-finite number")


class StoredRow:
    """One row of a registry's audit table: the stored line and the columns stored beside
    it for indexing (seq, entry_type, device_serial, entry_hash).  Those columns are not
    hashed, so verification derives each of them again from the hashed entry and compares
    (check_columns): a row re-labelled to hide a device's history is caught."""

    __slots__ = ("device_serial", "entry_hash", "entry_type", "line", "seq")

    def __init__(self, line, seq, entry_type, device_serial, entry_hash):
        self.line = line
        self.seq = seq
        self.entry_type = entry_type
        self.device_serial = device_serial
        self.entry_hash = entry_hash


def stored_columns(entry):
    """The registry columns an entry is stored under, derived from the entry alone:
    dict seq, entry_type, device_serial (None for checkpoints), entry_hash."""
    return {"seq": entry.seq, "entry_type": entry.type, "device_serial": entry.serial,
            "entry_hash": entry.hash_hex}


def check_columns(entry, row, index):
    """Raise AuditChainBroken(index, COLUMNS) unless every stored column of `row`
    (a StoredRow) is the one derived from `entry` (its parsed, hash-checked line)."""
    for name, expected in sorted(stored_columns(entry).items()):
        value = getattr(row, name)
        # Exact types: a device_serial of True or 5.0 is not the integer the entry holds.
        if type(value) is not type(expected) or value != expected:
            raise AuditChainBroken(index, AuditChainBroken.COLUMNS, name)
