//! `projector demo`: the embedded default. Starts librdkafka's in-process mock cluster, publishes
//! the example shop's events (with a duplicate, an out-of-order pair and a redelivered stretch),
//! runs the example projections into a fresh `projector_demo` database until they have caught up,
//! then prints the read models and what happened to every event.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::projection::{compile_file, Projection};
use crate::settings::Settings;
use crate::store;

pub const TOPIC: &str = "shop.orders";
const DEMO_DATABASE: &str = "projector_demo";

/// The example projections, compiled from the copies embedded in the binary.
pub fn example_projections() -> anyhow::Result<Vec<Projection>> {
    let files = [
        (
            "projections/order_summary.toml",
            include_str!("../projections/order_summary.toml"),
            "V1__create_order_summary",
            include_str!("../projections/order_summary/migrations/V1__create_order_summary.sql"),
        ),
        (
            "projections/customer_totals.toml",
            include_str!("../projections/customer_totals.toml"),
            "V1__create_customer_totals",
            include_str!("../projections/customer_totals/migrations/V1__create_customer_totals.sql"),
        ),
    ];
    files
        .iter()
        .map(|(path, text, migration, sql)| {
            let mut projection = compile_file(std::path::Path::new(path), text).map_err(|errors| {
                anyhow::anyhow!(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))
            })?;
            projection.migrations =
                vec![crate::projection::migrations::parse(migration, sql).map_err(anyhow::Error::msg)?];
            Ok(projection)
        })
        .collect()
}

/// One event of the shop domain, as published: record key (the order id) and JSON value.
#[derive(Debug, Clone)]
pub struct ShopEvent {
    pub key: String,
    pub value: serde_json::Value,
}

/// Builds a shop event in the default envelope.
pub fn shop_event(order: &str, version: i64, event_type: &str, data: serde_json::Value) -> ShopEvent {
    ShopEvent {
        key: order.to_string(),
        value: json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "type": event_type,
            "stream_id": order,
            "stream_version": version,
            "occurred_at": chrono::Utc::now().to_rfc3339(),
            "data": data,
        }),
    }
}

/// The demo's history: `orders` orders over four customers, placed, then paid and shipped, or
/// cancelled; in stream order.
pub fn demo_history(orders: usize) -> Vec<Vec<ShopEvent>> {
    (0..orders)
        .map(|i| {
            let order = uuid::Uuid::from_u128(0x5eed_0000 + i as u128).to_string();
            let customer = format!("customer-{}", i % 4 + 1);
            let total = format!("{}.{:02}", 10 + i * 7, (i * 13) % 100);
            let mut stream =
                vec![shop_event(&order, 1, "OrderPlaced", json!({"customer_id": customer, "total": total}))];
            if i % 4 == 3 {
                stream.push(shop_event(
                    &order,
                    2,
                    "OrderCancelled",
                    json!({"customer_id": customer, "reason": "changed mind"}),
                ));
            } else {
                stream.push(shop_event(&order, 2, "OrderPaid", json!({"customer_id": customer, "amount": total})));
                if i % 3 != 0 {
                    stream.push(shop_event(
                        &order,
                        3,
                        "OrderShipped",
                        json!({"customer_id": customer, "carrier": "parcelco"}),
                    ));
                }
            }
            stream
        })
        .collect()
}

/// Publishes `events` in order, keyed by order id.
pub async fn publish(bootstrap: &str, topic: &str, events: &[ShopEvent]) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "false")
        .set("max.in.flight.requests.per.connection", "1")
        .create()
        .context("creating a producer")?;
    for event in events {
        let payload = serde_json::to_vec(&event.value)?;
        producer
            .send(FutureRecord::to(topic).key(&event.key).payload(&payload), Duration::from_secs(10))
            .await
            .map_err(|(error, _)| anyhow::anyhow!("publishing: {error}"))?;
    }
    Ok(())
}

/// The URL of database `name` on the same server as `url`.
pub fn database_url(url: &str, name: &str) -> anyhow::Result<String> {
    let mut parsed = url::Url::parse(url).context("parsing the database url")?;
    parsed.set_path(&format!("/{name}"));
    Ok(parsed.to_string())
}

/// Drops and creates database `name` on `url`'s server; returns its URL.
pub async fn recreate_database(url: &str, name: &str) -> anyhow::Result<String> {
    store::scratch::recreate_database(url, name).await?;
    database_url(url, name)
}

/// Waits until every projection's checkpoints reach the end of every partition of its topics.
pub async fn wait_caught_up(settings: &Settings, projections: &[Projection], timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let pool = store::connect(&settings.database.url, 1).await?;
    loop {
        // Each partition still behind its end: projection, topic, partition, checkpoint, end.
        let mut behind = Vec::new();
        for projection in projections {
            let kafka = settings.kafka.clone();
            let topics = projection.topics.clone();
            let ends =
                tokio::task::spawn_blocking(move || crate::kafka::watermarks(&kafka, &topics, Duration::from_secs(5)))
                    .await??;
            let client = pool.get().await?;
            let stored: HashMap<_, _> =
                store::checkpoint::load_all(&**client, &projection.name).await.unwrap_or_default();
            for (partition, (_, high)) in ends {
                let at = stored.get(&partition).copied().unwrap_or(0);
                if at < high {
                    behind.push(format!(
                        "`{}` `{}` partition {} at {at} of {high}",
                        projection.name, partition.0, partition.1
                    ));
                }
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            behind.sort();
            anyhow::bail!("projections did not catch up within {timeout:?}: {}", behind.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let cluster = crate::kafka::mock::MockKafka::start(1).context("starting the mock Kafka cluster")?;
    cluster.create_topic(TOPIC, 4, 1).context("creating the demo topic")?;
    let mut settings = settings.clone();
    settings.kafka.bootstrap_servers = cluster.bootstrap_servers();
    settings.kafka.properties.clear();
    settings.database.url = recreate_database(&settings.database.url, DEMO_DATABASE).await?;
    println!("mock Kafka cluster at {}, read models in database `{DEMO_DATABASE}`", settings.kafka.bootstrap_servers);

    // Stream order, then the faults of at-least-once delivery.
    let history = demo_history(12);
    let mut published: Vec<ShopEvent> = Vec::new();
    for (i, stream) in history.iter().enumerate() {
        match i {
            // Out of order: shipped is published before paid.
            5 => published.extend([stream[0].clone(), stream[2].clone(), stream[1].clone()]),
            // A producer retry: paid is published twice.
            2 => published.extend([stream[0].clone(), stream[1].clone(), stream[1].clone(), stream[2].clone()]),
            _ => published.extend(stream.iter().cloned()),
        }
    }
    let redelivered: Vec<ShopEvent> = published[6..16].to_vec();
    published.extend(redelivered);
    publish(&settings.kafka.bootstrap_servers, TOPIC, &published).await?;
    let distinct: usize = history.iter().map(Vec::len).sum();
    println!("published {} records: {distinct} distinct events, 1 duplicate, 1 out-of-order pair, a redelivered stretch of 10", published.len());

    let projections = example_projections()?;
    let metrics = Metrics::new();
    let (done, caught_up) = oneshot::channel::<()>();
    let engine = {
        let (settings, projections, metrics) = (settings.clone(), projections.clone(), metrics.clone());
        tokio::spawn(async move {
            crate::app::run(&settings, projections, metrics, async {
                let _ = caught_up.await;
            })
            .await
        })
    };
    let waited = wait_caught_up(&settings, &projections, Duration::from_secs(60)).await;
    let _ = done.send(());
    engine.await??;
    waited?;

    print_read_models(&settings.database.url).await?;
    print_outcomes(&metrics, &projections);
    // The process ends right after: keep the broker up until then, so that clients still closing
    // in the background do not log connection errors at exit.
    std::mem::forget(cluster);
    Ok(())
}

async fn print_read_models(url: &str) -> anyhow::Result<()> {
    let pool = store::connect(url, 1).await?;
    let client = pool.get().await?;
    println!("\norder_summary");
    println!(
        "  {:<36}  {:<11}  {:>7}  {:<9}  {:>7}  {:<8}  version",
        "order_id", "customer_id", "total", "status", "paid", "carrier"
    );
    for row in store::demo::order_summaries(&client).await? {
        println!(
            "  {:<36}  {:<11}  {:>7}  {:<9}  {:>7}  {:<8}  {}",
            row.order_id, row.customer_id, row.total, row.status, row.paid, row.carrier, row.version
        );
    }
    println!("\ncustomer_totals");
    println!(
        "  {:<11}  {:>6}  {:>9}  {:>12}  {:>10}",
        "customer_id", "placed", "cancelled", "total_placed", "total_paid"
    );
    for row in store::demo::customer_totals(&client).await? {
        println!(
            "  {:<11}  {:>6}  {:>9}  {:>12}  {:>10}",
            row.customer_id, row.placed, row.cancelled, row.total_placed, row.total_paid
        );
    }
    Ok(())
}

fn print_outcomes(metrics: &Metrics, projections: &[Projection]) {
    println!("\noutcomes (projector_events_total)");
    for projection in projections {
        println!("  {:<16} {}", projection.name, metrics.outcome_summary(&projection.name));
    }
}
