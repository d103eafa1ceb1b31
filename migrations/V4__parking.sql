-- Parking per key: a parked event keeps every later event of its key parked behind it (class
-- `blocked`) until an operator retries or skips it; an out-of-order event whose predecessor never
-- came is parked after `parking.gap_timeout_secs` (class `gap_timeout`).
ALTER TABLE projector.dead_letters
    ADD COLUMN state       text        NOT NULL DEFAULT 'parked'
                           CHECK (state IN ('parked', 'retried', 'skipped')),
    ADD COLUMN attempts    integer     NOT NULL DEFAULT 0,
    ADD COLUMN resolved_at timestamptz,
    -- What resolved it: the outcome of the retry, or the reason given for the skip.
    ADD COLUMN resolution  text,
    ADD CONSTRAINT dead_letters_error_class CHECK (error_class IN ('poison', 'blocked', 'gap_timeout'));

CREATE INDEX dead_letters_parked_keys ON projector.dead_letters (projection, entity_key) WHERE state = 'parked';

-- Every operator action on parked events (`projector parked retry|skip`), kept when the events
-- themselves are dropped by a rebuild.
CREATE TABLE projector.parked_actions (
    id             bigserial   PRIMARY KEY,
    dead_letter_id bigint      NOT NULL,
    projection     text        NOT NULL,
    entity_key     text,
    action         text        NOT NULL CHECK (action IN ('retry', 'skip')),
    result         text        NOT NULL,
    reason         text,
    actor          text        NOT NULL DEFAULT current_user,
    acted_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX parked_actions_by_projection ON projector.parked_actions (projection, dead_letter_id);
