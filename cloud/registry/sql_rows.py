"""The registry tables' column lists and the statements and row checks that more than one
SQL module uses (sql_common's SqlRegistry, sql_revoke's revocations, the backends' joined
read), written with `?` placeholders (`SqlRegistry._q` rewrites them for PostgreSQL)."""

from fleetid.cloud import audit
from fleetid.cloud.registry.errors import CertificateNotFound, RegistryError

DEVICE_COLUMNS = (
    "serial, se_uid, status, station, operator, batch, hsm_session, intent_at, updated_at, "
    "committed_at, hold_reason, slot, aid, issuing_ca, attestation_hash, "
    "identity_fingerprint, rotation_state"
)
CERT_COLUMNS = (
    "fingerprint, device_serial, kind, cert_serial, issuer, not_before, not_after, added_at, "
    "der, revoked_at, revocation_reason"
)
DEVICE_NAMES = tuple(c.strip() for c in DEVICE_COLUMNS.split(","))
CERT_NAMES = tuple(c.strip() for c in CERT_COLUMNS.split(","))
# The certificate joined with its device (the column names of the two tables differ).
JOINED_QUERY = (
    "SELECT %s, %s FROM certificates c LEFT JOIN devices d ON d.serial = c.device_serial "
    "WHERE c.cert_serial = ?" % (", ".join("c." + n for n in CERT_NAMES),
                                 ", ".join("d." + n for n in DEVICE_NAMES)))
JOINED_QUERY_ISSUER = JOINED_QUERY + " AND c.issuer = ?"
SET_ROTATION = "UPDATE devices SET rotation_state = ?, updated_at = ? WHERE serial = ?"
# The audit chain's head, read before an append (the lock clause appended: the chain is
# serialised on this row), a sealed entry's row, and the head moved after it.
HEAD_QUERY = "SELECT entry_count, head_hash FROM audit_head WHERE id = 1"  # + lock clause to lock
AUDIT_INSERT = ("INSERT INTO audit_log (seq, entry_type, device_serial, entry_hash, entry) "
                "VALUES (?, ?, ?, ?, ?)")
HEAD_UPDATE = "UPDATE audit_head SET entry_count = ?, head_hash = ? WHERE id = 1"


def audit_row(entry):
    """The audit_log row of a sealed entry: every indexed column derived from the sealed
    entry (never from the caller), as verification derives them again
    (audit.check_columns)."""
    return (entry.seq, entry.type, entry.serial, entry.hash_hex,
            entry.line[:-1].decode("ascii"))


def cert_serial_text(cert_serial):
    """The stored (hex) form of a certificate serial given as int, bytes or hex."""
    return (audit.cert_serial_hex(cert_serial) if isinstance(cert_serial, int)
            else audit.to_hex(cert_serial))


def one_certificate(rows, cert_serial):
    """The single row of a certificate lookup; CertificateNotFound / AMBIGUOUS otherwise."""
    if not rows:
        raise CertificateNotFound(cert_serial)
    if len(rows) > 1:
        raise RegistryError(RegistryError.AMBIGUOUS, "serial %s: give the issuer"
                            % cert_serial)
    return rows[0]
