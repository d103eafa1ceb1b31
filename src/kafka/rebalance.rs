//! The rebalance bridge: the consumer's context, whose librdkafka callbacks (run on the polling
//! thread) ask the projection's worker, over the same channel as the records, where assigned
//! partitions start, and wait on revocation until the batch in flight is committed or rolled back.

use std::collections::HashMap;
use std::sync::Mutex;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio::sync::{mpsc, oneshot};

use super::{Input, CHUNK};
use crate::checkpoint::TopicPartition;
use crate::projection::Record;

/// The consumer's context: rebalance callbacks talk to the worker.
pub struct ProjectorContext {
    projection: String,
    pub(super) inputs: mpsc::Sender<Input>,
    start_from: Offset,
    /// Records polled and not yet sent, and their bytes: sent before anything a rebalance
    /// callback sends, so the worker sees everything in poll order.
    pub(super) pending: Mutex<(Vec<(Record, u64)>, usize)>,
    /// Where each partition was last started (assigned or sought), for a partition that must
    /// be assigned again before it has delivered anything.
    pub(super) started: Mutex<HashMap<TopicPartition, Offset>>,
}

impl ProjectorContext {
    /// The context of `projection`'s consumer, sending to `inputs`; a partition with no
    /// checkpoint starts at `start_from`.
    pub(super) fn new(projection: &str, inputs: mpsc::Sender<Input>, start_from: Offset) -> ProjectorContext {
        ProjectorContext {
            projection: projection.to_string(),
            inputs,
            start_from,
            pending: Mutex::new((Vec::new(), 0)),
            started: Mutex::new(HashMap::new()),
        }
    }

    /// Sends the pending records; false when the worker is gone.
    pub(super) fn send_pending(&self) -> bool {
        let taken = {
            let mut pending = self.pending.lock().expect("pending records");
            if pending.0.is_empty() {
                return true;
            }
            take_chunk(&mut pending)
        };
        self.send(taken)
    }

    /// Sends `records` to the worker; false when it is gone.
    pub(super) fn send(&self, records: Vec<(Record, u64)>) -> bool {
        records.is_empty() || self.inputs.blocking_send(Input::Records(records)).is_ok()
    }
}

/// The records pending, leaving room for a whole next chunk (grown record by record, a chunk was
/// copied again each time it doubled).
pub(super) fn take_chunk(pending: &mut (Vec<(Record, u64)>, usize)) -> Vec<(Record, u64)> {
    std::mem::replace(pending, (Vec::with_capacity(CHUNK), 0)).0
}

impl ClientContext for ProjectorContext {
    /// librdkafka's errors, logged; an offset out of range is the worker's to report (it says
    /// what was lost, with its partition), so it is only a warning here.
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AutoOffsetReset) => {
                tracing::warn!(projection = %self.projection, "librdkafka: {error}: {reason}")
            }
            _ => tracing::error!(projection = %self.projection, "librdkafka: {error}: {reason}"),
        }
    }
}

fn partitions_of(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements().iter().map(|element| (element.topic().to_string(), element.partition())).collect()
}

impl ConsumerContext for ProjectorContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, list: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions = partitions_of(list);
                tracing::info!(projection = %self.projection, ?partitions, "partitions assigned");
                let (reply, answer) = oneshot::channel();
                self.send_pending();
                let offsets = match self.inputs.blocking_send(Input::Assigned { partitions: partitions.clone(), reply })
                {
                    Ok(()) => answer.blocking_recv().ok(),
                    Err(_) => None,
                };
                let Some(offsets) = offsets else {
                    // The worker is gone (shutting down): take nothing.
                    let _ = consumer.assign(&TopicPartitionList::new());
                    return;
                };
                let mut started = self.started.lock().expect("start offsets");
                for (topic, partition) in &partitions {
                    let offset =
                        offsets.get(&(topic.clone(), *partition)).map_or(self.start_from, |next| Offset::Offset(*next));
                    if let Err(error) = list.set_partition_offset(topic, *partition, offset) {
                        tracing::error!(projection = %self.projection, %error, "cannot set start offset");
                    }
                    started.insert((topic.clone(), *partition), offset);
                }
                drop(started);
                if let Err(error) = consumer.assign(list) {
                    tracing::error!(projection = %self.projection, %error, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let partitions = partitions_of(list);
                tracing::info!(projection = %self.projection, ?partitions, "partitions revoked");
                let (reply, answer) = oneshot::channel();
                self.send_pending();
                if self.inputs.blocking_send(Input::Revoked { partitions, reply }).is_ok() {
                    let _ = answer.blocking_recv();
                }
                if let Err(error) = consumer.unassign() {
                    tracing::error!(projection = %self.projection, %error, "unassign failed");
                }
            }
            other => {
                tracing::error!(projection = %self.projection, error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}
