-- Herald's tables on SQLite: the transactional outbox, its relay lease, the inbox and the
-- checkpoints. The same columns as on PostgreSQL (see migrations/postgres); times are
-- INTEGER milliseconds since the Unix epoch (UTC).

CREATE TABLE herald_outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    aggregatetype   TEXT NOT NULL,
    aggregateid     TEXT NOT NULL,
    type            TEXT NOT NULL,
    payload         BLOB,
    payload_kind    TEXT CHECK (payload_kind IN ('json', 'binary')),
    headers         TEXT NOT NULL,
    topic           TEXT NOT NULL,
    partition       INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    last_error      TEXT,
    published_at    INTEGER
);

CREATE INDEX herald_outbox_unpublished ON herald_outbox (seq) WHERE published_at IS NULL;
CREATE INDEX herald_outbox_retrying ON herald_outbox (partition)
    WHERE published_at IS NULL AND next_attempt_at IS NOT NULL;
CREATE INDEX herald_outbox_published ON herald_outbox (published_at)
    WHERE published_at IS NOT NULL;

CREATE TABLE herald_outbox_leases (
    partition  INTEGER PRIMARY KEY,
    holder     TEXT,
    expires_at INTEGER
);
WITH RECURSIVE partitions(partition) AS (
    SELECT 0 UNION ALL SELECT partition + 1 FROM partitions WHERE partition < 31
)
INSERT INTO herald_outbox_leases (partition) SELECT partition FROM partitions;

CREATE TABLE herald_outbox_relays (
    holder     TEXT PRIMARY KEY,
    started_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);

CREATE TABLE herald_inbox (
    consumer_group TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    handled_at     INTEGER NOT NULL,
    published      TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (consumer_group, event_id)
);

CREATE TABLE herald_checkpoints (
    name       TEXT PRIMARY KEY,
    position   INTEGER NOT NULL CHECK (position >= 0),
    updated_at INTEGER NOT NULL
);
