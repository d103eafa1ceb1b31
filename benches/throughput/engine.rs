//! The `mock` and `tansu` modes: one broker, its topic loaded; the naive consumer on it if asked;
//! the engine clearing the backlog with every bench projection at once (timed from their
//! checkpoints); then the rebuild (of the first projection) and the latency phase (visibility in
//! the first projection).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_postgres::Client;

use projector::outcome::Outcome;
use projector::settings::Settings;

use crate::broker::{Broker, Kind};
use crate::cleared::{wait_cleared, Cleared};
use crate::db::{add_row_delay, connect, prepare_schema, processed_events, Databases};
use crate::latency::latency;
use crate::naive::naive;
use crate::proc::{cpu_snapshot, cpu_split, mb, peak_rss_mb, proc_status_kb, received_between, received_from};
use crate::produce::load_topic;
use crate::projections::{
    bench_projections, combined_check, create_tables, fill_tables, verify_table, BenchProjection, Dedupe,
};
use crate::rebuild::rebuild;
use crate::report::round;
use crate::running::{engine_settings, Engine};
use crate::workload::{schema_file, Format, Workload};
use crate::Args;

/// What to do in one broker mode.
pub struct Steps {
    pub naive: bool,
    pub engine: bool,
    pub rebuild: bool,
}

/// What the engine's steps of one broker mode share.
pub struct Setup {
    pub kind: Kind,
    /// The engine's database, and a connection to it.
    pub url: String,
    pub client: Client,
    pub settings: Settings,
    /// The projections the engine runs, all on the workload's topic; the rebuild and the latency
    /// phase use the first.
    pub projections: Vec<BenchProjection>,
    pub bootstrap: String,
    pub broker_pid: Option<u32>,
    /// The child engine's projections and log.
    pub dir: tempfile::TempDir,
}

/// One broker: load the topic; optionally the naive consumer; the engine clears the backlog; the
/// engine is stopped and the first projection rebuilt in place; the engine is started again for
/// the latency phase.
pub async fn broker_mode(
    kind: Kind,
    args: &Args,
    dbs: &mut Databases,
    workload: &mut Workload,
    steps: Steps,
) -> anyhow::Result<Value> {
    let label = kind.label();
    let broker = Broker::start(kind, &workload.topic, workload.partitions).await?;
    let bootstrap = broker.bootstrap();
    let peak_before_producing = proc_status_kb("self", "VmHWM").unwrap_or(0);
    let (load_s, topic_bytes) = tokio::task::block_in_place(|| load_topic(&bootstrap, workload))?;
    let rss_after_producing = proc_status_kb("self", "VmRSS").unwrap_or(0);
    let peak_after_producing = proc_status_kb("self", "VmHWM").unwrap_or(0);
    eprintln!(
        "  {label}: topic loaded in {load_s:.1} s; bench process: peak RSS before producing {} MB, RSS after producing {} MB (peak {} MB)",
        mb(peak_before_producing),
        mb(rss_after_producing),
        mb(peak_after_producing)
    );
    let mut result = json!({ "load_topic_s": round(load_s, 2) });
    if steps.naive && workload.format != Format::Json {
        anyhow::bail!("the naive consumer reads JSON only: leave `naive` out of --modes with --format avro");
    }
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
    let client = connect(&url).await?;
    create_tables(&client, args).await?;
    fill_tables(&client, args).await?;
    let projections = bench_projections(args, &workload.topic)?;
    let names: Vec<String> = projections.iter().map(|p| p.name.clone()).collect();
    if args.row_delay_ms > 0.0 {
        add_row_delay(&url, args.row_delay_ms, &names).await?;
    }
    let dir = tempfile::tempdir()?;
    let mut settings = engine_settings(&url, &bootstrap, kind, args);
    if let Some((file, schema)) = schema_file(workload.format) {
        // The writer's schema, where the engine finds it by its id.
        let schemas = dir.path().join("schemas");
        std::fs::create_dir_all(&schemas)?;
        std::fs::write(schemas.join(file), schema)?;
        settings.schemas.dir = Some(schemas);
    }
    if !settings.kafka.properties.is_empty() {
        eprintln!("  consumer properties: {:?}", settings.kafka.properties);
    }
    if names.len() > 1 {
        eprintln!(
            "  {} projections on the topic ({}), pool_size {}, lanes each {}",
            names.len(),
            names.join(", "),
            settings.database.pool_size,
            settings.lanes(names.len())
        );
    }
    let setup = Setup { kind, url, client, settings, projections, bootstrap, broker_pid: broker.pid(), dir };
    let mut per_partition = workload.per_partition();
    let records: i64 = per_partition.iter().sum();

    let baseline_rss = proc_status_kb("self", "VmRSS").unwrap_or(0);
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // resets VmHWM to the current RSS
    let started = Instant::now();
    let engine = Engine::start(kind, &setup.settings, &setup.projections, setup.dir.path())?;
    let before = cpu_snapshot(engine.pid(), setup.broker_pid);
    // The engine's connections to the broker (in-process: this process's, the only ones while it runs).
    let (engine_pid, ports) = (engine.pid().unwrap_or_else(std::process::id), ports_of(&setup.bootstrap));
    let received_before = received_from(engine_pid, &ports);
    let timeout = Duration::from_secs(args.timeout_secs);
    let cleared =
        wait_cleared(&setup.client, &workload.topic, &names, records, started, timeout, engine.alive()).await?;
    let after = cpu_snapshot(engine.pid(), setup.broker_pid);
    let received = received_before.zip(received_from(engine_pid, &ports)).map(|(b, a)| received_between(&b, &a));
    let mut checks = Vec::new();
    for name in &names {
        checks.push(verify_table(&setup.client, args, name, workload, args.existing_rows).await?);
    }
    let fetched = Fetched { received, topic_bytes };
    result["projector"] =
        projector_result(args, &setup, &cleared, records, &checks, fetched, cpu_split(&before, &after));
    if args.dedupe == Dedupe::EventId {
        result["projector"]["processed_events"] = processed_events(&setup.client, &names).await?;
        result["projector"]["processed_events"]["keep_event_ids"] = json!(args.keep_event_ids);
    }
    match &engine {
        Engine::InProcess { metrics, .. } => {
            let peak_kb = proc_status_kb("self", "VmHWM").unwrap_or(0);
            for outcome in Outcome::ALL {
                let count = |name: &String| metrics.outcome_count(name, outcome);
                result["projector"]["outcomes"][outcome.as_str()] = json!(names.iter().map(count).sum::<u64>());
                if names.len() > 1 {
                    for name in &names {
                        result["projector"]["projections"][name]["outcomes"][outcome.as_str()] = json!(count(name));
                    }
                }
            }
            if args.keep_event_ids.is_some() {
                let pruned = |name: &String| metrics.event_ids_pruned.with_label_values(&[name.as_str()]).get();
                result["projector"]["processed_events"]["pruned"] = json!(names.iter().map(pruned).sum::<u64>());
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
            result["projector"]["engine_peak_rss_mb"] = json!(peak_rss_mb(engine.pid().unwrap_or(0)));
        }
    }
    eprintln!("  {}", result["projector"]);
    engine.stop().await?;

    // The first projection alone: rebuilt, and its events' visibility measured, while the
    // engine runs them all. The latency's `half` is half the rate each projection read the topic at.
    if steps.rebuild {
        result["rebuild"] = rebuild(&setup, args, workload, records, &cleared.each[0]).await?;
    }
    if args.latency_secs > 0.0 {
        let per_projection = cleared.steady_rate / names.len() as f64;
        result["latency"] = latency(&setup, workload, &mut per_partition, per_projection, args).await?;
    }
    drop(broker);
    Ok(result)
}

/// The ports of a `host:port,host:port` bootstrap list.
fn ports_of(bootstrap: &str) -> Vec<u16> {
    bootstrap.split(',').filter_map(|server| server.rsplit(':').next()?.trim().parse().ok()).collect()
}

/// What the engine fetched from the broker while clearing the backlog: the bytes its connections
/// received (`None`: `ss` could not be run), and the topic's key and value bytes.
struct Fetched {
    received: Option<u64>,
    topic_bytes: u64,
}

/// The `projector` results of a broker mode: the rates (events applied across every projection,
/// and per projection), the checks, the CPU (and per event), the bytes fetched, and for several
/// projections each one's own.
fn projector_result(
    args: &Args,
    setup: &Setup,
    cleared: &Cleared,
    records: i64,
    checks: &[Value],
    fetched: Fetched,
    cpu: Value,
) -> Value {
    let names: Vec<String> = setup.projections.iter().map(|p| p.name.clone()).collect();
    let n = names.len();
    let applied = records as f64 * n as f64;
    let per_event_us = |seconds: &Value| round(seconds.as_f64().unwrap_or(0.0) * 1e6 / applied, 2);
    let mut result = json!({
        "records": records,
        "wall_s": round(cleared.wall_s, 2),
        "events_per_s_steady": round(cleared.steady_rate, 0),
        "events_per_s_wall": round(cleared.wall_rate, 0),
        "events_per_s_each_half_second": cleared.rates,
        "check": combined_check(&names, checks),
        "cpu": cpu,
        "kafka_properties": setup.settings.kafka.properties,
        "projection_count": n,
        "events_applied": records * n as i64,
        "events_per_s_per_projection": round(cleared.steady_rate / n as f64, 0),
        "note": "events_per_s_steady, _wall and _each_half_second count the events applied across all projections: records × projections over the time (from the first checkpoint seen to the poll that saw every projection's checkpoints sum to the records, for steady); events_per_s_per_projection is events_per_s_steady over the projections",
        "database_pool_size": setup.settings.database.pool_size,
        "lanes_per_projection": setup.settings.lanes(setup.projections.len()),
        "topic_bytes": fetched.topic_bytes,
        "bytes_fetched": fetched.received,
        "bytes_fetched_note": match fetched.received {
            Some(_) => "measured: bytes received (Kafka responses, framing included) on the engine's TCP connections to the broker from its start to the backlog cleared, the kernel's tcp_info.bytes_received read by `ss`; connections closed meanwhile (e.g. a bootstrap connection) are not counted",
            None => "not measured: `ss` could not be run",
        },
        "bytes_fetched_estimate": fetched.topic_bytes * n as u64,
        "bytes_fetched_estimate_note": "an estimate, not measured: projections × topic_bytes (the keys and values published), as each projection's consumer fetches the whole topic once; record batches' and the protocol's framing not counted",
    });
    match setup.kind {
        Kind::Tansu => result["engine_cpu_per_event_us"] = json!(per_event_us(&result["cpu"]["engine_process_cpu_s"])),
        Kind::Mock => {
            result["bench_process_cpu_per_event_us"] = json!(per_event_us(&result["cpu"]["bench_process_cpu_s"]));
            result["cpu_per_event_note"] = json!("in-process: the bench process's CPU, which includes the mock broker and the bench's polling, per event applied (records × projections)");
        }
    }
    if args.dedupe == Dedupe::EventId {
        let reapplied = checks.iter().map(|c| c["reapplied_duplicates"].as_i64().unwrap_or(0)).sum::<i64>();
        result["reapplied_duplicates"] = json!(reapplied);
    }
    if n > 1 {
        for ((name, check), own) in names.iter().zip(checks).zip(&cleared.each) {
            let mut one = check.clone();
            one["cleared_after_s"] = json!(round(own.wall_s, 2));
            one["events_per_s_steady"] = json!(round(own.steady_rate, 0));
            result["projections"][name] = one;
        }
    }
    result
}
