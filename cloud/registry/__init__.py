"""fleetid.cloud.registry: identity records, certificate history, serials and the audit
chain of the factory line, behind one storage interface.

    registry = open_registry("sqlite:/var/lib/fleetid/registry.db")   # the default backend
    registry = open_registry("memory:")                                # the fake, for tests

Interface and life cycle: interface.py (`Registry`).  Schema: schema.py.
PostgreSQL: not implemented yet (a later issue).  The schema is already portable SQL and
each backend method is a short transaction, so a psycopg backend is one more module in this
folder: `SELECT ... FOR UPDATE` on the `serial_counter` / `audit_head` rows in place of
SQLite's BEGIN IMMEDIATE, %s placeholders (`schema.placeholders`), BYTEA for the DER.
"""

from fleetid.cloud import audit
from fleetid.cloud.registry.errors import (
    CertificateNotFound,
    DeviceNotFound,
    DuplicateSerial,
    DuplicateSeUid,
    InvalidState,
    RegistryError,
)
from fleetid.cloud.registry.interface import (
    CERT_KINDS,
    COMMITTED,
    HELD,
    IDENTITY,
    INTENT,
    OPERATIONAL,
    REVOKED,
    STATUSES,
    CertificateRecord,
    DeviceRecord,
    IdentityRecord,
    Registry,
)

__all__ = [
    "open_registry", "verify_registry_log", "Registry", "IdentityRecord", "DeviceRecord",
    "CertificateRecord", "RegistryError", "DuplicateSerial", "DuplicateSeUid",
    "DeviceNotFound", "CertificateNotFound", "InvalidState", "INTENT", "COMMITTED", "HELD",
    "REVOKED", "STATUSES", "IDENTITY", "OPERATIONAL", "CERT_KINDS",
]


def open_registry(uri, wall_clock=None):
    """Open a registry from a URI: "sqlite:<path>" or "memory:".

    "postgresql://..." is recognised and refused with RegistryError(CONFIG) until the
    PostgreSQL backend exists.  Raises RegistryError(CONFIG) for anything else.
    """
    kwargs = {} if wall_clock is None else {"wall_clock": wall_clock}
    scheme, sep, rest = uri.partition(":")
    if sep and scheme == "sqlite" and rest:
        from fleetid.cloud.registry.sqlite_backend import SqliteRegistry

        return SqliteRegistry(rest, **kwargs)
    if sep and scheme == "memory" and not rest:
        from fleetid.cloud.registry.memory import MemoryRegistry

        return MemoryRegistry(**kwargs)
    if scheme in ("postgresql", "postgres"):
        raise RegistryError(RegistryError.CONFIG, "the PostgreSQL backend is not built yet")
    # The scheme only: a mistyped URI may still carry a password.
    raise RegistryError(RegistryError.CONFIG, "registry URI %r: must be sqlite:<path> or "
                        "memory:" % (scheme[:32] + (":..." if sep else "")))


def verify_registry_log(registry, line_public_key, witness_public_key, witness_anchor=None):
    """Verify the registry's audit chain against its own head row (count and hash, moved
    in the same transaction as every append: a truncated or extended audit table shows),
    and against the witness's (covers, head) if given: someone able to rewrite both the
    table and the head row is caught there.

    Returns audit.VerifyReport.  Raises audit.AuditChainBroken at the first bad entry.
    """
    count, head, lines = registry.audit_snapshot()
    try:
        return audit.verify_log(lines, line_public_key, witness_public_key,
                                expected_count=count, expected_head=head,
                                witness_anchor=witness_anchor)
    finally:
        close = getattr(lines, "close", None)
        if close:
            close()
