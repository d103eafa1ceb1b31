//! One projection's worker: gathers records into batches, applies each batch with its checkpoint
//! moves in one transaction (per lane), and answers the consumer's rebalance callbacks. Failures
//! are handled by their class (see [`lane`]); nothing is skipped: records the broker no longer
//! holds are counted and reported ([`lost`]), a consumer thread that dies is replaced, and a
//! checkpoint written by another definition stops the projection ([`gate`]).
//!
//! # Layout
//! - this file: the consumer protocol (records, assignments, revocations, positions), which
//!   records are taken ([`crate::checkpoint`] holds the rules), seeks and re-reads.
//! - [`batch`]: batches split into lanes by partition, dispatched, and settled in order.
//! - [`lane`]: a lane's batch on a task of its own; the retry policy, by [`crate::store::apply::Handling`].
//! - [`sweep`]: held events parked after their timeout, or released.
//! - [`condition`]: `running`, or `failed` while any problem is present, each named in the log.
//! - [`gate`]: the definition gate, before the consumer starts and after a change is seen.
//! - [`lost`]: partitions whose checkpoint the broker no longer holds (`kafka.on_data_loss`).
//! - [`prune`]: an event-id projection's processed ids deleted after `keep_event_ids`.

mod batch;
pub mod condition;
mod gate;
pub mod lane;
mod lost;
mod prune;
mod sweep;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::stream::StreamExt;
use tokio::sync::{mpsc, watch};

use self::condition::{Condition, Problem};
use self::lane::{Chain, Pending, RetryPolicy};
use crate::checkpoint::{is_of, Move, PartitionState, TopicPartition};
use crate::kafka::{Command, ConsumerThread, Input};
use crate::metrics::Metrics;
use crate::projection::{Projection, Record};
use crate::settings::{OnDataLoss, Settings};
use crate::store::checkpoint;
use crate::store::fast::Applier;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("projection `{projection}`: kafka: {source}")]
    Kafka {
        projection: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("projection `{projection}` stopped: {message}")]
    Fatal { projection: String, message: String },
}

/// How [`Worker::consume`] ended.
enum Ended {
    /// Shutdown was asked for.
    Shutdown,
    /// The consumer thread went away without being asked to.
    ConsumerGone,
    /// A checkpoint was written by another definition.
    DefinitionChanged(String),
}

/// How a worker runs beyond its projection and settings.
#[derive(Debug, Clone, Default)]
pub struct WorkerOptions {
    /// Apply nothing at or past these offsets (a rebuild "as of" given offsets).
    pub stop_offsets: Option<HashMap<TopicPartition, i64>>,
    /// Apply nothing from the first record stamped at or after this time (milliseconds since the
    /// epoch) on, per partition: a rebuild "as of" a point in time. The offset of that first
    /// record is put in `reached`.
    pub stop_at_time_ms: Option<i64>,
    pub reached: Option<Arc<std::sync::Mutex<HashMap<TopicPartition, i64>>>>,
    /// Report the state `rebuilding` instead of `running`.
    pub rebuilding: bool,
}

struct Worker {
    projection: Arc<Projection>,
    /// Settings and caches of applying batches, shared by the worker's lanes and sweeps.
    applier: Applier,
    pool: Pool,
    metrics: Metrics,
    condition: Arc<Condition>,
    retry: RetryPolicy,
    on_data_loss: OnDataLoss,
    max_events: usize,
    /// A batch is applied once its records hold this many bytes (`batch.max_bytes`).
    max_bytes: usize,
    /// Records gathered for a busy lane are sent on behind its commit after this long.
    max_wait: Duration,
    /// Parts a batch is split into by partition, applied concurrently (`batch.lanes`).
    lanes: usize,
    commit_offsets: bool,
    /// Held gaps older than this are parked (`None`: never).
    gap_timeout: Option<Duration>,
    partitions: HashMap<TopicPartition, PartitionState>,
    /// The latest seek epoch of each partition (kept across revocations, as the consumer thread
    /// keeps it): records polled before that seek carry an older epoch and are dropped.
    epochs: HashMap<TopicPartition, u64>,
    next_epoch: u64,
    /// Records at or past these offsets are not applied.
    stop_offsets: HashMap<TopicPartition, i64>,
    stop_at_time_ms: Option<i64>,
    reached: Arc<std::sync::Mutex<HashMap<TopicPartition, i64>>>,
    commands: std::sync::mpsc::Sender<Command>,
    shutdown: watch::Receiver<bool>,
    /// Partition number to (topic, lane): see [`Worker::deal_lanes`].
    lane_map: HashMap<i32, Vec<(String, usize)>>,
    /// One per lane.
    chains: Vec<Chain>,
    /// The bytes of the records in the batch being gathered, and of the batches in flight.
    batch_bytes: usize,
    in_flight_bytes: usize,
    /// Records found lost, counted once per partition and checkpoint (see [`lost`]).
    counted_lost: HashMap<(TopicPartition, i64), i64>,
    /// Set when a settled batch ends the consumption.
    ended: Option<Ended>,
    /// When a partition last could not be read although every checkpoint was in range.
    unexplained_at: Option<std::time::Instant>,
    /// Whether the owned partitions may have held events (gaps) to release: see
    /// [`Worker::release_ready`].
    may_hold: bool,
}

/// Runs one projection until `shutdown` turns true, then commits the batch in flight and leaves
/// the consumer group.
pub async fn run(
    projection: Arc<Projection>,
    pool: Pool,
    settings: &Settings,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    run_with(projection, pool, settings, metrics, shutdown, WorkerOptions::default()).await
}

/// [`run`], with options.
pub async fn run_with(
    projection: Arc<Projection>,
    pool: Pool,
    settings: &Settings,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
    options: WorkerOptions,
) -> Result<(), WorkerError> {
    let condition = Arc::new(Condition::new(&projection.name, metrics.clone(), options.rebuilding));
    let retry = RetryPolicy {
        max_attempts: settings.retry.max_attempts.max(1),
        max_backoff: Duration::from_millis(settings.retry.max_backoff_ms.max(1)),
    };
    let applier = Applier::new(settings.batch.set_based);
    // Processed ids are pruned beside the consumer, for as long as the worker runs (a `JoinSet`
    // aborts its tasks when dropped).
    let mut pruning = tokio::task::JoinSet::new();
    if let Some(keep) = projection.keep_event_ids {
        pruning.spawn(prune::prune_event_ids(
            projection.clone(),
            keep,
            pool.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    let mut restarts = 0;
    loop {
        // A fault the tests inject (feature `failpoints`): the worker ends as if its work were done.
        #[cfg(feature = "failpoints")]
        if fail::eval(&format!("worker-{}", projection.name), |_| ()).is_some() {
            return Ok(());
        }
        if !gate::wait_for_matching_definition(&projection, &pool, &condition, shutdown.clone()).await {
            return Ok(());
        }
        // The channel holds a bounded number of chunks, each of at most `kafka::CHUNK` records and
        // `kafka::CHUNK_BYTES` (or one larger record): about two batches, by count (or the share
        // of that `Settings::sharing` gives) and by bytes.
        let handover = settings.batch.handover.unwrap_or(settings.batch.max_events.saturating_mul(2));
        let by_count = handover.max(crate::kafka::CHUNK).div_ceil(crate::kafka::CHUNK);
        let by_bytes = (settings.batch.max_bytes.max(1) * 2).div_ceil(crate::kafka::CHUNK_BYTES);
        let (inputs_tx, mut inputs) = mpsc::channel(by_count.min(by_bytes).max(2));
        let consumer = ConsumerThread::start(
            &settings.kafka,
            settings.batch.max_events,
            settings.batch.max_bytes.max(1),
            &projection.name,
            &projection.topics,
            inputs_tx,
        )
        .map_err(|source| WorkerError::Kafka { projection: projection.name.clone(), source })?;
        condition.publish();
        let lanes = settings.lanes(1);
        let mut worker = Worker {
            projection: projection.clone(),
            applier: applier.clone(),
            pool: pool.clone(),
            metrics: metrics.clone(),
            condition: condition.clone(),
            retry,
            on_data_loss: settings.kafka.on_data_loss,
            max_events: settings.batch.max_events,
            max_bytes: settings.batch.max_bytes.max(1),
            max_wait: Duration::from_millis(settings.batch.max_wait_ms),
            lanes,
            commit_offsets: settings.kafka.commit_offsets,
            gap_timeout: (settings.parking.gap_timeout_secs > 0)
                .then(|| Duration::from_secs(settings.parking.gap_timeout_secs)),
            partitions: HashMap::new(),
            epochs: HashMap::new(),
            next_epoch: 1,
            stop_offsets: options.stop_offsets.clone().unwrap_or_default(),
            stop_at_time_ms: options.stop_at_time_ms,
            reached: options.reached.clone().unwrap_or_default(),
            commands: consumer.commands.clone(),
            shutdown: shutdown.clone(),
            lane_map: HashMap::new(),
            chains: (0..lanes).map(|_| Chain::default()).collect(),
            batch_bytes: 0,
            in_flight_bytes: 0,
            counted_lost: HashMap::new(),
            ended: None,
            unexplained_at: None,
            may_hold: matches!(projection.dedupe, crate::projection::Dedupe::Version(_)),
        };
        let mut pending = Pending::new();
        let result = worker.consume(&mut inputs, &mut pending).await;
        // Batches still in flight after a failure end (commit or roll back) before the group is left.
        while pending.next().await.is_some() {}

        // Leave the group: keep answering the consumer thread until it has closed.
        consumer.stop();
        while let Some(input) = inputs.recv().await {
            if let Input::Revoked { reply, .. } = input {
                let _ = reply.send(());
            }
        }
        let died = tokio::task::spawn_blocking(move || consumer.join()).await.ok().flatten();
        match result {
            Err(error) => {
                metrics.set_state(&projection.name, "failed");
                return Err(error);
            }
            Ok(Ended::Shutdown) => return Ok(()),
            Ok(Ended::DefinitionChanged(message)) => {
                condition.set(Problem::Definition, format!("{message}: stopped; waiting for the definition to match"));
            }
            Ok(Ended::ConsumerGone) => {
                restarts += 1;
                metrics.record_consumer_restart(&projection.name);
                let why = died.unwrap_or_else(|| "it ended without a word".to_string());
                condition
                    .set(Problem::Consumer, format!("the Kafka consumer thread ended ({why}); starting a new one"));
                let wait = retry.backoff(restarts.min(8));
                let mut stopping_rx = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stopping(&mut stopping_rx) => return Ok(()),
                }
            }
        }
    }
}

impl Worker {
    async fn consume(
        &mut self,
        inputs: &mut mpsc::Receiver<Input>,
        pending: &mut Pending,
    ) -> Result<Ended, WorkerError> {
        let mut batch: Vec<Record> = Vec::with_capacity(self.max_events);
        let mut deadline = tokio::time::Instant::now();
        let mut shutdown = self.shutdown.clone();
        // Held gaps are checked for their timeout twice per timeout, at most every 10 s.
        let sweep_every = self.gap_timeout.map_or(Duration::from_secs(3600), |timeout| {
            (timeout / 2).clamp(Duration::from_millis(200), Duration::from_secs(10))
        });
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Partitions held for lost records are looked at again every few seconds.
        let mut recheck = tokio::time::interval(Duration::from_secs(2));
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Held events whose predecessor another lane or instance applied are released within a
        // second or so.
        let mut release = tokio::time::interval(Duration::from_secs(1));
        release.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            if let Some(ended) = self.ended.take() {
                break ended;
            }
            tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => break Ended::Shutdown,
                Some(done) = pending.next(), if !pending.is_empty() => {
                    self.settle(done, &mut batch).await?;
                    // Natural batching: what arrived for a lane while it was busy goes at once.
                    self.flush_free(&mut batch, pending);
                }
                _ = sweep.tick(), if self.gap_timeout.is_some() => {
                    self.flush(&mut batch, pending).await?;
                    self.drain(&mut batch, pending).await?;
                    self.park_expired_gaps().await?;
                }
                _ = recheck.tick(), if self.partitions.values().any(|state| state.lost.is_some()) => {
                    self.recheck_lost().await?;
                }
                _ = release.tick(), if self.may_hold => {
                    self.flush(&mut batch, pending).await?;
                    self.drain(&mut batch, pending).await?;
                    self.release_ready().await?;
                }
                _ = tokio::time::sleep_until(deadline), if !batch.is_empty() => {
                    self.flush(&mut batch, pending).await?;
                }
                input = inputs.recv() => match input {
                    None => {
                        let ended = if *self.shutdown.borrow() { Ended::Shutdown } else { Ended::ConsumerGone };
                        break ended;
                    }
                    Some(Input::Records(records)) => {
                        for (record, epoch) in records {
                            if self.accepts(&record, epoch) {
                                if batch.is_empty() {
                                    deadline = tokio::time::Instant::now() + self.max_wait;
                                }
                                self.batch_bytes += crate::kafka::record_bytes(&record);
                                batch.push(record);
                                if batch.len() >= self.max_events || self.batch_bytes >= self.max_bytes {
                                    self.flush(&mut batch, pending).await?;
                                }
                            }
                        }
                        // A chunk ends where the consumer had nothing more fetched: the records of
                        // free lanes are applied now rather than after `max_wait`.
                        self.flush_free(&mut batch, pending);
                    }
                    Some(Input::Assigned { partitions, reply }) => {
                        self.flush(&mut batch, pending).await?;
                        self.drain(&mut batch, pending).await?;
                        let Some(stored) = self.load_checkpoints(&partitions).await else {
                            break Ended::Shutdown;
                        };
                        for partition in partitions {
                            let checkpoint = stored.get(&partition).copied();
                            self.metrics.set_checkpoint(&self.projection.name, &partition, checkpoint.unwrap_or(0));
                            self.partitions.insert(partition, PartitionState { checkpoint, ..PartitionState::default() });
                        }
                        self.deal_lanes();
                        self.condition.clear(&Problem::Consumer);
                        let _ = reply.send(stored);
                    }
                    Some(Input::Revoked { partitions, reply }) => {
                        self.flush(&mut batch, pending).await?;
                        self.drain(&mut batch, pending).await?;
                        for partition in &partitions {
                            self.partitions.remove(partition);
                            self.condition.clear(&Problem::DataLoss(partition.clone()));
                        }
                        self.deal_lanes();
                        let _ = reply.send(());
                    }
                    Some(Input::OutOfRange { watermarks }) => {
                        self.flush(&mut batch, pending).await?;
                        self.drain(&mut batch, pending).await?;
                        self.out_of_range(&watermarks).await?;
                    }
                    Some(Input::Positions(positions)) => {
                        if self.positions(positions) && batch.is_empty() {
                            self.flush(&mut batch, pending).await?;
                        }
                    }
                },
            }
        };
        self.flush(&mut batch, pending).await?;
        self.drain(&mut batch, pending).await?;
        Ok(self.ended.take().unwrap_or(ended))
    }

    /// Drops records of partitions we do not own, polled before a seek, already checkpointed, or
    /// at or past where a rebuild "as of" stops.
    fn accepts(&self, record: &Record, epoch: u64) -> bool {
        // Once per record: the maps (a few partitions each) are scanned, not hashed with a copy
        // of the topic.
        let same = |known: &TopicPartition| is_of(&record.topic, record.partition, known);
        let Some(state) = self.partitions.iter().find(|(known, _)| same(known)).map(|(_, state)| state) else {
            return false;
        };
        let stop = self.stop_offsets.iter().find(|(known, _)| same(known)).map(|(_, stop)| *stop);
        if !state.accepts(record.offset, stop) {
            return false;
        }
        if let Some(stop) = self.stop_at_time_ms {
            let partition = (record.topic.to_string(), record.partition);
            let mut reached = self.reached.lock().expect("reached offsets");
            if reached.get(&partition).is_some_and(|first| record.offset >= *first) {
                return false;
            }
            if record.timestamp_ms.is_none_or(|timestamp| timestamp >= stop) {
                reached.insert(partition, record.offset);
                return false;
            }
        }
        epoch == self.epochs.iter().find(|(known, _)| same(known)).map_or(0, |(_, epoch)| *epoch)
    }

    /// Takes the consumer's positions: a partition whose consumer stands past its checkpoint with
    /// no record left to deliver (transaction markers, aborted records) moves there with the next
    /// batch. Returns whether any will move.
    fn positions(&mut self, positions: Vec<(TopicPartition, i64, u64)>) -> bool {
        let mut any = false;
        for (partition, position, epoch) in positions {
            if self.epochs.get(&partition).copied().unwrap_or(0) != epoch {
                continue;
            }
            let mut stop = self.stop_offsets.get(&partition).copied();
            if self.stop_at_time_ms.is_some() {
                if let Some(reached) = self.reached.lock().expect("reached offsets").get(&partition) {
                    stop = Some(stop.map_or(*reached, |stop| stop.min(*reached)));
                }
            }
            let Some(state) = self.partitions.get_mut(&partition) else { continue };
            any |= state.advance_to(position, stop);
        }
        any
    }

    /// The stored checkpoints of `partitions`, retried until they are read; `None` when shutdown
    /// came first.
    async fn load_checkpoints(&self, partitions: &[TopicPartition]) -> Option<HashMap<TopicPartition, i64>> {
        let mut attempt = 0;
        loop {
            let result = async {
                let client = crate::store::client(&self.pool).await?;
                checkpoint::load(&**client, &self.projection.name, partitions).await
            }
            .await;
            match result {
                Ok(stored) => return Some(stored),
                Err(error) => {
                    attempt += 1;
                    tracing::warn!(projection = %self.projection.name, %error, attempt, "cannot load checkpoints, retrying");
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(self.retry.backoff(attempt)) => {}
                        _ = stopping(&mut shutdown) => return None,
                    }
                }
            }
        }
    }

    /// After a fenced batch: take the stored checkpoints as the truth and re-read from them.
    async fn resync(&mut self, moves: &[Move]) {
        let partitions: Vec<TopicPartition> = moves.iter().map(|known| known.partition.clone()).collect();
        let Some(stored) = self.load_checkpoints(&partitions).await else {
            return;
        };
        for partition in partitions {
            let checkpoint = stored.get(&partition).copied();
            if let Some(state) = self.partitions.get_mut(&partition) {
                state.checkpoint = checkpoint;
                state.advance = None;
            }
            self.seek(partition, checkpoint);
        }
    }

    /// Re-reads `partition` from `offset` (`None`: where `start_from` says): records polled before
    /// carry an older epoch and are dropped.
    fn seek(&mut self, partition: TopicPartition, offset: Option<i64>) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.epochs.insert(partition.clone(), epoch);
        let _ = self.commands.send(Command::Seek { partition, offset, epoch });
    }
}

/// Completes once shutdown is asked for (or nobody can ask any more). The receiver's guard is
/// not held past it, so that it can be awaited in `select!` branches of `Send` futures.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}
