//! A lane: the part of each batch that falls on some of a projection's partitions, applied by a
//! task of its own in a transaction of its own; and the retry policy that decides, by the class
//! of each failure, whether a lane's batch is retried, isolated, given up or fatal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures::stream::FuturesOrdered;
use rand::Rng;
use tokio::sync::{oneshot, watch};

use super::condition::{Condition, Problem};
use crate::checkpoint::Move;
use crate::metrics::Metrics;
use crate::outcome::BatchReport;
use crate::projection::{Decoded, Projection, Record};
use crate::store::apply::{apply_batch, ApplyError, Batch, Handling};
use crate::store::fast::Applier;

/// How a lane's batch ended.
pub(super) enum Lane {
    Committed {
        report: BatchReport,
        seconds: f64,
    },
    /// Another instance moved a checkpoint: rolled back; re-read from the stored checkpoints.
    Fenced,
    /// The checkpoints carry another definition: rolled back; the projection stops.
    DefinitionChanged(String),
    /// Rolled back at shutdown after retries: read again by whoever owns the partitions next.
    GaveUp,
    /// Not applied: the lane's previous batch, which this one was built on, did not commit.
    Skipped,
    Fatal(String),
}

/// A lane's batch, applied by a task of its own. Batch *n+1* of a lane is decoded while batch
/// *n* is still in its transaction, then waits for it: a partition is always in the same lane,
/// so its batches commit in order.
pub(super) struct InFlight {
    pub lane: usize,
    /// The lane's generation when the batch was built (see [`Chain`]).
    pub generation: u64,
    pub moves: Vec<Move>,
    pub events: usize,
    /// The records' bytes (keys, values, headers): what the batch holds in memory.
    pub bytes: usize,
    pub outcome: Lane,
}

/// The lanes' batches in flight, oldest first.
pub(super) type Pending = FuturesOrdered<tokio::task::JoinHandle<InFlight>>;

/// How a lane's batch ended, for the next batch of the lane: committed, and the generation it
/// was built in.
pub(super) type Done = (bool, u64);

/// A lane's sequence of batches.
#[derive(Default)]
pub(super) struct Chain {
    /// How the lane's latest batch ends, awaited by the next.
    pub latest: Option<oneshot::Receiver<Done>>,
    /// Bumped when the lane's partitions are re-read from the stored checkpoints. A batch built on
    /// one that failed in the same generation is skipped; one built after the re-read is applied.
    pub generation: u64,
    /// The lane's batches dispatched and not yet settled.
    pub in_flight: usize,
}

/// How failures that retrying may fix are retried (`[retry]`).
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in a row after which the projection is reported `failed` (it keeps retrying).
    pub max_attempts: u32,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// Capped exponential backoff with full jitter: up to 100 ms × 2^attempt, at most
    /// `max_backoff`, at least half of that.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(16)).min(self.max_backoff);
        let millis = ceiling.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis.max(1)))
    }
}

/// One lane's part of a batch, with what it needs to run on a task of its own.
pub(super) struct LaneJob {
    pub projection: Arc<Projection>,
    pub applier: Applier,
    pub pool: Pool,
    pub shutdown: watch::Receiver<bool>,
    pub condition: Arc<Condition>,
    pub metrics: Metrics,
    pub retry: RetryPolicy,
    pub lane: usize,
    pub generation: u64,
    pub records: Vec<Record>,
    pub moves: Vec<Move>,
    /// How the lane's previous batch ends (`None`: there was none).
    pub previous: Option<oneshot::Receiver<Done>>,
    pub done: oneshot::Sender<Done>,
}

impl LaneJob {
    /// Decodes the records, waits for the lane's previous batch, then applies them.
    pub async fn run(self) -> InFlight {
        let LaneJob {
            projection,
            applier,
            pool,
            shutdown,
            condition,
            metrics,
            retry,
            lane,
            generation,
            records,
            moves,
            previous,
            done,
        } = self;
        // Decoded now, while the lane's previous batch may still be in its transaction; when a
        // schema cannot be had, the first attempt to apply fetches it again (and is retried).
        let decoded = match projection.ensure_schemas(&records).await {
            Ok(()) => Some(records.iter().map(|record| projection.decode(record)).collect()),
            Err(_) => None,
        };
        let built_on_failure = match previous {
            None => false,
            Some(previous) => match previous.await {
                Ok((committed, previous_generation)) => !committed && previous_generation == generation,
                Err(_) => true,
            },
        };
        let outcome = if built_on_failure {
            Lane::Skipped
        } else {
            let run = LaneRun {
                projection: &projection,
                applier: &applier,
                pool: &pool,
                shutdown: &shutdown,
                condition: &condition,
                metrics: &metrics,
                retry,
                lane,
            };
            let outcome = run.apply(&records, &moves, decoded).await;
            condition.clear(&Problem::Retries { lane });
            outcome
        };
        let _ = done.send((matches!(outcome, Lane::Committed { .. }), generation));
        let bytes = records.iter().map(crate::kafka::record_bytes).sum();
        InFlight { lane, generation, moves, events: records.len(), bytes, outcome }
    }
}

/// What applying a lane's records needs.
struct LaneRun<'a> {
    projection: &'a Projection,
    applier: &'a Applier,
    pool: &'a Pool,
    shutdown: &'a watch::Receiver<bool>,
    condition: &'a Condition,
    metrics: &'a Metrics,
    retry: RetryPolicy,
    lane: usize,
}

impl<'a> LaneRun<'a> {
    /// Applies one lane's records, retrying until it commits, is fenced, gives up at shutdown, or
    /// fails for good. `decoded` serves the first attempt. Only the class of a failure decides:
    /// poison (one event's data) isolates the events so that the one responsible is parked;
    /// transient (and poison that no event can be blamed for) is retried with backoff, the
    /// projection reported `failed` after `max_attempts` in a row; fatal stops.
    async fn apply(&self, records: &[Record], moves: &[Move], mut decoded: Option<Vec<Decoded<'a>>>) -> Lane {
        let projection = self.projection;
        let started = Instant::now();
        let mut isolate = false;
        let mut attempt: u32 = 0;
        loop {
            let result = match self.pool.get().await {
                Ok(mut client) => {
                    let batch = Batch { records, moves: moves.to_vec() };
                    apply_batch(&mut client, self.applier, projection, &batch, decoded.take(), isolate).await
                }
                Err(error) => Err(ApplyError::Pool(error)),
            };
            let error = match result {
                Ok(report) => {
                    if attempt > 0 {
                        self.metrics.set_retry_backoff(&projection.name, Duration::ZERO);
                    }
                    return Lane::Committed { report, seconds: started.elapsed().as_secs_f64() };
                }
                Err(error) => error,
            };
            match error.handling() {
                Handling::Isolate => {
                    match &error {
                        ApplyError::Mispredicted { why, .. } => {
                            tracing::debug!(projection = %projection.name, why, "fast path declined: retrying the batch event by event")
                        }
                        _ => tracing::info!(projection = %projection.name, error = %error,
                            "a statement failed on an event's data: retrying the batch event by event"),
                    }
                    isolate = true;
                }
                Handling::Reread => {
                    tracing::warn!(projection = %projection.name, %error,
                        "checkpoint moved by another instance: batch rolled back, re-reading from the stored checkpoint");
                    return Lane::Fenced;
                }
                Handling::StopProjection => return Lane::DefinitionChanged(error.to_string()),
                Handling::Fail => {
                    tracing::error!(projection = %projection.name, %error, "batch failed and cannot be retried");
                    return Lane::Fatal(error.to_string());
                }
                Handling::Retry => {
                    attempt += 1;
                    if *self.shutdown.borrow() && attempt > 3 {
                        tracing::warn!(projection = %projection.name, %error, "giving up the batch in flight at shutdown: it was rolled back and will be read again");
                        return Lane::GaveUp;
                    }
                    let wait = self.retry.backoff(attempt);
                    self.metrics.record_retry(&projection.name, wait);
                    tracing::warn!(projection = %projection.name, lane = self.lane, %error, class = error.class().as_str(), attempt, ?wait, "batch failed, retrying");
                    if attempt >= self.retry.max_attempts {
                        self.condition.set(
                            Problem::Retries { lane: self.lane },
                            format!("a batch failed {attempt} times in a row and is still being retried; last error: {error}"),
                        );
                    }
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = super::stopping(&mut shutdown) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool whose connections are refused: a batch that tries to apply fails transiently, and
    /// at shutdown gives up after a few attempts. A skipped batch never asks for a connection.
    fn refusing_pool() -> Pool {
        let config: tokio_postgres::Config = "postgres://postgres@127.0.0.1:1/none".parse().expect("config");
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
        );
        Pool::builder(manager).max_size(1).build().expect("pool")
    }

    fn projection() -> Arc<Projection> {
        let path = std::path::Path::new("projections/order_summary.toml");
        let text = std::fs::read_to_string(path).expect("example definition");
        Arc::new(crate::projection::compile::compile_file(path, &text).expect("compiles"))
    }

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy { max_attempts, max_backoff: Duration::from_millis(20) }
    }

    /// Runs a lane job after a previous batch that ended as `previous` (`None`: its task went
    /// away without a word), built in `generation`, with shutdown under way.
    async fn after(previous: Option<Done>, generation: u64, metrics: &Metrics) -> (InFlight, Done) {
        let (previous_tx, previous_rx) = oneshot::channel();
        if let Some(previous) = previous {
            previous_tx.send(previous).expect("send");
        } else {
            drop(previous_tx);
        }
        let (_stop, shutdown) = watch::channel(true);
        let (done, next) = oneshot::channel();
        let moves = vec![Move { partition: ("shop.orders".to_string(), 0), from: Some(10), to: 11 }];
        let job = LaneJob {
            projection: projection(),
            applier: Applier::default(),
            pool: refusing_pool(),
            shutdown,
            condition: Arc::new(Condition::new("order_summary", metrics.clone(), false)),
            metrics: metrics.clone(),
            retry: policy(3),
            lane: 0,
            generation,
            records: Vec::new(),
            moves,
            previous: Some(previous_rx),
            done,
        };
        let in_flight = job.run().await;
        (in_flight, next.await.expect("the job reports how it ended"))
    }

    #[tokio::test]
    async fn a_batch_built_on_one_that_did_not_commit_is_skipped() {
        let metrics = Metrics::new();
        let (in_flight, done) = after(Some((false, 3)), 3, &metrics).await;
        assert!(matches!(in_flight.outcome, Lane::Skipped));
        assert_eq!(done, (false, 3), "the next batch of the lane is skipped too");
        let (in_flight, _) = after(None, 0, &metrics).await;
        assert!(matches!(in_flight.outcome, Lane::Skipped), "a previous task that vanished counts as failed");
    }

    #[tokio::test]
    async fn a_batch_built_after_the_partitions_were_read_again_is_applied() {
        let metrics = Metrics::new();
        // The previous batch failed in generation 3; this one was built in generation 4, after the
        // lane's partitions were read again: it tries to apply (and gives up, as nothing answers).
        let (in_flight, done) = after(Some((false, 3)), 4, &metrics).await;
        assert!(matches!(in_flight.outcome, Lane::GaveUp));
        assert_eq!(done, (false, 4));
        // After a committed batch it applies, whatever the generation.
        let (in_flight, _) = after(Some((true, 4)), 4, &metrics).await;
        assert!(matches!(in_flight.outcome, Lane::GaveUp));
    }

    #[tokio::test]
    async fn retries_are_counted_and_fail_the_projection_after_max_attempts() {
        let metrics = Metrics::new();
        let condition = Arc::new(Condition::new("order_summary", metrics.clone(), false));
        condition.publish();
        let (stop, shutdown) = watch::channel(false);
        let (done, _next) = oneshot::channel();
        let job = LaneJob {
            projection: projection(),
            applier: Applier::default(),
            pool: refusing_pool(),
            shutdown,
            condition: condition.clone(),
            metrics: metrics.clone(),
            retry: policy(3),
            lane: 2,
            generation: 0,
            records: Vec::new(),
            moves: vec![Move { partition: ("shop.orders".to_string(), 0), from: Some(10), to: 11 }],
            previous: None,
            done,
        };
        let task = tokio::spawn(job.run());
        let retries = || metrics.batch_retries.with_label_values(&["order_summary"]).get();
        let deadline = Instant::now() + Duration::from_secs(10);
        while retries() < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(retries() >= 3, "retried {} times", retries());
        assert_eq!(metrics.current_state("order_summary"), Some("failed"), "failed after 3 attempts in a row");
        assert!(condition.has(&Problem::Retries { lane: 2 }));
        assert!(metrics.retry_backoff.with_label_values(&["order_summary"]).get() > 0.0);
        let _ = stop.send(true);
        let in_flight = task.await.expect("lane task");
        assert!(matches!(in_flight.outcome, Lane::GaveUp), "given up at shutdown");
        assert_eq!(metrics.current_state("order_summary"), Some("running"), "the lane's problem ends with its batch");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy { max_attempts: 10, max_backoff: Duration::from_secs(30) };
        assert!(policy.backoff(1) <= Duration::from_millis(200));
        assert!(policy.backoff(1) >= Duration::from_millis(100));
        for attempt in 0..40 {
            assert!(policy.backoff(attempt) <= Duration::from_secs(30));
        }
        assert!(policy.backoff(20) >= Duration::from_secs(15));
    }
}
