//! The fast path's guarded waves, batch by batch against real Postgres (no Kafka): a batch's
//! events run as set-based statements, a key's `k`-th event in wave `k`; refused events are
//! duplicates when their row is already at or past them, and anything else (a gap) rolls the
//! batch back so that it is retried event by event.

use projector::checkpoint::Move;
use projector::demo::shop_event;
use projector::outcome::{BatchReport, Outcome};
use projector::projection::{Projection, Record};
use projector::store::apply::{apply_batch, ApplyError, Batch};
use projector::store::fast::Applier;
use serde_json::json;

use crate::common::{self, TestDb};

const TOPIC: &str = "guarded";

/// Records of partition 0 from `offset` on, one per `(order, version, type)`.
fn records(offset: i64, events: &[(&str, i64, &str)]) -> Vec<Record> {
    events
        .iter()
        .enumerate()
        .map(|(i, (order, version, event_type))| {
            let data = match *event_type {
                "OrderPlaced" => json!({"customer_id": "c-1", "total": "10.00"}),
                "OrderPaid" => json!({"amount": "10.00"}),
                _ => json!({"carrier": "post"}),
            };
            let event = shop_event(order, *version, event_type, data);
            Record {
                topic: TOPIC.into(),
                partition: 0,
                offset: offset + i as i64,
                key: Some(order.as_bytes().to_vec()),
                value: Some(serde_json::to_vec(&event.value).expect("json")),
                headers: Vec::new(),
                timestamp_ms: None,
            }
        })
        .collect()
}

async fn apply(
    pool: &deadpool_postgres::Pool,
    projection: &Projection,
    records: &[Record],
    from: Option<i64>,
    isolate: bool,
) -> Result<BatchReport, ApplyError> {
    let mut client = pool.get().await.expect("connection");
    let to = records.last().expect("records").offset + 1;
    let batch = Batch { records, moves: vec![Move { partition: (TOPIC.to_string(), 0), from, to }] };
    apply_batch(&mut client, &Applier::default(), projection, &batch, None, isolate).await
}

fn counts(report: &BatchReport) -> (u64, u64, u64) {
    (report.total(Outcome::Applied), report.total(Outcome::Duplicate), report.total(Outcome::Gap))
}

/// A database with the example projections' tables, and a pool of `connections` on it.
async fn migrated(connections: usize) -> (TestDb, deadpool_postgres::Pool) {
    let db = TestDb::create().await;
    projector::store::migrate_with(&db.url, &common::example_projections(TOPIC)).await.expect("migrations");
    let pool = projector::store::connect(&db.url, connections).await.expect("pool");
    (db, pool)
}

#[tokio::test]
async fn refused_events_are_duplicates_or_send_the_batch_the_careful_way() {
    let (db, pool) = migrated(2).await;
    let projection = common::example_projection(TOPIC, "order_summary").remove(0);
    let (a, b, c) = (
        "00000000-0000-0000-0000-00000000000a",
        "00000000-0000-0000-0000-00000000000b",
        "00000000-0000-0000-0000-00000000000c",
    );

    // a: created and moved on in one batch, with copies of earlier events in between and after;
    // b, c: created.
    let first = records(
        0,
        &[
            (a, 1, "OrderPlaced"),
            (b, 1, "OrderPlaced"),
            (a, 2, "OrderPaid"),
            (a, 1, "OrderPlaced"),
            (c, 1, "OrderPlaced"),
            (a, 3, "OrderShipped"),
            (a, 2, "OrderPaid"),
        ],
    );
    let report = apply(&pool, &projection, &first, None, false).await.expect("first batch");
    assert!(report.fast, "the guarded waves applied it");
    assert_eq!(counts(&report), (5, 2, 0), "applied, duplicates, gaps");

    // b: an old copy first, then its next two versions; a: a copy of its latest.
    let second =
        records(7, &[(b, 1, "OrderPlaced"), (b, 2, "OrderPaid"), (a, 3, "OrderShipped"), (b, 3, "OrderShipped")]);
    let report = apply(&pool, &projection, &second, Some(7), false).await.expect("second batch");
    assert!(report.fast);
    assert_eq!(counts(&report), (2, 2, 0));

    // c: version 3 while the row is at 1: a gap. The guarded waves roll back and say so; event by
    // event, it is held, and the rest of the batch applies.
    let third = records(11, &[(b, 4, "OrderShipped"), (c, 3, "OrderShipped")]);
    let refused = apply(&pool, &projection, &third, Some(11), false).await;
    assert!(matches!(refused, Err(ApplyError::Mispredicted { .. })), "{refused:?}");
    let report = apply(&pool, &projection, &third, Some(11), true).await.expect("third batch, event by event");
    assert!(!report.fast);
    assert_eq!(counts(&report), (1, 0, 1));

    let client = db.connect().await;
    let versions: Vec<(String, i64)> = client
        .query("SELECT order_id::text, version FROM order_summary ORDER BY order_id", &[])
        .await
        .expect("versions")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(versions, [(a.to_string(), 3), (b.to_string(), 4), (c.to_string(), 1)]);
    assert_eq!(common::query_i64(&client, "SELECT count(*) FROM projector.held_events").await, 1);
    assert_eq!(
        common::query_i64(&client, "SELECT next_offset FROM projector.checkpoints WHERE topic = 'guarded'").await,
        13
    );
    drop(client);
    drop(pool);
    db.drop().await;
}

/// A versioned projection of the shop's events into `table`, keyed by `p1`, whose other columns
/// are named like the set-based statements' own (`p2`, `p3`, `projector_rows`): every update
/// reads them unqualified.
fn shadowing_projection(table: &str) -> Projection {
    let handlers = format!(
        r#"[on.OrderPlaced]
insert = {{ p2 = ":data.total", p3 = ":data.customer_id", projector_rows = "'placed'" }}

[on.OrderPaid]
update = {{ p2 = "p2 + :data.amount", p3 = "p3 || '+paid'", projector_rows = "projector_rows || '+'" }}

[on.OrderShipped]
sql = "UPDATE {table} SET p3 = p3 || '+' || :data.carrier, version = :version WHERE p1 = :key AND version = :version - 1 AND p2 > 0"
"#
    );
    common::versioned_projection(table, TOPIC, table, "p1", &handlers)
}

#[tokio::test]
async fn columns_named_like_the_set_based_statements_own_are_not_ambiguous() {
    let (db, pool) = migrated(2).await;
    let client = db.connect().await;
    // `pcols`, a table called like the rows the set-based statements read, and one called like
    // the keys they return.
    for table in ["pcols", "projector_rows", "projector_changed"] {
        client
            .batch_execute(&format!(
                "CREATE TABLE {table} (p1 text PRIMARY KEY, version bigint NOT NULL, p2 numeric NOT NULL,
                                       p3 text NOT NULL, projector_rows text NOT NULL)"
            ))
            .await
            .expect("table");
        let projection = shadowing_projection(table);
        assert!(projection.handlers.values().all(|handler| handler.statements[0].set_based.is_some()));
        let problems = projector::store::check_statements(&client, std::slice::from_ref(&projection), true).await;
        assert!(problems.is_empty(), "{problems:?}");

        let (a, b) = ("a", "b");
        let batch = records(
            0,
            &[
                (a, 1, "OrderPlaced"),
                (b, 1, "OrderPlaced"),
                (a, 2, "OrderPaid"),
                (b, 2, "OrderPaid"),
                (a, 3, "OrderShipped"),
                (b, 1, "OrderPlaced"),
            ],
        );
        let report = apply(&pool, &projection, &batch, None, false).await.expect("the batch applies");
        assert!(report.fast, "{table}: set-based");
        assert_eq!(counts(&report), (5, 1, 0), "{table}: applied, duplicates, gaps");
        let rows: Vec<String> = client
            .query(&format!("SELECT t::text FROM {table} t ORDER BY p1"), &[])
            .await
            .expect("rows")
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(rows, ["(a,3,20.00,c-1+paid+post,placed+)", "(b,2,20.00,c-1+paid,placed+)"], "{table}");
    }
    drop(client);
    drop(pool);
    db.drop().await;
}

/// Small batches are what a caught-up engine commits: their set-based statements are planned once
/// per connection (a generic plan), not at every execution, and the setting ends with the batch.
#[tokio::test]
async fn set_based_statements_are_planned_once_per_connection() {
    // One connection: the prepared statements counted below are the batches'.
    let (db, pool) = migrated(1).await;
    let projection = common::example_projection(TOPIC, "order_summary").remove(0);
    let orders: Vec<String> = (0..8).map(|i| format!("00000000-0000-0000-0000-00000000000{i}")).collect();
    let mut offset = 0;
    for (version, event_type) in [(1, "OrderPlaced"), (2, "OrderPaid")] {
        for order in &orders {
            let batch = records(offset, &[(order, version, event_type)]);
            let from = (offset > 0).then_some(offset);
            let report = apply(&pool, &projection, &batch, from, false).await.expect("a one-event batch");
            assert!(report.fast, "set-based");
            assert_eq!(counts(&report), (1, 0, 0));
            offset += 1;
        }
    }
    // A gap, applied the careful way on the same connection.
    let gap = records(offset, &[(&orders[0], 4, "OrderShipped")]);
    let report = apply(&pool, &projection, &gap, Some(offset), true).await.expect("the gap, event by event");
    assert_eq!(counts(&report), (0, 0, 1));

    let client = pool.get().await.expect("the batches' connection");
    let plans: Vec<(String, i64, i64)> = client
        .query(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements
              WHERE statement LIKE '%projector_rows.p1%' AND statement NOT LIKE '%pg_prepared_statements%'
              ORDER BY statement",
            &[],
        )
        .await
        .expect("prepared statements")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    // The set-based statements (reading `projector_rows`): the creates and the updates.
    assert_eq!(plans.len(), 2, "{plans:#?}");
    for (statement, generic, custom) in &plans {
        assert_eq!((*generic, *custom), (8, 0), "executions planned generic, custom: {statement}");
    }
    let mode: String = client.query_one("SHOW plan_cache_mode", &[]).await.expect("setting").get(0);
    assert_eq!(mode, "auto", "the setting was the batches' own");
    drop(client);
    drop(pool);
    db.drop().await;
}
