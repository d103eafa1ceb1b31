//! The promise as a property: for any history of duplicates, redeliveries, out-of-order pairs,
//! graceful restarts and crashes, the read models equal the fold of the distinct events.
//!
//! Every case runs a real engine against a real database, so there are few cases (12, or
//! `PROPTEST_CASES`) and little shrinking. One mock cluster serves every case; each case has its
//! own topic, consumer groups and database.

use std::time::Duration;

use projector::kafka::mock::MockKafka;
use projector::outcome::Outcome;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::common::model::{self, Fact, Kind};
use crate::common::{self, Engine, TestDb};

/// How an order's stream goes on after `OrderPlaced`.
#[derive(Debug, Clone, Copy)]
enum Path {
    Placed,
    Paid,
    Cancelled,
    Shipped {
        /// Publish shipped (v3) before paid (v2): a gap, held until paid arrives.
        shipped_first: bool,
    },
}

#[derive(Debug, Clone)]
struct OrderSpec {
    customer: u8,
    cents: i64,
    path: Path,
}

/// How one publishing phase ends before the next one: the engine is replaced.
#[derive(Debug, Clone, Copy)]
enum Restart {
    /// Stop gracefully `after_ms` after publishing (the batch in flight commits).
    Graceful { after_ms: u64 },
    /// Abort the engine's task `after_ms` after publishing (the transaction in flight rolls back).
    Crash { after_ms: u64 },
}

#[derive(Debug, Clone)]
struct Scenario {
    orders: Vec<OrderSpec>,
    /// Picks, at each step, which order publishes its next event.
    interleaving: Vec<Index>,
    /// (record to copy, how far after the end of the stream to insert the copy).
    duplicates: Vec<(Index, Index)>,
    /// A stretch (start, length) published again at the end, as after a producer retry.
    redelivered: Option<(Index, usize)>,
    /// Where the published records are cut into phases, and how the engine restarts at each cut.
    restarts: Vec<(Index, Restart)>,
    partitions: i32,
    max_events: usize,
}

fn path() -> impl Strategy<Value = Path> {
    prop_oneof![
        1 => Just(Path::Placed),
        2 => Just(Path::Paid),
        2 => Just(Path::Cancelled),
        3 => any::<bool>().prop_map(|shipped_first| Path::Shipped { shipped_first }),
    ]
}

fn restart() -> impl Strategy<Value = Restart> {
    prop_oneof![
        (0u64..300).prop_map(|after_ms| Restart::Graceful { after_ms }),
        (0u64..300).prop_map(|after_ms| Restart::Crash { after_ms }),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(
            (0u8..4, 1i64..10_000_000, path()).prop_map(|(customer, cents, path)| OrderSpec { customer, cents, path }),
            1..=12,
        ),
        prop::collection::vec(any::<Index>(), 48),
        prop::collection::vec((any::<Index>(), any::<Index>()), 0..8),
        prop::option::of((any::<Index>(), 1usize..10)),
        prop::collection::vec((any::<Index>(), restart()), 0..=2),
        1i32..=4,
        1usize..=12,
    )
        .prop_map(|(orders, interleaving, duplicates, redelivered, restarts, partitions, max_events)| Scenario {
            orders,
            interleaving,
            duplicates,
            redelivered,
            restarts,
            partitions,
            max_events,
        })
}

/// Each order's stream, in the order it is published (shipped may come before paid).
fn streams(scenario: &Scenario) -> Vec<Vec<Fact>> {
    scenario
        .orders
        .iter()
        .map(|spec| {
            let order = uuid::Uuid::new_v4().to_string();
            let customer = format!("customer-{}", spec.customer);
            let total = model::money(spec.cents);
            let fact = |version, kind| Fact::new(&order, &customer, version, kind);
            let placed = fact(1, Kind::Placed { total });
            let paid = || fact(2, Kind::Paid { amount: total });
            let shipped = || fact(3, Kind::Shipped { carrier: format!("carrier-{}", spec.cents % 3) });
            match spec.path {
                Path::Placed => vec![placed],
                Path::Paid => vec![placed, paid()],
                Path::Cancelled => vec![placed, fact(2, Kind::Cancelled { reason: "changed mind".into() })],
                Path::Shipped { shipped_first: false } => vec![placed, paid(), shipped()],
                Path::Shipped { shipped_first: true } => vec![placed, shipped(), paid()],
            }
        })
        .collect()
}

/// The records to publish, in order: the streams interleaved, then duplicates and a redelivered
/// stretch, each copy after its original.
fn published(scenario: &Scenario, streams: &[Vec<Fact>]) -> Vec<Fact> {
    let mut records = common::model::interleave(streams, &scenario.interleaving);
    common::model::insert_copies(&mut records, &scenario.duplicates);
    if let Some((start, length)) = scenario.redelivered {
        let start = start.index(records.len());
        let end = (start + length).min(records.len());
        let stretch = records[start..end].to_vec();
        records.extend(stretch);
    }
    records
}

/// What one case did, for the summary printed at the end.
#[derive(Default, Debug)]
struct Tally {
    cases: usize,
    records: usize,
    distinct: usize,
    graceful: usize,
    crashes: usize,
    max_records: usize,
}

async fn run_case(kafka: &MockKafka, scenario: &Scenario, tally: &mut Tally) -> Result<(), TestCaseError> {
    let streams = streams(scenario);
    let records = published(scenario, &streams);
    let topic = common::new_topic(kafka, scenario.partitions);
    let db = TestDb::create().await;
    let settings = common::settings(kafka, &db.url, scenario.max_events, true);
    let projections = common::example_projections(&topic);

    // Phases: cut the records at the restart points (sorted, possibly empty phases).
    let mut cuts: Vec<(usize, Restart)> =
        scenario.restarts.iter().map(|(at, restart)| (at.index(records.len() + 1), *restart)).collect();
    cuts.sort_by_key(|(at, _)| *at);
    let mut from = 0;
    let mut engine = Engine::start(&settings, &projections);
    let mut parked = 0;
    // `order_summary`'s outcomes, over every engine run.
    let (mut applied, mut duplicates, mut gaps, mut crashed) = (0, 0, 0, false);
    for (to, restart) in &cuts {
        projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &model::events(&records[from..*to]))
            .await
            .expect("publishing");
        from = *to;
        if matches!(restart, Restart::Crash { .. }) {
            crashed = true;
        }
        let metrics = match *restart {
            Restart::Graceful { after_ms } => {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                tally.graceful += 1;
                engine.stop().await
            }
            Restart::Crash { after_ms } => {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                tally.crashes += 1;
                engine.crash().await
            }
        };
        parked += metrics.outcome_count("order_summary", Outcome::Parked)
            + metrics.outcome_count("customer_totals", Outcome::Parked);
        applied += metrics.outcome_count("order_summary", Outcome::Applied);
        duplicates += metrics.outcome_count("order_summary", Outcome::Duplicate);
        gaps += metrics.outcome_count("order_summary", Outcome::Gap);
        engine = Engine::start(&settings, &projections);
    }
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &model::events(&records[from..]))
        .await
        .expect("publishing");
    common::wait_caught_up(&settings, &projections).await;
    let metrics = engine.stop().await;
    parked += metrics.outcome_count("order_summary", Outcome::Parked)
        + metrics.outcome_count("customer_totals", Outcome::Parked);
    applied += metrics.outcome_count("order_summary", Outcome::Applied);
    duplicates += metrics.outcome_count("order_summary", Outcome::Duplicate);
    gaps += metrics.outcome_count("order_summary", Outcome::Gap);

    let client = db.connect().await;
    let orders = model::read_order_summary(&client).await;
    let customers = model::read_customer_totals(&client).await;
    let held = common::query_i64(&client, "SELECT count(*) FROM projector.held_events").await;
    let dead = common::query_i64(&client, "SELECT count(*) FROM projector.dead_letters").await;
    drop(client);
    db.drop().await;

    let distinct = model::distinct(&records).len();
    tally.cases += 1;
    tally.records += records.len();
    tally.distinct += distinct;
    tally.max_records = tally.max_records.max(records.len());
    println!(
        "case {}: {} orders, {} records ({distinct} distinct), {} partitions, batches of {}, restarts {:?}",
        tally.cases,
        streams.len(),
        records.len(),
        scenario.partitions,
        scenario.max_events,
        cuts
    );
    prop_assert_eq!(orders, model::fold_order_summary(&records), "order_summary");
    prop_assert_eq!(customers, model::fold_customer_totals(&records), "customer_totals");
    prop_assert_eq!(held, 0, "held_events");
    prop_assert_eq!(dead, 0, "dead_letters");
    prop_assert_eq!(parked, 0, "parked outcomes");
    // Every distinct event applied once; every other record a duplicate, or a gap when it is a
    // copy of an event held for its predecessor. (A crash can stop an engine between its commit
    // and its counting: that batch is then counted nowhere.)
    let records = records.len() as u64;
    let distinct = distinct as u64;
    if crashed {
        prop_assert!(applied <= distinct, "{applied} applied of {distinct} distinct events");
    } else {
        prop_assert_eq!(applied, distinct, "order_summary: applied");
        prop_assert!(
            duplicates <= records - distinct && applied + duplicates + gaps >= records,
            "{records} records: {applied} applied, {duplicates} duplicates, {gaps} gaps"
        );
    }
    Ok(())
}

#[test]
fn read_models_equal_the_fold_of_distinct_events_whatever_the_faults() {
    common::init_tracing();
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(12);
    let config = Config { cases, max_shrink_iters: 16, failure_persistence: None, ..Config::default() };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let kafka = MockKafka::start(1).expect("mock kafka");
    let tally = std::cell::RefCell::new(Tally::default());
    let mut runner = TestRunner::new(config);
    let result =
        runner.run(&scenario(), |scenario| runtime.block_on(run_case(&kafka, &scenario, &mut tally.borrow_mut())));
    println!("property summary: {:?}", tally.borrow());
    if let Err(error) = result {
        panic!("{error}");
    }
}
