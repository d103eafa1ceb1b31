//! Kafka: one consumer per projection, polled on its own thread, with the rebalance callbacks
//! bridged to the projection's async worker over the same channel as the records, so that the
//! worker sees assignments, records and revocations in the order they happened.
//!
//! - On assignment the callback asks the worker for the stored checkpoints and starts each
//!   partition exactly there (Kafka's committed offsets are only advisory).
//! - On revocation the callback waits until the worker has committed (or rolled back) the batch
//!   in flight; only then is the partition released.

pub mod mock;

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio::sync::{mpsc, oneshot};

use crate::projection::Record;
use crate::settings::KafkaSettings;
use crate::store::checkpoint::TopicPartition;

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
}

/// What the worker asks of the consumer thread.
pub enum Command {
    /// Advisory: commit these next offsets to Kafka for outside tools.
    Commit(Vec<(TopicPartition, i64)>),
    /// Re-read a partition from `offset` (`None`: from the configured start); records polled
    /// afterwards carry `epoch`.
    Seek { partition: TopicPartition, offset: Option<i64>, epoch: u64 },
}

/// The consumer's context: rebalance callbacks talk to the worker.
pub struct ProjectorContext {
    projection: String,
    inputs: mpsc::Sender<Input>,
    start_from: Offset,
    /// Records polled and not yet sent: sent before anything a rebalance callback sends, so the
    /// worker sees everything in poll order.
    pending: std::sync::Mutex<Vec<(Record, u64)>>,
}

impl ProjectorContext {
    /// Sends the pending records; false when the worker is gone.
    fn send_pending(&self) -> bool {
        let records = std::mem::take(&mut *self.pending.lock().expect("pending records"));
        records.is_empty() || self.inputs.blocking_send(Input::Records(records)).is_ok()
    }
}

impl ClientContext for ProjectorContext {}

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
                for (topic, partition) in &partitions {
                    let offset =
                        offsets.get(&(topic.clone(), *partition)).map_or(self.start_from, |next| Offset::Offset(*next));
                    if let Err(error) = list.set_partition_offset(topic, *partition, offset) {
                        tracing::error!(projection = %self.projection, %error, "cannot set start offset");
                    }
                }
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

/// The librdkafka configuration for a projection's consumer.
pub fn consumer_config(settings: &KafkaSettings, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap_servers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", if settings.start_from == "latest" { "latest" } else { "earliest" })
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        // A killed instance's partitions move to a live one after 10 s rather than librdkafka's
        // default 45 s (settings may override both).
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "2000")
        // librdkafka prefetches up to 64 MB per consumer by default; the worker reads ahead two
        // batches of its own, so 16 MB keeps the broker far ahead without that much memory.
        .set("queued.max.messages.kbytes", "16384")
        // When that queue is full, librdkafka waits `fetch.queue.backoff.ms` (default 1 s) before
        // fetching again: the worker empties 16 MB long before that, and then it stalls. While
        // clearing a backlog from Tansu, 1 s cut the rate from 221,000 to 158,000 events/s,
        // with whole half-seconds at 3,000.
        .set("fetch.queue.backoff.ms", "10")
        .set_log_level(RDKafkaLogLevel::Warning);
    for (name, value) in &settings.properties {
        config.set(name, value);
    }
    config
}

/// A running consumer thread.
pub struct ConsumerThread {
    pub commands: std_mpsc::Sender<Command>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ConsumerThread {
    /// Subscribes to `topics` and polls on a new thread, sending everything to `inputs`.
    pub fn start(
        settings: &KafkaSettings,
        projection: &str,
        topics: &[String],
        inputs: mpsc::Sender<Input>,
    ) -> KafkaResult<ConsumerThread> {
        let group = format!("{}.{}", settings.group_prefix, projection);
        let start_from = if settings.start_from == "latest" { Offset::End } else { Offset::Beginning };
        let context = ProjectorContext {
            projection: projection.to_string(),
            inputs: inputs.clone(),
            start_from,
            pending: std::sync::Mutex::new(Vec::new()),
        };
        let consumer: BaseConsumer<ProjectorContext> =
            consumer_config(settings, &group).create_with_context(context)?;
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let (commands, command_rx) = std_mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread_stop = stop.clone();
        let name = projection.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("kafka-{projection}"))
            .spawn(move || poll_loop(name, consumer, inputs, command_rx, thread_stop, start_from))
            .expect("spawning a thread");
        Ok(ConsumerThread { commands, stop, thread: Some(thread) })
    }

    /// Asks the thread to stop; the worker must keep answering inputs until the channel closes.
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits for the thread to end (call after the input channel closed).
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ConsumerThread {
    /// A worker that ends without `stop` (a crash, an aborted task) still stops its thread, which
    /// then leaves the group, so that its partitions go to a live consumer.
    fn drop(&mut self) {
        self.stop();
    }
}

/// Records sent to the worker at once, at most.
const CHUNK: usize = 256;

fn poll_loop(
    projection: String,
    consumer: BaseConsumer<ProjectorContext>,
    inputs: mpsc::Sender<Input>,
    commands: std_mpsc::Receiver<Command>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    start_from: Offset,
) {
    // Seek epochs by topic, then partition (looked up for every record without copying its topic).
    let mut epochs: HashMap<String, HashMap<i32, u64>> = HashMap::new();
    // Each topic's name, shared by its records.
    let mut names: Vec<std::sync::Arc<str>> = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) && !inputs.is_closed() {
        while let Ok(command) = commands.try_recv() {
            run_command(&projection, &consumer, command, &mut epochs, start_from);
        }
        // Wait for records only when none are pending; otherwise take what is already fetched
        // and send the chunk as soon as nothing more is.
        let pending = consumer.context().pending.lock().expect("pending records").len();
        let wait = if pending == 0 { Duration::from_millis(100) } else { Duration::ZERO };
        match consumer.poll(wait) {
            None => {
                if !consumer.context().send_pending() {
                    break;
                }
            }
            Some(Ok(message)) => {
                let topic = match names.iter().position(|name| **name == *message.topic()) {
                    Some(at) => names[at].clone(),
                    None => {
                        let name: std::sync::Arc<str> = message.topic().into();
                        names.push(name.clone());
                        name
                    }
                };
                let record = Record {
                    topic,
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                    headers: headers_of(&message),
                    timestamp_ms: message.timestamp().to_millis(),
                };
                drop(message);
                let epoch = epochs.get(&*record.topic).and_then(|of| of.get(&record.partition)).copied().unwrap_or(0);
                let full = {
                    let mut pending = consumer.context().pending.lock().expect("pending records");
                    pending.push((record, epoch));
                    pending.len() >= CHUNK
                };
                if full && !consumer.context().send_pending() {
                    break;
                }
            }
            Some(Err(error)) => {
                tracing::warn!(projection = %projection, %error, "kafka consumer error")
            }
        }
    }
    // Leaving the group revokes our partitions through the callback, which the worker answers.
    consumer.unsubscribe();
    drop(consumer);
}

/// A message's headers, names and values as the producer wrote them. rdkafka's own iterator
/// panics on a name that is not UTF-8 (`CStr::to_str().unwrap()`), so they are read here through
/// librdkafka directly. A name ends at its first NUL: librdkafka keeps names as C strings.
fn headers_of(message: &rdkafka::message::BorrowedMessage<'_>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    use rdkafka::bindings as rdsys;
    use rdkafka::error::IsError;
    let mut headers: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: the message is alive for this call; librdkafka owns `headers`, which lives as long
    // as the message, and every name and value is copied before it returns.
    unsafe {
        if rdsys::rd_kafka_message_headers(message.ptr(), &mut headers).is_error() || headers.is_null() {
            return Vec::new();
        }
        let count = rdsys::rd_kafka_header_cnt(headers);
        let mut all = Vec::with_capacity(count);
        for index in 0..count {
            let mut name: *const std::os::raw::c_char = std::ptr::null();
            let mut value: *const std::os::raw::c_void = std::ptr::null();
            let mut size: usize = 0;
            if rdsys::rd_kafka_header_get_all(headers, index, &mut name, &mut value, &mut size).is_error()
                || name.is_null()
            {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(name).to_bytes().to_vec();
            let value = (!value.is_null()).then(|| std::slice::from_raw_parts(value as *const u8, size).to_vec());
            all.push((name, value));
        }
        all
    }
}

fn run_command(
    projection: &str,
    consumer: &BaseConsumer<ProjectorContext>,
    command: Command,
    epochs: &mut HashMap<String, HashMap<i32, u64>>,
    start_from: Offset,
) {
    match command {
        Command::Commit(offsets) => {
            let mut list = TopicPartitionList::new();
            for ((topic, partition), next) in &offsets {
                let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*next));
            }
            if let Err(error) = consumer.commit(&list, CommitMode::Async) {
                tracing::debug!(projection, %error, "advisory offset commit failed");
            }
        }
        Command::Seek { partition, offset, epoch } => {
            let target = offset.map_or(start_from, Offset::Offset);
            if let Err(error) = consumer.seek(&partition.0, partition.1, target, Duration::from_secs(10)) {
                tracing::warn!(projection, topic = %partition.0, partition = partition.1, %error, "seek failed");
            }
            epochs.entry(partition.0).or_default().insert(partition.1, epoch);
        }
    }
}

/// Low and high watermarks of every partition of `topics`, from a short-lived client.
pub fn watermarks(
    settings: &KafkaSettings,
    topics: &[String],
    timeout: Duration,
) -> KafkaResult<HashMap<TopicPartition, (i64, i64)>> {
    let consumer: BaseConsumer = consumer_config(settings, "projector-watermarks").create()?;
    let mut result = HashMap::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        for topic_metadata in metadata.topics() {
            for partition in topic_metadata.partitions() {
                let (low, high) = consumer.fetch_watermarks(topic, partition.id(), timeout)?;
                result.insert((topic.clone(), partition.id()), (low, high));
            }
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use rdkafka::consumer::BaseConsumer;

    use super::*;
    use crate::settings::Settings;

    /// librdkafka is built with OpenSSL: TLS and SASL (PLAIN, SCRAM, OAUTHBEARER) are accepted
    /// as properties. Without it, creating the consumer fails ("OpenSSL not available at build time").
    #[test]
    fn tls_and_sasl_properties_are_supported() {
        for (protocol, mechanism) in [
            ("SSL", None),
            ("SASL_SSL", Some("SCRAM-SHA-512")),
            ("SASL_SSL", Some("PLAIN")),
            ("SASL_PLAINTEXT", Some("SCRAM-SHA-256")),
        ] {
            let mut settings = Settings::default().kafka;
            settings.properties.insert("security.protocol".into(), protocol.into());
            settings.properties.insert("ssl.endpoint.identification.algorithm".into(), "https".into());
            if let Some(mechanism) = mechanism {
                settings.properties.insert("sasl.mechanism".into(), mechanism.into());
                settings.properties.insert("sasl.username".into(), "projector".into());
                settings.properties.insert("sasl.password".into(), "secret".into());
            }
            let created: Result<BaseConsumer, _> = consumer_config(&settings, "g").create();
            assert!(created.is_ok(), "{protocol} {mechanism:?}: {:?}", created.err());
        }
    }
}
