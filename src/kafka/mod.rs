//! Kafka: one consumer per projection, polled on its own thread, with the rebalance callbacks
//! bridged to the projection's async worker over the same channel as the records, so that the
//! worker sees assignments, records and revocations in the order they happened.
//!
//! - On assignment the callback asks the worker for the stored checkpoints and starts each
//!   partition exactly there (Kafka's committed offsets are only advisory).
//! - On revocation the callback waits until the worker has committed (or rolled back) the batch
//!   in flight; only then is the partition released.
//!
//! # Layout
//! - [`config`]: the consumers' librdkafka properties, and watermarks from a short-lived client.
//! - [`consumer`]: the polling thread and the worker's commands.
//! - [`rebalance`]: the rebalance callbacks, bridged to the worker.
//! - [`record`]: a polled message copied into a [`Record`].
//! - [`mock`]: librdkafka's in-process mock cluster, for the demo and tests.

pub mod config;
pub mod consumer;
pub mod mock;
pub mod rebalance;
pub mod record;

use std::collections::HashMap;

use tokio::sync::oneshot;

use crate::checkpoint::TopicPartition;
use crate::projection::Record;

pub use config::{consumer_config, property_warnings, read_ahead, watermarks};
pub use consumer::ConsumerThread;
pub use rebalance::ProjectorContext;
pub use record::record_bytes;

/// What the consumer thread tells a projection's worker, in order.
pub enum Input {
    /// Records in poll order, each tagged with the seek epoch of its partition at the time it was
    /// polled. Sent in chunks: one channel hand-over per record costs a thread wake-up per record
    /// once the worker falls behind.
    Records(Vec<(Record, u64)>),
    /// Partitions were assigned: reply with the offset to start each from (absent: no checkpoint).
    Assigned { partitions: Vec<TopicPartition>, reply: oneshot::Sender<HashMap<TopicPartition, i64>> },
    /// Partitions are being revoked: reply once no batch touching them is in flight.
    Revoked { partitions: Vec<TopicPartition>, reply: oneshot::Sender<()> },
    /// The broker refused to serve a partition from where it was to be read (`auto.offset.reset`
    /// is `error`: nothing is skipped silently), and its fetching stopped. Which partition the
    /// error was for is not told: these are the low and high watermarks of every partition
    /// assigned, for the worker to compare with its checkpoints.
    OutOfRange { watermarks: Vec<(TopicPartition, i64, i64)> },
    /// Where the consumer stands, with nothing more fetched: the next offset of each partition
    /// after everything it delivered, transaction markers and aborted records included, with the
    /// partition's seek epoch. Sent when it changed.
    Positions(Vec<(TopicPartition, i64, u64)>),
}

/// What the worker asks of the consumer thread.
pub enum Command {
    /// Advisory: commit these next offsets to Kafka for outside tools.
    Commit(Vec<(TopicPartition, i64)>),
    /// Re-read a partition from `offset` (`None`: from the configured start); records polled
    /// afterwards carry `epoch`.
    Seek { partition: TopicPartition, offset: Option<i64>, epoch: u64 },
}

/// Records sent to the worker at once, at most.
pub const CHUNK: usize = 256;

/// Bytes (keys, values, headers) a chunk of records sent to the worker holds at most, unless it is
/// one record larger than that: the channel to the worker holds a bounded number of chunks, so
/// this bounds what it holds in bytes too.
pub const CHUNK_BYTES: usize = 1 << 20;
