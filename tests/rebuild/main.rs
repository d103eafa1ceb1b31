//! Rebuilds against real PostgreSQL and librdkafka's in-process mock Kafka cluster: in place,
//! interrupted and resumed, into shadow tables under live traffic with a reader polling, a failed
//! pre-swap check, as of a point in time, a changed definition, and missing history.
//!
//! Databases, topics and engines come from `common::engine`; the fold from `common::model`.

#[path = "../common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use projector::kafka::mock::MockKafka;
use projector::metrics::Metrics;
use projector::projection::Projection;
use projector::rebuild::{RebuildArgs, RebuildError};
use projector::settings::Settings;

use common::model::{self, assert_read_models, events, order_stream, Fact};
use common::{Engine, TestDb};

/// `orders` orders over five customers, interleaved round-robin (each stream's order kept).
fn history(orders: usize) -> Vec<Fact> {
    let streams: Vec<Vec<Fact>> = (0..orders)
        .map(|i| {
            let steps: &[&str] = match i % 4 {
                0 => &["paid", "shipped"],
                1 => &["cancelled"],
                2 => &["paid"],
                _ => &[],
            };
            order_stream(&uuid::Uuid::new_v4().to_string(), &format!("customer-{}", i % 5), 100 + i as i64 * 37, steps)
        })
        .collect();
    let longest = streams.iter().map(Vec::len).max().unwrap_or(0);
    (0..longest).flat_map(|i| streams.iter().filter_map(move |s| s.get(i).cloned())).collect()
}

/// What every rebuild test starts from: its own mock broker (kept alive by `_kafka`), topic and
/// database, settings with `max_events` per batch, and the example projections on the topic.
struct Setup {
    _kafka: MockKafka,
    topic: String,
    db: TestDb,
    settings: Settings,
    projections: Vec<Projection>,
}

async fn setup(partitions: i32, max_events: usize) -> Setup {
    common::init_tracing();
    let kafka = MockKafka::start(1).expect("mock kafka");
    let topic = common::new_topic(&kafka, partitions);
    let db = TestDb::create().await;
    let settings = common::settings(&kafka, &db.url, max_events, true);
    let projections = common::example_projections(&topic);
    Setup { _kafka: kafka, topic, db, settings, projections }
}

async fn publish(settings: &Settings, topic: &str, facts: &[Fact]) {
    common::engine::publish(settings, topic, &events(facts)).await;
}

async fn rebuild(
    settings: &Settings,
    projections: &[Projection],
    args: RebuildArgs,
) -> Result<projector::rebuild::RebuildReport, RebuildError> {
    projector::rebuild::run(settings, projections, &args, Metrics::new(), std::future::pending()).await
}

fn args(name: &str) -> RebuildArgs {
    RebuildArgs { name: name.into(), ..RebuildArgs::default() }
}

/// Builds both read models with a live engine, then stops it: the "fresh build" to compare with.
async fn fresh_build(settings: &Settings, projections: &[Projection]) -> (Vec<String>, Vec<String>) {
    let engine = Engine::start(settings, projections);
    common::wait_caught_up(settings, projections).await;
    engine.stop().await;
    snapshot(settings).await
}

async fn snapshot(settings: &Settings) -> (Vec<String>, Vec<String>) {
    let client = common::connect(&settings.database.url).await;
    (
        common::db::table_text(&client, "order_summary", "order_id").await,
        common::db::table_text(&client, "customer_totals", "customer_id").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_rebuild_gives_the_same_tables_as_a_fresh_build() {
    let Setup { _kafka, topic, db, settings, projections } = setup(3, 50).await;
    let published = history(40);
    publish(&settings, &topic, &published).await;
    let fresh = fresh_build(&settings, &projections).await;

    // Damage both read models, as a buggy statement or a careless hand would.
    let client = db.connect().await;
    client
        .batch_execute(
            "UPDATE order_summary SET status = 'garbage'; DELETE FROM customer_totals WHERE customer_id = 'customer-1'",
        )
        .await
        .unwrap();
    assert_ne!(snapshot(&settings).await, fresh);

    for name in ["order_summary", "customer_totals"] {
        let report = rebuild(&settings, &projections, args(name)).await.expect("rebuild");
        assert!(!report.resumed);
        assert_eq!(report.events as usize, published.len(), "{name}: every record replayed once");
    }
    assert_eq!(snapshot(&settings).await, fresh, "rebuilt tables equal the fresh build, row for row");
    assert_read_models(&client, &published, "after in-place rebuild").await;
    let state: String = client
        .query_one(
            "SELECT state FROM projector.rebuilds WHERE projection = 'order_summary' AND target = 'order_summary'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "done");
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_interrupted_part_way_resumes_to_the_same_tables() {
    let Setup { _kafka, topic, db, settings, projections } = setup(4, 20).await;
    let published = history(400);
    publish(&settings, &topic, &published).await;
    let fresh = fresh_build(&settings, &projections).await;

    for name in ["order_summary", "customer_totals"] {
        // Interrupt once some, but not all, of the replay is done (Ctrl-C).
        let client = db.connect().await;
        let progress_query = format!(
            "SELECT coalesce(sum(next_offset), 0)::int8 FROM projector.checkpoints WHERE projection = '{name}'"
        );
        let started = Arc::new(AtomicBool::new(false));
        let interrupt = {
            let started = started.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let done: i64 = client.query_one(&progress_query, &[]).await.unwrap().get(0);
                    // The reset sets checkpoints to 0: wait for the rebuild to be under way, then part-way.
                    if done == 0 {
                        started.store(true, Ordering::SeqCst);
                    }
                    if started.load(Ordering::SeqCst) && done > 0 {
                        return;
                    }
                }
            }
        };
        let first = projector::rebuild::run(&settings, &projections, &args(name), Metrics::new(), interrupt).await;
        match first {
            Err(RebuildError::Interrupted { done, total }) => {
                assert!(done < total, "{name}: interrupted part-way ({done} of {total})")
            }
            other => panic!("{name}: expected an interrupted rebuild, got {other:?}"),
        }
        let state: String = db
            .connect()
            .await
            .query_one("SELECT state FROM projector.rebuilds WHERE projection = $1 AND target = $1", &[&name])
            .await
            .unwrap()
            .get(0);
        assert_eq!(state, "running", "{name}: the interrupted rebuild is recorded as under way");
        // `projector status` shows it, part-way.
        let status = projector::status::collect(&settings, &projections).await.expect("status");
        let shown = status.projections.iter().find(|p| p.projection == name).and_then(|p| p.rebuild.clone());
        let shown = shown.unwrap_or_else(|| panic!("{name}: status shows the rebuild under way"));
        assert_eq!(shown.mode, "in_place");
        assert!(shown.progress > 0.0 && shown.progress < 1.0, "{name}: progress part-way: {shown:?}");
        assert_eq!(shown.events_total as usize, published.len());

        let resumed = rebuild(&settings, &projections, args(name)).await.expect("resumed rebuild");
        assert!(resumed.resumed, "{name}: the second run resumes instead of starting over");
        assert!((resumed.events as usize) < published.len(), "{name}: the resumed run does not replay from zero");
    }
    assert_eq!(snapshot(&settings).await, fresh, "resumed rebuild equals the fresh build");
    assert_read_models(&db.connect().await, &published, "after a resumed rebuild").await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_rebuild_under_live_traffic_swaps_without_readers_seeing_a_partial_table() {
    let Setup { _kafka, topic, db, settings, projections } = setup(3, 20).await;
    let first = history(150);
    publish(&settings, &topic, &first).await;
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;

    // Damage the live table: the shadow rebuild must produce the fold regardless.
    let client = db.connect().await;
    client.batch_execute("UPDATE order_summary SET carrier = 'wrong'").await.unwrap();

    // A reader polls the live table: it must never see it empty, partial or going backwards.
    let stop_reader = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop_reader.clone();
        let url = db.url.clone();
        tokio::spawn(async move {
            let client = common::connect(&url).await;
            let mut last = (0i64, 0i64);
            let mut reads = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let row = client
                    .query_one("SELECT count(*), coalesce(sum(version), 0)::int8 FROM order_summary", &[])
                    .await
                    .expect("the live table is always there");
                let now: (i64, i64) = (row.get(0), row.get(1));
                assert!(now.0 >= last.0 && now.1 >= last.1, "reader saw the read model go back: {last:?} then {now:?}");
                last = now;
                reads += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (reads, last)
        })
    };
    // Live traffic during the rebuild.
    let second = history(150);
    let producer = {
        let (settings, topic, second) = (settings.clone(), topic.clone(), second.clone());
        tokio::spawn(async move {
            for chunk in second.chunks(10) {
                publish(&settings, &topic, chunk).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let report = rebuild(&settings, &projections, RebuildArgs { shadow: true, ..args("order_summary") })
        .await
        .expect("shadow rebuild");
    producer.await.unwrap();
    common::wait_caught_up(&settings, &projections).await;
    stop_reader.store(true, Ordering::SeqCst);
    let (reads, _) = reader.await.expect("the reader never saw a partial table");
    assert!(reads > 10, "the reader polled during the rebuild ({reads} reads)");
    assert!(report.notes.iter().any(|note| note.contains("projector_retired_order_summary_")), "{:?}", report.notes);

    let mut all = first.clone();
    all.extend(second.iter().cloned());
    assert_read_models(&client, &all, "after the shadow swap, with live traffic").await;
    let outcomes = common::outcomes(&engine.stop().await, "order_summary");
    assert_eq!(outcomes.iter().find(|(o, _)| *o == "parked").unwrap().1, 0);

    // The old copy stays until dropped.
    let retired: Vec<String> = client
        .query("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'projector_retired_order_summary_%'", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(retired.len(), 1);
    let old_wrong: i64 = client
        .query_one(&format!("SELECT count(*) FROM {}.order_summary WHERE carrier = 'wrong'", retired[0]), &[])
        .await
        .unwrap()
        .get(0);
    assert!(old_wrong > 0, "the retired copy is the old table");
    let dropped = projector::rebuild::drop_retired(&settings, "order_summary").await.unwrap();
    assert_eq!(dropped, retired);
    let left: i64 = client
        .query_one("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'projector_retired_order_summary_%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pre_swap_check_leaves_the_live_table_untouched() {
    let Setup { _kafka, topic, db, settings, mut projections } = setup(2, 50).await;
    publish(&settings, &topic, &history(30)).await;
    let before = fresh_build(&settings, &projections).await;

    let summary = projections.iter_mut().find(|p| p.name == "order_summary").unwrap();
    summary.rebuild.checks = vec!["SELECT count(*) = 0 FROM order_summary".into()];
    let error = rebuild(&settings, &projections, RebuildArgs { shadow: true, ..args("order_summary") })
        .await
        .expect_err("the check fails");
    assert!(matches!(error, RebuildError::Swap(_)), "{error}");
    assert!(error.to_string().contains("is not true on the shadow copy"), "{error}");
    assert_eq!(snapshot(&settings).await, before, "live tables untouched");

    // A row-count check fails the same way.
    let summary = projections.iter_mut().find(|p| p.name == "order_summary").unwrap();
    summary.rebuild.checks.clear();
    let error = rebuild(
        &settings,
        &projections,
        RebuildArgs { shadow: true, restart: true, min_row_ratio: Some(2.0), ..args("order_summary") },
    )
    .await
    .expect_err("the row count check fails");
    assert!(error.to_string().contains("fewer than 2"), "{error}");
    assert_eq!(snapshot(&settings).await, before, "live tables untouched");
    let client = db.connect().await;
    let state: String = client
        .query_one("SELECT state FROM projector.rebuilds WHERE target = 'order_summary~shadow'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "aborted");
    let live_checkpoints: i64 = client
        .query_one("SELECT count(*) FROM projector.checkpoints WHERE projection = 'order_summary'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(live_checkpoints, 2, "live checkpoints untouched");
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_builds_the_fold_of_the_events_up_to_that_point() {
    let Setup { _kafka, topic, db, settings, projections } = setup(3, 50).await;
    let before = history(30);
    publish(&settings, &topic, &before).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cut = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut after = history(20);
    // Also later events of orders from before the cut: the as-of copy must not see them.
    for fact in before.iter().filter(|fact| fact.version == 1).take(5) {
        if let Some(last) = before.iter().filter(|f| f.order == fact.order).map(|f| f.version).max() {
            after.push(Fact::new(
                &fact.order,
                &fact.customer,
                last + 1,
                model::Kind::Cancelled { reason: "late".into() },
            ));
        }
    }
    publish(&settings, &topic, &after).await;
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;

    let report = rebuild(
        &settings,
        &projections,
        RebuildArgs { until: Some(cut), into: Some("order_summary_asof".into()), ..args("order_summary") },
    )
    .await
    .expect("as-of rebuild");
    assert_eq!(report.events as usize, before.len(), "exactly the records before the cut");
    engine.stop().await;

    let client = db.connect().await;
    let as_of = model::read_order_summary_from(&client, "order_summary_asof").await;
    assert_eq!(as_of, model::fold_order_summary(&before), "as-of table = fold of the events before the cut");
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    assert_read_models(&client, &all, "live tables untouched by the as-of build").await;
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_definition_is_refused_until_rebuilt_or_accepted() {
    let Setup { _kafka, topic, db, settings, projections } = setup(2, 50).await;
    let first = history(10);
    publish(&settings, &topic, &first).await;
    fresh_build(&settings, &projections).await;

    // The team changes a statement: shipped orders now record the carrier in upper case.
    let changed_text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/projections/order_summary.toml"))
        .unwrap()
        .replace("carrier = \":data.carrier?\"", "carrier = \"upper(:data.carrier?)\"");
    let mut changed = projector::projection::compile_file(std::path::Path::new("order_summary.toml"), &changed_text)
        .expect("the changed definition compiles");
    changed.topics = vec![topic.clone()];
    let original = projections.iter().find(|p| p.name == "order_summary").unwrap();
    assert_ne!(changed.hash, original.hash, "a changed statement changes the definition hash");
    let changed_projections = vec![changed.clone()];

    // New events arrive; an engine with the changed definition must not apply them.
    let second = history(10);
    publish(&settings, &topic, &second).await;
    let engine = Engine::start(&settings, &changed_projections);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let client = db.connect().await;
    let state = engine
        .metrics
        .registry
        .gather()
        .iter()
        .filter(|family| family.name() == "projector_projection_state")
        .flat_map(|family| family.get_metric().to_vec())
        .filter(|metric| metric.get_gauge().value() == 1.0)
        .flat_map(|metric| {
            metric.get_label().iter().filter(|l| l.name() == "state").map(|l| l.value().to_string()).collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    assert_eq!(state, vec!["failed".to_string()], "the changed projection is held back");
    assert_eq!(model::read_order_summary(&client).await, model::fold_order_summary(&first), "nothing new applied");

    // The operator accepts the change: the waiting engine starts by itself.
    projector::rebuild::accept(&settings, &changed).await.expect("accept");
    common::wait_caught_up(&settings, &changed_projections).await;
    engine.stop().await;
    let mut all = first.clone();
    all.extend(second.iter().cloned());
    assert_eq!(model::read_order_summary(&client).await.len(), model::fold_order_summary(&all).len());
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_refuses_when_history_is_missing() {
    let Setup { _kafka, topic, db, mut settings, projections } = setup(1, 50).await;
    // Retention below may pass the engine while it reads: it skips what is gone (counted) and
    // catches up, instead of holding the partition for an operator.
    settings.kafka.on_data_loss = projector::settings::OnDataLoss::Skip;
    let small = history(10);
    publish(&settings, &topic, &small).await;
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;

    // Retention: the mock broker keeps at most 5 MB per partition and drops the oldest records
    // beyond that, moving the partition's log start, as Kafka's retention does.
    let padding = "x".repeat(100_000);
    let big: Vec<projector::demo::ShopEvent> = (0..70)
        .map(|i| {
            projector::demo::shop_event(
                &uuid::Uuid::new_v4().to_string(),
                1,
                "OrderPlaced",
                serde_json::json!({"customer_id": format!("big-{i}"), "total": "1.00", "padding": padding}),
            )
        })
        .collect();
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &big).await.expect("publishing");
    common::wait_caught_up(&settings, &projections).await;
    engine.stop().await;
    let (low, _) = projector::kafka::watermarks(&settings.kafka, std::slice::from_ref(&topic), Duration::from_secs(5))
        .unwrap()[&(topic.clone(), 0)];
    assert!(low > 10, "the broker dropped the oldest records (log start {low})");
    let before = snapshot(&settings).await;

    let error = rebuild(&settings, &projections, args("order_summary")).await.expect_err("refused");
    assert!(matches!(error, RebuildError::HistoryMissing(_)), "{error}");
    assert!(error.to_string().contains(&format!("partition 0 starts at offset {low}")), "{error}");
    assert!(error.to_string().contains("--accept-data-loss"), "{error}");
    assert_eq!(snapshot(&settings).await, before, "nothing was reset");
    let rebuilds: i64 =
        db.connect().await.query_one("SELECT count(*) FROM projector.rebuilds", &[]).await.unwrap().get(0);
    assert_eq!(rebuilds, 0, "no rebuild was started");

    let report = rebuild(&settings, &projections, RebuildArgs { accept_data_loss: true, ..args("order_summary") })
        .await
        .expect("rebuild accepting the loss");
    let records = (small.len() + big.len()) as i64;
    assert!(low < records);
    assert_eq!(report.events as i64, records - low, "what is left is replayed");
    db.drop().await;
}

/// A projection called `name` keeping each order's total in a table of its own, also called
/// `name` (created here): for tests that need projections with chosen names.
async fn totals_projection(client: &tokio_postgres::Client, topic: &str, name: &str) -> Projection {
    client
        .batch_execute(&format!(
            "CREATE TABLE {name} (order_id uuid PRIMARY KEY, total numeric(12,2) NOT NULL, version bigint NOT NULL)"
        ))
        .await
        .unwrap_or_else(|error| panic!("creating table `{name}`: {error}"));
    common::versioned_projection(
        name,
        topic,
        name,
        "order_id",
        "[on.OrderPlaced]\ninsert = { total = \":data.total\" }\n",
    )
}

/// The schemas whose name starts with `projector_retired_`, sorted.
async fn retired_schemas(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, 'projector_retired_') ORDER BY nspname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_retired_drops_only_the_named_projections_tables() {
    let Setup { _kafka, topic, db, settings, .. } = setup(1, 50).await;
    publish(&settings, &topic, &history(8)).await;
    let client = db.connect().await;
    // `a`'s retired schemas' names are a prefix of `a_b`'s (and `_` is a LIKE wildcard).
    let projections =
        vec![totals_projection(&client, &topic, "a").await, totals_projection(&client, &topic, "a_b").await];
    // The old live tables, which the swaps retire, hold a row each.
    for name in ["a", "a_b"] {
        client
            .execute(&format!("INSERT INTO {name} VALUES ('00000000-0000-0000-0000-000000000001', 1, 1)"), &[])
            .await
            .unwrap();
    }
    for name in ["a", "a_b"] {
        rebuild(&settings, &projections, RebuildArgs { shadow: true, ..args(name) }).await.expect("shadow rebuild");
    }
    let retired = retired_schemas(&client).await;
    assert_eq!(retired.len(), 2, "{retired:?}");

    let dropped = projector::rebuild::drop_retired(&settings, "a").await.expect("drop-retired a");
    assert_eq!(dropped.len(), 1, "only `a`'s: {dropped:?}");
    assert!(!dropped[0].starts_with("projector_retired_a_b_"), "{dropped:?}");
    let left = retired_schemas(&client).await;
    assert_eq!(left.len(), 1, "`a_b`'s retired tables are kept: {left:?}");
    assert!(left[0].starts_with("projector_retired_a_b_"), "{left:?}");
    assert_eq!(common::query_i64(&client, &format!("SELECT count(*) FROM {}.a_b", left[0])).await, 1);
    assert_eq!(common::query_i64(&client, "SELECT count(*) FROM a_b").await, 8, "the live table is the rebuilt one");

    assert_eq!(projector::rebuild::drop_retired(&settings, "a_b").await.expect("drop-retired a_b"), left);
    assert!(retired_schemas(&client).await.is_empty());
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_named_projection_swapped_twice_keeps_both_retired_schemas() {
    let Setup { _kafka, topic, db, settings, .. } = setup(1, 50).await;
    publish(&settings, &topic, &history(4)).await;
    let client = db.connect().await;
    // As long as a rebuild allows (40 bytes), and another that differs only in its last byte.
    let long = format!("long_{}", "n".repeat(35));
    let also_long = format!("{}m", &long[..39]);
    let projections =
        vec![totals_projection(&client, &topic, &long).await, totals_projection(&client, &topic, &also_long).await];
    let swap = |name: &str| RebuildArgs { shadow: true, restart: true, ..args(name) };

    rebuild(&settings, &projections, swap(&long)).await.expect("first swap");
    // A retired schema's name ends in the swap's time, to the second: the next swap is a second on.
    let into_second = 1_000 - chrono::Utc::now().timestamp_subsec_millis() as u64;
    tokio::time::sleep(Duration::from_millis(into_second)).await;
    rebuild(&settings, &projections, swap(&long)).await.expect("second swap, into a schema of its own");
    rebuild(&settings, &projections, swap(&also_long)).await.expect("swap of the other projection");

    let retired = retired_schemas(&client).await;
    assert_eq!(retired.len(), 3, "{retired:?}");
    for schema in &retired {
        assert!(schema.len() <= 63, "`{schema}` fits Postgres' identifiers");
    }
    let dropped = projector::rebuild::drop_retired(&settings, &long).await.expect("drop-retired");
    assert_eq!(dropped.len(), 2, "both swaps' schemas: {dropped:?}");
    for schema in &dropped {
        assert!(!retired_schemas(&client).await.contains(schema), "`{schema}` is dropped");
    }
    let left = retired_schemas(&client).await;
    assert_eq!(left.len(), 1, "the other projection's is kept: {left:?}");
    assert_eq!(projector::rebuild::drop_retired(&settings, &also_long).await.expect("drop-retired"), left);
    drop(client);
    db.drop().await;
}

/// `n` orders placed, one event each.
fn placed(n: usize) -> Vec<Fact> {
    (0..n).flat_map(|i| order_stream(&uuid::Uuid::new_v4().to_string(), "customer-1", 100 + i as i64, &[])).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_whose_shadow_cannot_catch_up_gives_up_in_time_and_the_live_projection_goes_on() {
    let Setup { _kafka, topic, db, settings, .. } = setup(1, 50).await;
    let client = db.connect().await;
    let projections = vec![totals_projection(&client, &topic, "swapped").await];
    let engine = Engine::start(&settings, &projections);
    publish(&settings, &topic, &placed(10)).await;
    common::wait_caught_up(&settings, &projections).await;

    // The shadow's consumer waits until the rebuild has taken its targets (the 10 events), so
    // that it reads two more, which it cannot apply: a transaction of the test holds the first
    // one's key in the shadow table. One event per batch: its checkpoint stops right before.
    let fail_point = "consumer-poll-swapped~shadow";
    fail::cfg(fail_point, "pause").expect("configuring the fail point");
    let mut rebuild_settings = settings.clone();
    rebuild_settings.batch.max_events = 1;
    rebuild_settings.rebuild.swap_timeout_secs = 2;
    let swap = RebuildArgs { shadow: true, max_lag: 2, ..args("swapped") };
    let rebuilding = {
        let (settings, projections, swap) = (rebuild_settings.clone(), projections.clone(), swap.clone());
        tokio::spawn(async move { rebuild(&settings, &projections, swap).await })
    };
    common::wait_for("the shadow build to start", Duration::from_secs(30), || async {
        common::query_i64(&client, "SELECT count(*) FROM projector.rebuilds WHERE target = 'swapped~shadow'").await == 1
    })
    .await;
    let late = placed(2);
    publish(&settings, &topic, &late).await;
    common::wait_caught_up(&settings, &projections).await;
    let mut blocker = db.connect().await;
    let blocking = blocker.transaction().await.unwrap();
    blocking
        .execute("INSERT INTO projector_shadow_swapped.swapped VALUES ($1::text::uuid, 1, 1)", &[&late[0].order])
        .await
        .unwrap();
    fail::remove(fail_point);

    // The swap locks the live checkpoints, at 12, and waits for the shadow, stuck at 10.
    let held = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                   AND state = 'idle in transaction' AND query LIKE 'SELECT projection, topic, partition, next_offset%'";
    common::wait_for("the swap to hold the live checkpoints", Duration::from_secs(30), || async {
        common::query_i64(&client, held).await == 1
    })
    .await;
    let holding = std::time::Instant::now();
    // Live traffic meanwhile: its batch waits for the locks.
    let during = placed(1);
    publish(&settings, &topic, &during).await;

    let outcome = tokio::time::timeout(Duration::from_secs(30), rebuilding)
        .await
        .expect("the swap gave up instead of waiting for ever")
        .unwrap();
    let given_up_after = holding.elapsed();
    let error = outcome.expect_err("the swap gives up");
    assert!(matches!(error, RebuildError::SwapTimeout { behind: 2, .. }), "{error}");
    for advice in ["rebuild.swap_timeout_secs", "run the same command again"] {
        assert!(error.to_string().contains(advice), "{error}");
    }
    // Within the bound (2 s), then as long again at most for the stuck shadow to stop.
    assert!(given_up_after < Duration::from_secs(8), "given up after {given_up_after:?}");
    assert_eq!(common::query_i64(&client, held).await, 0, "the live checkpoints are released");
    common::wait_caught_up(&settings, &projections).await;
    assert!(holding.elapsed() < Duration::from_secs(10), "the live projection went on: {:?}", holding.elapsed());
    assert_eq!(common::query_i64(&client, "SELECT count(*) FROM swapped").await, 13, "the live table has every order");
    assert!(retired_schemas(&client).await.is_empty(), "nothing was swapped");

    // Once the shadow can go on, the same command resumes it and swaps.
    blocking.rollback().await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), rebuild(&rebuild_settings, &projections, swap))
        .await
        .expect("the second attempt ends")
        .expect("the second attempt swaps");
    assert!(report.resumed, "the shadow is resumed, not started over");
    assert_eq!(retired_schemas(&client).await.len(), 1);
    common::wait_caught_up(&settings, &projections).await;
    assert_eq!(common::query_i64(&client, "SELECT count(*) FROM swapped").await, 13, "the swapped-in table too");
    engine.stop().await;
    drop(blocker);
    drop(client);
    db.drop().await;
}

/// Accounts, as first deployed: `branch` kept, `balance` an integer.
const ACCOUNTS_V1: &str = r#"topics = ["TOPIC"]

[table]
name = "accounts"
key = "account_id"

[on.AccountOpened]
insert = { owner = ":data.owner", branch = ":data.branch", balance = "0" }

[on.MoneyDeposited]
update = { balance = "balance + :data.amount" }
"#;

/// Accounts, changed: `branch` dropped, `deposits` added, `balance` numeric with cents.
const ACCOUNTS_V2: &str = r#"topics = ["TOPIC"]

[table]
name = "accounts"
key = "account_id"

[on.AccountOpened]
insert = { owner = ":data.owner", balance = "0" }

[on.MoneyDeposited]
update = { balance = "balance + :data.amount", deposits = "deposits + 1" }
"#;

const ACCOUNTS_MIGRATION_1: &str = "CREATE TABLE accounts (
    account_id text PRIMARY KEY, owner text NOT NULL, branch text NOT NULL, balance integer NOT NULL, version bigint NOT NULL
);";

const ACCOUNTS_MIGRATION_2: &str = "ALTER TABLE accounts DROP COLUMN branch;
ALTER TABLE accounts ADD COLUMN deposits bigint NOT NULL DEFAULT 0;
ALTER TABLE accounts ALTER COLUMN balance TYPE numeric(14,2);
CREATE INDEX accounts_by_owner ON accounts (owner);";

fn accounts(topic: &str, text: &str, migrations: &[(&str, &str)]) -> Projection {
    let mut projection =
        projector::projection::compile_file(std::path::Path::new("accounts.toml"), &text.replace("TOPIC", topic))
            .expect("the accounts projection compiles");
    projection.migrations = migrations
        .iter()
        .map(|(name, sql)| projector::projection::migrations::parse(name, sql).expect("a migration"))
        .collect();
    projection
}

/// `count` events of each account of `range`, from version `from_version` (1: opened; then
/// deposits of `i + 1` for account `i`, or `i + 1.25` with `cents`), round-robin over accounts.
fn account_events(
    range: std::ops::Range<usize>,
    count: i64,
    from_version: i64,
    cents: bool,
) -> Vec<projector::demo::ShopEvent> {
    let mut events = Vec::new();
    for round in 0..count {
        for i in range.clone() {
            let key = format!("acc-{i:03}");
            let version = from_version + round;
            if version == 1 {
                events.push(projector::demo::shop_event(
                    &key,
                    1,
                    "AccountOpened",
                    serde_json::json!({"owner": format!("owner-{}", i % 7), "branch": "north"}),
                ));
            } else {
                let amount = if cents { serde_json::json!(format!("{}.25", i + 1)) } else { serde_json::json!(i + 1) };
                events.push(projector::demo::shop_event(
                    &key,
                    version,
                    "MoneyDeposited",
                    serde_json::json!({"amount": amount}),
                ));
            }
        }
    }
    events
}

/// The accounts projection as first deployed (V1) and changed (V1, V2).
fn accounts_before_and_after(topic: &str) -> (Projection, Projection) {
    let first = ("V1__create_accounts", ACCOUNTS_MIGRATION_1);
    (
        accounts(topic, ACCOUNTS_V1, &[first]),
        accounts(topic, ACCOUNTS_V2, &[first, ("V2__cents_and_deposits", ACCOUNTS_MIGRATION_2)]),
    )
}

/// Publishes `events`, and returns an engine running `v1` once it has applied them.
async fn run_first_definition(
    settings: &Settings,
    topic: &str,
    v1: &Projection,
    events: Vec<projector::demo::ShopEvent>,
) -> Engine {
    projector::demo::publish(&settings.kafka.bootstrap_servers, topic, &events).await.expect("publishing");
    let engine = Engine::start(settings, std::slice::from_ref(v1));
    common::wait_caught_up(settings, std::slice::from_ref(v1)).await;
    engine
}

async fn columns_of(client: &tokio_postgres::Client, table: &str) -> Vec<(String, String)> {
    client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
              WHERE table_name = $1 AND table_schema = current_schema() ORDER BY column_name",
            &[&table],
        )
        .await
        .expect("columns")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_change_ships_by_shadow_rebuild_under_live_traffic_without_readers_seeing_it_half_done() {
    let Setup { _kafka, topic, db, settings, .. } = setup(3, 20).await;
    let (v1, v2) = accounts_before_and_after(&topic);
    // 60 accounts opened with 3 deposits each, under the first definition.
    let client = db.connect().await;
    let old_engine = run_first_definition(&settings, &topic, &v1, account_events(0..60, 4, 1, false)).await;
    let before = columns_of(&client, "accounts").await;
    assert!(
        before.contains(&("branch".into(), "text".into())) && before.contains(&("balance".into(), "integer".into()))
    );

    // A reader polls the live table through the whole change: never missing, never empty or
    // partial, never going back, and its columns either all old or all new.
    let stop_reader = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop_reader.clone();
        let url = db.url.clone();
        tokio::spawn(async move {
            let client = common::connect(&url).await;
            let (mut last, mut reads, mut shapes) = ((0i64, 0i64), 0u64, Vec::<Vec<(String, String)>>::new());
            while !stop.load(Ordering::SeqCst) {
                let row = client
                    .query_one("SELECT count(*), coalesce(sum(version), 0)::int8 FROM accounts", &[])
                    .await
                    .expect("the live table is always there");
                let now: (i64, i64) = (row.get(0), row.get(1));
                assert!(now.0 >= 60 && now.0 >= last.0 && now.1 >= last.1, "reader saw {last:?} then {now:?}");
                let shape = columns_of(&client, "accounts").await;
                if shapes.last() != Some(&shape) {
                    shapes.push(shape);
                }
                last = now;
                reads += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (reads, shapes)
        })
    };
    // Live traffic all along: deposits 4 to 6 of the first 60 accounts, 20 new accounts.
    let producer = {
        let (bootstrap, topic) = (settings.kafka.bootstrap_servers.clone(), topic.clone());
        tokio::spawn(async move {
            let mut more = account_events(0..60, 3, 5, false);
            more.extend(account_events(60..80, 3, 1, false));
            for chunk in more.chunks(10) {
                projector::demo::publish(&bootstrap, &topic, chunk).await.expect("publishing");
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            more.len()
        })
    };

    let report = rebuild(&settings, std::slice::from_ref(&v2), RebuildArgs { shadow: true, ..args("accounts") })
        .await
        .expect("shadow rebuild with the new schema");
    assert!(
        report.notes.iter().any(|note| note.contains("built by the projection's migrations")),
        "{:?}",
        report.notes
    );
    producer.await.expect("producer");
    // The old definition's engine no longer writes (its checkpoints are the new definition's);
    // the new one's starts, applies nothing in place (V1 would fail a second time), and goes on.
    let old_metrics = old_engine.stop().await;
    let new_engine = Engine::start(&settings, std::slice::from_ref(&v2));
    let mut last = account_events(0..60, 1, 8, true);
    last.extend(account_events(60..80, 1, 4, true));
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &last).await.expect("publishing");
    common::wait_caught_up(&settings, std::slice::from_ref(&v2)).await;
    stop_reader.store(true, Ordering::SeqCst);
    let (reads, shapes) = reader.await.expect("the reader never saw a missing, partial or older table");
    assert!(reads > 20, "the reader polled throughout ({reads} reads)");
    let after = vec![
        ("account_id".to_string(), "text".to_string()),
        ("balance".into(), "numeric".into()),
        ("deposits".into(), "bigint".into()),
        ("owner".into(), "text".into()),
        ("version".into(), "bigint".into()),
    ];
    assert_eq!(shapes, [before, after], "the reader saw the old columns, then the new ones, nothing between");
    let index: bool =
        client.query_one("SELECT to_regclass('accounts_by_owner') IS NOT NULL", &[]).await.expect("index").get(0);
    assert!(index, "the new index came with the swap");
    let history: Vec<i32> = client
        .query("SELECT version FROM projector.migrations_accounts ORDER BY version", &[])
        .await
        .expect("history")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(history, [1, 2]);

    // The fold: accounts 0..60 have 6 integer deposits, then one with cents under the new
    // definition; 60..80 have 2, then one with cents.
    let rows = client
        .query("SELECT account_id, balance::text, deposits, version FROM accounts ORDER BY account_id", &[])
        .await
        .expect("rows");
    assert_eq!(rows.len(), 80);
    for row in rows {
        let account: String = row.get(0);
        let i: i64 = account[4..].parse().expect("account number");
        let integer_deposits = if i < 60 { 6 } else { 2 };
        let balance = format!("{}.25", (i + 1) * (integer_deposits + 1));
        let expected = (balance, integer_deposits + 1, integer_deposits + 2);
        assert_eq!((row.get::<_, String>(1), row.get::<_, i64>(2), row.get::<_, i64>(3)), expected, "{account}");
    }
    let parked = common::outcomes(&new_engine.stop().await, "accounts");
    assert_eq!(parked.iter().find(|(outcome, _)| *outcome == "parked").map(|(_, n)| *n), Some(0));
    let old_parked = common::outcomes(&old_metrics, "accounts");
    assert_eq!(old_parked.iter().find(|(outcome, _)| *outcome == "parked").map(|(_, n)| *n), Some(0));
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_definitions_migrations_wait_for_its_rebuild_or_accept() {
    let Setup { _kafka, topic, db, settings, .. } = setup(2, 20).await;
    let (v1, v2) = accounts_before_and_after(&topic);
    let client = db.connect().await;
    run_first_definition(&settings, &topic, &v1, account_events(0..10, 2, 1, false)).await.stop().await;
    let old = columns_of(&client, "accounts").await;

    // The new definition's engine starts; the projection waits, and so do its migrations: the
    // live table keeps the columns the old definition's rows were written with.
    let engine = Engine::start(&settings, std::slice::from_ref(&v2));
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &account_events(0..10, 1, 3, true))
        .await
        .expect("publishing");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(columns_of(&client, "accounts").await, old, "V2 waits");
    let versions: i64 = client.query_one("SELECT sum(version)::int8 FROM accounts", &[]).await.expect("sum").get(0);
    assert_eq!(versions, 20, "nothing applied by the waiting definition");

    // `projector accept`: V2 applied in place, then the new definition runs on the kept rows.
    projector::rebuild::accept(&settings, &v2).await.expect("accept");
    assert!(columns_of(&client, "accounts").await.iter().any(|(column, _)| column == "deposits"));
    common::wait_caught_up(&settings, std::slice::from_ref(&v2)).await;
    let rows = client
        .query("SELECT account_id, balance::text, deposits, version FROM accounts ORDER BY account_id", &[])
        .await
        .expect("rows");
    for row in rows {
        let account: String = row.get(0);
        let i: i64 = account[4..].parse().expect("account number");
        // One integer deposit under the old definition (not counted in `deposits`), one with cents.
        let expected = (format!("{}.25", 2 * (i + 1)), 1, 3);
        assert_eq!((row.get::<_, String>(1), row.get::<_, i64>(2), row.get::<_, i64>(3)), expected, "{account}");
    }
    engine.stop().await;
    drop(client);
    db.drop().await;
}
