//! One projection's worker: gathers records into batches, applies each batch with its checkpoint
//! moves in one transaction, and answers the consumer's rebalance callbacks. Transient failures
//! are retried with capped, jittered backoff; nothing is skipped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures::stream::{FuturesOrdered, StreamExt};
use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch};

use crate::kafka::{Command, ConsumerThread, Input};
use crate::metrics::Metrics;
use crate::projection::{Projection, Record};
use crate::settings::Settings;
use crate::store::apply::{apply_batch, park_expired_gaps, ApplyError, Batch, BatchReport, ErrorClass};
use crate::store::checkpoint::{self, TopicPartition};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("projection `{projection}`: kafka: {message}")]
    Kafka { projection: String, message: String },
    #[error("projection `{projection}` stopped: {message}")]
    Fatal { projection: String, message: String },
}

/// A checkpoint move: the partition, its stored checkpoint (the compare-and-set's expected value),
/// and the next offset after the batch.
type Move = (TopicPartition, Option<i64>, i64);

/// How one lane of a batch ended.
enum Lane {
    Committed {
        report: BatchReport,
        seconds: f64,
    },
    /// Another instance moved a checkpoint: rolled back; re-read from the stored checkpoints.
    Fenced,
    /// Rolled back at shutdown after retries: read again by whoever owns the partitions next.
    GaveUp,
    /// Not applied: the lane's previous batch, which this one was built on, did not commit.
    Skipped,
    Fatal(String),
}

/// A lane's batch, applied by a task of its own. Batch *n+1* of a lane is decoded while batch
/// *n* is still in its transaction, then waits for it: a partition is always in the same lane,
/// so its batches commit in order.
struct InFlight {
    lane: usize,
    /// The lane's generation when the batch was built (see [`Chain`]).
    generation: u64,
    moves: Vec<Move>,
    events: usize,
    outcome: Lane,
}

/// The lanes' batches in flight, oldest first.
type Pending = FuturesOrdered<tokio::task::JoinHandle<InFlight>>;

/// How a lane's batch ended, for the next batch of the lane: committed, and the generation it
/// was built in.
type Done = (bool, u64);

/// Where a partition stands, as this worker knows it.
struct PartitionState {
    /// The stored checkpoint (`None`: never checkpointed): the compare-and-set's expected value.
    checkpoint: Option<i64>,
}

struct Worker {
    projection: Arc<Projection>,
    pool: Pool,
    metrics: Metrics,
    max_events: usize,
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
}

/// A lane's sequence of batches.
#[derive(Default)]
struct Chain {
    /// How the lane's latest batch ends, awaited by the next.
    latest: Option<oneshot::Receiver<Done>>,
    /// Bumped when the lane's partitions are re-read from the stored checkpoints. A batch built on
    /// one that failed in the same generation is skipped; one built after the re-read is applied.
    generation: u64,
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
    if !wait_for_matching_definition(&projection, &pool, &metrics, shutdown.clone()).await {
        return Ok(());
    }
    // Records come in chunks of up to 256: this bounds what is read ahead to about twice a batch.
    let (inputs_tx, mut inputs) = mpsc::channel((settings.batch.max_events.max(256) * 2).div_ceil(256));
    let consumer = ConsumerThread::start(&settings.kafka, &projection.name, &projection.topics, inputs_tx)
        .map_err(|error| WorkerError::Kafka { projection: projection.name.clone(), message: error.to_string() })?;
    metrics.set_state(&projection.name, if options.rebuilding { "rebuilding" } else { "running" });
    let lanes = settings.batch.lanes.clamp(1, settings.database.pool_size.max(1));
    let mut worker = Worker {
        projection: projection.clone(),
        pool,
        metrics: metrics.clone(),
        max_events: settings.batch.max_events,
        max_wait: Duration::from_millis(settings.batch.max_wait_ms),
        lanes,
        commit_offsets: settings.kafka.commit_offsets,
        gap_timeout: (settings.parking.gap_timeout_secs > 0)
            .then(|| Duration::from_secs(settings.parking.gap_timeout_secs)),
        partitions: HashMap::new(),
        epochs: HashMap::new(),
        next_epoch: 1,
        stop_offsets: options.stop_offsets.unwrap_or_default(),
        stop_at_time_ms: options.stop_at_time_ms,
        reached: options.reached.unwrap_or_default(),
        commands: consumer.commands.clone(),
        shutdown,
        lane_map: HashMap::new(),
        chains: (0..lanes).map(|_| Chain::default()).collect(),
    };
    let mut pending = Pending::new();
    let result = worker.consume(&mut inputs, &mut pending).await;
    // Batches still in flight after a failure end (commit or roll back) before the group is left.
    while pending.next().await.is_some() {}

    // Leave the group: keep answering the consumer thread until it has closed.
    consumer.stop();
    while let Some(input) = inputs.recv().await {
        match input {
            Input::Revoked { reply, .. } => {
                let _ = reply.send(());
            }
            Input::Assigned { .. } | Input::Records(..) => {}
        }
    }
    tokio::task::spawn_blocking(move || consumer.join()).await.ok();
    if result.is_err() {
        metrics.set_state(&projection.name, "failed");
    }
    result
}

impl Worker {
    async fn consume(&mut self, inputs: &mut mpsc::Receiver<Input>, pending: &mut Pending) -> Result<(), WorkerError> {
        let mut batch: Vec<Record> = Vec::with_capacity(self.max_events);
        let mut deadline = tokio::time::Instant::now();
        let mut shutdown = self.shutdown.clone();
        // Held gaps are checked for their timeout twice per timeout, at most every 10 s.
        let sweep_every = self.gap_timeout.map_or(Duration::from_secs(3600), |timeout| {
            (timeout / 2).clamp(Duration::from_millis(200), Duration::from_secs(10))
        });
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                Some(done) = pending.next(), if !pending.is_empty() => {
                    self.settle(done, &mut batch).await?;
                }
                _ = sweep.tick(), if self.gap_timeout.is_some() => {
                    self.flush(&mut batch, pending).await?;
                    self.drain(&mut batch, pending).await?;
                    self.park_expired_gaps().await?;
                }
                _ = tokio::time::sleep_until(deadline), if !batch.is_empty() => {
                    self.flush(&mut batch, pending).await?;
                }
                input = inputs.recv() => match input {
                    None => break,
                    Some(Input::Records(records)) => {
                        for (record, epoch) in records {
                            if self.accepts(&record, epoch) {
                                if batch.is_empty() {
                                    deadline = tokio::time::Instant::now() + self.max_wait;
                                }
                                batch.push(record);
                                if batch.len() >= self.max_events {
                                    self.flush(&mut batch, pending).await?;
                                }
                            }
                        }
                    }
                    Some(Input::Assigned { partitions, reply }) => {
                        self.flush(&mut batch, pending).await?;
                        self.drain(&mut batch, pending).await?;
                        let stored = self.load_checkpoints(&partitions).await?;
                        for partition in partitions {
                            let checkpoint = stored.get(&partition).copied();
                            self.metrics.checkpoint.with_label_values(&[&self.projection.name, &partition.0, &partition.1.to_string()])
                                .set(checkpoint.unwrap_or(0));
                            self.partitions.insert(partition, PartitionState { checkpoint });
                        }
                        self.deal_lanes();
                        let _ = reply.send(stored);
                    }
                    Some(Input::Revoked { partitions, reply }) => {
                        self.flush(&mut batch, pending).await?;
                        self.drain(&mut batch, pending).await?;
                        for partition in &partitions {
                            self.partitions.remove(partition);
                        }
                        self.deal_lanes();
                        let _ = reply.send(());
                    }
                },
            }
        }
        self.flush(&mut batch, pending).await?;
        self.drain(&mut batch, pending).await
    }

    /// Drops records of partitions we do not own, polled before a seek, or already checkpointed.
    fn accepts(&self, record: &Record, epoch: u64) -> bool {
        // Once per record: the maps (a few partitions each) are scanned, not hashed with a copy
        // of the topic.
        let same = |known: &TopicPartition| is_of(record, known);
        let Some(state) = self.partitions.iter().find(|(known, _)| same(known)).map(|(_, state)| state) else {
            return false;
        };
        if self.stop_offsets.iter().find(|(known, _)| same(known)).is_some_and(|(_, stop)| record.offset >= *stop) {
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
            && state.checkpoint.is_none_or(|next| record.offset >= next)
    }

    async fn load_checkpoints(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, WorkerError> {
        let mut attempt = 0;
        loop {
            let result = async {
                let client = self.pool.get().await.map_err(|error| StoreError::Connect(error.to_string()))?;
                checkpoint::load(&**client, &self.projection.name, partitions).await
            }
            .await;
            match result {
                Ok(stored) => return Ok(stored),
                Err(error) => {
                    attempt += 1;
                    tracing::warn!(projection = %self.projection.name, %error, attempt, "cannot load checkpoints, retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
    }

    /// Starts applying `batch` (then empties it). The batch is split by partition into up to
    /// `lanes` parts, each applied by a task of its own, in a transaction of its own on a
    /// connection of its own: a key's events are all in one partition, so in one lane, in order.
    /// Each lane's part waits for the lane's previous batch to commit; at most two batches are in
    /// flight. The checkpoints this worker expects are moved at once; a lane that does not commit
    /// has its partitions re-read from the stored checkpoints when it is settled.
    async fn flush(&mut self, batch: &mut Vec<Record>, pending: &mut Pending) -> Result<(), WorkerError> {
        // Settling may re-read partitions: their records in `batch` are then dropped.
        while pending.len() >= 2 * self.lanes {
            let Some(done) = pending.next().await else { break };
            self.settle(done, batch).await?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mut lanes: Vec<Vec<Record>> = (0..self.lanes).map(|_| Vec::new()).collect();
        for record in batch.drain(..) {
            let lane = self.lane_of(&record.topic, record.partition);
            lanes[lane].push(record);
        }
        for (lane, records) in lanes.into_iter().enumerate() {
            if records.is_empty() {
                continue;
            }
            let moves = self.moves_of(&records);
            for (partition, _, to) in &moves {
                if let Some(state) = self.partitions.get_mut(partition) {
                    state.checkpoint = Some(*to);
                }
            }
            let (done, next) = oneshot::channel();
            let job = LaneJob {
                projection: self.projection.clone(),
                pool: self.pool.clone(),
                shutdown: self.shutdown.clone(),
                lane,
                generation: self.chains[lane].generation,
                records,
                moves,
                previous: self.chains[lane].latest.replace(next),
                done,
            };
            pending.push_back(tokio::spawn(job.run()));
        }
        Ok(())
    }

    /// Waits for every batch in flight and settles it.
    async fn drain(&mut self, batch: &mut Vec<Record>, pending: &mut Pending) -> Result<(), WorkerError> {
        while let Some(done) = pending.next().await {
            self.settle(done, batch).await?;
        }
        Ok(())
    }

    /// Records how a lane's batch ended: metrics and the advisory Kafka commit when it committed;
    /// when it did not, its partitions are re-read from the stored checkpoints (once per failure:
    /// batches built on the failed one are skipped and need nothing more).
    async fn settle(
        &mut self,
        done: Result<InFlight, tokio::task::JoinError>,
        batch: &mut Vec<Record>,
    ) -> Result<(), WorkerError> {
        let done = done.map_err(|error| WorkerError::Fatal {
            projection: self.projection.name.clone(),
            message: format!("a batch task failed: {error}"),
        })?;
        match done.outcome {
            Lane::Committed { report, seconds } => self.committed(&done.moves, &report, done.events, seconds),
            Lane::Fenced | Lane::Skipped => {
                if done.generation == self.chains[done.lane].generation && !*self.shutdown.borrow() {
                    self.chains[done.lane].generation += 1;
                    batch.retain(|record| !done.moves.iter().any(|(partition, _, _)| is_of(record, partition)));
                    self.resync(&done.moves).await?;
                }
            }
            Lane::GaveUp => {}
            Lane::Fatal(message) => {
                return Err(WorkerError::Fatal { projection: self.projection.name.clone(), message })
            }
        }
        Ok(())
    }

    /// The lane of a partition: the same one until the assignment changes (with nothing in
    /// flight).
    fn lane_of(&self, topic: &str, partition: i32) -> usize {
        self.lane_map
            .get(&partition)
            .and_then(|topics| topics.iter().find(|(name, _)| name == topic))
            .map_or(0, |(_, lane)| *lane)
    }

    /// Deals the owned partitions out to the lanes in turn, so that lanes get equal shares.
    fn deal_lanes(&mut self) {
        let mut owned: Vec<&TopicPartition> = self.partitions.keys().collect();
        owned.sort();
        self.lane_map.clear();
        for (index, (topic, partition)) in owned.into_iter().enumerate() {
            self.lane_map.entry(*partition).or_default().push((topic.clone(), index % self.lanes));
        }
    }

    /// Where each partition of `records` moves: from its expected checkpoint to past its last record.
    fn moves_of(&self, records: &[Record]) -> Vec<Move> {
        // A lane holds a few partitions: found by a scan, the topic copied once per partition.
        let mut moves: Vec<Move> = Vec::new();
        for record in records {
            let found = moves.iter_mut().find(|(partition, _, _)| is_of(record, partition));
            match found {
                Some((_, _, to)) => *to = (*to).max(record.offset + 1),
                None => {
                    let partition = (record.topic.to_string(), record.partition);
                    let from = self.partitions.get(&partition).and_then(|state| state.checkpoint);
                    moves.push((partition, from, record.offset + 1));
                }
            }
        }
        moves.sort_by(|a, b| a.0.cmp(&b.0));
        moves
    }

    /// Records a committed lane: checkpoint gauges, metrics, and the advisory Kafka commit. (The
    /// expected checkpoints moved when the batch started.)
    fn committed(&mut self, moves: &[Move], report: &BatchReport, events: usize, seconds: f64) {
        let mut committed = Vec::with_capacity(moves.len());
        for (partition, _, to) in moves {
            self.metrics
                .checkpoint
                .with_label_values(&[&self.projection.name, &partition.0, &partition.1.to_string()])
                .set(*to);
            committed.push((partition.clone(), *to));
        }
        self.metrics.record_batch(&self.projection.name, report, events, seconds);
        tracing::debug!(projection = %self.projection.name, events, ?report, "batch committed");
        if self.commit_offsets {
            let _ = self.commands.send(Command::Commit(committed));
        }
    }

    /// Parks the held gaps of our partitions that waited past `parking.gap_timeout_secs`.
    async fn park_expired_gaps(&mut self) -> Result<(), WorkerError> {
        let Some(timeout) = self.gap_timeout else {
            return Ok(());
        };
        let owned: Vec<(TopicPartition, i64)> = self
            .partitions
            .iter()
            .filter_map(|(partition, state)| state.checkpoint.map(|checkpoint| (partition.clone(), checkpoint)))
            .collect();
        if owned.is_empty() {
            return Ok(());
        }
        let result = match self.pool.get().await {
            Ok(mut client) => park_expired_gaps(&mut client, &self.projection, &owned, timeout.as_secs()).await,
            Err(error) => Err(ApplyError::Pool(error.to_string())),
        };
        match result {
            Ok(0) => {}
            Ok(parked) => {
                tracing::warn!(projection = %self.projection.name, parked, "held events parked: their predecessors did not arrive in time");
                self.metrics.gap_timeouts.with_label_values(&[&self.projection.name]).inc_by(parked);
            }
            Err(ApplyError::Fenced { partition }) => {
                tracing::warn!(projection = %self.projection.name, topic = %partition.0, partition = partition.1,
                    "checkpoint moved by another instance: re-reading from the stored checkpoint");
                let moves: Vec<(TopicPartition, Option<i64>, i64)> = owned
                    .into_iter()
                    .map(|(partition, checkpoint)| (partition, Some(checkpoint), checkpoint))
                    .collect();
                self.resync(&moves).await?;
            }
            Err(error) if error.class() == ErrorClass::Fatal => {
                return Err(WorkerError::Fatal { projection: self.projection.name.clone(), message: error.to_string() })
            }
            Err(error) => {
                tracing::warn!(projection = %self.projection.name, %error, "cannot check held events for their timeout; trying again later")
            }
        }
        Ok(())
    }

    /// After a fenced batch: take the stored checkpoints as the truth and re-read from them.
    async fn resync(&mut self, moves: &[(TopicPartition, Option<i64>, i64)]) -> Result<(), WorkerError> {
        let partitions: Vec<TopicPartition> = moves.iter().map(|(partition, _, _)| partition.clone()).collect();
        let stored = self.load_checkpoints(&partitions).await?;
        for partition in partitions {
            let epoch = self.next_epoch;
            self.next_epoch += 1;
            let checkpoint = stored.get(&partition).copied();
            if let Some(state) = self.partitions.get_mut(&partition) {
                state.checkpoint = checkpoint;
            }
            self.epochs.insert(partition.clone(), epoch);
            let _ = self.commands.send(Command::Seek { partition, offset: checkpoint, epoch });
        }
        Ok(())
    }
}

/// Whether `record` is of `partition`, compared without copying its topic.
fn is_of(record: &Record, (topic, partition): &TopicPartition) -> bool {
    *partition == record.partition && **topic == *record.topic
}

/// One lane's part of a batch, with what it needs to run on a task of its own.
struct LaneJob {
    projection: Arc<Projection>,
    pool: Pool,
    shutdown: watch::Receiver<bool>,
    lane: usize,
    generation: u64,
    records: Vec<Record>,
    moves: Vec<Move>,
    /// How the lane's previous batch ends (`None`: there was none).
    previous: Option<oneshot::Receiver<Done>>,
    done: oneshot::Sender<Done>,
}

impl LaneJob {
    /// Decodes the records, waits for the lane's previous batch, then applies them.
    async fn run(self) -> InFlight {
        let LaneJob { projection, pool, shutdown, lane, generation, records, moves, previous, done } = self;
        let decoded: Vec<_> = records.iter().map(|record| projection.decode(record)).collect();
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
            apply_lane(&projection, &pool, &shutdown, &records, &moves, decoded).await
        };
        let _ = done.send((matches!(outcome, Lane::Committed { .. }), generation));
        InFlight { lane, generation, moves, events: records.len(), outcome }
    }
}

/// Applies one lane's records, retrying until it commits, is fenced, gives up at shutdown, or
/// fails for good. `decoded` serves the first attempt.
async fn apply_lane<'p>(
    projection: &'p Projection,
    pool: &Pool,
    shutdown: &watch::Receiver<bool>,
    records: &[Record],
    moves: &[Move],
    decoded: Vec<crate::projection::Decoded<'p>>,
) -> Lane {
    let started = Instant::now();
    let mut decoded = Some(decoded);
    let mut isolate = false;
    let mut attempt = 0;
    loop {
        let result = match pool.get().await {
            Ok(mut client) => {
                let batch = Batch { records, moves: moves.to_vec() };
                apply_batch(&mut client, projection, &batch, decoded.take(), isolate).await
            }
            Err(error) => Err(ApplyError::Pool(error.to_string())),
        };
        let error = match result {
            Ok(report) => return Lane::Committed { report, seconds: started.elapsed().as_secs_f64() },
            Err(error) => error,
        };
        match error {
            ApplyError::Mispredicted(message) => {
                tracing::debug!(projection = %projection.name, %message, "fast path declined: retrying the batch event by event");
                isolate = true;
            }
            ApplyError::Isolate(message) => {
                tracing::info!(projection = %projection.name, %message,
                    "a statement failed on an event's data: retrying the batch event by event");
                isolate = true;
            }
            ApplyError::Fenced { partition } => {
                tracing::warn!(projection = %projection.name, topic = %partition.0, partition = partition.1,
                    "checkpoint moved by another instance: batch rolled back, re-reading from the stored checkpoint");
                return Lane::Fenced;
            }
            ApplyError::DefinitionChanged { .. } => {
                tracing::error!(projection = %projection.name, %error, "batch rolled back");
                return Lane::Fatal(error.to_string());
            }
            error if error.class() == ErrorClass::Fatal => {
                tracing::error!(projection = %projection.name, %error, "batch failed and cannot be retried");
                return Lane::Fatal(error.to_string());
            }
            error => {
                attempt += 1;
                let stopping = *shutdown.borrow();
                if stopping && attempt > 3 {
                    tracing::warn!(projection = %projection.name, %error, "giving up the batch in flight at shutdown: it was rolled back and will be read again");
                    return Lane::GaveUp;
                }
                let wait = backoff(attempt);
                tracing::warn!(projection = %projection.name, %error, class = error.class().as_str(), attempt, ?wait, "batch failed, retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Waits until the checkpoints of `projection` were written by its current definition (or it has
/// none yet). A changed definition is never applied to rows built by the old one: the operator
/// rebuilds (`projector rebuild`) or accepts the change (`projector accept`), and the worker starts
/// by itself. Returns false when shutdown came first.
async fn wait_for_matching_definition(
    projection: &Projection,
    pool: &Pool,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> bool {
    let mut warned = false;
    loop {
        let hashes = match pool.get().await {
            Ok(client) => checkpoint::definition_hashes(&**client, &projection.name).await,
            Err(error) => Err(StoreError::Connect(error.to_string())),
        };
        match hashes {
            Ok(hashes) if hashes.iter().all(|hash| *hash == projection.hash) => {
                if warned {
                    tracing::info!(projection = %projection.name, "definition change resolved: starting");
                }
                return true;
            }
            Ok(hashes) => {
                if !warned {
                    tracing::error!(
                        projection = %projection.name,
                        file = %projection.file.display(),
                        built_by = %hashes.join(","),
                        current = %projection.hash,
                        "projection `{}` changed since its read model was built: its new statements are not applied \
                         to rows built by the old ones. Rebuild it (`projector rebuild {0}`, or `--shadow` to keep \
                         serving reads), or keep the rows and apply the new definition from here on \
                         (`projector accept {0}`). Waiting.",
                        projection.name
                    );
                    metrics.set_state(&projection.name, "failed");
                    warned = true;
                }
            }
            Err(error) => tracing::warn!(projection = %projection.name, %error, "cannot read checkpoints, retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => return false,
        }
        if *shutdown.borrow() {
            return false;
        }
    }
}

/// Capped exponential backoff with full jitter: up to 100 ms × 2^attempt, at most 30 s.
pub fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_secs(30);
    let ceiling = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(16)).min(cap);
    let millis = rand::rng().random_range(ceiling.as_millis() as u64 / 2..=ceiling.as_millis() as u64);
    Duration::from_millis(millis)
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

    /// Runs a lane job after a previous batch that ended as `previous` (`None`: its task went
    /// away without a word), built in `generation`.
    async fn after(previous: Option<Done>, generation: u64) -> (InFlight, Done) {
        let (previous_tx, previous_rx) = oneshot::channel();
        if let Some(previous) = previous {
            previous_tx.send(previous).expect("send");
        } else {
            drop(previous_tx);
        }
        let (_stop, shutdown) = watch::channel(true);
        let (done, next) = oneshot::channel();
        let moves = vec![(("shop.orders".to_string(), 0), Some(10), 11)];
        let job = LaneJob {
            projection: projection(),
            pool: refusing_pool(),
            shutdown,
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
        let (in_flight, done) = after(Some((false, 3)), 3).await;
        assert!(matches!(in_flight.outcome, Lane::Skipped));
        assert_eq!(done, (false, 3), "the next batch of the lane is skipped too");
        let (in_flight, _) = after(None, 0).await;
        assert!(matches!(in_flight.outcome, Lane::Skipped), "a previous task that vanished counts as failed");
    }

    #[tokio::test]
    async fn a_batch_built_after_the_partitions_were_read_again_is_applied() {
        // The previous batch failed in generation 3; this one was built in generation 4, after the
        // lane's partitions were read again: it tries to apply (and gives up, as nothing answers).
        let (in_flight, done) = after(Some((false, 3)), 4).await;
        assert!(matches!(in_flight.outcome, Lane::GaveUp));
        assert_eq!(done, (false, 4));
        // After a committed batch it applies, whatever the generation.
        let (in_flight, _) = after(Some((true, 4)), 4).await;
        assert!(matches!(in_flight.outcome, Lane::GaveUp));
    }
}
