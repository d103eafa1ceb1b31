//! The `mock` and `tansu` modes: one broker, its topic loaded; the naive consumer on it if asked;
//! the engine clearing the backlog (timed from its checkpoints); then the rebuild and the latency
//! phase.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};
use tokio_postgres::Client;

use projector::outcome::Outcome;
use projector::projection::Projection;
use projector::settings::Settings;

use crate::broker::{Broker, Kind};
use crate::db::{add_row_delay, checkpoint_sum, connect, prepare_schema, verify, Databases};
use crate::latency::latency;
use crate::naive::naive;
use crate::proc::{cpu_snapshot, cpu_split, mb, peak_rss_mb, proc_status_kb};
use crate::produce::load_topic;
use crate::rebuild::rebuild;
use crate::report::round;
use crate::running::{engine_settings, Engine};
use crate::workload::{bench_projection, Workload, PROJECTION};
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
    pub projection: Projection,
    pub bootstrap: String,
    pub broker_pid: Option<u32>,
    /// The child engine's projections and log.
    pub dir: tempfile::TempDir,
}

/// One broker: load the topic; optionally the naive consumer; the engine clears the backlog; the
/// engine is stopped and the projection rebuilt in place; the engine is started again for the
/// latency phase.
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
        add_row_delay(&url, args.row_delay_ms).await?;
    }
    let projection = bench_projection(&workload.topic)?;
    let settings = engine_settings(&url, &bootstrap, kind, args);
    if !settings.kafka.properties.is_empty() {
        eprintln!("  consumer properties: {:?}", settings.kafka.properties);
    }
    let client = connect(&url).await?;
    let dir = tempfile::tempdir()?;
    let setup = Setup { kind, url, client, settings, projection, bootstrap, broker_pid: broker.pid(), dir };
    let mut per_partition = workload.per_partition();
    let target: i64 = per_partition.iter().sum();

    let baseline_rss = proc_status_kb("self", "VmRSS").unwrap_or(0);
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // resets VmHWM to the current RSS
    let started = Instant::now();
    let engine = Engine::start(kind, &setup.settings, &setup.projection, setup.dir.path())?;
    let before = cpu_snapshot(engine.pid(), setup.broker_pid);
    let cleared = wait_cleared(
        &setup.client,
        &workload.topic,
        target,
        started,
        Duration::from_secs(args.timeout_secs),
        engine.alive(),
    )
    .await?;
    let after = cpu_snapshot(engine.pid(), setup.broker_pid);
    let check = verify(&setup.client, "order_summary", workload.entities, workload.version_sum()).await?;
    result["projector"] = json!({
        "records": target,
        "wall_s": round(cleared.wall_s, 2),
        "events_per_s_steady": round(cleared.steady_rate, 0),
        "events_per_s_wall": round(cleared.wall_rate, 0),
        "events_per_s_each_half_second": cleared.rates,
        "check": check,
        "cpu": cpu_split(&before, &after),
        "kafka_properties": setup.settings.kafka.properties,
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
            result["projector"]["engine_peak_rss_mb"] = json!(peak_rss_mb(engine.pid().unwrap_or(0)));
        }
    }
    eprintln!("  {}", result["projector"]);
    engine.stop().await?;

    if steps.rebuild {
        result["rebuild"] = rebuild(&setup, workload, target, &cleared).await?;
    }
    if args.latency_secs > 0.0 {
        result["latency"] =
            latency(&setup, workload, &mut per_partition, cleared.steady_rate, &args.latency_rates, args.latency_secs)
                .await?;
    }
    drop(broker);
    Ok(result)
}

/// Records per second from the first checkpoint seen (`first`: when, and the checkpoints' sum
/// then) to `now`, when the checkpoints sum to `target`.
pub fn rate_since((at, done): (Instant, i64), now: Instant, target: i64) -> Option<f64> {
    let seconds = now.duration_since(at).as_secs_f64();
    (seconds > 0.0).then(|| (target - done) as f64 / seconds)
}

pub struct Cleared {
    /// From the engine's start to the last checkpoint.
    pub wall_s: f64,
    /// From the first checkpoint seen to the last: the events after the first commit, over that time.
    pub steady_rate: f64,
    pub wall_rate: f64,
    /// Records applied in each half second from the first checkpoint, per second.
    pub rates: Vec<f64>,
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
