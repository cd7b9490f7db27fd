"""The factory line's audit log: append-only, hash-chained, checkpointed by two signers.

One entry per injection (and per hold, revocation, reconciliation and checkpoint), in a
canonical text encoding that an auditor can read with `jq` and re-hash with `sha256sum`.

Where the chain lives (why "identity record + audit entry in one transaction" is true)
--------------------------------------------------------------------------------------
The authoritative chain is a table of the registry database (`audit_log`, plus the
one-row `audit_head` with the entry count and the head hash).  `Registry.commit_identity`
takes the unsealed injection entry, and inside the *same* database transaction that marks
the device committed and stores its certificate it reads the head, seals the entry (assigns
`seq` and `prev`, computes its hash), inserts it and moves the head.  The row's other
columns (`seq`, `entry_type`, `device_serial`, `entry_hash`: indexes for `audit show`) are
derived from the sealed entry, and verification derives them again and compares
(`check_columns`), so an unhashed column cannot be changed unseen.  SQLite commits all of
it or none of it; a second store (a file beside the database) could not join that
transaction, which is why the file form is a mirror and not the record.  Writers are
serialised by the transaction itself (`BEGIN IMMEDIATE` on SQLite; the head row lock on
PostgreSQL), so parallel stations get one linear chain.

The file form (`AuditFile`, JSON lines, fsync per append) serves lines that run without a
registry, the export that goes to an auditor or a witness (`export_lines`), and offline
verification (`fleetid audit verify --log`).  Both forms hold byte-identical lines.

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
about 800 bytes (`entry_size_stats`): within the 1-3 KB per injection the line budgets.

Checkpoints
-----------
A checkpoint says "the first `covers` entries of this log end in hash `head`", signed by
the line key (in the line's HSM) and by a witness key (held by another party).  Both sign
the same statement:

    statement = b"fleetid/audit-checkpoint/v1\\n" ||
                canonical({"covers": n, "head": "<64 hex>", "time": "<time>"})

with ECDSA P-256 / SHA-256 (DER signatures, hex in the entry); `line_key` and
`witness_key` are SHA-256 of each signer's SubjectPublicKeyInfo DER.  The checkpoint is
then appended to the chain like any entry, at some seq >= covers: signing happens outside
the registry's write lock, so stations keep committing while the HSM and the witness sign.

What verification catches, and what it cannot alone
---------------------------------------------------
A change, deletion, insertion or reordering anywhere breaks a hash link, a seq or a
canonical form at the first affected entry.  Truncation leaves a valid shorter chain: it
is caught only against something kept outside the truncated copy, namely the registry's
`audit_head` row (count and head hash, moved in the same transaction as every append), a
count the caller knows (`expected_count`), or a witness's copy of its latest checkpoint
(`expected_head`).  Entries after the last checkpoint are reported as `unanchored`: only
the next checkpoint makes them tamper-evident against someone who can rewrite the whole
tail and the head row together.
"""

import binascii
import datetime
import hashlib
import json
import os
import re
import threading
import time as _time
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.common.errors import FleetidError

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


# -- errors ---------------------------------------------------------------------------------------


class AuditError(FleetidError):
    """An audit log could not be written or read (bad fields, torn file, wrong key).

    `reason` is one of the class constants; `detail` is short and secret-free.
    """

    BAD_FIELDS = "bad_fields"  # an entry to append has missing / unknown / malformed fields
    TORN_TAIL = "torn_tail"  # the log file ends in a partial line (crash during an append)
    SIGNER = "signer"  # a signer's signature does not verify under its own public key
    IO = "io"  # the log file could not be read or written
    STATE = "state"  # the log is not where the caller expected (e.g. head moved)

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


class AuditChainBroken(FleetidError):
    """Verification failed at entry `index` (0-based: the FIRST bad entry) for `reason`.

    For truncation `index` is the position of the first missing entry (the log's length).
    """

    PARSE = "parse"  # not one JSON object of ASCII text
    NOT_CANONICAL = "not_canonical"  # parses, but is not its own canonical encoding
    FIELDS = "fields"  # missing, unknown or malformed fields, or over MAX_ENTRY_BYTES
    HASH = "hash"  # the stored hash is not the hash of the entry
    SEQ = "seq"  # seq is not the entry's position (deleted / inserted / moved entries)
    LINK = "link"  # prev is not the previous entry's hash
    CHECKPOINT_RANGE = "checkpoint_range"  # covers 0, beyond itself, or going backwards
    CHECKPOINT_HEAD = "checkpoint_head"  # head is not the hash of entry covers-1
    CHECKPOINT_KEY = "checkpoint_key"  # signed by a key other than the trusted ones
    CHECKPOINT_SIG = "checkpoint_sig"  # a signature does not verify
    TRUNCATED = "truncated"  # fewer entries than the registry / caller / witness knows of
    BEYOND_HEAD = "beyond_head"  # more entries than the registry's head row says
    HEAD = "head"  # the last hash differs from the head the registry / witness holds
    COLUMNS = "columns"  # a registry row's indexed columns disagree with its hashed entry

    def __init__(self, index, reason, detail=""):
        message = "entry %d: %s" % (index, reason)
        super().__init__(message + (": " + detail if detail else ""))
        self.index = index
        self.reason = reason
        self.detail = detail


# -- small helpers --------------------------------------------------------------------------------


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
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)


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


def certificate_facts(cert_der):
    """What the log records about a certificate, from its DER.

    Returns dict: cert_serial (hex), cert_fingerprint (SHA-256 of the DER, hex),
    issuing_ca (the issuer name, RFC 4514 string).
    """
    cert = x509.load_der_x509_certificate(bytes(cert_der))
    return {
        "cert_serial": cert_serial_hex(cert.serial_number),
        "cert_fingerprint": hashlib.sha256(bytes(cert_der)).hexdigest(),
        "issuing_ca": cert.issuer.rfc4514_string(),
    }


def attestation_hash(statement_der):
    """SHA-256 (hex) of an attestation statement as the SE produced it (DER bytes)."""
    return hashlib.sha256(bytes(statement_der)).hexdigest()


def key_id(public_key):
    """SHA-256 (hex) of a public key's SubjectPublicKeyInfo DER: names a checkpoint signer."""
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def load_public_key(key):
    """A cryptography EC public key from itself, PEM bytes/str, or a PEM certificate."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key
    data = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if b"BEGIN CERTIFICATE" in data:
        public = x509.load_pem_x509_certificate(data).public_key()
    else:
        public = serialization.load_pem_public_key(data)
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise AuditError(AuditError.SIGNER, "checkpoint keys are EC P-256")
    return public


def _check_value(kind, value):
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


def _field_problem(fields, sealed):
    """None if `fields` match the schema of their type, else a short description."""
    entry_type = fields.get("type")
    if entry_type not in _REQUIRED:
        return "unknown type %r" % (entry_type,)
    schema = dict(_COMMON_FIELDS)
    schema.update(_REQUIRED[entry_type])
    if not sealed:
        for name in ("seq", "prev"):
            schema.pop(name)
    required = set(schema)
    schema.update(_OPTIONAL[entry_type])
    for name in sorted(required):
        if name not in fields:
            return "missing %s" % name
    for name, value in sorted(fields.items()):
        kind = schema.get(name)
        if kind is None:
            return "unknown field %s" % name
        if not _check_value(kind, value):
            return "bad %s" % name
    if fields["v"] != FORMAT_VERSION:
        return "format version %r" % (fields["v"],)
    return None


# -- entries --------------------------------------------------------------------------------------


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
        """Device serial, or None for checkpoints."""
        return self.fields.get("serial")


def _base(entry_type, when):
    return {"v": FORMAT_VERSION, "type": entry_type,
            "time": when if isinstance(when, str) else format_time(when)}


def _checked(fields):
    problem = _field_problem(fields, sealed=False)
    if problem:
        raise AuditError(AuditError.BAD_FIELDS, problem)
    return fields


def injection_entry(*, serial, se_uid, slot, aid, cert_serial, cert_fingerprint, issuing_ca,
                    batch, station, operator, hsm_session, attestation_hash, when):
    """Build the (unsealed) audit entry of one injection.

    Params: serial int; se_uid bytes or hex; slot int; aid bytes or hex (the applet AID);
    cert_serial int or hex; cert_fingerprint bytes or hex (SHA-256 of the cert DER);
    issuing_ca str; batch, station, operator, hsm_session str; attestation_hash bytes or
    hex (SHA-256 of the statement DER); when epoch seconds, aware datetime or a formatted
    time string.  `certificate_facts(der)` gives the three certificate fields.
    Returns: dict of fields; hand it to Registry.commit_identity (or AuditFile.append).
    Raises: AuditError(BAD_FIELDS).
    """
    fields = _base(INJECTION, when)
    fields.update(
        serial=serial, se_uid=to_hex(se_uid), slot=slot, aid=to_hex(aid),
        cert_serial=cert_serial_hex(cert_serial) if isinstance(cert_serial, int)
        else to_hex(cert_serial),
        cert_fingerprint=to_hex(cert_fingerprint), issuing_ca=issuing_ca, batch=batch,
        station=station, operator=operator, hsm_session=hsm_session,
        attestation_hash=to_hex(attestation_hash),
    )
    return _checked(fields)


def hold_entry(*, serial, reason, station, operator, when, se_uid=None):
    """Build a hold / quarantine entry (a device that must not ship).  Raises AuditError."""
    fields = _base(HOLD, when)
    fields.update(serial=serial, reason=reason, station=station, operator=operator)
    if se_uid is not None:
        fields["se_uid"] = to_hex(se_uid)
    return _checked(fields)


def revoke_entry(*, serial, cert_serial, cert_fingerprint, reason, operator, when):
    """Build a certificate revocation entry.  Raises AuditError."""
    fields = _base(REVOKE, when)
    fields.update(serial=serial, cert_fingerprint=to_hex(cert_fingerprint), reason=reason,
                  operator=operator,
                  cert_serial=cert_serial_hex(cert_serial) if isinstance(cert_serial, int)
                  else to_hex(cert_serial))
    return _checked(fields)


def reconcile_entry(*, serial, outcome, reason, station, operator, when, se_uid=None,
                    cert_serial=None, cert_fingerprint=None):
    """Build a reconciliation entry (an intent record resolved after a crash)."""
    fields = _base(RECONCILE, when)
    fields.update(serial=serial, outcome=outcome, reason=reason, station=station,
                  operator=operator)
    if se_uid is not None:
        fields["se_uid"] = to_hex(se_uid)
    if cert_serial is not None:
        fields["cert_serial"] = (cert_serial_hex(cert_serial) if isinstance(cert_serial, int)
                                 else to_hex(cert_serial))
    if cert_fingerprint is not None:
        fields["cert_fingerprint"] = to_hex(cert_fingerprint)
    return _checked(fields)


def issuance_entry(*, serial, kind, operation, cert_der, operator, when):
    """Build the entry of a certificate issued outside the line's injection (EST
    simpleenroll / simplereenroll, or a certificate recorded by any other path).

    Params: serial int (device); kind "identity" / "operational"; operation name (e.g.
    "simpleenroll"); cert_der the certificate (its serial, fingerprint and issuer are
    recorded); operator str; when as for injection_entry.  Raises AuditError(BAD_FIELDS).
    """
    try:
        facts = certificate_facts(cert_der)
    except ValueError:
        raise AuditError(AuditError.BAD_FIELDS, "not a DER certificate") from None
    fields = _base(ISSUANCE, when)
    fields.update(serial=serial, kind=kind, operation=operation, operator=operator, **facts)
    return _checked(fields)


def rotation_ack_entry(*, serial, cert_fingerprint, previous_fingerprint, when):
    """Build the entry of a rotation acknowledgement: device `serial` switched to
    `cert_fingerprint`; `previous_fingerprint`'s overlap window closed.  Raises AuditError."""
    fields = _base(ROTATION_ACK, when)
    fields.update(serial=serial, cert_fingerprint=to_hex(cert_fingerprint),
                  previous_fingerprint=to_hex(previous_fingerprint))
    return _checked(fields)


def ca_revoke_entry(*, ca_fingerprint, subject, reason, operator, when):
    """Build the entry of a revoked issuing (batch) CA: every device under it is refused.
    Params: ca_fingerprint SHA-256 of the CA certificate DER (bytes or hex); subject its
    RFC 4514 name.  Raises AuditError."""
    fields = _base(CA_REVOKE, when)
    fields.update(ca_fingerprint=to_hex(ca_fingerprint), subject=subject, reason=reason,
                  operator=operator)
    return _checked(fields)


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


# -- checkpoints ----------------------------------------------------------------------------------


class HsmSigner:
    """A checkpoint signer over an HSM key: `HsmSigner(hsm, "audit-line-1")`.

    sign(data) -> DER ECDSA-SHA256 signature made inside the HSM; public_key() -> the
    cryptography public key.  The private key never reaches this process.
    """

    def __init__(self, hsm, label):
        self.hsm = hsm
        self.label = label

    def sign(self, data):
        return self.hsm.sign(self.label, data)

    def public_key(self):
        return self.hsm.public_key(self.label)


class KeySigner:
    """A checkpoint signer over an in-memory private key (a witness's own software key,
    tests).  Same protocol as HsmSigner.  The key is never printed by repr()."""

    def __init__(self, private_key):
        self._private_key = private_key

    def sign(self, data):
        return self._private_key.sign(bytes(data), ec.ECDSA(hashes.SHA256()))

    def public_key(self):
        return self._private_key.public_key()

    def __repr__(self):
        return "KeySigner(<private key>)"


class AnchoringWitness:
    """The witness side of checkpoints: signs with `signer` (HsmSigner / KeySigner) and
    keeps, in `anchor_path`, the latest checkpoint it signed (the anchor).

    Why: a log can be cut after any entry and its tail rewritten together with the
    registry's head row; the result is a valid, shorter chain.  What the cut cannot change
    is the witness's own record of how far the log went.  `audit verify --witness-anchor
    FILE` compares the log against it (read_witness_anchor).  The witness also refuses to
    sign a checkpoint that covers fewer entries than its anchor, or the same number with
    another head (AuditError(STATE)): it never vouches for a rolled-back log.

    Anchor file (JSON, written atomically): {"covers", "head", "time", "witness_key",
    "witness_sig"}: the signed checkpoint statement's fields and the witness's signature
    over it, so a reader can check the anchor came from the witness.  In production the
    witness is another party and the file lives with it; the embedded line keeps it in
    <line>/witness/anchor.json.
    """

    def __init__(self, signer, anchor_path):
        self.signer = signer
        self.anchor_path = os.fspath(anchor_path)
        self._lock = threading.Lock()

    def public_key(self):
        return self.signer.public_key()

    def sign(self, statement):
        statement = bytes(statement)
        if not statement.startswith(CHECKPOINT_DOMAIN):
            raise AuditError(AuditError.SIGNER, "the witness signs checkpoint statements only")
        try:
            signed = json.loads(statement[len(CHECKPOINT_DOMAIN):].decode("ascii"))
            covers, head, when = signed["covers"], signed["head"], signed["time"]
        except (ValueError, KeyError, TypeError):
            raise AuditError(AuditError.SIGNER, "not a checkpoint statement") from None
        if checkpoint_statement(covers, head, when) != statement:
            raise AuditError(AuditError.SIGNER, "not a canonical checkpoint statement")
        with self._lock:
            anchor = _read_anchor_file(self.anchor_path)
            if anchor is not None:
                if covers < anchor["covers"]:
                    raise AuditError(AuditError.STATE, "the witness signed %d entries "
                                     "already; refuses %d" % (anchor["covers"], covers))
                if covers == anchor["covers"] and head != anchor["head"]:
                    raise AuditError(AuditError.STATE, "the witness signed another head "
                                     "for %d entries" % covers)
            signature = bytes(self.signer.sign(statement))
            record = {"covers": covers, "head": head, "time": when,
                      "witness_key": key_id(self.signer.public_key()),
                      "witness_sig": to_hex(signature)}
            directory = os.path.dirname(os.path.abspath(self.anchor_path))
            os.makedirs(directory, exist_ok=True)
            tmp = "%s.tmp-%d" % (self.anchor_path, os.getpid())
            with open(tmp, "wb") as f:
                f.write(canonical_json(record) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.anchor_path)
            _fsync_dir(self.anchor_path)
        return signature


def _read_anchor_file(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(AuditError.IO, "witness anchor: %s" % (exc.strerror or exc)) \
            from None
    try:
        anchor = json.loads(data.decode("ascii"))
        problem = not isinstance(anchor, dict) or set(anchor) != {
            "covers", "head", "time", "witness_key", "witness_sig"}
        if not problem:
            problem = not (_check_value("int", anchor["covers"]) and anchor["covers"] >= 1
                           and _check_value("hex32", anchor["head"])
                           and _check_value("time", anchor["time"])
                           and _check_value("hex32", anchor["witness_key"])
                           and _check_value("hex", anchor["witness_sig"]))
    except (ValueError, UnicodeDecodeError):
        problem = True
    if problem:
        raise AuditError(AuditError.STATE, "witness anchor %s is not an anchor file" % path)
    return anchor


def read_witness_anchor(path, witness_public_key):
    """The (covers, head hex) a witness anchor file records, after checking its signature
    under one of the witness's public keys (same forms as verify_log takes).

    Raises AuditError(IO) unreadable, AuditError(STATE) not an anchor file or missing,
    AuditError(SIGNER) not signed by the witness.
    """
    anchor = _read_anchor_file(path)
    if anchor is None:
        raise AuditError(AuditError.STATE, "no witness anchor at %s" % path)
    public = _trusted_keys(witness_public_key, "witness").get(anchor["witness_key"])
    if public is None:
        raise AuditError(AuditError.SIGNER, "the anchor is signed by another witness key")
    statement = checkpoint_statement(anchor["covers"], anchor["head"], anchor["time"])
    try:
        public.verify(binascii.unhexlify(anchor["witness_sig"]), statement,
                      ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise AuditError(AuditError.SIGNER, "the anchor's signature does not verify") \
            from None
    return anchor["covers"], anchor["head"]


def checkpoint_statement(covers, head_hex, time_text):
    """The bytes both checkpoint signers sign (module docstring)."""
    return CHECKPOINT_DOMAIN + canonical_json(
        {"covers": covers, "head": head_hex, "time": time_text})


def checkpoint_entry(*, covers, head, line_signer, witness_signer, when):
    """Sign "the first `covers` entries end in `head`" with both signers.

    Each signature is checked against its signer's public key before the entry is built
    (a misbehaving HSM or witness is caught here, not by the next auditor).
    Returns: unsealed fields for append.  Raises: AuditError(SIGNER / BAD_FIELDS).
    """
    if not isinstance(covers, int) or covers < 1:
        raise AuditError(AuditError.BAD_FIELDS, "a checkpoint covers at least one entry")
    fields = _base(CHECKPOINT, when)
    statement = checkpoint_statement(covers, head, fields["time"])
    fields.update(covers=covers, head=head)
    for role, signer in (("line", line_signer), ("witness", witness_signer)):
        signature = bytes(signer.sign(statement))
        public = signer.public_key()
        try:
            public.verify(signature, statement, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise AuditError(AuditError.SIGNER, role + " signature does not verify") from None
        fields[role + "_key"] = key_id(public)
        fields[role + "_sig"] = to_hex(signature)
    return _checked(fields)


class Checkpointer:
    """Appends a signed checkpoint when enough entries or time have gone by.

    `store` is a Registry or an AuditFile (anything with head(), last_checkpoint() and
    append_audit(fields)).  Call maybe_checkpoint() after each commit (cheap when nothing
    is due) and at the end of a shift.  Thread-safe; signing runs outside the store's
    write lock.
    """

    def __init__(self, store, line_signer, witness_signer, every_entries=256,
                 every_seconds=3600.0, wall_clock=_time.time):
        self.store = store
        self.line_signer = line_signer
        self.witness_signer = witness_signer
        self.every_entries = every_entries
        self.every_seconds = every_seconds
        self.wall_clock = wall_clock
        self._lock = threading.Lock()
        self._last_covers = None
        self._had_checkpoint = False
        self._last_time = None

    def _load(self):
        if self._last_covers is None:
            last = self.store.last_checkpoint()
            self._last_covers = last.fields["covers"] if last else 0
            self._had_checkpoint = last is not None
            self._last_time = self.wall_clock() if last is None else _parse_time(
                last.fields["time"])

    def _pending(self, count):
        # Entries not yet covered, not counting the last checkpoint's own entry (it lies
        # after what it covers): otherwise every checkpoint would call for the next one.
        return count - self._last_covers - (1 if self._had_checkpoint else 0)

    def due(self):
        """True when `every_entries` entries or `every_seconds` passed since the last one."""
        with self._lock:
            self._load()
            count, _head = self.store.head()
            pending = self._pending(count)
            if pending <= 0:
                return False
            return (pending >= self.every_entries
                    or self.wall_clock() - self._last_time >= self.every_seconds)

    def maybe_checkpoint(self):
        """Checkpoint if due().  Returns the sealed AuditEntry, or None."""
        return self.checkpoint() if self.due() else None

    def checkpoint(self):
        """Sign the current head now (if any entry is new) and append the checkpoint.

        Returns: the sealed AuditEntry, or None if nothing is new since the last one.
        Raises: AuditError(SIGNER), HsmError from the line signer, store errors.
        """
        with self._lock:
            self._load()
            count, head = self.store.head()
            if self._pending(count) <= 0:
                return None
            now = self.wall_clock()
            fields = checkpoint_entry(covers=count, head=head, line_signer=self.line_signer,
                                      witness_signer=self.witness_signer, when=now)
            entry = self.store.append_audit(fields)
            self._last_covers = count
            self._had_checkpoint = True
            self._last_time = now
            return entry


def _parse_time(text):
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


# -- verification ---------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What verify_log found in a log that verified.

    entries: total; by_type: {type: count}; checkpoints: count; head: hash of the last
    entry (hex; GENESIS_PREV for an empty log); anchored: entries covered by the last
    checkpoint; unanchored: entries other than checkpoints that no checkpoint covers yet;
    first_time / last_time: of the entries.
    """

    entries: int = 0
    by_type: dict = field(default_factory=dict)
    checkpoints: int = 0
    head: str = GENESIS_PREV
    anchored: int = 0
    unanchored: int = 0
    first_time: str = ""
    last_time: str = ""


def _trusted_keys(keys, role):
    if keys is None:
        raise AuditError(AuditError.SIGNER, "the %s public key is required" % role)
    if isinstance(keys, (list, tuple)):
        loaded = [load_public_key(k) for k in keys]
    else:
        loaded = [load_public_key(keys)]
    if not loaded:
        raise AuditError(AuditError.SIGNER, "the %s public key is required" % role)
    return {key_id(k): k for k in loaded}


def verify_log(lines, line_public_key, witness_public_key, expected_count=None,
               expected_head=None, witness_anchor=None):
    """Verify a whole log offline: every entry, every hash link, every checkpoint.

    Params:
      lines               iterable of stored lines (bytes), in log order: read_log_file(path),
                          Registry.iter_audit_lines(), or a list; or of StoredRow (a
                          registry's audit_snapshot()), whose columns are checked too
      line_public_key     the line's checkpoint key (EC public key or PEM; or a list of them
                          when the line key was rotated)
      witness_public_key  the witness's key (same forms)
      expected_count      entries the log must hold (the registry's head row, a witness's
                          latest checkpoint `covers`); None = no truncation check
      expected_head       hex hash the last entry must have (with expected_count: the
                          registry's head row)
      witness_anchor      (covers, head hex) from the witness's copy of its latest
                          checkpoint (read_witness_anchor): the log must hold at least
                          `covers` entries, entry covers-1 must have that hash (the log may
                          have grown since), and the checkpoint entry itself must be in the
                          log (so not even the last checkpoint can be cut off unseen)
    Returns: VerifyReport.
    Raises: AuditChainBroken(index, reason) at the FIRST bad entry; AuditError(SIGNER) if
      a key is missing.
    """
    line_keys = _trusted_keys(line_public_key, "line")
    witness_keys = _trusted_keys(witness_public_key, "witness")
    report = VerifyReport()
    digests = bytearray()  # 32 bytes per entry: checkpoints look back at any covered head
    prev = GENESIS_PREV
    last_covers = 0
    checkpoint_at = []
    anchor_checkpoint_seen = False
    index = -1
    for index, line in enumerate(lines):
        if isinstance(line, StoredRow):
            entry = parse_entry(line.line, index)
            check_columns(entry, line, index)
        else:
            entry = parse_entry(line, index)
        fields = entry.fields
        if fields["prev"] != prev:
            raise AuditChainBroken(index, AuditChainBroken.LINK)
        if fields["type"] == CHECKPOINT:
            _verify_checkpoint(index, fields, digests, last_covers, line_keys, witness_keys)
            last_covers = fields["covers"]
            checkpoint_at.append(index)
            if witness_anchor is not None and (last_covers, fields["head"]) == \
                    tuple(witness_anchor):
                anchor_checkpoint_seen = True
            report.checkpoints += 1
        digests += entry.digest
        prev = entry.hash_hex
        if witness_anchor is not None and index == witness_anchor[0] - 1 \
                and prev != witness_anchor[1]:
            raise AuditChainBroken(index, AuditChainBroken.HEAD, "differs from the witness")
        report.by_type[fields["type"]] = report.by_type.get(fields["type"], 0) + 1
        if not report.first_time:
            report.first_time = fields["time"]
        report.last_time = fields["time"]
        if expected_count is not None and index + 1 > expected_count:
            raise AuditChainBroken(index, AuditChainBroken.BEYOND_HEAD,
                                   "head row says %d entries" % expected_count)
    count = index + 1
    if witness_anchor is not None and count < witness_anchor[0]:
        raise AuditChainBroken(count, AuditChainBroken.TRUNCATED,
                               "the witness signed %d entries" % witness_anchor[0])
    if witness_anchor is not None and not anchor_checkpoint_seen:
        raise AuditChainBroken(count, AuditChainBroken.TRUNCATED,
                               "the witness's checkpoint of %d entries is not in the log"
                               % witness_anchor[0])
    if expected_count is not None and count < expected_count:
        raise AuditChainBroken(count, AuditChainBroken.TRUNCATED,
                               "%d of %d entries" % (count, expected_count))
    if expected_head is not None and count and prev != expected_head:
        raise AuditChainBroken(count - 1, AuditChainBroken.HEAD)
    if expected_head is not None and not count and expected_head != GENESIS_PREV:
        raise AuditChainBroken(0, AuditChainBroken.TRUNCATED, "empty log")
    report.entries = count
    report.head = prev
    report.anchored = last_covers
    # Checkpoint entries sign themselves: only other entries count as not yet anchored.
    report.unanchored = count - last_covers - sum(1 for i in checkpoint_at if i >= last_covers)
    return report


def _verify_checkpoint(index, fields, digests, last_covers, line_keys, witness_keys):
    covers = fields["covers"]
    if covers < 1 or covers > index or covers < last_covers:
        raise AuditChainBroken(index, AuditChainBroken.CHECKPOINT_RANGE, "covers %d" % covers)
    covered_head = binascii.hexlify(bytes(digests[(covers - 1) * 32:covers * 32])).decode()
    if covered_head != fields["head"]:
        raise AuditChainBroken(index, AuditChainBroken.CHECKPOINT_HEAD)
    statement = checkpoint_statement(covers, fields["head"], fields["time"])
    for role, trusted in (("line", line_keys), ("witness", witness_keys)):
        public = trusted.get(fields[role + "_key"])
        if public is None:
            raise AuditChainBroken(index, AuditChainBroken.CHECKPOINT_KEY, role + " key")
        try:
            public.verify(binascii.unhexlify(fields[role + "_sig"]), statement,
                          ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise AuditChainBroken(index, AuditChainBroken.CHECKPOINT_SIG, role) from None


def show(lines, serial):
    """Every entry about device `serial`, in log order (each self-checked, not chain-checked:
    run verify_log for that).

    Returns: list of AuditEntry (injection first, then any hold / revoke / reconcile).
    Raises: AuditChainBroken if a line fails its own checks.
    """
    out = []
    for index, line in enumerate(lines):
        entry = parse_entry(line, index)
        if entry.fields.get("serial") == serial:
            out.append(entry)
    return out


def describe(entry):
    """One human line for an entry: when, what, where, who, with what evidence."""
    f = entry.fields
    if f["type"] == INJECTION:
        return ("%s injection serial=%d se_uid=%s station=%s operator=%s hsm_session=%s "
                "batch=%s slot=%d aid=%s cert_serial=%s cert_sha256=%s issuing_ca=%r "
                "attestation_sha256=%s" % (
                    f["time"], f["serial"], f["se_uid"], f["station"], f["operator"],
                    f["hsm_session"], f["batch"], f["slot"], f["aid"], f["cert_serial"],
                    f["cert_fingerprint"], f["issuing_ca"], f["attestation_hash"]))
    if f["type"] == CHECKPOINT:
        return "%s checkpoint covers=%d head=%s" % (f["time"], f["covers"], f["head"])
    if f["type"] == CA_REVOKE:
        return "%s ca_revoke subject=%r ca_sha256=%s reason=%s operator=%s" % (
            f["time"], f["subject"], f["ca_fingerprint"], f["reason"], f["operator"])
    extras = " ".join("%s=%s" % (k, f[k]) for k in sorted(f)
                      if k not in ("v", "seq", "prev", "type", "time", "serial"))
    return "%s %s serial=%d %s" % (f["time"], f["type"], f["serial"], extras)


# -- the file form --------------------------------------------------------------------------------


def read_log_file(path):
    """Yield the lines of a JSON-lines audit file (bytes, with newlines), in order.

    A final line without its newline is yielded as is (verification then reports it).
    """
    with open(path, "rb") as f:
        for line in f:
            yield line


def _fsync_dir(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reverse_lines(f, size, block=65536):
    """Yield complete lines of an open binary file from the end backwards."""
    pos = size
    tail = b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        chunk = f.read(step) + tail
        parts = chunk.split(b"\n")
        tail = parts[0]
        for part in reversed(parts[1:]):
            if part:
                yield part + b"\n"
    if tail:
        yield tail + b"\n"


class AuditFile:
    """An append-only JSON-lines audit log in one file; every append is fsync'd.

    Opening reads only the tail (the last entry gives the head).  A file that ends in a
    partial line (a crash mid-append: that append never returned) is refused with
    AuditError(TORN_TAIL) unless `repair_torn_tail=True`, which cuts the partial line.
    Thread-safe within one process; one writer process per file.
    """

    def __init__(self, path, repair_torn_tail=False):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._failed = False
        created = not os.path.exists(self.path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise AuditError(AuditError.IO, exc.strerror or "open failed") from None
        try:
            if created:
                _fsync_dir(self.path)
            self._count, self._head = self._read_head(repair_torn_tail)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    def _read_head(self, repair):
        size = os.fstat(self._fd).st_size
        if size == 0:
            return 0, GENESIS_PREV
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                # Everything after the last newline is an append that never returned.
                f.seek(max(0, size - MAX_ENTRY_BYTES - 1))
                window = f.read()
                cut = window.rfind(b"\n")
                if cut < 0 and len(window) < size:
                    # A "partial line" longer than any entry is not a torn append.
                    raise AuditError(AuditError.STATE, "no entry boundary near the end")
                keep = (size - len(window) + cut + 1) if cut >= 0 else 0
                if not repair:
                    raise AuditError(AuditError.TORN_TAIL, "%d bytes after the last entry"
                                     % (size - keep))
                os.ftruncate(self._fd, keep)
                os.fsync(self._fd)
                size = keep
                if size == 0:
                    return 0, GENESIS_PREV
            last = next(_reverse_lines(f, size))
        try:
            seq = json.loads(last)["seq"]
            entry = parse_entry(last, seq)
        except (ValueError, KeyError, TypeError, AuditChainBroken) as exc:
            raise AuditError(AuditError.STATE, "last entry unreadable: %s" % exc) from None
        return entry.seq + 1, entry.hash_hex

    def head(self):
        """(entry count, hash of the last entry in hex)."""
        with self._lock:
            return self._count, self._head

    def append_audit(self, fields):
        """Seal `fields` as the next entry, write it and fsync.  Returns the AuditEntry.

        Raises: AuditError(BAD_FIELDS), AuditError(IO).
        """
        with self._lock:
            entry = seal(fields, self._count, self._head)
            self._write(entry.line)
            self._count += 1
            self._head = entry.hash_hex
            return entry

    append = append_audit

    def append_lines(self, lines):
        """Append already-sealed lines (an export from the registry), checking that each
        continues this file's chain.  Raises AuditChainBroken, AuditError(IO)."""
        with self._lock:
            for line in lines:
                entry = parse_entry(line, self._count)
                if entry.fields["prev"] != self._head:
                    raise AuditChainBroken(self._count, AuditChainBroken.LINK)
                self._write(entry.line)
                self._count += 1
                self._head = entry.hash_hex

    def _write(self, data):
        # After a failed write the file may end in part of a line: refuse further appends
        # (they would follow garbage) until a reopen repairs the tail.
        if self._fd is None or self._failed:
            raise AuditError(AuditError.STATE, "closed, or a previous append failed: reopen")
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError as exc:
            self._failed = True
            raise AuditError(AuditError.IO, exc.strerror or "write failed") from None

    def last_checkpoint(self):
        """The last checkpoint entry in the file, or None (reads backwards from the end)."""
        with self._lock:
            size = os.fstat(self._fd).st_size
            with open(self.path, "rb") as f:
                for line in _reverse_lines(f, size):
                    if b'"type":"checkpoint"' not in line:
                        continue
                    try:
                        entry = parse_entry(line, json.loads(line)["seq"])
                    except (ValueError, KeyError, TypeError, AuditChainBroken):
                        raise AuditError(AuditError.STATE, "unreadable entry near the end") \
                            from None
                    if entry.type == CHECKPOINT:
                        return entry
        return None

    def lines(self):
        """Iterate the stored lines from the start."""
        return read_log_file(self.path)

    def close(self):
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def export_lines(lines, path):
    """Write lines (e.g. Registry.iter_audit_lines()) to a new file atomically (temp file,
    fsync, rename, directory fsync).  Returns the number of lines written."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    count = 0
    with open(tmp, "wb") as f:
        for line in lines:
            f.write(line)
            count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path)
    return count


# -- sizing (for the bench) -----------------------------------------------------------------------


def sample_injection_entry(serial, rng=os.urandom, when=1795000000.0):
    """A realistic injection entry for sizing: production-like field widths (16-byte UID,
    20-byte certificate serial, a batch CA's distinguished name)."""
    return injection_entry(
        serial=serial, se_uid=rng(16), slot=2, aid=bytes.fromhex("a000000620466c656574"),
        cert_serial=rng(20), cert_fingerprint=rng(32),
        issuing_ca="CN=fleetid batch CA 2026-11 line-3,OU=batch 2026-11-23-A,O=fleetid",
        batch="2026-11-23-A", station="line-3/station-17", operator="op-4711",
        hsm_session="hsm-pool-3/session-211", attestation_hash=rng(32), when=when)


def entry_size_stats(count=1000, rng=os.urandom):
    """Bytes per sealed injection entry over `count` sample entries, and per checkpoint
    (estimated from 72-byte DER signatures, the P-256 maximum).

    Returns dict: injection_min, injection_max, injection_mean, checkpoint_bytes.
    Not a test: the bench calls it to report the audit log's per-injection footprint.
    """
    sizes = []
    prev = GENESIS_PREV
    for seq in range(count):
        entry = seal(sample_injection_entry(seq + 1, rng), seq, prev)
        prev = entry.hash_hex
        sizes.append(len(entry.line))
    checkpoint = _base(CHECKPOINT, 1795000000.0)
    checkpoint.update(covers=count, head=prev, line_key="a" * 64, witness_key="b" * 64,
                      line_sig="30" * 72, witness_sig="30" * 72)
    return {
        "injection_min": min(sizes),
        "injection_max": max(sizes),
        "injection_mean": sum(sizes) / len(sizes),
        "checkpoint_bytes": len(seal(checkpoint, count, prev).line),
    }
