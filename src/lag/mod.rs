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
//!
//! # Layout
//! - this file: the measurement ([`measure`], [`partition_lag`]) and what it returns.
//! - [`probe`]: the Kafka side, blocking: end offsets and the oldest record not yet applied.
//! - [`sampler`]: measuring every few seconds into the metrics, for as long as an engine runs.
//! - the Postgres side is [`crate::store::lag`].

mod probe;
mod sampler;

use std::collections::BTreeSet;

use deadpool_postgres::Pool;
use serde::Serialize;

use crate::projection::Projection;
use crate::store::{self, StoreError};

pub use probe::KafkaProbe;
pub use sampler::{record, KafkaReachability, RunningSampler, Sampler};

#[derive(Debug, thiserror::Error)]
pub enum LagError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
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
        Err(error) => return (probe, Err(LagError::Kafka(error))),
    };
    let names: Vec<String> = targets.iter().map(|t| t.projection.clone()).collect();
    let stored = match store::lag::checkpoints(pool, &names).await {
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
