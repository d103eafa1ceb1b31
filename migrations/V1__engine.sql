-- The engine's own tables, in their own schema.
CREATE SCHEMA IF NOT EXISTS projector;

-- The next Kafka offset to read, per projection, topic and partition. Moved by compare-and-set in
-- the same transaction as the read-model changes it covers.
CREATE TABLE projector.checkpoints (
    projection      text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    next_offset     bigint      NOT NULL CHECK (next_offset >= 0),
    definition_hash text        NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);

-- Event ids already applied, for projections deduplicating by event id.
CREATE TABLE projector.processed_events (
    projection   text        NOT NULL,
    event_id     text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, event_id)
);

-- Events that arrived before their predecessor (a `gap`): held here, in the transaction that moves
-- the checkpoint past them, until the predecessor is applied.
CREATE TABLE projector.held_events (
    projection     text        NOT NULL,
    entity_key     text        NOT NULL,
    version        bigint      NOT NULL,
    found_version  bigint,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    "offset"       bigint      NOT NULL,
    record_key     bytea,
    record_value   bytea,
    header_names   text[]      NOT NULL DEFAULT '{}',
    header_values  bytea[]     NOT NULL DEFAULT '{}',
    timestamp_ms   bigint,
    held_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, entity_key, version)
);

-- Events that cannot be applied (malformed, values that do not fit, constraint violations),
-- parked with everything needed to retry them.
CREATE TABLE projector.dead_letters (
    id              bigserial   PRIMARY KEY,
    projection      text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    entity_key      text,
    event_type      text,
    record_key      bytea,
    record_value    bytea,
    header_names    text[]      NOT NULL DEFAULT '{}',
    header_values   bytea[]     NOT NULL DEFAULT '{}',
    timestamp_ms    bigint,
    error_class     text        NOT NULL,
    error           text        NOT NULL,
    definition_hash text        NOT NULL,
    parked_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (projection, topic, partition, "offset")
);
