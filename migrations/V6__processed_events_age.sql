-- Processed event ids are found by age too: a projection's `keep_event_ids` deletes those older
-- than it, oldest first, without reading the whole table.
CREATE INDEX processed_events_age ON projector.processed_events (projection, processed_at);
