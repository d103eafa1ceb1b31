//! The Kafka side of measuring lag, blocking: end offsets of every partition, and the oldest
//! record of a partition not yet applied.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::Pending;
use crate::checkpoint::TopicPartition;
use crate::kafka::consumer_config;
use crate::settings::{KafkaSettings, DEFAULT_BATCH_BYTES, DEFAULT_BATCH_EVENTS};

/// The Kafka side of measuring lag, blocking: one long-lived client for end offsets, one for
/// reading the oldest pending record of a partition, and what that second one has read, per
/// partition and start offset (a record is read once per checkpoint value, and forgotten once no
/// projection's checkpoint is there any more).
pub struct KafkaProbe {
    metadata: BaseConsumer,
    reader: BaseConsumer,
    timeout: Duration,
    /// (partition, offset read from) to (end offset then, what was found).
    pub(super) read: HashMap<(TopicPartition, i64), (i64, Pending)>,
}

impl KafkaProbe {
    pub fn new(settings: &KafkaSettings, timeout: Duration) -> KafkaResult<KafkaProbe> {
        // Neither client joins a group or commits: the group id only satisfies librdkafka.
        let metadata: BaseConsumer =
            consumer_config(settings, "projector-lag", DEFAULT_BATCH_EVENTS, DEFAULT_BATCH_BYTES).create()?;
        let reader: BaseConsumer =
            consumer_config(settings, "projector-lag", DEFAULT_BATCH_EVENTS, DEFAULT_BATCH_BYTES)
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
