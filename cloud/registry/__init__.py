"""fleetid.cloud.registry: identity records, certificate history, serials and the audit
chain of the factory line, behind one storage interface.

    registry = open_registry("sqlite:/var/lib/fleetid/registry.db")   # the default backend
    registry = open_registry("postgresql://fleet@db/fleet")            # shared by many hosts
    registry = open_registry("memory:")                                # the fake, for tests

`open_registry` is the one factory every command uses (line, audit, cloud).
Interface and life cycle: interface.py (`Registry`).  Schema: schema.py (portable SQL).
Backends: sqlite_backend.py, postgres_backend.py (psycopg 3; `fleetid[postgres]`),
memory.py.
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


def open_registry(uri, wall_clock=None, timeout_s=None, apply_schema=True):
    """Open a registry from a URI: "sqlite:<path>", "postgresql://..." / "postgres://..."
    (anything libpq accepts after the scheme; passwords from PGPASSWORD or ~/.pgpass) or
    "memory:".

    timeout_s: the longest one operation may wait (None: the backend's defaults): SQLite's
    busy timeout; on PostgreSQL the server's statement_timeout, a third of it as
    lock_timeout and connect_timeout (>= 2 s), and a client-side deadline one second
    longer that holds while the server does not answer at all (pg_deadline.py).

    apply_schema: False opens a SQL registry without creating or migrating its schema
    (`fleetid registry migrate` reads the version, then calls migrate()).

    Raises RegistryError(CONFIG) for any other URI or when psycopg is missing,
    RegistryError(STORAGE) when the PostgreSQL server cannot be reached.
    """
    kwargs = {} if wall_clock is None else {"wall_clock": wall_clock}
    schema_kwargs = {} if apply_schema else {"apply_schema": False}
    timeouts = {}
    scheme, sep, rest = uri.partition(":")
    if sep and scheme == "sqlite" and rest:
        from fleetid.cloud.registry.sqlite_backend import SqliteRegistry

        if timeout_s:
            timeouts = {"busy_timeout_s": float(timeout_s)}
        return SqliteRegistry(rest, **kwargs, **timeouts, **schema_kwargs)
    if sep and scheme == "memory" and not rest:
        from fleetid.cloud.registry.memory import MemoryRegistry

        return MemoryRegistry(**kwargs)
    if sep and scheme in ("postgresql", "postgres") and rest:
        from fleetid.cloud.registry.postgres_backend import PostgresRegistry

        if timeout_s:
            timeouts = {"lock_timeout_s": timeout_s / 3.0,
                        "connect_timeout_s": max(2, int(timeout_s / 3.0))}
        return PostgresRegistry(uri, **kwargs, **timeouts, **schema_kwargs)
    # The scheme only: a mistyped URI may still carry a password.
    raise RegistryError(RegistryError.CONFIG, "registry URI %r: must be sqlite:<path>, "
                        "postgresql://... or memory:" % (scheme[:32] + (":..." if sep else "")))


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
