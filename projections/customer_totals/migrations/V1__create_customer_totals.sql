-- The read model of projections/customer_totals.toml: one row per customer, deduplicated by
-- event id. `IF NOT EXISTS`: databases migrated by projector before read models brought their own
-- schema already have this table (from the engine's former migration V2__shop_read_models).
CREATE TABLE IF NOT EXISTS customer_totals (
    customer_id      text          PRIMARY KEY,
    orders_placed    bigint        NOT NULL DEFAULT 0,
    orders_cancelled bigint        NOT NULL DEFAULT 0,
    total_placed     numeric(14,2) NOT NULL DEFAULT 0,
    total_paid       numeric(14,2) NOT NULL DEFAULT 0
);
