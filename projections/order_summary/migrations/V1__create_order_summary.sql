-- The read model of projections/order_summary.toml: one row per order, guarded by its version.
-- `IF NOT EXISTS`: databases migrated by projector before read models brought their own schema
-- already have this table (from the engine's former migration V2__shop_read_models).
CREATE TABLE IF NOT EXISTS order_summary (
    order_id      uuid          PRIMARY KEY,
    customer_id   text          NOT NULL,
    total         numeric(12,2) NOT NULL,
    status        text          NOT NULL,
    paid_amount   numeric(12,2),
    carrier       text,
    cancel_reason text,
    placed_at     timestamptz,
    updated_at    timestamptz,
    version       bigint        NOT NULL
);
