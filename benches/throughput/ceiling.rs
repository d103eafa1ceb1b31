//! The `ceiling` mode: the workload's row changes, duplicates folded out, written straight to
//! Postgres in 1,000-row set-based statements over arrays, one version wave at a time, on 2
//! connections (no Kafka, no checkpoints).

use std::time::Instant;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::db::{connect, fill_existing, verify};
use crate::proc::{cpu_snapshot, cpu_split};
use crate::report::round;
use crate::workload::{customer_of, entity_id, note_of, occurred_at, total_of, Workload};

/// The ceiling: the faster of two ways to commit the same set-based statements (see
/// [`ceiling_run`]). On a disk with slow flushes, committing every 1,000-row statement costs
/// the ceiling more than it costs the engine, which commits a batch of thousands of events at once.
pub async fn ceiling(url: &str, workload: &Workload, existing: usize) -> anyhow::Result<Value> {
    let per_statement = ceiling_run(url, workload, existing, false).await?;
    eprintln!("  each statement committed: {per_statement}");
    let per_wave = ceiling_run(url, workload, existing, true).await?;
    eprintln!("  one transaction per wave and connection: {per_wave}");
    let rate = |run: &Value| run["events_per_s"].as_f64().unwrap_or(0.0);
    let mut best = if rate(&per_wave) >= rate(&per_statement) { per_wave.clone() } else { per_statement.clone() };
    best["each_statement_committed"] = per_statement;
    best["one_transaction_per_wave"] = per_wave;
    Ok(best)
}

/// One run of the ceiling: the workload's row changes as 1,000-row set-based statements, a version
/// wave at a time, over 2 connections; each statement committed on its own, or (`per_wave`) each
/// connection's share of a wave sent pipelined in one transaction.
async fn ceiling_run(url: &str, workload: &Workload, existing: usize, per_wave: bool) -> anyhow::Result<Value> {
    let setup = connect(url).await?;
    setup
        .batch_execute(
            "DROP TABLE IF EXISTS ceiling_order_summary;
             CREATE TABLE ceiling_order_summary (LIKE order_summary INCLUDING ALL)",
        )
        .await?;
    fill_existing(&setup, "ceiling_order_summary", existing, false).await?;
    // Duplicates folded out: each entity's versions 1..=len, applied one version "wave" at a time
    // (two rows of one key in one statement would break it), 1,000 rows per statement.
    let max_version = workload.lengths.iter().copied().max().unwrap_or(0);
    enum Chunk {
        Placed(Vec<Uuid>, Vec<String>, Vec<Decimal>, Vec<DateTime<Utc>>, Vec<i64>),
        Paid(Vec<Uuid>, Vec<Decimal>, Vec<DateTime<Utc>>, Vec<i64>),
        Noted(Vec<Uuid>, Vec<String>, Vec<DateTime<Utc>>, Vec<i64>),
    }
    let mut waves: Vec<Vec<Chunk>> = Vec::new();
    for version in 1..=max_version {
        let entities: Vec<u32> =
            (0..workload.entities as u32).filter(|e| workload.lengths[*e as usize] >= version).collect();
        let chunks = entities
            .chunks(1000)
            .map(|chunk| {
                let ids = chunk.iter().map(|e| entity_id(*e)).collect();
                let at = vec![occurred_at(version); chunk.len()];
                let versions = vec![i64::from(version); chunk.len()];
                match version {
                    1 => Chunk::Placed(
                        ids,
                        chunk.iter().map(|e| customer_of(*e)).collect(),
                        chunk.iter().map(|e| total_of(*e)).collect(),
                        at,
                        versions,
                    ),
                    2 => Chunk::Paid(ids, chunk.iter().map(|e| total_of(*e)).collect(), at, versions),
                    _ => Chunk::Noted(ids, vec![note_of(version); chunk.len()], at, versions),
                }
            })
            .collect();
        waves.push(chunks);
    }
    const PLACED: &str = "INSERT INTO ceiling_order_summary (order_id, customer_id, total, status, placed_at, updated_at, version)
        SELECT u.id, u.customer, u.total, 'placed', u.at, u.at, u.version
        FROM unnest($1::uuid[], $2::text[], $3::numeric[], $4::timestamptz[], $5::int8[]) AS u(id, customer, total, at, version)
        ON CONFLICT (order_id) DO NOTHING";
    const PAID: &str = "UPDATE ceiling_order_summary t SET status = 'paid', paid_amount = u.amount, updated_at = u.at, version = u.version
        FROM unnest($1::uuid[], $2::numeric[], $3::timestamptz[], $4::int8[]) AS u(id, amount, at, version)
        WHERE t.order_id = u.id AND t.version = u.version - 1";
    const NOTED: &str = "UPDATE ceiling_order_summary t SET note = u.note, updated_at = u.at, version = u.version
        FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::int8[]) AS u(id, note, at, version)
        WHERE t.order_id = u.id AND t.version = u.version - 1";
    let mut connections = Vec::new();
    for _ in 0..2 {
        let client = connect(url).await?;
        let statements = (client.prepare(PLACED).await?, client.prepare(PAID).await?, client.prepare(NOTED).await?);
        connections.push((client, statements));
    }
    let before = cpu_snapshot(None, None);
    let started = Instant::now();
    let mut changed = 0u64;
    for wave in &waves {
        let runs = connections.iter().enumerate().map(|(c, (client, (placed, paid, noted)))| {
            let mine: Vec<&Chunk> = wave.iter().skip(c).step_by(2).collect();
            async move {
                let statements = mine.into_iter().map(|chunk| async move {
                    match chunk {
                        Chunk::Placed(a, b, c, d, e) => client.execute(placed, &[a, b, c, d, e]).await,
                        Chunk::Paid(a, b, c, d) => client.execute(paid, &[a, b, c, d]).await,
                        Chunk::Noted(a, b, c, d) => client.execute(noted, &[a, b, c, d]).await,
                    }
                });
                if !per_wave {
                    let mut changed = 0u64;
                    for statement in statements {
                        changed += statement.await?;
                    }
                    return Ok::<u64, tokio_postgres::Error>(changed);
                }
                client.batch_execute("BEGIN").await?;
                let changed: Vec<u64> = futures::future::try_join_all(statements).await?;
                client.batch_execute("COMMIT").await?;
                Ok(changed.into_iter().sum())
            }
        });
        for result in futures::future::join_all(runs).await {
            changed += result?;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let after = cpu_snapshot(None, None);
    let check = verify(&setup, "ceiling_order_summary", workload.entities, workload.version_sum(), existing).await?;
    Ok(json!({
        "cpu": cpu_split(&before, &after),
        "rows_changed": changed,
        "seconds": round(secs, 2),
        "rows_per_s": round(changed as f64 / secs, 0),
        // The events the same changes stand for (duplicates are no-ops the ceiling never sees).
        "events_per_s": round(workload.records.len() as f64 / secs, 0),
        "check": check,
    }))
}
