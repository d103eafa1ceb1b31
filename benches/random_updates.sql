-- Postgres alone: what a 1,000-row guarded UPDATE costs per row as the table grows, with the keys
-- in random order (as events arrive) and in key order (as the bench's ceiling writes them).
-- No Kafka, no engine. BENCHMARKS.md ("How cost grows") has the results.
--
--   psql -h 127.0.0.1 -U postgres -c 'CREATE DATABASE random_updates'
--   psql -h 127.0.0.1 -U postgres -d random_updates -v rows=1000000 -f benches/random_updates.sql
--   psql -h 127.0.0.1 -U postgres -c 'DROP DATABASE random_updates'
--
-- Each CALL runs 200 statements of 1,000 keys each (one commit per statement) and prints the
-- microseconds per row updated; the orders alternate, three times each.
\set ON_ERROR_STOP 1
\set QUIET 1
\pset tuples_only on
\pset format unaligned
SET client_min_messages = warning;
DROP TABLE IF EXISTS t;
-- The bench's `order_summary` row: a uuid key (the workload's ids: a shared prefix, then the
-- order's number), a version, a few columns the updates change.
CREATE TABLE t (order_id uuid PRIMARY KEY, customer_id text NOT NULL, total numeric(12,2) NOT NULL,
    status text NOT NULL, note text, updated_at timestamptz, version bigint NOT NULL);
CREATE OR REPLACE FUNCTION order_id(n bigint) RETURNS uuid LANGUAGE sql IMMUTABLE
    AS $$ SELECT ('5eed0000-0000-0000-0000-' || lpad(to_hex(n), 12, '0'))::uuid $$;
INSERT INTO t SELECT order_id(g), 'customer-' || (g % 997), 10.5, 'placed', NULL, now(), 1
    FROM generate_series(0, :rows - 1) g;
VACUUM ANALYZE t;
CHECKPOINT;
CREATE OR REPLACE PROCEDURE updates(rows bigint, statements int, in_key_order bool, INOUT label text)
LANGUAGE plpgsql AS $$
DECLARE
    ids uuid[];
    first bigint;
    started timestamptz;
    spent interval := '0';
BEGIN
    FOR i IN 1..statements LOOP
        IF in_key_order THEN
            first := floor(random() * (rows - 1000))::bigint;
            SELECT array_agg(order_id(first + g)) INTO ids FROM generate_series(0, 999) g;
        ELSE
            SELECT array_agg(order_id(floor(random() * rows)::bigint)) INTO ids FROM generate_series(0, 999) g;
        END IF;
        started := clock_timestamp();
        UPDATE t SET note = 'n', updated_at = now(), version = t.version + 1
            FROM unnest(ids) u(id) WHERE t.order_id = u.id;
        COMMIT;
        spent := spent + (clock_timestamp() - started);
    END LOOP;
    label := format('%s rows, %s: %s us per row', rows, CASE WHEN in_key_order THEN 'key order' ELSE 'random order' END,
        round((extract(epoch FROM spent) * 1e6 / (statements * 1000))::numeric, 2));
END $$;
SELECT format('table and index: %s', pg_size_pretty(pg_total_relation_size('t')));
CALL updates(:rows, 200, false, NULL);
CALL updates(:rows, 200, true, NULL);
CALL updates(:rows, 200, false, NULL);
CALL updates(:rows, 200, true, NULL);
CALL updates(:rows, 200, false, NULL);
CALL updates(:rows, 200, true, NULL);
SELECT format('after: %s; updates HOT %s of %s; heap blocks read from outside shared_buffers %s, index blocks %s',
    pg_size_pretty(pg_total_relation_size('t')), n_tup_hot_upd, n_tup_upd, heap_blks_read, idx_blks_read)
    FROM pg_stat_user_tables JOIN pg_statio_user_tables USING (relid, schemaname, relname) WHERE relname = 't';
DROP TABLE t;
DROP PROCEDURE updates;
DROP FUNCTION order_id;
