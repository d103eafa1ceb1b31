//! The latency phase of the `mock` and `tansu` modes: the engine started again, then `OrderNoted`
//! updates produced open-loop (each sent on schedule, whether or not earlier ones are visible) at
//! each of `--latency-rates` in turn, each timed from when it was due to when it is visible in
//! the first bench projection (the engine runs them all).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::bail;
use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use serde_json::{json, Value};

use crate::db::{checkpoints, prepare_checkpoints};
use crate::engine::Setup;
use crate::proc::{cpu_snapshot, cpu_split, peak_rss_mb};
use crate::produce::{producer_config, send_retrying};
use crate::report::round;
use crate::running::Engine;
use crate::workload::{entity_id, event_json, Workload};
use crate::Args;

/// A rate of the latency phase: events per second, or `half`, half the steady backlog rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    PerSecond(f64),
    HalfMax,
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(text: &str) -> Result<Rate, String> {
        match text {
            "half" => Ok(Rate::HalfMax),
            number => match number.parse::<f64>() {
                Ok(rate) if rate > 0.0 => Ok(Rate::PerSecond(rate)),
                _ => Err(format!("`{text}` is neither `half` nor a positive number of events per second")),
            },
        }
    }
}

/// The engine of `setup` started again, warmed up with 50 events, then measured at each of `rates`
/// for `secs` each (a pause of a second between them); stopped after. `steady_rate` is the rate
/// each projection read the backlog at.
pub async fn latency(
    setup: &Setup,
    workload: &mut Workload,
    per_partition: &mut [i64],
    steady_rate: f64,
    args: &Args,
) -> anyhow::Result<Value> {
    let (secs, linger_ms) = (args.latency_secs, args.latency_linger_ms);
    let first = setup.projections[0].name.as_str();
    let engine = Engine::start(setup.kind, &setup.settings, &setup.projections, setup.dir.path())?;
    // Warm-up: a few events, until the engine has joined its group and applies them.
    latency_phase(setup, workload, per_partition, 50.0, 1.0, linger_ms, &engine).await?;
    let mut phases = Vec::new();
    for rate in &args.latency_rates {
        let (rate, label) = match rate {
            Rate::PerSecond(rate) => (*rate, format!("{rate:.0}/s")),
            Rate::HalfMax => (steady_rate / 2.0, "half".to_string()),
        };
        eprintln!("== {}: latency at {rate:.0} events/s ({label}) for {secs} s", setup.kind.label());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = cpu_snapshot(engine.pid(), setup.broker_pid);
        let batches_before = engine.batches();
        let mut phase = latency_phase(setup, workload, per_partition, rate, secs, linger_ms, &engine).await?;
        let after = cpu_snapshot(engine.pid(), setup.broker_pid);
        phase["rate"] = json!(label);
        if let (Some(before), Some(after)) = (batches_before, engine.batches()) {
            let (batches, events_per_batch, batch_ms_mean) = batch_stats(before, after);
            phase["batches"] = json!(batches);
            phase["events_per_batch"] = json!(events_per_batch);
            phase["batch_ms_mean"] = json!(batch_ms_mean);
        }
        phase["cpu"] = cpu_split(&before, &after);
        if setup.projections.len() > 1 {
            phase["projection"] = json!(first);
            phase["note"] = json!("visible in the first projection (its checkpoints), while the engine runs every projection; `half` is half the rate each projection read the backlog at");
        }
        if let Some(pid) = engine.pid() {
            phase["engine_peak_rss_mb"] = json!(peak_rss_mb(pid));
        }
        eprintln!("  {phase}");
        phases.push(phase);
    }
    engine.stop().await?;
    Ok(Value::Array(phases))
}

/// When a record was due to be sent, and when the producer was handed it.
type Sending = (Instant, Instant);

/// A record delivered: its partition, its offset, when it was due and sent, and when the broker
/// acknowledged it (as the producer saw it).
type Delivered = (i32, i64, Sending, Instant);

struct LatencyContext {
    delivered: Mutex<Vec<Delivered>>,
    failed: AtomicU64,
}
impl ClientContext for LatencyContext {}
impl ProducerContext for LatencyContext {
    type DeliveryOpaque = Box<Sending>;
    fn delivery(&self, result: &DeliveryResult<'_>, sent: Box<Sending>) {
        match result {
            Ok(message) => {
                self.delivered.lock().unwrap().push((message.partition(), message.offset(), *sent, Instant::now()))
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Produces `OrderNoted` updates at `rate` for `secs` to the broker of `setup` while polling the
/// checkpoints of its first projection every 1 ms; an event is visible at the first poll whose
/// checkpoint of its partition is past its offset (the checkpoint commits with the row), and, for
/// an engine in this process, its batch counters every second. `lengths` and `per_partition`
/// are advanced.
async fn latency_phase(
    setup: &Setup,
    workload: &mut Workload,
    per_partition: &mut [i64],
    rate: f64,
    secs: f64,
    linger_ms: u32,
    engine: &Engine,
) -> anyhow::Result<Value> {
    let mut alive = engine.alive();
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
    let projection = setup.projections[0].name.as_str();
    let (topic, bootstrap, value_bytes) = (workload.topic.clone(), setup.bootstrap.clone(), workload.value_bytes);
    let producing = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<Delivered>, Instant, f64)> {
        // A producer tuned for latency, as one would be where it matters: 1 ms linger (unless
        // `--latency-linger-ms` says otherwise), no Nagle.
        let producer: BaseProducer<LatencyContext> = producer_config(&bootstrap, &linger_ms.to_string(), value_bytes)
            .set("socket.nagle.disable", "true")
            .create_with_context(LatencyContext { delivered: Mutex::new(Vec::new()), failed: AtomicU64::new(0) })?;
        let started = Instant::now();
        let mut sent = 0;
        while sent < plan.len() {
            // Record i is due at i / rate: every record whose time has come, the first at once.
            // (Counting floor(elapsed × rate) records as due sent each one a whole interval after
            // its due time, which the results then counted against the broker: 10 ms at 100/s.)
            let due = ((started.elapsed().as_secs_f64() * rate) as usize + 1).min(plan.len());
            while sent < due {
                let (entity, version, partition) = plan[sent];
                let key = entity_id(entity).to_string();
                let payload = event_json(entity, version, Some(Utc::now()), value_bytes);
                // Timed from when it was due, not when the loop got to it: a late send counts
                // against the engine rather than hiding its delay (no coordinated omission).
                let due_at = started + Duration::from_secs_f64(sent as f64 / rate);
                let record = BaseRecord::with_opaque_to(&topic, Box::new((due_at, Instant::now())))
                    .partition(partition)
                    .key(key.as_bytes())
                    .payload(&payload[..]);
                send_retrying(&producer, record)?;
                sent += 1;
            }
            producer.poll(Duration::ZERO);
            std::thread::sleep(Duration::from_micros(200));
        }
        let produce_secs = started.elapsed().as_secs_f64();
        producer.flush(Duration::from_secs(60))?;
        let failed = producer.context().failed.load(Ordering::Relaxed);
        if failed > 0 {
            bail!("{failed} latency records were not delivered");
        }
        let delivered = std::mem::take(&mut *producer.context().delivered.lock().unwrap());
        Ok((delivered, started, produce_secs))
    });
    // The timeline of checkpoints, polled until every record produced is applied.
    let mut timeline: Vec<(Instant, Vec<i64>)> = Vec::new();
    let statement = prepare_checkpoints(&setup.client).await?;
    let deadline = Instant::now() + Duration::from_secs_f64(secs + 120.0);
    // The in-process engine's batch counters, read once a second.
    let mut counted: Vec<(u64, f64, f64)> = engine.batches().into_iter().collect();
    let mut count_at = Instant::now() + Duration::from_secs(1);
    loop {
        let next = checkpoints(&setup.client, &statement, projection, &workload.topic, workload.partitions).await?;
        let now = Instant::now();
        if now >= count_at {
            counted.extend(engine.batches());
            count_at += Duration::from_secs(1);
        }
        let done = next.iter().sum::<i64>() >= target;
        timeline.push((now, next));
        if done && producing.is_finished() {
            break;
        }
        alive()?;
        if now > deadline {
            bail!("latency phase: the engine did not catch up");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // `started`: when the first record was due.
    let (delivered, started, produce_secs) = producing.await??;
    let mut latencies: Vec<f64> = Vec::with_capacity(delivered.len());
    let mut acked: Vec<f64> = Vec::with_capacity(delivered.len());
    let mut after_ack: Vec<f64> = Vec::with_capacity(delivered.len());
    let mut late: Vec<f64> = Vec::with_capacity(delivered.len());
    // Each second of the phase (by when its records were due): their latencies.
    let mut by_second: Vec<Vec<f64>> = vec![Vec::new(); secs.ceil() as usize + 1];
    let mut unmatched = 0;
    let ms = |later: Instant, earlier: Instant| later.saturating_duration_since(earlier).as_secs_f64() * 1000.0;
    for (partition, offset, (due, sent), ack) in &delivered {
        acked.push(ms(*ack, *due));
        late.push(ms(*sent, *due));
        let first = timeline.partition_point(|(_, next)| next[*partition as usize] <= *offset);
        match timeline.get(first) {
            Some((at, _)) => {
                latencies.push(ms(*at, *due));
                after_ack.push(ms(*at, *ack));
                let second = due.saturating_duration_since(started).as_secs() as usize;
                let last = by_second.len() - 1;
                by_second[second.min(last)].push(ms(*at, *due));
            }
            None => unmatched += 1,
        }
    }
    let (latency, acked, after_ack) = (Percentiles::of(latencies), Percentiles::of(acked), Percentiles::of(after_ack));
    let late = Percentiles::of(late);
    // Each second's batches: how many, their mean events and mean milliseconds.
    let batches_by_second: Vec<Value> = counted.windows(2).map(|pair| json!(batch_stats(pair[0], pair[1]))).collect();
    let p99_by_second: Vec<f64> = by_second
        .into_iter()
        .filter(|second| !second.is_empty())
        .map(|second| Percentiles::of(second).at(0.99))
        .collect();
    Ok(json!({
        "target_rate": round(rate, 0),
        "achieved_rate": round(delivered.len() as f64 / produce_secs, 0),
        "events": delivered.len(),
        "unmatched": unmatched,
        "p50_ms": latency.at(0.50),
        "p99_ms": latency.at(0.99),
        "max_ms": latency.at(1.0),
        "acked_p50_ms": acked.at(0.50),
        "acked_p99_ms": acked.at(0.99),
        "after_ack_p50_ms": after_ack.at(0.50),
        "after_ack_p99_ms": after_ack.at(0.99),
        "late_p50_ms": late.at(0.50),
        "late_p99_ms": late.at(0.99),
        "p99_ms_by_second": p99_by_second,
        "batches_by_second": batches_by_second,
        "poll_interval_ms": 1,
    }))
}

/// The batches an in-process engine committed between two readings of its counters
/// ([`Engine::batches`]): how many, their mean events and their mean milliseconds.
fn batch_stats(before: (u64, f64, f64), after: (u64, f64, f64)) -> (u64, f64, f64) {
    let batches = after.0 - before.0;
    let per = batches.max(1) as f64;
    (batches, round((after.2 - before.2) / per, 1), round((after.1 - before.1) * 1000.0 / per, 2))
}

/// Milliseconds, sorted, for percentiles.
struct Percentiles(Vec<f64>);

impl Percentiles {
    fn of(mut values: Vec<f64>) -> Percentiles {
        values.sort_by(f64::total_cmp);
        Percentiles(values)
    }

    /// The value at `share` (0 to 1) of the sorted values, to 0.1 ms; NaN when there is none.
    fn at(&self, share: f64) -> f64 {
        let index = ((self.0.len() as f64 * share) as usize).min(self.0.len().saturating_sub(1));
        round(self.0.get(index).copied().unwrap_or(f64::NAN), 1)
    }
}
