//! End to end: a Tansu broker and `projector run` as separate processes. Publishes the example
//! shop's history with duplicates, crashes the projector (SIGKILL) while it is applying, restarts
//! it, and checks that the read models equal the fold of the distinct events, computed here
//! independently of the engine, and that the checkpoints cover exactly what was produced.
//!
//! Needs PostgreSQL (`PROJECTOR_TEST_DATABASE_URL`) and the `tansu` binary (scripts/install-tansu.sh).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::{
    checkpoints, produce_one_per_batch, projector_command, query_i64, wait_for, LogDir, Projector, Tansu, TestDb,
};
use nix::sys::signal::Signal;
use projector::demo::{demo_history, ShopEvent, TOPIC};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use tokio_postgres::Client;

const ORDERS: usize = 60;
const PARTITIONS: i32 = 4;
const PROJECTIONS: [&str; 2] = ["order_summary", "customer_totals"];
const CATCH_UP: Duration = Duration::from_secs(90);

/// One order's row in `order_summary`: status and version.
type OrderRow = (String, i64);

/// One customer's row in `customer_totals`: placed, cancelled, total placed, total paid (as text).
type CustomerRow = (i64, i64, String, String);

/// What the read models must hold after applying `records` (duplicates included) exactly once each.
#[derive(Debug, Default, PartialEq)]
struct Expected {
    orders: BTreeMap<String, OrderRow>,
    customers: BTreeMap<String, CustomerRow>,
}

fn text(value: &serde_json::Value, field: &str) -> String {
    match &value[field] {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The fold of the distinct events among `records`, by event id, independently of the engine.
fn expected_fold(records: &[ShopEvent]) -> Expected {
    let mut seen = HashSet::new();
    let mut orders: BTreeMap<String, OrderRow> = BTreeMap::new();
    let mut sums: BTreeMap<String, (i64, i64, Decimal, Decimal)> = BTreeMap::new();
    for record in records {
        let event = &record.value;
        if !seen.insert(text(event, "id")) {
            continue;
        }
        let order = text(event, "stream_id");
        let version = event["stream_version"].as_i64().expect("stream_version");
        let data = &event["data"];
        let customer = sums.entry(text(data, "customer_id")).or_default();
        let status = match text(event, "type").as_str() {
            "OrderPlaced" => {
                customer.0 += 1;
                customer.2 += Decimal::from_str(&text(data, "total")).expect("total");
                "placed"
            }
            "OrderPaid" => {
                customer.3 += Decimal::from_str(&text(data, "amount")).expect("amount");
                "paid"
            }
            "OrderShipped" => "shipped",
            "OrderCancelled" => {
                customer.1 += 1;
                "cancelled"
            }
            other => panic!("unexpected event type `{other}`"),
        };
        // Each order's records are published in stream order, so the highest version is the last.
        let row = orders.entry(order).or_insert_with(|| (String::new(), 0));
        if version > row.1 {
            *row = (status.to_string(), version);
        }
    }
    let customers = sums
        .into_iter()
        .map(|(customer, (placed, cancelled, total_placed, total_paid))| {
            (customer, (placed, cancelled, format!("{total_placed:.2}"), format!("{total_paid:.2}")))
        })
        .collect();
    Expected { orders, customers }
}

/// The example history, interleaved at random across orders (each order's events stay in order),
/// with about 10% of the records republished later (same event id: at-least-once duplicates).
fn shuffled_history_with_duplicates(rng: &mut StdRng) -> (Vec<ShopEvent>, usize) {
    let mut streams: Vec<std::collections::VecDeque<ShopEvent>> =
        demo_history(ORDERS).into_iter().map(Into::into).collect();
    let mut records: Vec<ShopEvent> = Vec::new();
    let mut duplicates = 0;
    loop {
        let open: Vec<usize> = (0..streams.len()).filter(|&i| !streams[i].is_empty()).collect();
        if open.is_empty() {
            break;
        }
        let stream = open[rng.random_range(0..open.len())];
        records.push(streams[stream].pop_front().expect("open stream"));
        if rng.random_bool(0.1) {
            let earlier = records[rng.random_range(0..records.len())].clone();
            records.push(earlier);
            duplicates += 1;
        }
    }
    (records, duplicates)
}

async fn read_models(client: &Client) -> Result<Expected, String> {
    let orders = client
        .query("SELECT order_id::text, status, version FROM order_summary", &[])
        .await
        .map_err(|error| format!("reading order_summary: {error}"))?
        .iter()
        .map(|row| (row.get::<_, String>(0), (row.get::<_, String>(1), row.get::<_, i64>(2))))
        .collect();
    let customers = client
        .query(
            "SELECT customer_id, orders_placed, orders_cancelled, total_placed::text, total_paid::text FROM customer_totals",
            &[],
        )
        .await
        .map_err(|error| format!("reading customer_totals: {error}"))?
        .iter()
        .map(|row| (row.get::<_, String>(0), (row.get(1), row.get(2), row.get(3), row.get(4))))
        .collect();
    Ok(Expected { orders, customers })
}

/// Records per partition, from the producer's delivery reports. Offsets must be dense from 0
/// (one record per batch), so the count is also the partition's end offset.
fn records_per_partition(positions: &[(i32, i64)]) -> BTreeMap<i32, i64> {
    let mut offsets: BTreeMap<i32, BTreeSet<i64>> = BTreeMap::new();
    for &(partition, offset) in positions {
        offsets.entry(partition).or_default().insert(offset);
    }
    offsets
        .into_iter()
        .map(|(partition, offsets)| {
            let count = offsets.len() as i64;
            assert_eq!(
                offsets.iter().copied().collect::<Vec<_>>(),
                (0..count).collect::<Vec<_>>(),
                "partition {partition}: the broker's offsets are not dense from 0"
            );
            (partition, count)
        })
        .collect()
}

/// Ok when both read models equal `expected` and both projections' checkpoints equal `ends`.
async fn caught_up(
    client: &Client,
    projector: &Projector,
    expected: &Expected,
    ends: &BTreeMap<i32, i64>,
) -> Result<(), String> {
    projector.assert_running();
    for projection in PROJECTIONS {
        let mut stored =
            checkpoints(client, projection, TOPIC).await.map_err(|error| format!("reading checkpoints: {error}"))?;
        stored.retain(|_, next_offset| *next_offset > 0);
        if &stored != ends {
            return Err(format!("`{projection}` checkpoints {stored:?}, want {ends:?}"));
        }
    }
    let actual = read_models(client).await?;
    if actual.orders != expected.orders {
        let wrong: Vec<_> = expected
            .orders
            .iter()
            .filter(|(order, row)| actual.orders.get(*order) != Some(row))
            .map(|(order, row)| format!("{order}: {:?} want {row:?}", actual.orders.get(order)))
            .take(5)
            .collect();
        return Err(format!(
            "order_summary has {} rows, want {}; first differences: {wrong:?}",
            actual.orders.len(),
            expected.orders.len()
        ));
    }
    if actual.customers != expected.customers {
        return Err(format!("customer_totals {:?}, want {:?}", actual.customers, expected.customers));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_restart_against_tansu_converges_to_the_fold_of_distinct_events() {
    let started = Instant::now();
    let seed: u64 =
        std::env::var("PROJECTOR_E2E_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (rerun with PROJECTOR_E2E_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    // 1. Broker, topic, database, group prefix.
    let tansu = Tansu::start().await;
    tansu.create_topic(TOPIC, PARTITIONS).await;
    let db = TestDb::create().await;
    let client = db.connect().await;
    let group_prefix = format!("e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let log_dir = LogDir::new("e2e");
    let log = log_dir.path.join("projector.log");
    eprintln!(
        "tansu at {}, database `{}`, group prefix `{group_prefix}`, projector log {}",
        tansu.bootstrap,
        db.name,
        log.display()
    );

    // 2. The first half of the history.
    let (records, duplicates) = shuffled_history_with_duplicates(&mut rng);
    let half = records.len() / 2;
    let (first, second) = records.split_at(half);
    eprintln!("{} records: {} distinct events and {duplicates} duplicates", records.len(), records.len() - duplicates);
    let mut positions = produce_one_per_batch(&tansu.bootstrap, TOPIC, first).await;

    // 3. The projector catches up with the first half.
    let settings = log_dir.path.join("projector.toml");
    std::fs::write(&settings, "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n")
        .expect("writing projector.toml");
    let command = || {
        let mut command = projector_command(&db.url, &tansu.bootstrap, &group_prefix, &log);
        command.env("PROJECTOR_BATCH__MAX_EVENTS", "8").env("PROJECTOR_BATCH__MAX_WAIT_MS", "20");
        // A SIGKILLed member keeps its partitions until its session times out (45 s by default):
        // a short session lets the restarted projector get them back sooner.
        command.env("PROJECTOR_CONFIG", &settings);
        command
    };
    let mut projector = Projector::spawn(command(), &log, "first run");
    let expected_first = expected_fold(first);
    let ends_first = records_per_partition(&positions);
    assert_eq!(ends_first.values().sum::<i64>(), first.len() as i64);
    wait_for("the first half to be applied", CATCH_UP, || caught_up(&client, &projector, &expected_first, &ends_first))
        .await;
    eprintln!("first half applied after {:?}", started.elapsed());

    // 4. The rest, produced in the background, slowly enough to crash the projector mid-stream.
    let versions_after_first = query_i64(&client, "SELECT coalesce(sum(version), 0)::bigint FROM order_summary").await;
    let producing = {
        let (bootstrap, second) = (tansu.bootstrap.clone(), second.to_vec());
        tokio::spawn(async move {
            let mut positions = Vec::new();
            for chunk in second.chunks(4) {
                positions.extend(produce_one_per_batch(&bootstrap, TOPIC, chunk).await);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            positions
        })
    };
    wait_for("some of the second half to be applied", CATCH_UP, || async {
        projector.assert_running();
        let versions = query_i64(&client, "SELECT coalesce(sum(version), 0)::bigint FROM order_summary").await;
        if versions >= versions_after_first + 10 {
            Ok(())
        } else {
            Err(format!("sum of versions {versions}, first half left {versions_after_first}"))
        }
    })
    .await;
    projector.kill();
    eprintln!(
        "projector SIGKILLed after {:?}; the producer had {}finished",
        started.elapsed(),
        if producing.is_finished() { "" } else { "not " }
    );
    projector = Projector::spawn(command(), &log, "after SIGKILL");
    positions.extend(producing.await.expect("producer task"));
    eprintln!("second half produced after {:?}", started.elapsed());

    let expected_all = expected_fold(&records);
    let ends_all = records_per_partition(&positions);
    assert_eq!(ends_all.values().sum::<i64>(), records.len() as i64);
    assert_eq!(expected_all.orders.len(), ORDERS);
    wait_for("everything to be applied after the restart", CATCH_UP, || {
        caught_up(&client, &projector, &expected_all, &ends_all)
    })
    .await;
    eprintln!("everything applied after {:?}", started.elapsed());
    assert_eq!(query_i64(&client, "SELECT count(*) FROM projector.held_events").await, 0, "held events remain");
    assert_eq!(query_i64(&client, "SELECT count(*) FROM projector.dead_letters").await, 0, "events were dead-lettered");

    // 5. A graceful stop.
    let status = projector.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30)).await;
    assert!(status.success(), "the projector exited with {status} on SIGTERM; log:\n{}", common::log_tail(&log, 60));
    // Nothing moved after the last check.
    assert_eq!(read_models(&client).await.expect("read models"), expected_all);

    drop(client);
    db.drop().await;
    eprintln!("passed in {:?}", started.elapsed());
}
