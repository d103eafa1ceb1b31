-- Rebuilds under way or done: one row per projection and build target (the projection itself for an
-- in-place rebuild, `<name>~shadow` for a shadow build, `<name>~asof` for a point-in-time build).
CREATE TABLE projector.rebuilds (
    projection      text        NOT NULL,
    target          text        NOT NULL,
    mode            text        NOT NULL CHECK (mode IN ('in_place', 'shadow', 'as_of')),
    state           text        NOT NULL CHECK (state IN ('running', 'done', 'aborted')),
    definition_hash text        NOT NULL,
    -- Per partition ("topic/partition"): where the build started and the end offset it must reach.
    start_offsets   jsonb       NOT NULL,
    target_offsets  jsonb       NOT NULL,
    detail          text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    PRIMARY KEY (projection, target)
);
