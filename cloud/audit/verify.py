"""Offline verification of a whole audit log, and reading one device's entries.

What verification catches, and what it cannot alone
---------------------------------------------------
A change, deletion, insertion or reordering anywhere breaks a hash link, a seq or a
canonical form at the first affected entry.  Truncation leaves a valid shorter chain: it
is caught only against something kept outside the truncated copy, namely the registry's
`audit_head` row (count and head hash, moved in the same transaction as every append), a
count and head hash the caller knows (`expected_count`, `expected_head`), or the
witness's signed anchor of its latest checkpoint (`witness_anchor`).  Entries after the
last checkpoint are reported as `unanchored`: only the next checkpoint makes them
tamper-evident against someone who can rewrite the whole tail and the head row together.
A checkpoint is due at least every checkpoints.DEFAULT_EVERY_SECONDS while entries are
pending (and at once after a revocation), so an entry left uncovered for longer is a
failure, not a note: check_anchoring() raises for it (`fleetid audit verify` runs it).
"""

import binascii
import collections
import datetime
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.audit.checkpoints import (
    DEFAULT_EVERY_SECONDS,
    URGENT_TYPES,
    checkpoint_statement,
)
from fleetid.cloud.audit.codec import (
    CA_REVOKE,
    CHECKPOINT,
    GENESIS_PREV,
    INJECTION,
    StoredRow,
    check_columns,
    parse_entry,
)
from fleetid.cloud.audit.errors import AuditChainBroken
from fleetid.cloud.audit.signers import trusted_keys


# How long a revocation or CA change may wait for its checkpoint: it is due at once, and a
# running `cloud serve` looks every server.CHECKPOINT_POLL_SECONDS (10 s) for those
# written by other processes; 60 s leaves room for a slow HSM.
DEFAULT_URGENT_MAX_AGE_S = 60


@dataclass
class VerifyReport:
    """What verify_log found in a log that verified.

    entries: total; by_type: {type: count}; checkpoints: count; head: hash of the last
    entry (hex; GENESIS_PREV for an empty log); anchored: entries covered by the last
    checkpoint; unanchored: entries other than checkpoints that no checkpoint covers yet;
    oldest_unanchored_index / oldest_unanchored_time: the first of those (-1 / "" when
    none); oldest_urgent_index / oldest_urgent_time: the first of those that is a
    revocation or CA change (checkpoints.URGENT_TYPES); first_time / last_time: of the
    entries.
    """

    entries: int = 0
    by_type: dict = field(default_factory=dict)
    checkpoints: int = 0
    head: str = GENESIS_PREV
    anchored: int = 0
    unanchored: int = 0
    oldest_unanchored_index: int = -1
    oldest_unanchored_time: str = ""
    oldest_urgent_index: int = -1
    oldest_urgent_time: str = ""
    first_time: str = ""
    last_time: str = ""


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
    walk = _ChainWalk(trusted_keys(line_public_key, "line"),
                      trusted_keys(witness_public_key, "witness"), expected_count,
                      witness_anchor)
    for index, line in enumerate(lines):
        walk.step(index, line)
    return walk.finish(expected_head)


class _ChainWalk:
    """verify_log's state while it walks the log entry by entry."""

    def __init__(self, line_keys, witness_keys, expected_count, witness_anchor):
        self.line_keys = line_keys
        self.witness_keys = witness_keys
        self.expected_count = expected_count
        self.witness_anchor = witness_anchor
        self.report = VerifyReport()
        self.digests = bytearray()  # 32 bytes per entry: checkpoints look back at any head
        self.prev = GENESIS_PREV
        self.last_covers = 0
        self.checkpoint_at = []
        self.anchor_checkpoint_seen = False
        self.count = 0
        self.uncovered = collections.deque()  # (index, time) of entries no checkpoint covers

    def step(self, index, line):
        """Check entry `index` (its own form, its link, a checkpoint's signatures)."""
        if isinstance(line, StoredRow):
            entry = parse_entry(line.line, index)
            check_columns(entry, line, index)
        else:
            entry = parse_entry(line, index)
        fields = entry.fields
        if fields["prev"] != self.prev:
            raise AuditChainBroken(index, AuditChainBroken.LINK)
        if fields["type"] == CHECKPOINT:
            self._checkpoint(index, fields)
        else:
            self.uncovered.append((index, fields["time"], fields["type"] in URGENT_TYPES))
        self.digests += entry.digest
        self.prev = entry.hash_hex
        anchor = self.witness_anchor
        if anchor is not None and index == anchor[0] - 1 and self.prev != anchor[1]:
            raise AuditChainBroken(index, AuditChainBroken.HEAD, "differs from the witness")
        report = self.report
        report.by_type[fields["type"]] = report.by_type.get(fields["type"], 0) + 1
        if not report.first_time:
            report.first_time = fields["time"]
        report.last_time = fields["time"]
        if self.expected_count is not None and index + 1 > self.expected_count:
            raise AuditChainBroken(index, AuditChainBroken.BEYOND_HEAD,
                                   "head row says %d entries" % self.expected_count)
        self.count = index + 1

    def _checkpoint(self, index, fields):
        _verify_checkpoint(index, fields, self.digests, self.last_covers, self.line_keys,
                           self.witness_keys)
        self.last_covers = fields["covers"]
        while self.uncovered and self.uncovered[0][0] < self.last_covers:
            self.uncovered.popleft()
        self.checkpoint_at.append(index)
        if self.witness_anchor is not None and \
                (self.last_covers, fields["head"]) == tuple(self.witness_anchor):
            self.anchor_checkpoint_seen = True
        self.report.checkpoints += 1

    def finish(self, expected_head):
        """The truncation and head checks once every entry is read.  Returns VerifyReport."""
        count, prev, anchor = self.count, self.prev, self.witness_anchor
        if anchor is not None and count < anchor[0]:
            raise AuditChainBroken(count, AuditChainBroken.TRUNCATED,
                                   "the witness signed %d entries" % anchor[0])
        if anchor is not None and not self.anchor_checkpoint_seen:
            raise AuditChainBroken(count, AuditChainBroken.TRUNCATED,
                                   "the witness's checkpoint of %d entries is not in the log"
                                   % anchor[0])
        if self.expected_count is not None and count < self.expected_count:
            raise AuditChainBroken(count, AuditChainBroken.TRUNCATED,
                                   "%d of %d entries" % (count, self.expected_count))
        if expected_head is not None and count and prev != expected_head:
            raise AuditChainBroken(count - 1, AuditChainBroken.HEAD)
        if expected_head is not None and not count and expected_head != GENESIS_PREV:
            raise AuditChainBroken(0, AuditChainBroken.TRUNCATED, "empty log")
        report = self.report
        report.entries = count
        report.head = prev
        report.anchored = self.last_covers
        # Checkpoint entries sign themselves: only other entries count as not yet anchored.
        report.unanchored = count - self.last_covers - sum(
            1 for i in self.checkpoint_at if i >= self.last_covers)
        if self.uncovered:
            report.oldest_unanchored_index, report.oldest_unanchored_time, _ = \
                self.uncovered[0]
        for index, time_text, urgent in self.uncovered:
            if urgent:
                report.oldest_urgent_index, report.oldest_urgent_time = index, time_text
                break
        return report


def check_anchoring(report, now, max_age_s=DEFAULT_EVERY_SECONDS,
                    urgent_max_age_s=DEFAULT_URGENT_MAX_AGE_S):
    """Fail a verified log with an entry left without a checkpoint for too long at `now`:
    any entry older than `max_age_s` (a checkpoint was due every interval), or a
    revocation / CA change older than `urgent_max_age_s` (one was due at once:
    checkpoints.URGENT_TYPES).  Either way that tail was never anchored, or a checkpoint
    after it was cut off, and it could be cut off unseen.

    Params: report: VerifyReport of verify_log.  now: epoch seconds.  max_age_s: seconds
        (default: the checkpoint interval, DEFAULT_EVERY_SECONDS).  urgent_max_age_s:
        seconds (default DEFAULT_URGENT_MAX_AGE_S: a running server's checkpoint poll
        with margin).
    Returns: None.  Raises: AuditChainBroken(the uncovered entry's index, UNANCHORED).
    """
    for index, time_text, limit, what in (
            (report.oldest_urgent_index, report.oldest_urgent_time, urgent_max_age_s,
             "a revocation or CA change, due a checkpoint at once"),
            (report.oldest_unanchored_index, report.oldest_unanchored_time, max_age_s,
             "the checkpoint interval")):
        if index < 0:
            continue
        age = now - _epoch(time_text)
        if age > limit:
            raise AuditChainBroken(
                index, AuditChainBroken.UNANCHORED,
                "%d entries after the last checkpoint; this one (%s) is %d s old, more than "
                "%d s (%s): they could be cut off unseen"
                % (report.unanchored, time_text, age, limit, what))


def _epoch(time_text):
    moment = datetime.datetime.strptime(time_text, "%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


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
