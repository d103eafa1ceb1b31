//! The `naive` mode: one consumer reading the topic; per event one transaction (look the event id
//! up, the guarded write, record the id, commit). Run on a sample.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::db::connect;
use crate::report::round;
use crate::workload::Workload;

pub async fn naive(
    url: &str,
    bootstrap: &str,
    workload: &Workload,
    max_events: usize,
    max_secs: f64,
) -> anyhow::Result<Value> {
    let mut client = connect(url).await?;
    client
        .batch_execute(
            "CREATE TABLE naive_order_summary (LIKE order_summary INCLUDING ALL);
             CREATE TABLE naive_processed_events (event_id text PRIMARY KEY, processed_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let seen = client.prepare("SELECT 1 FROM naive_processed_events WHERE event_id = $1").await?;
    let mark = client.prepare("INSERT INTO naive_processed_events (event_id) VALUES ($1)").await?;
    let placed = client
        .prepare(
            "INSERT INTO naive_order_summary (order_id, customer_id, total, status, placed_at, updated_at, version)
             VALUES ($1, $2, $3, 'placed', $4, $4, $5) ON CONFLICT (order_id) DO NOTHING",
        )
        .await?;
    let paid = client
        .prepare(
            "UPDATE naive_order_summary SET status = 'paid', paid_amount = $2, updated_at = $3, version = $4::int8
             WHERE order_id = $1 AND version = $4::int8 - 1",
        )
        .await?;
    let noted = client
        .prepare("UPDATE naive_order_summary SET note = $2, updated_at = $3, version = $4::int8 WHERE order_id = $1 AND version = $4::int8 - 1")
        .await?;

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(10_000);
    let (bootstrap, topic, partitions) = (bootstrap.to_string(), workload.topic.clone(), workload.partitions);
    let reader = std::thread::spawn(move || -> anyhow::Result<()> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "bench-naive")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition_offset(&topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&list)?;
        while !tx.is_closed() {
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let payload = message?.payload().unwrap_or_default().to_vec();
                if tx.blocking_send(payload).is_err() {
                    break;
                }
            }
        }
        Ok(())
    });
    let mut started = None;
    let (mut applied, mut duplicates, mut done) = (0u64, 0u64, 0usize);
    while done < max_events {
        let Some(payload) = rx.recv().await else { break };
        let started_at = *started.get_or_insert_with(Instant::now);
        let event: Value = serde_json::from_slice(&payload)?;
        let id = event["id"].as_str().context("id")?;
        let key: Uuid = event["stream_id"].as_str().context("stream_id")?.parse()?;
        let version = event["stream_version"].as_i64().context("version")?;
        let at: DateTime<Utc> =
            DateTime::parse_from_rfc3339(event["occurred_at"].as_str().context("occurred_at")?)?.into();
        let data = &event["data"];
        let transaction = client.transaction().await?;
        if transaction.query_opt(&seen, &[&id]).await?.is_some() {
            transaction.commit().await?;
            duplicates += 1;
        } else {
            let decimal =
                |field: &str| -> anyhow::Result<Decimal> { Ok(data[field].as_str().context("decimal")?.parse()?) };
            let changed = match event["type"].as_str() {
                Some("OrderPlaced") => {
                    let customer = data["customer_id"].as_str().context("customer")?;
                    transaction.execute(&placed, &[&key, &customer, &decimal("total")?, &at, &version]).await?
                }
                Some("OrderPaid") => transaction.execute(&paid, &[&key, &decimal("amount")?, &at, &version]).await?,
                _ => transaction.execute(&noted, &[&key, &data["note"].as_str(), &at, &version]).await?,
            };
            transaction.execute(&mark, &[&id]).await?;
            transaction.commit().await?;
            if changed > 0 {
                applied += 1;
            }
        }
        done += 1;
        if started_at.elapsed().as_secs_f64() >= max_secs {
            break;
        }
    }
    let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    drop(rx);
    reader.join().map_err(|_| anyhow!("naive reader panicked"))??;
    Ok(json!({
        "events": done,
        "applied": applied,
        "duplicates": duplicates,
        "seconds": round(secs, 2),
        "events_per_s": round(done as f64 / secs, 0),
        "sample": format!("first {done} events in consumption order (stops at --naive-events or --naive-secs)"),
    }))
}
