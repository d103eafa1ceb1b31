//! The throughput benchmark (issue 6): one run, one machine, one database server, one workload.
//!
//! Modes (`--modes`, in this order):
//! - `ceiling`: the workload's row changes (duplicates folded out) written straight to Postgres in
//!   1,000-row set-based statements over arrays (`INSERT … SELECT FROM unnest`, `UPDATE … FROM
//!   unnest`, version-guarded), one version "wave" at a time, on 2 connections. No Kafka, no checkpoints.
//! - `naive`: one consumer reading the topic; per event one transaction: look the event id up in a
//!   processed-events table, apply the guarded write, record the id, commit. Run on a sample.
//! - `mock`: the topic is loaded into librdkafka's mock cluster first (load time reported, not
//!   counted), then the engine (`projector::app::run`, in this process) clears the backlog;
//!   then the latency phase; then `rebuild` (in place, `projector::rebuild::run`).
//! - `tansu`: the same against a Tansu broker, with the engine as a child process (`projector run`),
//!   so that its peak RSS is the engine's alone.
//!
//! `cargo bench --bench throughput -- --help` lists the flags. See BENCHMARKS.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, TimeZone, Utc};
use clap::Parser;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, ClientContext};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

use projector::metrics::Metrics;
use projector::outcome::Outcome;
use projector::projection::{compile_file, Projection};
use projector::settings::{property_variable, Settings};

const PROJECTION: &str = "order_summary";
/// The bench's only addition to the example projection: an update that can repeat.
const NOTED_HANDLER: &str = "\n[on.OrderNoted]\nupdate = { note = \":data.note\", updated_at = \":occurred_at\" }\n";

#[derive(Parser, Debug, Clone)]
#[command(name = "throughput", about = "projector's throughput benchmark (see BENCHMARKS.md)")]
struct Args {
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
    /// Each row the engine writes to `order_summary` waits this long (a trigger calling
    /// `pg_sleep`): a slow database, so that the engine falls behind the broker and reads ahead as
    /// far as its bounds let it. 0: none.
    #[arg(long, default_value_t = 0.0)]
    row_delay_ms: f64,
    /// Share of the records that are duplicates, re-published later, in percent.
    #[arg(long, default_value_t = 5)]
    duplicate_percent: usize,
    /// Any of ceiling,naive,mock,rebuild,tansu (rebuild needs mock).
    #[arg(long, value_delimiter = ',', default_value = "ceiling,naive,mock,rebuild,tansu")]
    modes: Vec<String>,
    /// The server the `projector_bench_<random>_*` databases are created on (and dropped).
    #[arg(long, env = "PROJECTOR_BENCH_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_url: String,
    /// Naive mode stops after this many events …
    #[arg(long, default_value_t = 20_000)]
    naive_events: usize,
    /// … or this many seconds, whichever comes first.
    #[arg(long, default_value_t = 20.0)]
    naive_secs: f64,
    /// Length of the latency phase (produce at half the measured rate), per engine mode; 0 skips it.
    #[arg(long, default_value_t = 20.0)]
    latency_secs: f64,
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
    /// The engine's `database.pool_size`.
    #[arg(long, default_value_t = Settings::default().database.pool_size)]
    pool_size: usize,
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
    /// partitions, ignoring `max.partition.fetch.bytes`: see BENCHMARKS.md.
    #[arg(long = "tansu-property", value_parser = parse_property,
          default_values = ["fetch.wait.max.ms=10", "fetch.max.bytes=1048576"])]
    tansu_properties: Vec<(String, String)>,
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

// ---------------------------------------------------------------------------------------------
// The workload

#[derive(Clone, Copy)]
struct Rec {
    entity: u32,
    version: u32,
}

#[derive(Clone)]
struct Workload {
    topic: String,
    partitions: i32,
    entities: usize,
    /// Records in publish order (duplicates included).
    records: Vec<Rec>,
    duplicates: usize,
    /// Each entity's stream length (its last version).
    lengths: Vec<u32>,
    /// Each record's value padded to about this many bytes (0: none).
    value_bytes: usize,
}

impl Workload {
    fn generate(args: &Args) -> anyhow::Result<Workload> {
        let events = args.events;
        let entities = args.entities.unwrap_or((events / 10).max(1));
        let duplicates = events * args.duplicate_percent / 100;
        let distinct = events - duplicates;
        if distinct < entities {
            bail!("{events} events with {duplicates} duplicates cannot cover {entities} entities");
        }
        let mut rng = StdRng::seed_from_u64(args.seed);
        let lengths: Vec<u32> =
            (0..entities).map(|e| (distinct / entities + usize::from(e < distinct % entities)) as u32).collect();
        // A random interleaving of the streams that keeps each stream in order.
        let mut order: Vec<u32> = Vec::with_capacity(distinct);
        for (e, len) in lengths.iter().enumerate() {
            order.extend(std::iter::repeat_n(e as u32, *len as usize));
        }
        order.shuffle(&mut rng);
        let mut next = vec![1u32; entities];
        let distinct_records: Vec<Rec> = order
            .into_iter()
            .map(|e| {
                let version = next[e as usize];
                next[e as usize] += 1;
                Rec { entity: e, version }
            })
            .collect();
        // Duplicates: copies of random events, re-published up to a tenth of the stream later.
        let spread = (distinct / 10).max(1) as u64;
        let mut keyed: Vec<(u64, Rec)> =
            distinct_records.iter().enumerate().map(|(i, rec)| (2 * i as u64, *rec)).collect();
        for i in rand::seq::index::sample(&mut rng, distinct, duplicates) {
            let later = i as u64 + rng.random_range(1..=spread);
            keyed.push((2 * later + 1, distinct_records[i]));
        }
        keyed.sort_unstable_by_key(|(position, _)| *position);
        Ok(Workload {
            topic: "bench.orders".into(),
            partitions: args.partitions,
            entities,
            records: keyed.into_iter().map(|(_, rec)| rec).collect(),
            duplicates,
            lengths,
            value_bytes: args.value_bytes,
        })
    }

    fn partition_of(&self, entity: u32) -> i32 {
        (entity % self.partitions as u32) as i32
    }

    fn per_partition(&self) -> Vec<i64> {
        let mut counts = vec![0i64; self.partitions as usize];
        for rec in &self.records {
            counts[self.partition_of(rec.entity) as usize] += 1;
        }
        counts
    }

    fn distinct(&self) -> usize {
        self.records.len() - self.duplicates
    }

    fn version_sum(&self) -> i64 {
        self.lengths.iter().map(|len| i64::from(*len)).sum()
    }
}

fn entity_id(entity: u32) -> Uuid {
    Uuid::from_u64_pair(0x5eed_0000_0000_0000, u64::from(entity))
}

fn customer_of(entity: u32) -> String {
    format!("customer-{}", entity % 997)
}

fn total_of(entity: u32) -> Decimal {
    Decimal::new(1000 + i64::from(entity % 90_000), 2)
}

fn note_of(version: u32) -> String {
    format!("note {version}")
}

fn occurred_at(version: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(i64::from(version))
}

fn event_type(version: u32) -> &'static str {
    match version {
        1 => "OrderPlaced",
        2 => "OrderPaid",
        _ => "OrderNoted",
    }
}

/// The record value of `entity`'s event `version`; the id is a function of both, so a duplicate
/// carries its original's id. With `value_bytes`, its `data` holds a `padding` string that makes
/// the value that long.
fn event_json(entity: u32, version: u32, at: Option<DateTime<Utc>>, value_bytes: usize) -> Vec<u8> {
    let mut data = match version {
        1 => json!({"customer_id": customer_of(entity), "total": total_of(entity).to_string()}),
        2 => json!({"customer_id": customer_of(entity), "amount": total_of(entity).to_string()}),
        _ => json!({"note": note_of(version)}),
    };
    let event = |data: &Value| {
        serde_json::to_vec(&json!({
            "id": Uuid::from_u64_pair(u64::from(entity), u64::from(version)).to_string(),
            "type": event_type(version),
            "stream_id": entity_id(entity).to_string(),
            "stream_version": version,
            "occurred_at": at.unwrap_or_else(|| occurred_at(version)).to_rfc3339(),
            "data": data,
        }))
        .expect("event as JSON")
    };
    let value = event(&data);
    // `,"padding":""` is 13 bytes.
    match value_bytes.checked_sub(value.len() + 13) {
        Some(padding) if value_bytes > 0 => {
            data["padding"] = Value::String("x".repeat(padding));
            event(&data)
        }
        _ => value,
    }
}

/// The example `order_summary` projection on the bench topic, plus `OrderNoted`.
fn bench_projection_text(topic: &str) -> anyhow::Result<String> {
    let original = include_str!("../projections/order_summary.toml");
    let text = original.replace("topics = [\"shop.orders\"]", &format!("topics = [\"{topic}\"]"));
    if text == original {
        bail!("projections/order_summary.toml no longer has `topics = [\"shop.orders\"]`: update the bench");
    }
    Ok(text + NOTED_HANDLER)
}

fn bench_projection(topic: &str) -> anyhow::Result<Projection> {
    compile_file(Path::new("bench/order_summary.toml"), &bench_projection_text(topic)?)
        .map_err(|errors| anyhow!(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")))
}

// ---------------------------------------------------------------------------------------------
// Postgres

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

struct Databases {
    server: String,
    prefix: String,
    created: Vec<String>,
}

impl Databases {
    async fn create(&mut self, suffix: &str) -> anyhow::Result<String> {
        let name = format!("{}_{suffix}", self.prefix);
        let admin = connect(&self.server).await?;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await?;
        admin.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await?;
        self.created.push(name.clone());
        projector::demo::database_url(&self.server, &name)
    }

    async fn drop_all(&mut self) {
        let Ok(admin) = connect(&self.server).await else { return };
        for name in self.created.drain(..) {
            if let Err(error) = admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await {
                eprintln!("could not drop database {name}: {error}");
            }
        }
    }
}

/// The engine's migrations, plus the bench's `note` column.
async fn prepare_schema(url: &str) -> anyhow::Result<()> {
    projector::store::migrate_with(url, &projector::demo::example_projections()?).await?;
    connect(url).await?.batch_execute("ALTER TABLE order_summary ADD COLUMN IF NOT EXISTS note text").await?;
    Ok(())
}

/// Rows and sum of versions of `table`, against the workload's expectation.
async fn verify(client: &Client, table: &str, entities: usize, version_sum: i64) -> anyhow::Result<String> {
    let row = client.query_one(&format!("SELECT count(*), coalesce(sum(version), 0)::int8 FROM {table}"), &[]).await?;
    let (rows, sum): (i64, i64) = (row.get(0), row.get(1));
    Ok(if rows == entities as i64 && sum == version_sum {
        format!("ok ({rows} rows, versions sum {sum})")
    } else {
        format!("MISMATCH: {rows} rows (expected {entities}), versions sum {sum} (expected {version_sum})")
    })
}

// ---------------------------------------------------------------------------------------------
// /proc: memory and CPU

fn proc_status_kb(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|line| line.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// utime, stime, cutime, cstime in clock ticks.
fn proc_ticks(stat_path: &str) -> Option<[u64; 4]> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some([fields[11].parse().ok()?, fields[12].parse().ok()?, fields[13].parse().ok()?, fields[14].parse().ok()?])
}

const TICK: f64 = 0.01; // USER_HZ is 100 on Linux

#[derive(Clone, Default)]
struct CpuSnapshot {
    at: Option<Instant>,
    this_process: u64,
    threads: HashMap<String, u64>,
    postgres: u64,
    /// Backends connected to the bench's databases.
    postgres_bench: u64,
    /// Backends of other databases (anything else using the same server meanwhile).
    postgres_other: u64,
    child: u64,
    broker: u64,
    system_busy: u64,
    system_total: u64,
}

fn cpu_snapshot(child: Option<u32>, broker: Option<u32>) -> CpuSnapshot {
    let mut snapshot = CpuSnapshot { at: Some(Instant::now()), ..Default::default() };
    snapshot.this_process = proc_ticks("/proc/self/stat").map_or(0, |t| t[0] + t[1]);
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let path = task.path();
            let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default().trim().to_string();
            let group = if name.starts_with("rdk:") {
                "librdkafka threads".to_string()
            } else if name.starts_with("tokio-r") {
                "tokio workers".to_string()
            } else {
                name
            };
            let ticks = proc_ticks(&format!("{}/stat", path.display())).map_or(0, |t| t[0] + t[1]);
            *snapshot.threads.entry(group).or_default() += ticks;
        }
    }
    if let Ok(processes) = std::fs::read_dir("/proc") {
        for process in processes.flatten() {
            let pid = process.file_name().to_string_lossy().to_string();
            if !pid.chars().all(|c| c.is_ascii_digit()) {
                continue;
            }
            if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres") {
                // Backends' own time, and the postmaster's reaped children (exited backends).
                let ticks = proc_ticks(&format!("/proc/{pid}/stat")).map_or(0, |t| t.iter().sum());
                snapshot.postgres += ticks;
                let cmdline =
                    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
                        .to_string();
                if cmdline.contains("projector_bench_") {
                    snapshot.postgres_bench += ticks;
                } else if cmdline.contains("127.0.0.1(") || cmdline.contains("[local]") || cmdline.contains("::1(") {
                    snapshot.postgres_other += ticks;
                }
            }
        }
    }
    let ticks_of =
        |pid: Option<u32>| pid.and_then(|pid| proc_ticks(&format!("/proc/{pid}/stat"))).map_or(0, |t| t[0] + t[1]);
    snapshot.child = ticks_of(child);
    snapshot.broker = ticks_of(broker);
    if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
        if let Some(line) = stat.lines().next() {
            let values: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
            snapshot.system_total = values.iter().take(8).sum();
            snapshot.system_busy =
                snapshot.system_total - values.get(3).copied().unwrap_or(0) - values.get(4).copied().unwrap_or(0);
        }
    }
    snapshot
}

/// CPU seconds per component between two snapshots, and each as a share of the wall time.
fn cpu_split(before: &CpuSnapshot, after: &CpuSnapshot, labels: (&str, &str)) -> Value {
    let wall = after.at.unwrap().duration_since(before.at.unwrap()).as_secs_f64();
    let seconds = |a: u64, b: u64| (b.saturating_sub(a)) as f64 * TICK;
    let mut threads: Vec<(String, f64)> = after
        .threads
        .iter()
        .map(|(name, ticks)| (name.clone(), seconds(before.threads.get(name).copied().unwrap_or(0), *ticks)))
        .filter(|(_, s)| *s > 0.0)
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    let busy = seconds(before.system_busy, after.system_busy);
    let total = seconds(before.system_total, after.system_total);
    json!({
        "wall_s": round(wall, 2),
        "bench_process_cpu_s": round(seconds(before.this_process, after.this_process), 2),
        "bench_process_threads_cpu_s": threads.iter().map(|(n, s)| json!({"thread": n, "cpu_s": round(*s, 2)})).collect::<Vec<_>>(),
        "postgres_cpu_s": round(seconds(before.postgres, after.postgres), 2),
        "postgres_bench_backends_cpu_s": round(seconds(before.postgres_bench, after.postgres_bench), 2),
        "postgres_other_databases_backends_cpu_s": round(seconds(before.postgres_other, after.postgres_other), 2),
        labels.0: round(seconds(before.child, after.child), 2),
        labels.1: round(seconds(before.broker, after.broker), 2),
        "machine_busy_percent": round(if total > 0.0 { 100.0 * busy / total } else { 0.0 }, 1),
    })
}

fn round(value: f64, digits: i32) -> f64 {
    let factor = 10f64.powi(digits);
    (value * factor).round() / factor
}

// ---------------------------------------------------------------------------------------------
// Kafka

struct CountingContext {
    failed: AtomicU64,
}
impl ClientContext for CountingContext {}
impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A producer's `message.max.bytes` for values of `value_bytes` (librdkafka's default, 1,000,000,
/// refuses a 1,000,000-byte value with its key and envelope).
fn message_max_bytes(value_bytes: usize) -> String {
    (value_bytes + 65536).max(1_000_000).to_string()
}

fn send_retrying<C: ProducerContext>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'_, [u8], [u8], C::DeliveryOpaque>,
) -> anyhow::Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(10));
            }
            Err((error, _)) => return Err(anyhow!("producing: {error}")),
        }
    }
}

/// Publishes the whole workload, batched; returns the seconds it took. The last record of each
/// partition is held back and published alone, in a batch of one, after the rest: Tansu reports
/// a partition's high watermark as its last batch's base offset + 1, which is then exact (a
/// rebuild reads up to the high watermarks). The producer holds at most 16 MiB of records not yet
/// delivered, so that what it leaves behind in the bench process is small next to the engine.
fn load_topic(bootstrap: &str, workload: &Workload) -> anyhow::Result<f64> {
    let producer = |batch: &str| -> anyhow::Result<BaseProducer<CountingContext>> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "false")
            .set("linger.ms", "20")
            .set("batch.num.messages", batch)
            .set("queue.buffering.max.messages", "500000")
            .set("queue.buffering.max.kbytes", "16384")
            .set("message.max.bytes", message_max_bytes(workload.value_bytes))
            .set("message.timeout.ms", "300000")
            .create_with_context(CountingContext { failed: AtomicU64::new(0) })?)
    };
    let mut last = vec![None; workload.partitions as usize];
    for (i, rec) in workload.records.iter().enumerate() {
        last[workload.partition_of(rec.entity) as usize] = Some(i);
    }
    let started = Instant::now();
    let send = |producer: &BaseProducer<CountingContext>, rec: &Rec| {
        let key = entity_id(rec.entity).to_string();
        let payload = event_json(rec.entity, rec.version, None, workload.value_bytes);
        send_retrying(
            producer,
            BaseRecord::to(&workload.topic)
                .partition(workload.partition_of(rec.entity))
                .key(key.as_bytes())
                .payload(&payload[..]),
        )
    };
    let bulk = producer("10000")?;
    for (i, rec) in workload.records.iter().enumerate() {
        if last[workload.partition_of(rec.entity) as usize] == Some(i) {
            continue;
        }
        send(&bulk, rec)?;
        if i % 1000 == 0 {
            bulk.poll(Duration::ZERO);
        }
    }
    bulk.flush(Duration::from_secs(600))?;
    let tail = producer("1")?;
    for i in last.iter().flatten() {
        send(&tail, &workload.records[*i])?;
    }
    tail.flush(Duration::from_secs(60))?;
    let failed = bulk.context().failed.load(Ordering::Relaxed) + tail.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} records were not delivered");
    }
    Ok(started.elapsed().as_secs_f64())
}

/// librdkafka's mock cluster keeps at most 5 MB per partition (rdkafka_mock.c, `max_size`, not
/// configurable) and deletes the oldest records beyond it: a backlog that does not fit cannot be
/// loaded beforehand. `Err` says why.
fn mock_fits(workload: &Workload) -> Result<(), String> {
    let count = workload.records.len().clamp(1, 1000);
    let bytes: usize = workload
        .records
        .iter()
        .take(count)
        .map(|r| event_json(r.entity, r.version, None, workload.value_bytes).len() + 36 + 70)
        .sum();
    let per_record = bytes as f64 / count as f64;
    let largest = workload.per_partition().into_iter().max().unwrap_or(0) as f64 * per_record;
    if largest > 0.9 * 5.0 * 1024.0 * 1024.0 {
        Err(format!(
            "skipped: the backlog needs about {:.0} MB per partition; librdkafka's mock cluster keeps 5 MB per partition and deletes older records",
            largest / 1024.0 / 1024.0
        ))
    } else {
        Ok(())
    }
}

fn kafka_metadata_ok(bootstrap: &str, topic: Option<&str>) -> Option<usize> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("log_level", "3").create().ok()?;
    let metadata = consumer.fetch_metadata(topic, Duration::from_secs(3)).ok()?;
    Some(metadata.topics().iter().filter(|t| t.error().is_none()).map(|t| t.partitions().len()).sum())
}

/// A Tansu broker (in-memory storage) in a process of its own, killed on drop.
struct Tansu {
    bootstrap: String,
    binary: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Tansu {
    fn start() -> anyhow::Result<Tansu> {
        let binary = std::env::var_os("TANSU_BIN").map(PathBuf::from).unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            let cargo = home.join(".cargo/bin/tansu");
            if cargo.is_file() {
                cargo
            } else {
                PathBuf::from("tansu")
            }
        });
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let listener = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log"))?;
        let child = Command::new(&binary)
            .arg("broker")
            .args(["--listener-url", &listener, "--advertised-listener-url", &listener])
            .args(["--storage-engine", "memory://tansu/"])
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (install it with scripts/install-tansu.sh)", binary.display()))?;
        let mut tansu = Tansu { bootstrap: format!("127.0.0.1:{port}"), binary, child, _dir: dir };
        let started = Instant::now();
        while kafka_metadata_ok(&tansu.bootstrap, None).is_none() {
            if let Some(status) = tansu.child.try_wait()? {
                bail!("tansu exited at start: {status}");
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("tansu did not answer within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(tansu)
    }

    fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        let output = Command::new(&self.binary)
            .args(["topic", "create", name, "--partitions", &partitions.to_string()])
            .args(["--broker", &format!("tcp://{}", self.bootstrap)])
            .output()?;
        if !output.status.success() {
            bail!("tansu topic create: {}", String::from_utf8_lossy(&output.stderr));
        }
        let started = Instant::now();
        while kafka_metadata_ok(&self.bootstrap, Some(name)) != Some(partitions as usize) {
            if started.elapsed() > Duration::from_secs(20) {
                bail!("topic {name} did not show {partitions} partitions");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

// ---------------------------------------------------------------------------------------------
// Waiting for the engine

/// Sum of the projection's checkpoints (next offsets) on the topic.
async fn checkpoint_sum(client: &Client, topic: &str) -> anyhow::Result<i64> {
    let row = client
        .query_one(
            "SELECT coalesce(sum(next_offset), 0)::int8 FROM projector.checkpoints WHERE projection = $1 AND topic = $2",
            &[&PROJECTION, &topic],
        )
        .await?;
    Ok(row.get(0))
}

/// The rebuild's steady rate, measured as the engine's: from the first checkpoint it commits to
/// the last. An in-place rebuild first empties the checkpoints, which are at `target` when it
/// starts. `None` when that was not seen.
fn rebuild_steady_rate(client: Client, topic: String, target: i64) -> tokio::task::JoinHandle<Option<f64>> {
    tokio::spawn(async move {
        let mut emptied = false;
        let mut first: Option<(Instant, i64)> = None;
        loop {
            let sum = checkpoint_sum(&client, &topic).await.ok()?;
            let now = Instant::now();
            if !emptied {
                emptied = sum < target;
            }
            if emptied && sum > 0 && first.is_none() {
                first = Some((now, sum));
            }
            if let Some(first) = first.filter(|_| sum >= target) {
                return rate_since(first, now, target);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Records per second from the first checkpoint seen (`first`: when, and the checkpoints' sum
/// then) to `now`, when the checkpoints sum to `target`.
fn rate_since((at, done): (Instant, i64), now: Instant, target: i64) -> Option<f64> {
    let seconds = now.duration_since(at).as_secs_f64();
    (seconds > 0.0).then(|| (target - done) as f64 / seconds)
}

struct Cleared {
    /// From the engine's start to the last checkpoint.
    wall_s: f64,
    /// From the first checkpoint seen to the last: the events after the first commit, over that time.
    steady_rate: f64,
    wall_rate: f64,
    /// Records applied in each half second from the first checkpoint, per second.
    rates: Vec<f64>,
}

/// Polls the checkpoints until they sum to `target` (every record of every partition applied).
/// `alive` fails when the engine is gone.
async fn wait_cleared(
    client: &Client,
    topic: &str,
    target: i64,
    started: Instant,
    timeout: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Cleared> {
    let mut first: Option<(Instant, i64)> = None;
    let mut last_report = Instant::now();
    let mut rates = Vec::new();
    let mut mark: Option<(Instant, i64)> = None;
    loop {
        let sum = checkpoint_sum(client, topic).await?;
        let now = Instant::now();
        if sum > 0 && first.is_none() {
            first = Some((now, sum));
            mark = first;
        }
        if let Some((at, done)) = mark {
            let elapsed = now.duration_since(at).as_secs_f64();
            if elapsed >= 0.5 || sum >= target {
                rates.push(((sum - done) as f64 / elapsed).round());
                mark = Some((now, sum));
            }
        }
        if sum >= target {
            let wall_s = now.duration_since(started).as_secs_f64();
            let steady_rate = rate_since(first.expect("set above"), now, target).unwrap_or(target as f64 / wall_s);
            return Ok(Cleared { wall_s, steady_rate, wall_rate: target as f64 / wall_s, rates });
        }
        alive()?;
        if started.elapsed() > timeout {
            bail!("the engine did not clear the backlog within {timeout:?}: {sum} of {target}");
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("  … {sum} of {target} records applied ({:.0} s)", started.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Latency at half the maximum rate

struct LatencyContext {
    delivered: Mutex<Vec<(i32, i64, Instant)>>,
    failed: AtomicU64,
}
impl ClientContext for LatencyContext {}
impl ProducerContext for LatencyContext {
    type DeliveryOpaque = Box<Instant>;
    fn delivery(&self, result: &DeliveryResult<'_>, sent: Box<Instant>) {
        match result {
            Ok(message) => self.delivered.lock().unwrap().push((message.partition(), message.offset(), *sent)),
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Produces `OrderNoted` updates at `rate` for `secs` while polling the checkpoints every 5 ms;
/// an event is visible at the first poll whose checkpoint of its partition is past its offset
/// (the checkpoint commits with the row). `lengths` and `per_partition` are advanced.
async fn latency_phase(
    client: &Client,
    bootstrap: &str,
    workload: &mut Workload,
    per_partition: &mut [i64],
    rate: f64,
    secs: f64,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Value> {
    let count = (rate * secs) as usize;
    let mut rng = StdRng::seed_from_u64(7);
    let mut plan = Vec::with_capacity(count);
    for _ in 0..count {
        let entity = rng.random_range(0..workload.entities as u32);
        workload.lengths[entity as usize] += 1;
        let partition = workload.partition_of(entity);
        per_partition[partition as usize] += 1;
        plan.push((entity, workload.lengths[entity as usize], partition));
    }
    let target: i64 = per_partition.iter().sum();
    let (topic, bootstrap_owned, value_bytes) = (workload.topic.clone(), bootstrap.to_string(), workload.value_bytes);
    let producing = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<(i32, i64, Instant)>, f64)> {
        let producer: BaseProducer<LatencyContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap_owned)
            .set("enable.idempotence", "false")
            .set("linger.ms", "1")
            .set("message.max.bytes", message_max_bytes(value_bytes))
            .create_with_context(LatencyContext { delivered: Mutex::new(Vec::new()), failed: AtomicU64::new(0) })?;
        let started = Instant::now();
        let mut sent = 0;
        while sent < plan.len() {
            let due = ((started.elapsed().as_secs_f64() * rate) as usize).min(plan.len());
            while sent < due {
                let (entity, version, partition) = plan[sent];
                let key = entity_id(entity).to_string();
                let payload = event_json(entity, version, Some(Utc::now()), value_bytes);
                let record = BaseRecord::with_opaque_to(&topic, Box::new(Instant::now()))
                    .partition(partition)
                    .key(key.as_bytes())
                    .payload(&payload[..]);
                send_retrying(&producer, record)?;
                sent += 1;
            }
            producer.poll(Duration::ZERO);
            std::thread::sleep(Duration::from_millis(1));
        }
        let produce_secs = started.elapsed().as_secs_f64();
        producer.flush(Duration::from_secs(60))?;
        let failed = producer.context().failed.load(Ordering::Relaxed);
        if failed > 0 {
            bail!("{failed} latency records were not delivered");
        }
        let delivered = std::mem::take(&mut *producer.context().delivered.lock().unwrap());
        Ok((delivered, produce_secs))
    });
    // The timeline of checkpoints, polled until every record produced is applied.
    let mut timeline: Vec<(Instant, Vec<i64>)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs_f64(secs + 120.0);
    loop {
        let rows = client
            .query(
                "SELECT partition, next_offset FROM projector.checkpoints WHERE projection = $1 AND topic = $2",
                &[&PROJECTION, &workload.topic],
            )
            .await?;
        let mut next = vec![0i64; workload.partitions as usize];
        for row in rows {
            next[row.get::<_, i32>(0) as usize] = row.get(1);
        }
        let now = Instant::now();
        let done = next.iter().sum::<i64>() >= target;
        timeline.push((now, next));
        if done && producing.is_finished() {
            break;
        }
        alive()?;
        if now > deadline {
            bail!("latency phase: the engine did not catch up");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (delivered, produce_secs) = producing.await??;
    let mut latencies: Vec<f64> = Vec::with_capacity(delivered.len());
    let mut unmatched = 0;
    for (partition, offset, sent) in &delivered {
        let first = timeline.partition_point(|(_, next)| next[*partition as usize] <= *offset);
        match timeline.get(first) {
            Some((at, _)) => latencies.push(at.saturating_duration_since(*sent).as_secs_f64() * 1000.0),
            None => unmatched += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(json!({
        "target_rate": round(rate, 0),
        "achieved_rate": round(delivered.len() as f64 / produce_secs, 0),
        "events": delivered.len(),
        "unmatched": unmatched,
        "p50_ms": round(pct(0.50), 1),
        "p99_ms": round(pct(0.99), 1),
        "max_ms": round(latencies.last().copied().unwrap_or(f64::NAN), 1),
        "poll_interval_ms": 5,
    }))
}

// ---------------------------------------------------------------------------------------------
// Modes

/// The ceiling: the faster of two ways to commit the same set-based statements (see
/// [`ceiling_run`]). On a disk with slow flushes, committing every 1,000-row statement costs
/// the ceiling more than it costs the engine, which commits a batch of thousands of events at once.
async fn ceiling(url: &str, workload: &Workload) -> anyhow::Result<Value> {
    let per_statement = ceiling_run(url, workload, false).await?;
    eprintln!("  each statement committed: {per_statement}");
    let per_wave = ceiling_run(url, workload, true).await?;
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
async fn ceiling_run(url: &str, workload: &Workload, per_wave: bool) -> anyhow::Result<Value> {
    let setup = connect(url).await?;
    setup
        .batch_execute(
            "DROP TABLE IF EXISTS ceiling_order_summary;
             CREATE TABLE ceiling_order_summary (LIKE order_summary INCLUDING ALL)",
        )
        .await?;
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
    let check = verify(&setup, "ceiling_order_summary", workload.entities, workload.version_sum()).await?;
    Ok(json!({
        "cpu": cpu_split(&before, &after, ("engine_process_cpu_s", "broker_process_cpu_s")),
        "rows_changed": changed,
        "seconds": round(secs, 2),
        "rows_per_s": round(changed as f64 / secs, 0),
        // The events the same changes stand for (duplicates are no-ops the ceiling never sees).
        "events_per_s": round(workload.records.len() as f64 / secs, 0),
        "check": check,
    }))
}

async fn naive(
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

/// The bench's own connections (ceiling, naive, checks) are plain TCP: unless the URL says
/// otherwise, the engine's are too (its default, libpq's `prefer`, would use TLS where the server
/// offers it), so that every mode pays the same transport.
fn same_transport_as_the_bench(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if !parsed.query_pairs().any(|(name, _)| name == "sslmode") => {
            parsed.query_pairs_mut().append_pair("sslmode", "disable");
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

fn engine_settings(url: &str, bootstrap: &str, kind: Kind, args: &Args) -> Settings {
    let mut settings = Settings::default();
    settings.database.url = same_transport_as_the_bench(url);
    settings.kafka.bootstrap_servers = bootstrap.to_string();
    settings.kafka.group_prefix = format!("bench-{}", kind.label());
    settings.kafka.properties.clear();
    if kind == Kind::Tansu {
        settings.kafka.properties.extend(args.tansu_properties.iter().cloned());
    }
    settings.http.listen = "127.0.0.1:0".into();
    settings.batch.max_events = args.batch_max_events;
    settings.batch.max_bytes = args.batch_max_bytes;
    settings.batch.set_based = args.set_based;
    settings.batch.lanes = args.lanes;
    settings.database.pool_size = args.pool_size;
    settings.kafka.properties.extend(args.kafka_properties.iter().cloned());
    settings
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    let (name, value) = text.split_once('=').ok_or_else(|| format!("`{text}` is not `name=value`"))?;
    Ok((name.to_string(), value.to_string()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// librdkafka's mock cluster, and the engine, in this process.
    Mock,
    /// A Tansu broker, and `projector run`, each in a process of its own.
    Tansu,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Mock => "mock",
            Kind::Tansu => "tansu",
        }
    }
}

enum Broker {
    Mock(projector::kafka::mock::MockKafka),
    Tansu(Tansu),
}

impl Broker {
    fn bootstrap(&self) -> String {
        match self {
            Broker::Mock(cluster) => cluster.bootstrap_servers(),
            Broker::Tansu(tansu) => tansu.bootstrap.clone(),
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Broker::Mock(_) => None,
            Broker::Tansu(tansu) => Some(tansu.child.id()),
        }
    }
}

/// A running engine: `projector::app::run` on this runtime, or `projector run` as a child.
enum Engine {
    InProcess {
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<Result<(), projector::app::AppError>>,
        finished: Arc<std::sync::atomic::AtomicBool>,
        metrics: Metrics,
    },
    Child {
        child: Arc<Mutex<Child>>,
        log: PathBuf,
    },
}

impl Engine {
    fn start(kind: Kind, settings: &Settings, projection: &Projection, dir: &Path) -> anyhow::Result<Engine> {
        match kind {
            Kind::Mock => {
                let metrics = Metrics::new();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let task = {
                    let (settings, projection, metrics, finished) =
                        (settings.clone(), projection.clone(), metrics.clone(), finished.clone());
                    tokio::spawn(async move {
                        let result = projector::app::run(&settings, vec![projection], metrics, async {
                            let _ = stopped.await;
                        })
                        .await;
                        finished.store(true, Ordering::SeqCst);
                        result
                    })
                };
                Ok(Engine::InProcess { stop, task, finished, metrics })
            }
            Kind::Tansu => {
                let projections_dir = dir.join("projections");
                std::fs::create_dir_all(&projections_dir)?;
                std::fs::write(
                    projections_dir.join("order_summary.toml"),
                    bench_projection_text(&projection.topics[0])?,
                )?;
                let log = dir.join("projector.log");
                let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
                // `PROJECTOR_BENCH_ENGINE`: another `projector` binary (e.g. a copy, while the tree is rebuilt).
                let binary = std::env::var_os("PROJECTOR_BENCH_ENGINE")
                    .unwrap_or_else(|| env!("CARGO_BIN_EXE_projector").into());
                let mut command = Command::new(binary);
                command.arg("run");
                for (name, _) in std::env::vars_os() {
                    if name.to_string_lossy().starts_with("PROJECTOR_") {
                        command.env_remove(name);
                    }
                }
                command
                    .env("DATABASE_URL", &settings.database.url)
                    .env("PROJECTOR_KAFKA__BOOTSTRAP_SERVERS", &settings.kafka.bootstrap_servers)
                    .env("PROJECTOR_KAFKA__GROUP_PREFIX", &settings.kafka.group_prefix)
                    .env("PROJECTOR_PROJECTIONS_DIR", &projections_dir)
                    .env("PROJECTOR_HTTP__LISTEN", "127.0.0.1:0")
                    .env("PROJECTOR_BATCH__MAX_EVENTS", settings.batch.max_events.to_string())
                    .env("PROJECTOR_BATCH__MAX_BYTES", settings.batch.max_bytes.to_string())
                    .env("PROJECTOR_BATCH__SET_BASED", settings.batch.set_based.to_string())
                    .env("PROJECTOR_BATCH__LANES", settings.batch.lanes.to_string())
                    .env("PROJECTOR_DATABASE__POOL_SIZE", settings.database.pool_size.to_string())
                    .envs(settings.kafka.properties.iter().map(|(name, value)| (property_variable(name), value)))
                    .env("RUST_LOG", "warn")
                    .current_dir(dir)
                    .stdin(Stdio::null())
                    .stdout(log_file.try_clone()?)
                    .stderr(log_file);
                let child = command.spawn().context("starting the projector binary")?;
                Ok(Engine::Child { child: Arc::new(Mutex::new(child)), log })
            }
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Engine::InProcess { .. } => None,
            Engine::Child { child, .. } => Some(child.lock().unwrap().id()),
        }
    }

    /// A check that fails once the engine has stopped.
    fn alive(&self) -> impl FnMut() -> anyhow::Result<()> + use<> {
        let (finished, child) = match self {
            Engine::InProcess { finished, .. } => (Some(finished.clone()), None),
            Engine::Child { child, log } => (None, Some((child.clone(), log.clone()))),
        };
        move || {
            if finished.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
                bail!("the engine stopped");
            }
            if let Some((child, log)) = &child {
                if let Some(status) = child.lock().unwrap().try_wait()? {
                    let log = std::fs::read_to_string(log).unwrap_or_default();
                    bail!("projector exited ({status}); its log ends:\n{}", &log[log.len().saturating_sub(3000)..]);
                }
            }
            Ok(())
        }
    }

    /// SIGINT/SIGTERM-style shutdown: the batch in flight commits, the group is left.
    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Engine::InProcess { stop, task, .. } => {
                let _ = stop.send(());
                task.await??;
            }
            Engine::Child { child, .. } => {
                let pid = child.lock().unwrap().id();
                let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    {
                        let mut child = child.lock().unwrap();
                        if child.try_wait()?.is_some() {
                            break;
                        }
                        if Instant::now() > deadline {
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Ok(())
    }
}

/// What to do in one broker mode.
struct Steps {
    naive: bool,
    engine: bool,
    rebuild: bool,
}

/// One broker: load the topic; optionally the naive consumer; the engine clears the backlog; the
/// engine is stopped and the projection rebuilt in place; the engine is started again for the
/// latency phase.
async fn broker_mode(
    kind: Kind,
    args: &Args,
    dbs: &mut Databases,
    workload: &mut Workload,
    steps: Steps,
) -> anyhow::Result<Value> {
    let label = kind.label();
    let broker = match kind {
        Kind::Mock => {
            let cluster = projector::kafka::mock::MockKafka::start(1)?;
            cluster.create_topic(&workload.topic, workload.partitions, 1)?;
            Broker::Mock(cluster)
        }
        Kind::Tansu => {
            let tansu = tokio::task::block_in_place(Tansu::start)?;
            tokio::task::block_in_place(|| tansu.create_topic(&workload.topic, workload.partitions))?;
            Broker::Tansu(tansu)
        }
    };
    let bootstrap = broker.bootstrap();
    let mb = |kb: u64| round(kb as f64 / 1024.0, 1);
    let peak_before_producing = proc_status_kb("self", "VmHWM").unwrap_or(0);
    let load_s = tokio::task::block_in_place(|| load_topic(&bootstrap, workload))?;
    let rss_after_producing = proc_status_kb("self", "VmRSS").unwrap_or(0);
    let peak_after_producing = proc_status_kb("self", "VmHWM").unwrap_or(0);
    eprintln!(
        "  {label}: topic loaded in {load_s:.1} s; bench process: peak RSS before producing {} MB, RSS after producing {} MB (peak {} MB)",
        mb(peak_before_producing),
        mb(rss_after_producing),
        mb(peak_after_producing)
    );
    let mut result = json!({ "load_topic_s": round(load_s, 2) });
    if steps.naive {
        eprintln!("== naive (per-event transactions, reading the {label} topic)");
        let url = dbs.create(&format!("naive_{label}")).await?;
        prepare_schema(&url).await?;
        result["naive"] = naive(&url, &bootstrap, workload, args.naive_events, args.naive_secs).await?;
        result["naive"]["broker"] = json!(label);
        eprintln!("  {}", result["naive"]);
    }
    if !steps.engine {
        return Ok(result);
    }
    match kind {
        Kind::Mock => eprintln!("== mock: the engine in this process (projector::app::run), librdkafka's mock cluster"),
        Kind::Tansu => {
            eprintln!("== tansu: the engine as a child process (`projector run`), Tansu broker (memory storage)")
        }
    }
    let url = dbs.create(label).await?;
    prepare_schema(&url).await?;
    if args.row_delay_ms > 0.0 {
        connect(&url)
            .await?
            .batch_execute(&format!(
                "CREATE FUNCTION bench_row_delay() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM pg_sleep({}); RETURN NEW; END $$;
                 CREATE TRIGGER bench_row_delay BEFORE INSERT OR UPDATE ON order_summary
                 FOR EACH ROW EXECUTE FUNCTION bench_row_delay()",
                args.row_delay_ms / 1000.0
            ))
            .await?;
    }
    let projection = bench_projection(&workload.topic)?;
    let settings = engine_settings(&url, &bootstrap, kind, args);
    if !settings.kafka.properties.is_empty() {
        eprintln!("  consumer properties: {:?}", settings.kafka.properties);
    }
    let client = connect(&url).await?;
    let dir = tempfile::tempdir()?;
    let mut per_partition = workload.per_partition();
    let target: i64 = per_partition.iter().sum();

    let baseline_rss = proc_status_kb("self", "VmRSS").unwrap_or(0);
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // resets VmHWM to the current RSS
    let started = Instant::now();
    let engine = Engine::start(kind, &settings, &projection, dir.path())?;
    let before = cpu_snapshot(engine.pid(), broker.pid());
    let cleared =
        wait_cleared(&client, &workload.topic, target, started, Duration::from_secs(args.timeout_secs), engine.alive())
            .await?;
    let after = cpu_snapshot(engine.pid(), broker.pid());
    let check = verify(&client, "order_summary", workload.entities, workload.version_sum()).await?;
    result["projector"] = json!({
        "records": target,
        "wall_s": round(cleared.wall_s, 2),
        "events_per_s_steady": round(cleared.steady_rate, 0),
        "events_per_s_wall": round(cleared.wall_rate, 0),
        "events_per_s_each_half_second": cleared.rates,
        "check": check,
        "cpu": cpu_split(&before, &after, ("engine_process_cpu_s", "broker_process_cpu_s")),
        "kafka_properties": settings.kafka.properties,
    });
    match &engine {
        Engine::InProcess { metrics, .. } => {
            let peak_kb = proc_status_kb("self", "VmHWM").unwrap_or(0);
            for outcome in Outcome::ALL {
                result["projector"]["outcomes"][outcome.as_str()] = json!(metrics.outcome_count(PROJECTION, outcome));
            }
            result["projector"]["bench_process_peak_rss_before_producing_mb"] = json!(mb(peak_before_producing));
            result["projector"]["bench_process_rss_after_producing_mb"] = json!(mb(rss_after_producing));
            result["projector"]["bench_process_peak_rss_after_producing_mb"] = json!(mb(peak_after_producing));
            result["projector"]["bench_process_peak_rss_mb"] = json!(mb(peak_kb));
            result["projector"]["bench_process_rss_before_engine_mb"] = json!(mb(baseline_rss));
            result["projector"]["engine_rss_increase_mb"] = json!(mb(peak_kb.saturating_sub(baseline_rss)));
            result["projector"]["rss_note"] = json!("in-process: the bench process holds the mock broker (and the topic) and the workload; the increase of its peak over its RSS before the engine started approximates the engine's own");
            eprintln!(
                "  memory: bench process peak RSS {} MB once the engine caught up: +{} MB over its RSS before the engine started ({} MB)",
                mb(peak_kb),
                mb(peak_kb.saturating_sub(baseline_rss)),
                mb(baseline_rss)
            );
        }
        Engine::Child { .. } => {
            let pid = engine.pid().unwrap_or(0).to_string();
            result["projector"]["engine_peak_rss_mb"] =
                json!(round(proc_status_kb(&pid, "VmHWM").unwrap_or(0) as f64 / 1024.0, 1));
        }
    }
    eprintln!("  {}", result["projector"]);
    engine.stop().await?;

    if steps.rebuild {
        eprintln!("== {label}: rebuild in place (projector::rebuild::run in this process, engine stopped)");
        let rebuild_args = projector::rebuild::RebuildArgs { name: PROJECTION.into(), ..Default::default() };
        let steady = rebuild_steady_rate(connect(&url).await?, workload.topic.clone(), target);
        let before = cpu_snapshot(None, broker.pid());
        let report = projector::rebuild::run(
            &settings,
            &[projection.clone()],
            &rebuild_args,
            Metrics::new(),
            std::future::pending(),
        )
        .await?;
        let after = cpu_snapshot(None, broker.pid());
        let steady = if steady.is_finished() {
            steady.await.ok().flatten()
        } else {
            steady.abort();
            None
        };
        steady
            .is_none()
            .then(|| eprintln!("  (the rebuild's checkpoints were not seen to empty and fill: no steady rate)"));
        let check = verify(&client, "order_summary", workload.entities, workload.version_sum()).await?;
        result["rebuild"] = json!({
            "events": report.events,
            "seconds": round(report.seconds, 2),
            "events_per_s": round(report.rate(), 0),
            "over_engine_wall": ratio(report.rate(), cleared.wall_rate),
            "events_per_s_steady": steady.map(|rate| round(rate, 0)),
            "steady_over_steady": steady.map(|rate| ratio(rate, cleared.steady_rate)),
            "over_steady": ratio(report.rate(), cleared.steady_rate),
            "check": check,
            "cpu": cpu_split(&before, &after, ("engine_process_cpu_s", "broker_process_cpu_s")),
        });
        eprintln!("  {}", result["rebuild"]);
    }

    if args.latency_secs > 0.0 {
        let engine = Engine::start(kind, &settings, &projection, dir.path())?;
        // Warm-up: a few events, until the engine has joined its group and applies them.
        latency_phase(&client, &bootstrap, workload, &mut per_partition, 50.0, 1.0, engine.alive()).await?;
        let rate = cleared.steady_rate / 2.0;
        eprintln!("== {label}: latency at {rate:.0} events/s (half the backlog rate) for {} s", args.latency_secs);
        let before = cpu_snapshot(engine.pid(), broker.pid());
        let mut latency =
            latency_phase(&client, &bootstrap, workload, &mut per_partition, rate, args.latency_secs, engine.alive())
                .await?;
        let after = cpu_snapshot(engine.pid(), broker.pid());
        latency["cpu"] = cpu_split(&before, &after, ("engine_process_cpu_s", "broker_process_cpu_s"));
        if let Some(pid) = engine.pid() {
            latency["engine_peak_rss_mb"] =
                json!(round(proc_status_kb(&pid.to_string(), "VmHWM").unwrap_or(0) as f64 / 1024.0, 1));
        }
        result["latency"] = latency;
        eprintln!("  {}", result["latency"]);
        engine.stop().await?;
    }
    drop(broker);
    Ok(result)
}

// ---------------------------------------------------------------------------------------------

fn ratio(a: f64, b: f64) -> Value {
    if a > 0.0 && b > 0.0 {
        json!(round(a / b, 2))
    } else {
        Value::Null
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = proc_status_kb_meminfo().map_or(0.0, |kb| round(kb as f64 / 1024.0 / 1024.0, 1));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string();
    json!({ "cpu": cpu, "cores": cores, "memory_gib": memory_gib, "loadavg_at_start": load })
}

fn proc_status_kb_meminfo() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn get(value: &Value, path: &[&str]) -> f64 {
    path.iter().fold(value, |v, k| &v[*k]).as_f64().unwrap_or(0.0)
}

fn print_summary(results: &Value) {
    let mut table = comfy_table::Table::new();
    table.set_header(["mode", "events/s", "vs ceiling", "vs naive", "peak RSS", "latency p50 / p99 @ ½ max", "check"]);
    let ceiling = get(results, &["ceiling", "events_per_s"]);
    let naive = get(results, &["naive", "events_per_s"]);
    let cell = |v: f64| if v > 0.0 { format!("{v:.0}") } else { "-".into() };
    if !results["ceiling"].is_null() {
        table.add_row(vec![
            "ceiling (unnest, 2 conns)".to_string(),
            cell(ceiling),
            "1.00".into(),
            "".into(),
            "".into(),
            "".into(),
            results["ceiling"]["check"].as_str().unwrap_or("").to_string(),
        ]);
    }
    if !results["naive"].is_null() {
        table.add_row(vec![
            format!("naive (sample of {})", results["naive"]["events"]),
            cell(naive),
            ratio(naive, ceiling).to_string(),
            "1.00".into(),
            "".into(),
            "".into(),
            "".into(),
        ]);
    }
    for (mode, label, rss) in [
        ("mock", "projector, mock cluster (in-process)", "engine_rss_increase_mb"),
        ("tansu", "projector, Tansu (child process)", "engine_peak_rss_mb"),
    ] {
        if results[mode].is_null() || results[mode]["projector"].is_null() {
            continue;
        }
        let rate = get(results, &[mode, "projector", "events_per_s_steady"]);
        let latency = &results[mode]["latency"];
        table.add_row(vec![
            label.to_string(),
            cell(rate),
            ratio(rate, ceiling).to_string(),
            ratio(rate, naive).to_string(),
            format!("{} MB{}", results[mode]["projector"][rss], if mode == "mock" { " (increase)" } else { "" }),
            if latency.is_null() { "".into() } else { format!("{} / {} ms", latency["p50_ms"], latency["p99_ms"]) },
            results[mode]["projector"]["check"].as_str().unwrap_or("").to_string(),
        ]);
    }
    for (mode, label) in [("mock", "mock"), ("tansu", "Tansu")] {
        if results[mode]["rebuild"].is_null() {
            continue;
        }
        let rate = get(results, &[mode, "rebuild", "events_per_s"]);
        table.add_row(vec![
            format!("rebuild in place ({} events, {label})", results[mode]["rebuild"]["events"]),
            cell(rate),
            ratio(rate, ceiling).to_string(),
            ratio(rate, naive).to_string(),
            "".into(),
            format!(
                "{}× steady; from its first checkpoint {}×",
                results[mode]["rebuild"]["over_steady"], results[mode]["rebuild"]["steady_over_steady"]
            ),
            results[mode]["rebuild"]["check"].as_str().unwrap_or("").to_string(),
        ]);
    }
    for mode in ["mock", "tansu"] {
        if let Some(reason) = results[mode]["skipped"].as_str() {
            table.add_row(vec![
                mode.to_string(),
                "-".into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
                reason.to_string(),
            ]);
        }
    }
    println!("{table}");
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
        if !["ceiling", "naive", "mock", "rebuild", "tansu"].contains(&mode.as_str()) {
            bail!("unknown mode `{mode}`");
        }
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
    let mut dbs = Databases {
        server: args.database_url.clone(),
        prefix: format!("projector_bench_{}", &Uuid::new_v4().simple().to_string()[..8]),
        created: Vec::new(),
    };
    let mut results = json!({
        "machine": machine(),
        "args": {
            "events": args.events, "entities": workload.entities, "partitions": args.partitions,
            "duplicate_percent": args.duplicate_percent, "value_bytes": args.value_bytes, "row_delay_ms": args.row_delay_ms,
            "batch_max_events": args.batch_max_events, "batch_max_bytes": args.batch_max_bytes, "set_based": args.set_based,
            "modes": args.modes, "latency_secs": args.latency_secs,
        },
        "workload": {
            "records": workload.records.len(), "distinct": workload.distinct(), "duplicates": workload.duplicates,
            "creates": workload.entities, "per_partition": per_partition,
        },
    });
    let outcome = async {
        if has("ceiling") {
            eprintln!("== ceiling (set-based unnest statements, 2 connections, no Kafka, no checkpoints)");
            let url = dbs.create("ceiling").await?;
            prepare_schema(&url).await?;
            results["ceiling"] = ceiling(&url, &workload).await?;
            eprintln!("  {}", results["ceiling"]);
        }
        // Each broker mode gets the workload as generated (its latency phase extends its copy).
        // The naive consumer reads the first broker that runs (the mock when the backlog fits).
        let fits = mock_fits(&workload);
        let mut naive_pending = has("naive");
        if has("mock") || (naive_pending && fits.is_ok()) {
            if let Err(reason) = &fits {
                eprintln!("== mock {reason}");
                results["mock"] = json!({ "skipped": reason });
            } else {
                let steps = Steps { naive: naive_pending, engine: has("mock"), rebuild: has("rebuild") };
                let mut mode = broker_mode(Kind::Mock, &args, &mut dbs, &mut workload.clone(), steps).await?;
                if let Some(naive) = mode.as_object_mut().and_then(|m| m.remove("naive")) {
                    results["naive"] = naive;
                    naive_pending = false;
                }
                if has("mock") {
                    results["mock"] = mode;
                }
            }
        }
        if has("tansu") || naive_pending {
            let steps = Steps { naive: naive_pending, engine: has("tansu"), rebuild: has("rebuild") };
            let mut mode = broker_mode(Kind::Tansu, &args, &mut dbs, &mut workload.clone(), steps).await?;
            if let Some(naive) = mode.as_object_mut().and_then(|m| m.remove("naive")) {
                results["naive"] = naive;
            }
            if has("tansu") {
                results["tansu"] = mode;
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
    let ceiling = get(&results, &["ceiling", "events_per_s"]);
    let naive = get(&results, &["naive", "events_per_s"]);
    for mode in ["mock", "tansu"] {
        let rate = get(&results, &[mode, "projector", "events_per_s_steady"]);
        results["ratios"][mode] =
            json!({ "projector_over_ceiling": ratio(rate, ceiling), "projector_over_naive": ratio(rate, naive) });
    }
    let path =
        args.json.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("projector-bench-{}.json", args.events)));
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    print_summary(&results);
    println!("results: {}", path.display());
    outcome?;
    let mut mismatches = Vec::new();
    find_mismatches(&results, "", &mut mismatches);
    if !mismatches.is_empty() {
        bail!("read models differ from the workload: {}", mismatches.join("; "));
    }
    Ok(())
}

/// Every `check` that is not ok, with where it is.
fn find_mismatches(value: &Value, at: &str, found: &mut Vec<String>) {
    if let Value::Object(map) = value {
        for (key, inner) in map {
            let here = if at.is_empty() { key.clone() } else { format!("{at}.{key}") };
            match inner.as_str() {
                Some(check) if key == "check" && !check.starts_with("ok") => found.push(format!("{here}: {check}")),
                _ => find_mismatches(inner, &here, found),
            }
        }
    }
}
