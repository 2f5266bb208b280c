-- Herald's tables on PostgreSQL: the transactional outbox, its relay leases, the inbox and
-- the checkpoints. Column names of herald_outbox follow Debezium's outbox event router
-- (id, aggregatetype, aggregateid, type, payload), so that CDC can replace the relay.

CREATE TABLE herald_outbox (
    -- The order rows are relayed in, per lease partition.
    seq             BIGSERIAL PRIMARY KEY,
    -- Debezium: the event id (a CloudEvents id: any non-empty string, UUIDv7 by default).
    id              TEXT NOT NULL,
    -- Debezium: routes the event; Herald writes the topic here unless told otherwise.
    aggregatetype   TEXT NOT NULL,
    -- Debezium: the message key; Herald writes the partition key (order is kept per key).
    aggregateid     TEXT NOT NULL,
    -- Debezium: the event type.
    type            TEXT NOT NULL,
    -- Debezium: the payload; Herald writes the event's data bytes (JSON text or binary).
    payload         BYTEA,
    -- Whether payload is the JSON text of the data ('json') or opaque bytes ('binary').
    payload_kind    TEXT CHECK (payload_kind IN ('json', 'binary')),
    -- Every other CloudEvents attribute and extension, as a JSON object (the structured
    -- format without data): with payload, the exact event that was enqueued.
    headers         JSON NOT NULL,
    -- Where the relay publishes the event.
    topic           TEXT NOT NULL,
    -- The lease partition: stable hash of the partition key modulo the lease count.
    partition       INTEGER NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ,
    last_error      TEXT,
    published_at    TIMESTAMPTZ,
    CONSTRAINT herald_outbox_id_key UNIQUE (id)
);

-- The claim: the first unpublished rows of each held partition, in seq order.
CREATE INDEX herald_outbox_unpublished ON herald_outbox (partition, seq)
    WHERE published_at IS NULL;
-- Partitions waiting for a retry of their first row.
CREATE INDEX herald_outbox_retrying ON herald_outbox (partition)
    WHERE published_at IS NULL AND next_attempt_at IS NOT NULL;
-- Retention: published rows by age.
CREATE INDEX herald_outbox_published ON herald_outbox (published_at)
    WHERE published_at IS NOT NULL;

-- One row per lease partition; a relay publishes the rows of the partitions it holds.
CREATE TABLE herald_outbox_leases (
    partition  INTEGER PRIMARY KEY,
    holder     TEXT,
    expires_at TIMESTAMPTZ
);
INSERT INTO herald_outbox_leases (partition) SELECT generate_series(0, 31);

-- The relays alive, so that each takes its fair share of the leases.
CREATE TABLE herald_outbox_relays (
    holder     TEXT PRIMARY KEY,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);

-- The events each consumer group handled; with the events its handler published, when the
-- runtime's idempotency layer recorded it (JSON batch format).
CREATE TABLE herald_inbox (
    consumer_group TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    handled_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    published      TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (consumer_group, event_id)
);

-- Named positions of subscriptions and projections; they only move forward.
CREATE TABLE herald_checkpoints (
    name       TEXT PRIMARY KEY,
    position   BIGINT NOT NULL CHECK (position >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
