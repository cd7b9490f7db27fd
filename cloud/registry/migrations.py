"""Forward migrations of the registry schema (schema.MIGRATIONS), run by
SqlRegistry.migrate(): when a registry opens on an older (or empty) database, or
explicitly (`fleetid registry migrate`, before a deploy starts its workers).  One
transaction with the base schema of a fresh database (on PostgreSQL under the schema
advisory lock, on SQLite under BEGIN IMMEDIATE): concurrent first starts of several
processes migrate once, and a crash mid-migration leaves the old version whole.

Opening a registry whose schema is current runs no DDL at all: it reads the version
(read-only) and goes on.  DDL beside live writers is what deadlocked on PostgreSQL
(CREATE INDEX takes a SHARE lock on its table).  A migration that adds an index still
locks its table against writes while it builds: migrate before starting the workers.

A database newer than this code (schema_version > schema.SCHEMA_VERSION) is refused
(RegistryError(SCHEMA)): an old process must not write a schema it does not know.
"""

import datetime

from fleetid.cloud.registry import schema
from fleetid.cloud.registry.errors import RegistryError


def current_version(conn):
    """The schema_version in registry_meta (int).  Raises RegistryError(SCHEMA) when it is
    missing or not a number."""
    row = conn.execute(
        "SELECT value FROM registry_meta WHERE name = 'schema_version'").fetchone()
    try:
        return int(row["value"])
    except (TypeError, ValueError):
        raise RegistryError(RegistryError.SCHEMA, "version %s"
                            % (row and row["value"])) from None


def check_known(version):
    """`version` (int) when this code can run on it; RegistryError(SCHEMA) otherwise."""
    if version > schema.SCHEMA_VERSION or version < 1:
        raise RegistryError(RegistryError.SCHEMA, "version %d (this fleetid knows up to %d)"
                            % (version, schema.SCHEMA_VERSION))
    return version


def upgrade(conn, dialect, placeholders):
    """Bring the schema at `conn` (inside a write transaction) to schema.SCHEMA_VERSION.

    Params: conn: the open transaction's connection; dialect: "sqlite" / "postgresql";
        placeholders: query -> query for the driver (SqlRegistry._q).
    Returns: the list of versions applied (empty when already current).
    Raises: RegistryError(SCHEMA) for a newer or unreadable version.
    """
    version = check_known(current_version(conn))
    applied = []
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for target in range(version + 1, schema.SCHEMA_VERSION + 1):
        for statement in schema.statements(dialect, schema.MIGRATIONS[target]):
            conn.execute(statement)
        conn.execute(placeholders("INSERT INTO schema_history (version, applied_at) "
                                  "VALUES (?, ?)"), (target, now))
        conn.execute(placeholders("UPDATE registry_meta SET value = ? "
                                  "WHERE name = 'schema_version'"), (str(target),))
        applied.append(target)
    return applied
