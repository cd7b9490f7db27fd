"""The audit package's two exceptions: AuditError (a log could not be written or read)
and AuditChainBroken (verification found the first bad entry)."""

from fleetid.common.errors import FleetidError


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
    UNANCHORED = "unanchored"  # an entry no checkpoint covers, older than the interval

    def __init__(self, index, reason, detail=""):
        message = "entry %d: %s" % (index, reason)
        super().__init__(message + (": " + detail if detail else ""))
        self.index = index
        self.reason = reason
        self.detail = detail
