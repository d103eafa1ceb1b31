//! The throughput benchmark (issue 6): one run, one machine, one database server, one workload.
//!
//! Modes (`--modes`, in this order):
//! - `decode`: the engine's decoding alone, on the workload's first `--decode-records` records,
//!   through the first bench projection: no Kafka, no Postgres; the time per record.
//! - `ceiling`: the workload's row changes (duplicates folded out) written straight to Postgres in
//!   1,000-row set-based statements over arrays (`INSERT … SELECT FROM unnest`, `UPDATE … FROM
//!   unnest`, version-guarded), one version "wave" at a time, on 2 connections. No Kafka, no checkpoints.
//! - `naive`: one consumer reading the topic; per event one transaction: look the event id up in a
//!   processed-events table, apply the guarded write, record the id, commit. Run on a sample.
//! - `mock`: the topic is loaded into librdkafka's mock cluster first (load time reported, not
//!   counted), then the engine (`projector::app::run`, in this process) clears the backlog;
//!   then `rebuild`; then the latency phases (in place, `projector::rebuild::run`).
//! - `tansu`: the same against a Tansu broker, with the engine as a child process (`projector run`),
//!   so that its peak RSS is the engine's alone.
//!
//! The engine modes run the bench projection (`projections.rs`): `order_summary`, versioned, or
//! with `--dedupe event-id` `order_events`, deduplicated by event id (`--keep-event-ids`: a
//! window); `--projections N` runs N of them on the one topic, each with its own table.
//!
//! `cargo bench --bench throughput -- --help` lists the flags. See BENCHMARKS.md.
//!
//! This file holds the flags and the order of the modes; each mode, and each thing they share,
//! has a file of its own beside it.

/// The allocator the `projector` binary uses, for the engine this process runs (`mock`, `rebuild`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod broker;
mod ceiling;
mod cleared;
mod db;
mod decode;
mod engine;
mod latency;
mod naive;
mod proc;
mod produce;
mod projections;
mod rebuild;
mod report;
mod running;
// The tests' Tansu launcher, this very file.
#[path = "../../tests/common/tansu.rs"]
#[allow(dead_code)]
mod tansu;
mod workload;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use clap::Parser;
use serde_json::json;

use projector::settings::Settings;

use crate::broker::Kind;
use crate::db::{prepare_schema, Databases};
use crate::engine::{broker_mode, Steps};
use crate::produce::mock_fits;
use crate::projections::Dedupe;
use crate::workload::Workload;

#[derive(Parser, Debug, Clone)]
#[command(name = "throughput", about = "projector's throughput benchmark (see BENCHMARKS.md)")]
pub struct Args {
    /// Records published (duplicates included).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Entities (orders); default events / 10.
    #[arg(long)]
    entities: Option<usize>,
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Each record's value padded to about this many bytes (a `padding` string in its `data`,
    /// which the projection does not read); 0: no padding (about 280 bytes).
    #[arg(long, default_value_t = 0)]
    value_bytes: usize,
    /// How the values are written: `json`, or `avro` or `protobuf` (Confluent-framed, the engine
    /// reading the writer's schema from a schema directory). The naive consumer and the latency phases read
    /// and write JSON only.
    #[arg(long, value_enum, default_value_t = workload::Format::Json)]
    format: workload::Format,
    /// Each row the engine writes to its tables (`order_summary`, …) waits this long (a trigger
    /// calling `pg_sleep`): a slow database, so that the engine falls behind the broker and reads
    /// ahead as far as its bounds let it. 0: none.
    #[arg(long, default_value_t = 0.0)]
    row_delay_ms: f64,
    /// Rows already in each read model before the run (ceiling's table and the engine modes'),
    /// of other orders (each at version 1, `md5`-derived ids): how the rate holds as the table
    /// grows. The checks count them in, and expect the engine to leave them alone.
    #[arg(long, default_value_t = 0)]
    existing_rows: usize,
    /// Share of the records that are duplicates, re-published later, in percent.
    #[arg(long, default_value_t = 5)]
    duplicate_percent: usize,
    /// Projections the engine modes run at once on the one topic: 1 is `order_summary` (or
    /// `order_events`); N > 1 are `order_summary_1` … `order_summary_N`, each writing a table of
    /// its own of that name. Their rates add up; the rebuild and the latency phase use the first.
    #[arg(long, default_value_t = 1)]
    projections: usize,
    /// How the engine modes' projections recognise duplicates: `version` (`order_summary`, every
    /// write guarded by the order's version) or `event-id` (`order_events`, an upsert counting each
    /// order's events, every event id recorded in `projector.processed_events`).
    #[arg(long, value_enum, default_value_t = Dedupe::Version)]
    dedupe: Dedupe,
    /// With `--dedupe event-id`: the projection's `keep_event_ids` (`30s`, `1m`): processed ids
    /// older than that are pruned, and a duplicate of one is applied again. Default: kept for ever.
    #[arg(long)]
    keep_event_ids: Option<String>,
    /// Any of decode,ceiling,naive,mock,rebuild,tansu (rebuild needs mock or tansu).
    #[arg(long, value_delimiter = ',', default_value = "decode,ceiling,naive,mock,rebuild,tansu")]
    modes: Vec<String>,
    /// The `decode` mode decodes the workload's first this many records (all when fewer).
    #[arg(long, default_value_t = 100_000)]
    decode_records: usize,
    /// The server the `projector_bench_<random>_*` databases are created on (and dropped).
    #[arg(long, env = "PROJECTOR_BENCH_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_url: String,
    /// Naive mode stops after this many events …
    #[arg(long, default_value_t = 20_000)]
    naive_events: usize,
    /// … or this many seconds, whichever comes first.
    #[arg(long, default_value_t = 20.0)]
    naive_secs: f64,
    /// Length of each latency phase, per engine mode; 0 skips them.
    #[arg(long, default_value_t = 20.0)]
    latency_secs: f64,
    /// The rates of the latency phases, in events per second, open-loop; `half` is half the
    /// engine's steady backlog rate measured just before.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000,half")]
    latency_rates: Vec<latency::Rate>,
    /// The latency phases' producer's `linger.ms`.
    #[arg(long, default_value_t = 1)]
    latency_linger_ms: u32,
    /// The engine's `batch.max_events`.
    #[arg(long, default_value_t = Settings::default().batch.max_events)]
    batch_max_events: usize,
    /// The engine's `batch.max_bytes` (the bytes of a batch's records; the consumer reads ahead
    /// from it too).
    #[arg(long, default_value_t = Settings::default().batch.max_bytes)]
    batch_max_bytes: usize,
    /// The engine's `batch.lanes` (parts of a batch applied concurrently).
    #[arg(long, default_value_t = Settings::default().batch.lanes)]
    lanes: usize,
    /// The engine's `database.pool_size`. Default: the engine's default (8); with several
    /// projections each gets `--lanes` or its share of the pool, whichever is fewer.
    #[arg(long)]
    pool_size: Option<usize>,
    /// The engine's `batch.set_based` (false: one statement per event, pipelined).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    set_based: bool,
    /// An extra librdkafka property for the engine's consumer, `name=value` (repeatable).
    #[arg(long = "kafka-property", value_parser = parse_property)]
    kafka_properties: Vec<(String, String)>,
    /// librdkafka properties for the engine's consumer against Tansu only, `name=value`
    /// (repeatable; given once, it replaces all the defaults; `--kafka-property` wins). Tansu 0.6
    /// holds every fetch for about half of `fetch.wait.max.ms` even when it has records to
    /// return, and fills a fetch up to `fetch.max.bytes` (capped at 5 MB) from its first
    /// partitions, ignoring `max.partition.fetch.bytes`: a fetch of 256 KB holds one partition's
    /// records, and the engine's lanes take turns (librdkafka requires `message.max.bytes` no
    /// larger than `fetch.max.bytes`). See BENCHMARKS.md.
    #[arg(long = "tansu-property", value_parser = parse_property,
          default_values = ["fetch.wait.max.ms=3", "fetch.max.bytes=262144", "message.max.bytes=262144"])]
    tansu_properties: Vec<(String, String)>,
    /// librdkafka properties for the engine's consumer against the mock cluster only, as
    /// `--tansu-property`. The mock holds a fetch that finds no record for all of
    /// `fetch.wait.max.ms` (500 by default) and does not answer it when records arrive: at low
    /// rates every record would wait for that.
    #[arg(long = "mock-property", value_parser = parse_property, default_values = ["fetch.wait.max.ms=1"])]
    mock_properties: Vec<(String, String)>,
    /// Give up waiting for the engine to clear the backlog after this long.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Where to write the results as JSON (default: the temp dir, printed at the end).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the databases (default: dropped at the end).
    #[arg(long)]
    keep_databases: bool,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    let (name, value) = text.split_once('=').ok_or_else(|| format!("`{text}` is not `name=value`"))?;
    Ok((name.to_string(), value.to_string()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rdkafka=off,librdkafka=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    for mode in &args.modes {
        if !["decode", "ceiling", "naive", "mock", "rebuild", "tansu"].contains(&mode.as_str()) {
            bail!("unknown mode `{mode}`");
        }
    }
    if args.projections == 0 {
        bail!("--projections must be at least 1");
    }
    if args.keep_event_ids.is_some() && args.dedupe != Dedupe::EventId {
        bail!("--keep-event-ids is for --dedupe event-id");
    }
    let has = |m: &str| args.modes.iter().any(|x| x == m);
    if has("rebuild") && !has("mock") && !has("tansu") {
        bail!("`rebuild` rebuilds what `mock` or `tansu` built: add one of them to --modes");
    }
    let generated = Instant::now();
    let workload = Workload::generate(&args)?;
    let per_partition = workload.per_partition();
    eprintln!(
        "workload: {} records ({} distinct, {} duplicates) over {} entities on {} partitions ({:?}); generated in {:.1} s",
        workload.records.len(),
        workload.distinct(),
        workload.duplicates,
        workload.entities,
        workload.partitions,
        per_partition,
        generated.elapsed().as_secs_f64()
    );
    let mut dbs = Databases::new(&args.database_url);
    let mut results = json!({
        "machine": proc::machine(),
        "args": {
            "events": args.events, "entities": workload.entities, "partitions": args.partitions,
            "duplicate_percent": args.duplicate_percent, "value_bytes": args.value_bytes, "format": format!("{:?}", args.format).to_lowercase(), "row_delay_ms": args.row_delay_ms,
            "existing_rows": args.existing_rows,
            "batch_max_events": args.batch_max_events, "batch_max_bytes": args.batch_max_bytes, "set_based": args.set_based,
            "modes": args.modes, "decode_records": args.decode_records, "latency_secs": args.latency_secs,
            "projections": args.projections, "dedupe": args.dedupe.label(), "keep_event_ids": args.keep_event_ids,
            "pool_size": args.pool_size, "lanes": args.lanes,
            "latency_rates": args.latency_rates.iter().map(|rate| format!("{rate:?}")).collect::<Vec<_>>(),
            "latency_linger_ms": args.latency_linger_ms,
        },
        "workload": {
            "records": workload.records.len(), "distinct": workload.distinct(), "duplicates": workload.duplicates,
            "creates": workload.entities, "per_partition": per_partition,
        },
    });
    let outcome = async {
        if has("decode") {
            let records = args.decode_records.min(workload.records.len());
            eprintln!("== decode (the first {records} records, no Kafka, no Postgres)");
            results["decode"] = decode::decode(&args, &workload).await?;
            eprintln!("  {}", results["decode"]);
        }
        if has("ceiling") {
            eprintln!("== ceiling (set-based unnest statements, 2 connections, no Kafka, no checkpoints)");
            let url = dbs.create("ceiling").await?;
            prepare_schema(&url).await?;
            results["ceiling"] = ceiling::ceiling(&url, &workload, args.existing_rows).await?;
            eprintln!("  {}", results["ceiling"]);
        }
        // Each broker mode gets the workload as generated (its latency phase extends its copy).
        // The naive consumer reads the first broker that runs (the mock when the backlog fits).
        let mut naive_pending = has("naive");
        for kind in [Kind::Mock, Kind::Tansu] {
            let label = kind.label();
            let fits = if kind == Kind::Mock { mock_fits(&workload) } else { Ok(()) };
            if !(has(label) || (naive_pending && fits.is_ok())) {
                continue;
            }
            if let Err(reason) = fits {
                eprintln!("== {label} {reason}");
                results[label] = json!({ "skipped": reason });
                continue;
            }
            let steps = Steps { naive: naive_pending, engine: has(label), rebuild: has("rebuild") };
            let mut mode = broker_mode(kind, &args, &mut dbs, &mut workload.clone(), steps).await?;
            if let Some(naive) = mode.as_object_mut().and_then(|m| m.remove("naive")) {
                results["naive"] = naive;
                naive_pending = false;
            }
            if has(label) {
                results[label] = mode;
            }
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if !args.keep_databases {
        dbs.drop_all().await;
    } else {
        eprintln!("databases kept: {:?}", dbs.created);
    }
    let path =
        args.json.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("projector-bench-{}.json", args.events)));
    report::write(&mut results, &path)?;
    outcome?;
    report::check(&results)
}
