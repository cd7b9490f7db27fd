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
"""

import binascii
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.audit.checkpoints import checkpoint_statement
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
