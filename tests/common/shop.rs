//! The example shop as the process-level tests see it: histories with duplicates, the read
//! models they must fold to (computed here, independently of the engine), and a check that both
//! read models and checkpoints have caught up.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::str::FromStr;

use projector::demo::{demo_history, ShopEvent};
use rand::rngs::StdRng;
use rand::Rng;
use rust_decimal::Decimal;
use tokio_postgres::Client;

use std::time::Duration;

use rdkafka::producer::FutureRecord;

use super::records::one_per_batch_producer;
use super::{checkpoints, query_i64, wait_for, Projector};

/// The example projections.
pub const PROJECTIONS: [&str; 2] = ["order_summary", "customer_totals"];

/// One order's row in `order_summary`: status and version.
pub type OrderRow = (String, i64);

/// One customer's row in `customer_totals`: placed, cancelled, total placed, total paid (as text).
pub type CustomerRow = (i64, i64, String, String);

/// What the read models must hold after applying `records` (duplicates included) exactly once each.
#[derive(Debug, Default, PartialEq)]
pub struct Expected {
    pub orders: BTreeMap<String, OrderRow>,
    pub customers: BTreeMap<String, CustomerRow>,
}

fn text(value: &serde_json::Value, field: &str) -> String {
    match &value[field] {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The fold of the distinct events among `records`, by event id, independently of the engine.
pub fn expected_fold(records: &[ShopEvent]) -> Expected {
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
pub fn shuffled_history_with_duplicates(rng: &mut StdRng, orders: usize) -> (Vec<ShopEvent>, usize) {
    let mut streams: Vec<std::collections::VecDeque<ShopEvent>> =
        demo_history(orders).into_iter().map(Into::into).collect();
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

pub async fn read_models(client: &Client) -> Result<Expected, String> {
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
pub fn records_per_partition(positions: &[(i32, i64)]) -> BTreeMap<i32, i64> {
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

/// Ok when both read models equal `expected` and both projections' checkpoints on `topic` equal
/// `ends`. With `projector`, fails at once when it has exited.
pub async fn caught_up(
    client: &Client,
    projector: Option<&Projector>,
    topic: &str,
    expected: &Expected,
    ends: &BTreeMap<i32, i64>,
) -> Result<(), String> {
    if let Some(projector) = projector {
        projector.assert_running();
    }
    for projection in PROJECTIONS {
        let mut stored =
            checkpoints(client, projection, topic).await.map_err(|error| format!("reading checkpoints: {error}"))?;
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

/// Waits (up to `timeout`) until both read models equal the fold of `records` and the checkpoints
/// cover `positions` exactly; checks nothing is held or parked; once `projector` has started,
/// stops it with SIGTERM (it must exit 0) and checks nothing moved after.
pub async fn converges_then_stops(
    client: &Client,
    projector: &Projector,
    topic: &str,
    records: &[ShopEvent],
    positions: &[(i32, i64)],
    timeout: Duration,
) {
    let expected = expected_fold(records);
    let ends = records_per_partition(positions);
    wait_for("the read models to equal the fold", timeout, || {
        caught_up(client, Some(projector), topic, &expected, &ends)
    })
    .await;
    assert_eq!(query_i64(client, "SELECT count(*) FROM projector.held_events").await, 0, "held events remain");
    assert_eq!(query_i64(client, "SELECT count(*) FROM projector.dead_letters").await, 0, "events were parked");
    // The read models may equal the fold before this run has even started (the runs before it
    // applied everything): a graceful stop needs its signal handlers in place.
    projector.wait_started(timeout).await;
    let status = projector.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30)).await;
    assert!(status.success(), "exit {status} on SIGTERM");
    assert_eq!(read_models(client).await.expect("read models"), expected, "nothing moved after the last check");
}

/// Publishes `events` in order, one record per produce batch (Tansu's high watermark is the last
/// batch's base offset + 1, so exact offsets need single-record batches), each awaited before the
/// next. Returns each record's `(partition, offset)`.
pub async fn produce_one_per_batch(bootstrap: &str, topic: &str, events: &[ShopEvent]) -> Vec<(i32, i64)> {
    let producer = one_per_batch_producer(bootstrap);
    let mut positions = Vec::with_capacity(events.len());
    for event in events {
        let payload = serde_json::to_vec(&event.value).expect("event as JSON");
        let delivered = producer
            .send(FutureRecord::to(topic).key(&event.key).payload(&payload), Duration::from_secs(30))
            .await
            .unwrap_or_else(|(error, _)| panic!("producing to `{topic}`: {error}"));
        positions.push((delivered.partition, delivered.offset));
    }
    positions
}

/// `count` events of new orders (each an `OrderPlaced`), in a valid order.
pub fn new_orders(count: usize) -> Vec<ShopEvent> {
    (0..count)
        .map(|i| {
            projector::demo::shop_event(
                &uuid::Uuid::new_v4().to_string(),
                1,
                "OrderPlaced",
                serde_json::json!({"customer_id": format!("customer-{}", i % 3), "total": "12.50"}),
            )
        })
        .collect()
}

/// The demo's history of `orders` orders, flattened in stream order.
pub fn history(orders: usize) -> Vec<ShopEvent> {
    demo_history(orders).into_iter().flatten().collect()
}
