"""Signed checkpoints of the audit chain, and the Checkpointer that appends them.

A checkpoint says "the first `covers` entries of this log end in hash `head`", signed by
the line key (in the line's HSM) and by a witness key (meant to be held by another party:
witness.AnchoringWitness).  Both sign the same statement:

    statement = b"fleetid/audit-checkpoint/v1\\n" ||
                canonical({"covers": n, "head": "<64 hex>", "time": "<time>"})

with ECDSA P-256 / SHA-256 (DER signatures, hex in the entry); `line_key` and
`witness_key` are SHA-256 of each signer's SubjectPublicKeyInfo DER.  The checkpoint is
then appended to the chain like any entry, at some seq >= covers: signing happens outside
the registry's write lock, so stations keep committing while the HSM and the witness sign.

When one is due (Checkpointer.due): every `every_entries` entries (256), every
`every_seconds` (DEFAULT_EVERY_SECONDS, one hour) while entries are pending, and AT ONCE
when a pending entry is a revocation or a CA change (URGENT_TYPES: revoke, ca_revoke).
Why at once: entries after the last checkpoint can be cut off with the head row by whoever
can write the database, unseen until the next checkpoint; a revocation is the entry an
attacker most wants gone.  A process that holds the signers checkpoints right after
such an entry (maybe_checkpoint after the write); a running `cloud serve` also picks up
those written by other processes sharing the registry (`fleetid revoke`, `fleetid cloud
revoke-ca`) within its poll (server.CHECKPOINT_POLL_SECONDS).  `fleetid audit verify`
fails when an entry has stayed uncovered longer than the interval (verify.py).
"""

import datetime
import json
import threading
import time as _time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.audit.codec import (
    CA_REVOKE,
    CHECKPOINT,
    CHECKPOINT_DOMAIN,
    REVOKE,
    canonical_json,
    checked_fields,
    new_fields,
    to_hex,
)
from fleetid.cloud.audit.errors import AuditError
from fleetid.cloud.audit.signers import key_id

# The longest an entry waits for its checkpoint (Checkpointer.every_seconds), and what
# `fleetid audit verify` allows an uncovered entry by default.
DEFAULT_EVERY_SECONDS = 3600.0
# Entry types that make a checkpoint due at once (module docstring).
URGENT_TYPES = (REVOKE, CA_REVOKE)


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
    fields = new_fields(CHECKPOINT, when)
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
    return checked_fields(fields)


class Checkpointer:
    """Appends a signed checkpoint when enough entries or time have gone by.

    `store` is a Registry or an AuditFile (anything with head(), last_checkpoint() and
    append_audit(fields)).  Call maybe_checkpoint() after each commit (cheap when nothing
    is due) and at the end of a shift.  Thread-safe; signing runs outside the store's
    write lock.
    """

    def __init__(self, store, line_signer, witness_signer, every_entries=256,
                 every_seconds=DEFAULT_EVERY_SECONDS, wall_clock=_time.time,
                 urgent_types=URGENT_TYPES):
        self.store = store
        # Entry types that make a checkpoint due at once; read from the store's pending
        # tail (iter_audit_lines(start)), each line once.  A store without that call (the
        # file mirror) has no urgent check.
        self.urgent_types = tuple(urgent_types)
        self._scanned = None  # entries already looked at for urgent types
        self._urgent = False
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
                    or self.wall_clock() - self._last_time >= self.every_seconds
                    or self._urgent_pending(count))

    def _urgent_pending(self, count):
        # Whether an entry of an urgent type was appended since the last checkpoint.
        # Only lines not looked at before are read (amortised O(1) per append).
        if self._urgent:
            return True
        lines = getattr(self.store, "iter_audit_lines", None)
        if not self.urgent_types or lines is None:
            return False
        start = self._last_covers if self._scanned is None else self._scanned
        if start >= count:
            return False
        for line in lines(start):
            if start >= count:
                break  # appended after head(): the next call looks at it
            start += 1
            try:
                kind = json.loads(line)["type"]
            except (ValueError, KeyError, TypeError):
                continue  # verify_log names a bad line; here it only cannot be urgent
            if kind in self.urgent_types:
                self._urgent = True
                break
        self._scanned = start
        return self._urgent

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
            self._urgent = False
            self._scanned = None  # the next look starts at the new checkpoint's cover
            return entry


def _parse_time(text):
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()
