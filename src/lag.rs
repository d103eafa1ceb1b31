//! Lag: how far each projection is behind the end of its partitions, measured from Kafka (end
//! offsets, the oldest record not yet applied) and Postgres (checkpoints, the truth), so that it
//! is right when the engine is idle, and sampled every few seconds into the metrics.
//!
//! For one partition, with `start` the stored checkpoint (or the log start offset when there is
//! none) and `end` its last stable offset (the high watermark as a `read_committed` client sees
//! it):
//! - nothing between `start` and `end`: lag 0 in messages and seconds;
//! - otherwise the oldest record at or after `start` is read (once per checkpoint value): lag in
//!   messages is `end` minus its offset, lag in seconds its age from its Kafka timestamp.
//!   On a plain topic its offset is `start`, so lag is `end - checkpoint`.
//! - when no record is found before `end`, only transaction markers or aborted records remain
//!   (a transactional topic): lag is 0, where `end - checkpoint` would never reach 0
//!   (confluentinc/librdkafka#2539).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::watch;

use crate::checkpoint::TopicPartition;
use crate::kafka::consumer_config;
use crate::metrics::{LagSample, Metrics};
use crate::projection::Projection;
use crate::settings::{KafkaSettings, DEFAULT_BATCH_BYTES};
use crate::store::{describe, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum LagError {
    #[error("kafka: {0}")]
    Kafka(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Whether a sampler measures live traffic or a rebuild's replay: the `mode` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Live,
    Rebuild,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Live => "live",
            Mode::Rebuild => "rebuild",
        }
    }
}

/// The oldest record of a partition not yet applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// This record, with its Kafka timestamp (milliseconds since the epoch), when it has one.
    Record { offset: i64, timestamp_ms: Option<i64> },
    /// No record before the end: only transaction markers or aborted records remain.
    Nothing,
    /// It could not be read this time.
    Unknown,
}

/// Lag of one partition: `(messages, seconds)`; seconds are `None` when unknown. Pure.
pub fn partition_lag(low: i64, end: i64, checkpoint: Option<i64>, pending: Pending, now_ms: i64) -> (i64, Option<f64>) {
    let start = checkpoint.unwrap_or(low).max(low);
    if end <= start {
        return (0, Some(0.0));
    }
    match pending {
        Pending::Nothing => (0, Some(0.0)),
        Pending::Unknown => (end - start, None),
        Pending::Record { offset, timestamp_ms } => {
            let messages = (end - offset.max(start)).max(0);
            if messages == 0 {
                return (0, Some(0.0));
            }
            let seconds = timestamp_ms.map(|ts| (now_ms - ts).max(0) as f64 / 1000.0);
            (messages, seconds)
        }
    }
}

/// One partition of one projection, as measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// Log start offset (low watermark).
    pub start_offset: i64,
    /// Last stable offset (high watermark for a `read_committed` client).
    pub end_offset: i64,
    /// The stored checkpoint: the next offset the projection reads. `None`: never checkpointed.
    pub checkpoint: Option<i64>,
    pub lag_messages: i64,
    /// `None`: the oldest pending record could not be read (or has no timestamp).
    pub lag_seconds: Option<f64>,
    /// When this partition's checkpoint last moved (Unix seconds).
    pub last_commit_unix: Option<f64>,
}

/// One projection, as measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProjectionLag {
    pub projection: String,
    pub partitions: Vec<PartitionLag>,
}

impl ProjectionLag {
    /// The latest commit over the projection's partitions (Unix seconds).
    pub fn last_commit_unix(&self) -> Option<f64> {
        self.partitions.iter().filter_map(|p| p.last_commit_unix).reduce(f64::max)
    }
}

/// A stored checkpoint row.
struct StoredCheckpoint {
    next_offset: i64,
    updated_unix: f64,
}

/// Every stored checkpoint of `projections`, with when it last moved.
// TODO(lead): belongs in `store::checkpoint` (the only place that speaks SQL) once that file is free.
async fn load_checkpoints(
    pool: &Pool,
    projections: &[String],
) -> Result<HashMap<(String, TopicPartition), StoredCheckpoint>, StoreError> {
    let client = pool.get().await.map_err(|error| StoreError::Connect(error.to_string()))?;
    let rows = client
        .query(
            "SELECT projection, topic, partition, next_offset, extract(epoch FROM updated_at)::float8
               FROM projector.checkpoints WHERE projection = ANY($1)",
            &[&projections],
        )
        .await
        .map_err(|error| StoreError::Postgres(describe(&error)))?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let key = (row.get::<_, String>(0), (row.get::<_, String>(1), row.get::<_, i32>(2)));
            (key, StoredCheckpoint { next_offset: row.get(3), updated_unix: row.get(4) })
        })
        .collect())
}

/// The Kafka side of measuring lag, blocking: one long-lived client for end offsets, one for
/// reading the oldest pending record of a partition, and what that second one has read, per
/// partition and start offset (a record is read once per checkpoint value, and forgotten once no
/// projection's checkpoint is there any more).
pub struct KafkaProbe {
    metadata: BaseConsumer,
    reader: BaseConsumer,
    timeout: Duration,
    /// (partition, offset read from) to (end offset then, what was found).
    read: HashMap<(TopicPartition, i64), (i64, Pending)>,
}

impl KafkaProbe {
    pub fn new(settings: &KafkaSettings, timeout: Duration) -> KafkaResult<KafkaProbe> {
        // Neither client joins a group or commits: the group id only satisfies librdkafka.
        let metadata: BaseConsumer = consumer_config(settings, "projector-lag", DEFAULT_BATCH_BYTES).create()?;
        let reader: BaseConsumer = consumer_config(settings, "projector-lag", DEFAULT_BATCH_BYTES)
            .set("enable.partition.eof", "true")
            .set("queued.min.messages", "1")
            .create()?;
        Ok(KafkaProbe { metadata, reader, timeout, read: HashMap::new() })
    }

    /// `(low, high)` watermarks of every partition of `topics`. The high watermark of a
    /// `read_committed` client is the last stable offset.
    pub fn watermarks(&self, topics: &BTreeSet<String>) -> KafkaResult<HashMap<TopicPartition, (i64, i64)>> {
        let mut result = HashMap::new();
        for topic in topics {
            let metadata = self.metadata.fetch_metadata(Some(topic), self.timeout)?;
            for topic_metadata in metadata.topics() {
                if let Some(error) = topic_metadata.error() {
                    // A topic that does not exist (yet) has no lag; the others still count.
                    tracing::debug!(%topic, error = ?RDKafkaErrorCode::from(error), "no metadata for topic");
                    continue;
                }
                for partition in topic_metadata.partitions() {
                    let marks = self.metadata.fetch_watermarks(topic, partition.id(), self.timeout)?;
                    result.insert((topic.clone(), partition.id()), marks);
                }
            }
        }
        Ok(result)
    }

    /// The oldest record of `partition` at or after `from`, below `end`.
    pub fn oldest_pending(&mut self, partition: &TopicPartition, from: i64, end: i64) -> Pending {
        let key = (partition.clone(), from);
        if let Some((cached_end, pending)) = self.read.get(&key) {
            let still_valid = match pending {
                Pending::Record { .. } => true,
                // Only markers up to `cached_end`: new records may have come after it.
                _ => *cached_end == end,
            };
            if still_valid {
                return *pending;
            }
        }
        let pending = match self.read_first(partition, from, end) {
            Ok(pending) => pending,
            Err(error) => {
                tracing::debug!(topic = %partition.0, partition = partition.1, %error, "cannot read the oldest pending record");
                Pending::Unknown
            }
        };
        if pending != Pending::Unknown {
            self.read.insert(key, (end, pending));
        }
        pending
    }

    fn read_first(&self, (topic, partition): &TopicPartition, from: i64, end: i64) -> KafkaResult<Pending> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, *partition, Offset::Offset(from))?;
        self.reader.assign(&list)?;
        let deadline = Instant::now() + self.timeout;
        let mut pending = Pending::Unknown;
        while Instant::now() < deadline {
            match self.reader.poll(Duration::from_millis(100)) {
                None => {}
                Some(Ok(message)) => {
                    if message.topic() != topic || message.partition() != *partition || message.offset() < from {
                        continue;
                    }
                    pending = if message.offset() >= end {
                        Pending::Nothing
                    } else {
                        Pending::Record { offset: message.offset(), timestamp_ms: message.timestamp().to_millis() }
                    };
                    break;
                }
                Some(Err(KafkaError::PartitionEOF(eof))) if eof == *partition => {
                    pending = Pending::Nothing;
                    break;
                }
                Some(Err(error)) => {
                    tracing::debug!(%topic, partition, %error, "reading the oldest pending record");
                }
            }
        }
        // Stop fetching: the next read assigns another partition anyway.
        self.reader.unassign()?;
        Ok(pending)
    }
}

/// What to measure: projection names and their topics.
#[derive(Debug, Clone)]
pub struct Target {
    pub projection: String,
    pub topics: Vec<String>,
}

impl Target {
    pub fn of(projections: &[Projection]) -> Vec<Target> {
        projections.iter().map(|p| Target { projection: p.name.clone(), topics: p.topics.clone() }).collect()
    }
}

/// Measures every partition of every target once. The probe is handed back with the result so
/// that it lives on across samples.
pub async fn measure(
    probe: KafkaProbe,
    pool: &Pool,
    targets: &[Target],
) -> (KafkaProbe, Result<Vec<ProjectionLag>, LagError>) {
    let topics: BTreeSet<String> = targets.iter().flat_map(|t| t.topics.iter().cloned()).collect();
    let joined = tokio::task::spawn_blocking(move || {
        let marks = probe.watermarks(&topics);
        (probe, marks)
    })
    .await;
    let (probe, marks) = match joined {
        Ok(joined) => joined,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    };
    let marks = match marks {
        Ok(marks) => marks,
        Err(error) => return (probe, Err(LagError::Kafka(error.to_string()))),
    };
    let names: Vec<String> = targets.iter().map(|t| t.projection.clone()).collect();
    let stored = match load_checkpoints(pool, &names).await {
        Ok(stored) => stored,
        Err(error) => return (probe, Err(error.into())),
    };

    let mut result: Vec<ProjectionLag> = Vec::with_capacity(targets.len());
    for target in targets {
        let mut partitions: Vec<PartitionLag> = marks
            .iter()
            .filter(|((topic, _), _)| target.topics.contains(topic))
            .map(|((topic, partition), (low, high))| {
                let stored = stored.get(&(target.projection.clone(), (topic.clone(), *partition)));
                PartitionLag {
                    topic: topic.clone(),
                    partition: *partition,
                    start_offset: *low,
                    end_offset: *high,
                    checkpoint: stored.map(|s| s.next_offset),
                    lag_messages: 0,
                    lag_seconds: None,
                    last_commit_unix: stored.map(|s| s.updated_unix),
                }
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        result.push(ProjectionLag { projection: target.projection.clone(), partitions });
    }

    // The oldest pending records, all read in one blocking task.
    let joined = tokio::task::spawn_blocking(move || {
        let mut probe = probe;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut used = BTreeSet::new();
        for lag in result.iter_mut().flat_map(|projection| projection.partitions.iter_mut()) {
            let start = lag.checkpoint.unwrap_or(lag.start_offset).max(lag.start_offset);
            let key = ((lag.topic.clone(), lag.partition), start);
            let pending = if lag.end_offset > start {
                used.insert(key.clone());
                probe.oldest_pending(&key.0, start, lag.end_offset)
            } else {
                Pending::Nothing
            };
            (lag.lag_messages, lag.lag_seconds) =
                partition_lag(lag.start_offset, lag.end_offset, lag.checkpoint, pending, now_ms);
        }
        probe.read.retain(|key, _| used.contains(key));
        (probe, result)
    })
    .await;
    let (probe, result) = match joined {
        Ok(joined) => joined,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    };
    (probe, Ok(result))
}

/// What the readiness check needs to know of Kafka: when the sampler last reached it.
#[derive(Debug, Default)]
pub struct KafkaReachability {
    last_success: Option<Instant>,
    last_error: Option<String>,
}

impl KafkaReachability {
    /// `Ok` when the last attempt succeeded no longer than `max_age` ago.
    pub fn check(&self, max_age: Duration) -> Result<(), String> {
        if let Some(error) = &self.last_error {
            return Err(error.clone());
        }
        match self.last_success {
            Some(at) if at.elapsed() <= max_age => Ok(()),
            Some(at) => Err(format!("kafka last reached {}s ago", at.elapsed().as_secs())),
            None => Err("kafka not reached yet".into()),
        }
    }
}

/// Measures lag every `interval` into `metrics`, with `mode` as the `mode` label.
pub struct Sampler {
    pub settings: KafkaSettings,
    pub pool: Pool,
    /// The projections to measure (a reload changes them).
    pub targets: Arc<std::sync::RwLock<Vec<Target>>>,
    pub mode: Mode,
    pub metrics: Metrics,
    /// Updated after every attempt, for the readiness check.
    pub kafka: Arc<std::sync::Mutex<KafkaReachability>>,
    pub interval: Duration,
}

impl Sampler {
    /// Runs until `stop` turns true (or is dropped).
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let Sampler { settings, pool, targets, mode, metrics, kafka, interval } = self;
        run_sampler(settings, pool, targets, mode, metrics, kafka, interval, stop).await
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_sampler(
    settings: KafkaSettings,
    pool: Pool,
    targets: Arc<std::sync::RwLock<Vec<Target>>>,
    mode: Mode,
    metrics: Metrics,
    kafka: Arc<std::sync::Mutex<KafkaReachability>>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let timeout = Duration::from_secs(5).min(interval.max(Duration::from_secs(1)) * 2);
    let created = tokio::task::spawn_blocking(move || KafkaProbe::new(&settings, timeout)).await;
    let mut probe = match created {
        Ok(Ok(probe)) => probe,
        Ok(Err(error)) => {
            tracing::error!(%error, "cannot create the lag sampler's kafka clients: no lag metrics");
            kafka.lock().expect("not poisoned").last_error = Some(format!("kafka client: {error}"));
            return;
        }
        Err(error) => {
            tracing::error!(%error, "lag sampler did not start");
            return;
        }
    };
    let mut warned = false;
    loop {
        let current = targets.read().expect("not poisoned").clone();
        let (returned, measured) = measure(probe, &pool, &current).await;
        probe = returned;
        match measured {
            Ok(projections) => {
                warned = false;
                kafka.lock().expect("not poisoned").record_success();
                record(&metrics, mode, &projections);
            }
            Err(error) => {
                if let LagError::Kafka(message) = &error {
                    kafka.lock().expect("not poisoned").last_error = Some(message.clone());
                } else {
                    // Postgres failed after Kafka answered.
                    kafka.lock().expect("not poisoned").record_success();
                }
                if !warned {
                    tracing::warn!(%error, "cannot measure lag; retrying every interval");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
        }
    }
}

impl KafkaReachability {
    fn record_success(&mut self) {
        self.last_success = Some(Instant::now());
        self.last_error = None;
    }
}

/// Writes one measurement into the metrics.
pub fn record(metrics: &Metrics, mode: Mode, projections: &[ProjectionLag]) {
    for projection in projections {
        if let Some(at) = projection.last_commit_unix() {
            metrics.observe_commit_time(&projection.projection, at as i64);
        }
        for partition in &projection.partitions {
            metrics.record_lag(&LagSample {
                projection: &projection.projection,
                topic: &partition.topic,
                partition: partition.partition,
                mode: mode.as_str(),
                end_offset: partition.end_offset,
                checkpoint: partition.checkpoint,
                lag_messages: partition.lag_messages,
                lag_seconds: partition.lag_seconds,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    #[test]
    fn caught_up_is_zero_without_reading() {
        assert_eq!(partition_lag(0, 10, Some(10), Pending::Unknown, NOW), (0, Some(0.0)));
        assert_eq!(partition_lag(0, 0, None, Pending::Unknown, NOW), (0, Some(0.0)));
    }

    #[test]
    fn plain_topic_lag_is_end_minus_checkpoint_and_age_of_oldest() {
        let pending = Pending::Record { offset: 7, timestamp_ms: Some(NOW - 2_500) };
        assert_eq!(partition_lag(0, 10, Some(7), pending, NOW), (3, Some(2.5)));
    }

    #[test]
    fn no_checkpoint_counts_from_the_log_start() {
        let pending = Pending::Record { offset: 4, timestamp_ms: Some(NOW) };
        assert_eq!(partition_lag(4, 10, None, pending, NOW), (6, Some(0.0)));
        // A checkpoint older than retention also counts from the log start.
        assert_eq!(partition_lag(4, 10, Some(1), pending, NOW), (6, Some(0.0)));
    }

    #[test]
    fn only_transaction_markers_left_is_caught_up() {
        assert_eq!(partition_lag(0, 11, Some(10), Pending::Nothing, NOW), (0, Some(0.0)));
        // A marker before the oldest pending record is not counted.
        let pending = Pending::Record { offset: 11, timestamp_ms: Some(NOW - 1_000) };
        assert_eq!(partition_lag(0, 14, Some(10), pending, NOW), (3, Some(1.0)));
    }

    #[test]
    fn unknown_pending_keeps_messages_and_leaves_seconds() {
        assert_eq!(partition_lag(0, 10, Some(6), Pending::Unknown, NOW), (4, None));
    }

    #[test]
    fn clock_skew_never_gives_negative_seconds() {
        let pending = Pending::Record { offset: 6, timestamp_ms: Some(NOW + 5_000) };
        assert_eq!(partition_lag(0, 10, Some(6), pending, NOW), (4, Some(0.0)));
    }
}
