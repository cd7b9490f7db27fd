"""fleetid.cloud.audit: the audit log of the line and the cloud: append-only,
hash-chained, checkpointed by two signers.

One entry per injection (and per hold, revocation, reconciliation, issuance, rotation
acknowledgement, CA revocation and checkpoint), in a canonical text encoding that an
auditor can read with `jq` and re-hash with `sha256sum`.  The registry stores the chain
(it imports this package); the line, the cloud services and `fleetid audit` build entries,
sign checkpoints and verify.

Modules (each imports only those above it in this list):

    errors       AuditError, AuditChainBroken
    codec        the entry format v1, its schema, seal() and parse_entry(): no I/O
    entries      builders of the unsealed entries, one per type
    signers      HsmSigner, KeySigner, key_id(): who signs a checkpoint
    checkpoints  the checkpoint statement and entry, Checkpointer
    filestore    AuditFile (JSON lines, fsync per append), export, atomic writes
    witness      AnchoringWitness and its anchor file (read_witness_anchor)
    verify       verify_log(), show(), describe()
    stats        bytes per sample entry (the per-injection budget)

The names below are the package's public interface; callers write `audit.seal(...)`
after `from fleetid.cloud import audit`.

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

The file form (`filestore.AuditFile`) holds byte-identical lines: see filestore.
"""

from fleetid.cloud.audit.checkpoints import (
    DEFAULT_EVERY_SECONDS,
    URGENT_TYPES,
    Checkpointer,
    checkpoint_entry,
    checkpoint_statement,
)
from fleetid.cloud.audit.codec import (
    CA_REVOKE,
    CHECKPOINT,
    CHECKPOINT_DOMAIN,
    DEVICELESS_TYPES,
    ENTRY_HASH_DOMAIN,
    ENTRY_TYPES,
    FORMAT_VERSION,
    GENESIS_PREV,
    HOLD,
    INJECTION,
    ISSUANCE,
    MAX_ENTRY_BYTES,
    MAX_TEXT,
    RECONCILE,
    REVOKE,
    ROTATION_ACK,
    AuditEntry,
    StoredRow,
    canonical_json,
    cert_serial_hex,
    check_columns,
    format_time,
    free_text,
    parse_entry,
    seal,
    stored_columns,
    to_hex,
)
from fleetid.cloud.audit.entries import (
    attestation_hash,
    ca_revoke_entry,
    certificate_facts,
    hold_entry,
    injection_entry,
    issuance_entry,
    issuer_name,
    reconcile_entry,
    revoke_entry,
    rotation_ack_entry,
)
from fleetid.cloud.audit.errors import AuditChainBroken, AuditError
from fleetid.cloud.audit.filestore import AuditFile, export_lines, read_log_file
from fleetid.cloud.audit.signers import HsmSigner, KeySigner, key_id, load_public_key
from fleetid.cloud.audit.stats import entry_size_stats, sample_injection_entry
from fleetid.cloud.audit.verify import (
    DEFAULT_URGENT_MAX_AGE_S,
    VerifyReport,
    check_anchoring,
    describe,
    show,
    verify_log,
)
from fleetid.cloud.audit.witness import AnchoringWitness, read_witness_anchor

__all__ = [
    "CA_REVOKE", "CHECKPOINT", "CHECKPOINT_DOMAIN", "DEFAULT_EVERY_SECONDS",
    "DEFAULT_URGENT_MAX_AGE_S",    "DEVICELESS_TYPES", "ENTRY_HASH_DOMAIN", "URGENT_TYPES",
    "ENTRY_TYPES", "FORMAT_VERSION", "GENESIS_PREV", "HOLD", "INJECTION", "ISSUANCE",
    "MAX_ENTRY_BYTES", "MAX_TEXT", "RECONCILE", "REVOKE", "ROTATION_ACK",
    "AnchoringWitness", "AuditChainBroken", "AuditEntry", "AuditError", "AuditFile",
    "Checkpointer", "HsmSigner", "KeySigner", "StoredRow", "VerifyReport",
    "attestation_hash", "ca_revoke_entry", "canonical_json", "check_anchoring", "cert_serial_hex",
    "certificate_facts", "issuer_name", "check_columns", "checkpoint_entry", "checkpoint_statement",
    "describe", "entry_size_stats", "export_lines", "format_time", "free_text", "hold_entry",
    "injection_entry", "issuance_entry", "key_id", "load_public_key", "parse_entry",
    "read_log_file", "read_witness_anchor", "reconcile_entry", "revoke_entry",
    "rotation_ack_entry", "sample_injection_entry", "seal", "show", "stored_columns",
    "to_hex", "verify_log",
]
