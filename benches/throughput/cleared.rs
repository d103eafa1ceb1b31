//! The engine clearing the backlog, timed from its checkpoints: polled until every projection's
//! checkpoints sum to the topic's records, with the rate overall and each projection's own.

use std::time::{Duration, Instant};

use anyhow::bail;
use tokio_postgres::Client;

use crate::db::checkpoint_sums;

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
    /// Each projection's own clearing (its `rates` empty), in the order of the names polled: from
    /// its own first checkpoint to the poll that saw it cleared.
    pub each: Vec<Cleared>,
}

impl Cleared {
    /// A clearing of `target` events from `first` (when the first checkpoint was seen, and the
    /// sum then) to `now`.
    fn new(first: (Instant, i64), now: Instant, started: Instant, target: i64, rates: Vec<f64>) -> Cleared {
        let wall_s = now.duration_since(started).as_secs_f64();
        let steady_rate = rate_since(first, now, target).unwrap_or(target as f64 / wall_s);
        Cleared { wall_s, steady_rate, wall_rate: target as f64 / wall_s, rates, each: Vec::new() }
    }
}

/// One projection's progress: its first checkpoint seen (when, and the sum then), and when it was
/// seen cleared.
#[derive(Clone, Copy, Default)]
struct Progress {
    first: Option<(Instant, i64)>,
    cleared: Option<Instant>,
}

/// Polls the checkpoints of `projections` until each sums to `records` (every record of every
/// partition applied by every projection). `alive` fails when the engine is gone.
pub async fn wait_cleared(
    client: &Client,
    topic: &str,
    projections: &[String],
    records: i64,
    started: Instant,
    timeout: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Cleared> {
    let target = records * projections.len() as i64;
    let mut first: Option<(Instant, i64)> = None;
    let mut last_report = Instant::now();
    let mut rates = Vec::new();
    let mut mark: Option<(Instant, i64)> = None;
    let mut each = vec![Progress::default(); projections.len()];
    loop {
        let sums = checkpoint_sums(client, topic, projections).await?;
        let sum: i64 = sums.iter().sum();
        let now = Instant::now();
        for (progress, own) in each.iter_mut().zip(&sums) {
            if *own > 0 && progress.first.is_none() {
                progress.first = Some((now, *own));
            }
            if *own >= records && progress.cleared.is_none() {
                progress.cleared = Some(now);
            }
        }
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
            let mut cleared = Cleared::new(first.expect("set above"), now, started, target, rates);
            cleared.each = each
                .into_iter()
                .map(|progress| {
                    let cleared = progress.cleared.unwrap_or(now);
                    Cleared::new(progress.first.unwrap_or((cleared, 0)), cleared, started, records, Vec::new())
                })
                .collect();
            return Ok(cleared);
        }
        alive()?;
        if started.elapsed() > timeout {
            bail!("the engine did not clear the backlog within {timeout:?}: {sum} of {target}");
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            let of = match projections.len() {
                1 => format!("{target} records"),
                n => format!("{target} events ({n} projections × {records} records)"),
            };
            eprintln!("  … {sum} of {of} applied ({:.0} s)", started.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
