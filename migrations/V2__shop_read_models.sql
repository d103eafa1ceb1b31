-- Read models of the example shop domain (projections/order_summary.toml, projections/customer_totals.toml).
CREATE TABLE order_summary (
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

CREATE TABLE customer_totals (
    customer_id      text          PRIMARY KEY,
    orders_placed    bigint        NOT NULL DEFAULT 0,
    orders_cancelled bigint        NOT NULL DEFAULT 0,
    total_placed     numeric(14,2) NOT NULL DEFAULT 0,
    total_paid       numeric(14,2) NOT NULL DEFAULT 0
);
