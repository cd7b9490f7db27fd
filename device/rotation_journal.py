# The rotation journal: the device agent's persistent state, kept in the SE as data object
# se_consts.DATA_OBJECT_ROTATION_JOURNAL.  Portable: CPython and MicroPython; sans-I/O
# except for the two SE verbs it is given (read_object / write_object).
#
# Write-once records, MCUboot swap-status style: a record is never changed once written;
# the state is DERIVED from the records with the decision table below.  Each append writes
# the whole object again (WRITE DATA OBJECT is atomic in the SE: after a power cut the
# object holds the old records or the old records plus the new one, never a torn mix).
# When a rotation ends, the journal is compacted to one BASE record (again one atomic
# write), so it never holds more than 4 records in normal use (2 more per refused
# certificate, at most 3 x the agent's max_rotation_attempts + 2 in all).
#
# Object layout (all integers big-endian):
#
#     0        1        2        3        4
#     +--------+--------+--------+--------+--------------- ... ---+
#     |  'F'   |  'R'   |  'J'   | ver=01 | records, 16 B each    |
#     +--------+--------+--------+--------+--------------- ... ---+
#
# Record (struct ">BBBBIIH" + CRC, 16 bytes):
#
#     0        1        2        3        4                 8                 12       14       16
#     +--------+--------+--------+--------+-----------------+-----------------+--------+--------+
#     |  kind  |  cur   |  new   | cause  |    t0 (u32)     |    t1 (u32)     | seq u16| crc u16|
#     +--------+--------+--------+--------+-----------------+-----------------+--------+--------+
#
#     kind   BASE 01: `cur` holds the credential in use; t0/t1 = its notBefore/notAfter
#            BEGIN 02: a rotation from `cur` to a new key in `new` started (t0 = when)
#            ISSUED 03: the new certificate is stored beside its key in `new`;
#                       t0/t1 = its notBefore/notAfter
#            ACKED 04: the verifier acknowledged `new` (t0/t1 copied from ISSUED)
#            REFUSED 05: the certificate for `new` was refused: by the agent's checks
#                       before it was stored (after BEGIN), or by the verifier at the
#                       acknowledgement (after ISSUED); t0 = when, t1 = REFUSAL_* code
#     cur    slot of the credential in use before the rotation (the identity slot 1 for
#            the first enrolment)
#     new    slot of the new key (0 in BASE)
#     cause  why the rotation started: CAUSE_* (0 in BASE)
#     t0/t1  seconds since 1970-01-01 UTC (the agent's injected clock)
#     seq    record counter, +1 per record across compactions (mod 2^16; diagnostics)
#     crc    CRC-16/X-25 (common/crc16.py) of bytes 0..13
#
# Allowed sequences: [] | [BASE] | [BASE] BEGIN | ... BEGIN ISSUED | ... ISSUED ACKED, and
# the same without the leading BASE for the first enrolment; a REFUSED may follow BEGIN or
# ISSUED and is followed by BEGIN (the next attempt, same slots).  The number of REFUSED
# records since the start is the rotation's count of refused certificates (refusals()).  Anything else (a bad magic,
# version, CRC, length or order) raises JournalError(CORRUPT): the agent then stops and
# says so instead of guessing which key is good.
#
# DECISION TABLE: what the agent does on resume, by the LAST record (the SE's slots are
# probed where the table says "if present"; every action is idempotent, so a cut during an
# action just repeats it):
#
#   last record      credential the verifier   what may be in the SE     action on resume
#                    accepts after the cut
#   ---------------  ------------------------  ------------------------  -------------------------------
#   (none: object    identity cert (slot 1)    nothing of the agent's    ENROL: append BEGIN(1, A), then
#    never written)                                                      as BEGIN
#   BASE(cur)        cur                       cur: key + cert           idle; sweep the other
#                                                                        rotation slot (delete a key
#                                                                        if present); rotate when due,
#                                                                        commanded, or cur refused
#   BEGIN(cur, new)  cur (no new cert issued,  new: nothing, a key, or   delete new's key if present,
#                    or the verifier holds     a key + its cert (cut     then (again) nonce, GENERATE
#                    overlap(cur -> X) and     before ISSUED was         KEY, ATTEST, CSR signed in the
#                    accepts cur until the     written)                  SE, (re)enrol authenticated by
#                    overlap deadline)                                   cur (or by the identity cert if
#                                                                        the verifier refuses cur), check
#                                                                        the certificate (certcheck.py),
#                                                                        PUT CERT, append ISSUED; a
#                                                                        refused certificate: append
#                                                                        REFUSED (row REFUSED)
#   ISSUED(cur,new)  new (the verifier's       cur: key + cert;          POST /v1/rotation/ack with new,
#                    rotation state names it)  new: key + cert           append ACKED.  If the verifier
#                    and cur until the ack;                              refuses new (a 4xx answer, or
#                    a certificate the device                            its TLS while cur's handshake
#                    could not judge (unknown                            succeeds): append REFUSED (row
#                    to the registry): cur                               REFUSED)
#   ACKED(cur, new)  new                       cur: key + cert, or       delete cur's key + cert if
#                                              already deleted           present (never the identity
#                                                                        slot), compact to BASE(new)
#   REFUSED(cur,new) cur (the refused cert     cur: key + cert;          delete new's key if present;
#                    was never acknowledged;   new: nothing, a key, or   fewer than the allowed
#                    the verifier accepts cur  a key + the refused cert  refusals: append BEGIN(cur,
#                    as before the rotation                              new) and go on as BEGIN;
#                    or inside its overlap)                              else compact to BASE(cur)
#                                                                        (empty when cur is the
#                                                                        identity slot) and end the
#                                                                        cycle (rotation abandoned)
#
# The records always name the credential to connect with: cur up to and including BEGIN,
# new from ISSUED on (credential_slot() below).  No slot leaks: a key outside {identity,
# cur, new} is never generated, `new` is cleared before every key generation, and cur is
# deleted before the BASE that forgets it.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


import struct

from fleetid.common.crc16 import crc16
from fleetid.common.errors import FleetidError, ReferenceNotFound

JOURNAL_OBJECT = const(0x00)  # se_consts.DATA_OBJECT_ROTATION_JOURNAL
SLOT_IDENTITY = const(0x01)  # se_consts.SLOT_IDENTITY
MAGIC = b"FRJ\x01"
RECORD_SIZE = const(16)
MAX_RECORDS = const(63)  # (1024 - 4) // 16: se_consts.DATA_OBJECT_MAX
_BODY = ">BBBBIIH"  # kind, cur, new, cause, t0, t1, seq (14 bytes; CRC follows)
_U32 = const(0xFFFFFFFF)

BASE = const(0x01)
BEGIN = const(0x02)
ISSUED = const(0x03)
ACKED = const(0x04)
REFUSED = const(0x05)
KIND_NAMES = {BASE: "BASE", BEGIN: "BEGIN", ISSUED: "ISSUED", ACKED: "ACKED",
              REFUSED: "REFUSED"}

# REFUSED's t1: who refused the certificate.
REFUSAL_CHECK = const(1)  # the agent's checks (device/certcheck.py), before storing it
REFUSAL_ACK = const(2)  # the verifier, at the acknowledgement
REFUSAL_NAMES = {REFUSAL_CHECK: "check", REFUSAL_ACK: "ack"}

CAUSE_NONE = const(0)
CAUSE_ENROL = const(1)  # no operational credential yet
CAUSE_DUE = const(2)  # the configured fraction of the validity has passed
CAUSE_COMMAND = const(3)  # the cloud (or the operator) asked
CAUSE_REFUSED = const(4)  # the verifier refused the current credential (superseded/expired)
CAUSE_NAMES = {CAUSE_NONE: "-", CAUSE_ENROL: "enrol", CAUSE_DUE: "due",
               CAUSE_COMMAND: "command", CAUSE_REFUSED: "refused"}

# What may follow each kind (None: the empty journal).
_NEXT = {None: (BASE, BEGIN), BASE: (BEGIN,), BEGIN: (ISSUED, REFUSED),
         ISSUED: (ACKED, REFUSED), ACKED: (), REFUSED: (BEGIN,)}


class JournalError(FleetidError):
    """The journal cannot be used.  reason: CORRUPT (bad magic / version / CRC / order;
    `detail` says which) or FULL (no room for a record)."""

    CORRUPT = "corrupt"
    FULL = "full"

    def __init__(self, reason, detail=""):
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail


class Record:
    """One journal record (fields as in the module header)."""

    def __init__(self, kind, cur, new=0, cause=CAUSE_NONE, t0=0, t1=0, seq=0):
        self.kind = kind
        self.cur = cur
        self.new = new
        self.cause = cause
        self.t0 = t0
        self.t1 = t1
        self.seq = seq

    def encode(self):
        """Returns: the 16-byte record (CRC included).  Raises: ValueError (range)."""
        for value in (self.kind, self.cur, self.new, self.cause):
            if value < 0 or value > 0xFF:
                raise ValueError("journal byte field out of range")
        t0 = min(max(self.t0, 0), _U32)
        t1 = min(max(self.t1, 0), _U32)
        body = struct.pack(_BODY, self.kind, self.cur, self.new, self.cause, t0, t1,
                           self.seq & 0xFFFF)
        crc = crc16(body)
        return body + bytes((crc >> 8, crc & 0xFF))

    def __repr__(self):
        return "Record(%s cur=%d new=%d cause=%s t0=%d t1=%d seq=%d)" % (
            KIND_NAMES.get(self.kind, "?"), self.cur, self.new,
            CAUSE_NAMES.get(self.cause, "?"), self.t0, self.t1, self.seq)


def decode(data):
    """Parse a journal object.  Returns: list of Record (in order).

    Raises: JournalError(CORRUPT)."""
    if len(data) < 4 or bytes(data[:4]) != MAGIC:
        raise JournalError(JournalError.CORRUPT, "magic or version")
    if (len(data) - 4) % RECORD_SIZE:
        raise JournalError(JournalError.CORRUPT, "length")
    records = []
    last = None
    for off in range(4, len(data), RECORD_SIZE):
        chunk = bytes(data[off:off + RECORD_SIZE])
        crc = crc16(chunk[:14])
        if chunk[14] != crc >> 8 or chunk[15] != crc & 0xFF:
            raise JournalError(JournalError.CORRUPT, "CRC of record %d" % len(records))
        kind, cur, new, cause, t0, t1, seq = struct.unpack(_BODY, chunk[:14])
        if kind not in _NEXT[last]:
            raise JournalError(JournalError.CORRUPT, "%s after %s" % (
                KIND_NAMES.get(kind, "kind %d" % kind), KIND_NAMES.get(last, "start")))
        if records and kind != BASE and (cur != records[-1].cur or (
                (kind != BEGIN or last == REFUSED) and new != records[-1].new)):
            raise JournalError(JournalError.CORRUPT, "slots change inside a rotation")
        records.append(Record(kind, cur, new, cause, t0, t1, seq))
        last = kind
    return records


def encode(records):
    """The object bytes for a list of Record."""
    out = bytearray(MAGIC)
    for record in records:
        out.extend(record.encode())
    return bytes(out)


class RotationJournal:
    """The journal in the SE.

    Params: se: SeSession (read_object / write_object).  object_id: the data object.
    Attributes after load(): records (list of Record).
    """

    def __init__(self, se, object_id=JOURNAL_OBJECT):
        self.se = se
        self.object_id = object_id
        self.records = []
        self.writes = 0

    def load(self):
        """Read and parse the journal; a never-written object is the empty journal.

        Returns: the last Record, or None.  Raises: JournalError, ApduError, LinkError."""
        try:
            data = self.se.read_object(self.object_id)
        except ReferenceNotFound:
            data = MAGIC
        self.records = decode(data)
        return self.last()

    def last(self):
        """The last record, or None when the journal is empty."""
        return self.records[-1] if self.records else None

    def _seq(self):
        return (self.records[-1].seq + 1) & 0xFFFF if self.records else 0

    def append(self, record):
        """Append one record (one atomic WRITE DATA OBJECT).

        Raises: JournalError(CORRUPT) when the order is not allowed, FULL; SE errors.
        """
        last = self.last()
        if record.kind not in _NEXT[None if last is None else last.kind]:
            raise JournalError(JournalError.CORRUPT, "%s may not follow %s" % (
                KIND_NAMES.get(record.kind, "?"),
                KIND_NAMES.get(None if last is None else last.kind, "start")))
        if len(self.records) >= MAX_RECORDS:
            raise JournalError(JournalError.FULL)
        record.seq = self._seq()
        records = self.records + [record]
        self._write(records)
        return record

    def compact(self, cur, not_before, not_after):
        """Replace the journal by one BASE(cur) record (one atomic write)."""
        record = Record(BASE, cur, 0, CAUSE_NONE, not_before, not_after, self._seq())
        self._write([record])
        return record

    def reset(self):
        """Forget everything (one atomic write of the empty journal): the state "not
        enrolled", used when the first enrolment's certificate was refused before its
        acknowledgement."""
        self._write([])

    def _write(self, records):
        self.se.write_object(self.object_id, encode(records))
        self.writes += 1
        self.records = records


def credential_slot(last):
    """The slot whose key and certificate the verifier accepts, by the decision table.

    Params: last: the journal's last Record, or None.  Returns: slot number."""
    if last is None:
        return SLOT_IDENTITY
    if last.kind in (ISSUED, ACKED):
        return last.new
    return last.cur


def refusals(records):
    """How many certificates the rotation in `records` had refused (REFUSED records)."""
    count = 0
    for record in records:
        if record.kind == REFUSED:
            count += 1
    return count


def is_final(last):
    """True when no rotation is in flight (empty journal or BASE)."""
    return last is None or last.kind == BASE
