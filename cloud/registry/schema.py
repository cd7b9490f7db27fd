"""The registry schema, in SQL that SQLite and PostgreSQL both accept.

Portable types only: TEXT, BIGINT, INTEGER and BYTEA, with the one difference mapped by
`DIALECTS` (SQLite spells BYTEA as BLOB).  Hex text for UIDs, hashes and certificate
serials (indexable and readable in both); RFC 3339 UTC text for times (sorts
chronologically); `?` placeholders in queries (a PostgreSQL driver would map them to %s
with `placeholders()`).  Partial unique indexes and `CREATE ... IF NOT EXISTS` exist in
both (SQLite 3.8+, PostgreSQL 9.5+).  Singleton rows (`id = 1`) hold the serial counter
and the audit head, so a writer on PostgreSQL can lock them with SELECT ... FOR UPDATE,
which is what serialises serial allocation and audit appends there; SQLite's
BEGIN IMMEDIATE does the same for the whole database.

Versions: SCHEMA is version 1 as first released; MIGRATIONS holds each later version's
forward step, applied in order by migrations.upgrade() when a registry opens (a fresh
database is created at 1 and brought forward the same way, so new and upgraded
databases take one path).  registry_meta's schema_version names the current version;
schema_history records when each migration ran.
"""

SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS registry_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO registry_meta (name, value)
    SELECT 'schema_version', '1'
    WHERE NOT EXISTS (SELECT 1 FROM registry_meta WHERE name = 'schema_version');

CREATE TABLE IF NOT EXISTS serial_counter (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    next_serial BIGINT NOT NULL CHECK (next_serial > 0)
);
INSERT INTO serial_counter (id, next_serial)
    SELECT 1, 1 WHERE NOT EXISTS (SELECT 1 FROM serial_counter);

CREATE TABLE IF NOT EXISTS devices (
    serial BIGINT PRIMARY KEY,
    se_uid TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('intent', 'committed', 'held', 'revoked')),
    station TEXT NOT NULL,
    operator TEXT NOT NULL,
    batch TEXT NOT NULL,
    hsm_session TEXT NOT NULL,
    intent_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    committed_at TEXT,
    hold_reason TEXT,
    slot INTEGER,
    aid TEXT,
    issuing_ca TEXT,
    attestation_hash TEXT,
    identity_fingerprint TEXT,
    rotation_state TEXT
);
CREATE INDEX IF NOT EXISTS devices_by_se_uid ON devices (se_uid);
CREATE INDEX IF NOT EXISTS devices_by_status ON devices (status);
-- one live identity per chip
CREATE UNIQUE INDEX IF NOT EXISTS devices_one_committed_per_se_uid
    ON devices (se_uid) WHERE status = 'committed';

CREATE TABLE IF NOT EXISTS certificates (
    fingerprint TEXT PRIMARY KEY,
    device_serial BIGINT NOT NULL REFERENCES devices (serial),
    kind TEXT NOT NULL CHECK (kind IN ('identity', 'operational')),
    cert_serial TEXT NOT NULL,
    issuer TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    added_at TEXT NOT NULL,
    revoked_at TEXT,
    revocation_reason TEXT,
    der BYTEA NOT NULL,
    UNIQUE (issuer, cert_serial)
);
CREATE INDEX IF NOT EXISTS certificates_by_device ON certificates (device_serial);
CREATE INDEX IF NOT EXISTS certificates_by_serial ON certificates (cert_serial);

CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT PRIMARY KEY,
    entry_type TEXT NOT NULL,
    device_serial BIGINT,
    entry_hash TEXT NOT NULL,
    entry TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_by_device ON audit_log (device_serial);
CREATE INDEX IF NOT EXISTS audit_log_by_type ON audit_log (entry_type, seq);

CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    entry_count BIGINT NOT NULL,
    head_hash TEXT NOT NULL
);
INSERT INTO audit_head (id, entry_count, head_hash)
    SELECT 1, 0, '0000000000000000000000000000000000000000000000000000000000000000'
    WHERE NOT EXISTS (SELECT 1 FROM audit_head);
"""

# Forward migrations: version -> its statements (same portable SQL as SCHEMA).
MIGRATIONS = {
    # 2: the state several stateless cloud processes share (issue 19): attestation
    # nonces (cloud/ca/nonces.py: consumed by one conditional UPDATE), EST pending
    # approvals, and the revocation event sequence every process polls.
    2: """
CREATE TABLE IF NOT EXISTS schema_history (
    version INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ca_nonces (
    nonce TEXT PRIMARY KEY,
    ca TEXT NOT NULL,
    issued_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    consumed_at TEXT,
    bound_key TEXT
);
CREATE INDEX IF NOT EXISTS ca_nonces_outstanding ON ca_nonces (expires_at)
    WHERE consumed_at IS NULL;
CREATE TABLE IF NOT EXISTS est_approvals (
    label TEXT NOT NULL,
    device_serial TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'approved')),
    updated_at TEXT NOT NULL,
    PRIMARY KEY (label, device_serial)
);
CREATE TABLE IF NOT EXISTS revocation_events (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    updated_at TEXT NOT NULL
);
INSERT INTO revocation_events (id, seq, updated_at)
    SELECT 1, 0, '1970-01-01T00:00:00Z' WHERE NOT EXISTS (SELECT 1 FROM revocation_events);
""",
    # 3: the revoked certificates of one issuer (revoked_certificates: the CRL, OCSP and
    # compact-set rebuilds after every revocation) were read through the (issuer,
    # cert_serial) unique index, i.e. every certificate of the issuer: a scan growing
    # with the fleet.  This partial index holds the revoked ones only, in the order the
    # query returns them.
    3: """
CREATE INDEX IF NOT EXISTS certificates_revoked_by_issuer
    ON certificates (issuer, cert_serial) WHERE revoked_at IS NOT NULL;
""",
}

# Type spellings per dialect; the schema text uses the PostgreSQL names.
DIALECTS = {
    "postgresql": {},
    "sqlite": {"BYTEA": "BLOB"},
}


def schema_for(dialect):
    """The schema text for `dialect` ("sqlite" or "postgresql")."""
    text = SCHEMA
    for portable, native in DIALECTS[dialect].items():
        text = text.replace(" " + portable + " ", " " + native + " ")
    return text


def statements(dialect, text=None):
    """The schema (or `text`, e.g. a migration) as a list of single statements for
    `dialect` (comments stripped)."""
    text = schema_for(dialect) if text is None else text
    for portable, native in DIALECTS[dialect].items():
        text = text.replace(" " + portable + " ", " " + native + " ")
    lines = [line for line in text.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def placeholders(query, dialect):
    """Rewrite `?` placeholders for drivers that use %s (psycopg)."""
    return query if dialect == "sqlite" else query.replace("?", "%s")
