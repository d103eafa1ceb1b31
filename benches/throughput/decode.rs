//! `decode`: the engine's decoding alone, on the first `--decode-records` records of the workload
//! (keys and values as they are published), through the first bench projection: no Kafka, no
//! Postgres. The time per record is the best of five passes. Under `valgrind --tool=callgrind`,
//! [`decode_all`]'s inclusive instructions over five times the records are exact per record.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use serde_json::{json, Value};

use projector::projection::{Decoded, Projection, Record};
use projector::settings::SchemaSettings;

use crate::projections::bench_projections;
use crate::report::round;
use crate::workload::{entity_id, event_value, schema_file, Workload};
use crate::Args;

/// Passes over the records; the fastest is reported.
const PASSES: usize = 5;

pub async fn decode(args: &Args, workload: &Workload) -> anyhow::Result<Value> {
    let mut projection = bench_projections(args, &workload.topic)?.remove(0).projection;
    let dir = tempfile::tempdir()?;
    if let Some((file, schema)) = schema_file(workload.format) {
        // The writer's schema, where the engine finds it by its id.
        std::fs::write(dir.path().join(file), schema)?;
        let settings = SchemaSettings { dir: Some(dir.path().to_path_buf()), ..SchemaSettings::default() };
        projection.schemas = projector::schema::from_settings(&settings)?;
    }
    let records = records(workload, args.decode_records);
    projection.ensure_schemas(&records).await?;
    let bytes: usize = records.iter().map(|record| record.value.as_ref().map_or(0, Vec::len)).sum();
    let mut seconds = Vec::with_capacity(PASSES);
    for _ in 0..PASSES {
        let started = Instant::now();
        let handled = decode_all(&projection, &records);
        seconds.push(started.elapsed().as_secs_f64());
        if handled != records.len() {
            bail!("decode: {handled} of {} records decoded as handled", records.len());
        }
    }
    let ns = |s: f64| round(s * 1e9 / records.len().max(1) as f64, 1);
    let best = seconds.iter().copied().fold(f64::MAX, f64::min);
    Ok(json!({
        "projection": projection.name,
        "records": records.len(),
        "value_bytes_mean": round(bytes as f64 / records.len().max(1) as f64, 1),
        "ns_per_record": ns(best),
        "ns_per_record_each_pass": seconds.iter().map(|&s| ns(s)).collect::<Vec<_>>(),
        "records_per_s": round(records.len() as f64 / best, 0),
        "check": format!("ok (every record decoded as handled, {PASSES} passes)"),
    }))
}

/// The first `n` records of the workload, as the producer publishes them (`produce.rs`).
fn records(workload: &Workload, n: usize) -> Vec<Record> {
    let topic: Arc<str> = workload.topic.as_str().into();
    workload
        .records
        .iter()
        .take(n)
        .enumerate()
        .map(|(offset, rec)| Record {
            topic: topic.clone(),
            partition: workload.partition_of(rec.entity),
            offset: offset as i64,
            key: Some(entity_id(rec.entity).to_string().into_bytes()),
            value: Some(event_value(workload.format, rec.entity, rec.version, workload.value_bytes)),
            headers: Vec::new(),
            timestamp_ms: Some(1_767_225_600_000),
        })
        .collect()
}

/// One pass: every record decoded; how many decoded as handled. Never inlined, so that a
/// callgrind profile shows its instructions apart.
#[inline(never)]
fn decode_all(projection: &Projection, records: &[Record]) -> usize {
    records
        .iter()
        .filter(|record| matches!(std::hint::black_box(projection.decode(record)), Decoded::Handled { .. }))
        .count()
}
