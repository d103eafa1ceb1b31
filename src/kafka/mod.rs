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
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::TopicPartition;
use crate::projection::Record;
use crate::settings::{KafkaSettings, DEFAULT_BATCH_BYTES};

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

/// The consumer's context: rebalance callbacks talk to the worker.
pub struct ProjectorContext {
    projection: String,
    inputs: mpsc::Sender<Input>,
    start_from: Offset,
    /// Records polled and not yet sent, and their bytes: sent before anything a rebalance
    /// callback sends, so the worker sees everything in poll order.
    pending: std::sync::Mutex<(Vec<(Record, u64)>, usize)>,
    /// Where each partition was last started (assigned or sought), for a partition that must
    /// be assigned again before it has delivered anything.
    started: std::sync::Mutex<HashMap<TopicPartition, Offset>>,
}

impl ProjectorContext {
    /// Sends the pending records; false when the worker is gone.
    fn send_pending(&self) -> bool {
        let (records, _) = std::mem::take(&mut *self.pending.lock().expect("pending records"));
        records.is_empty() || self.inputs.blocking_send(Input::Records(records)).is_ok()
    }
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

/// librdkafka's own read-ahead for a consumer whose batches hold `max_bytes` (`batch.max_bytes`),
/// so that what it holds is bounded by the same setting as the worker's batches:
///
/// - `queued.max.messages.kbytes`: its queue of fetched records stops fetching at two batches'
///   worth (librdkafka's default is 64 MB per consumer; 16 MB for the default 8 MiB batches). A
///   fetch is asked for only below that, so the queue overshoots it by one fetch at most.
/// - `fetch.max.bytes`: one fetch brings at most one batch's worth (librdkafka's default is 50 MB),
///   and no less than `message.max.bytes` (1,000,000 unless set), which librdkafka requires.
/// - `max.partition.fetch.bytes`: at most 1 MiB of it from one partition (librdkafka's default),
///   less when the whole fetch is smaller.
///
/// A record batch larger than these is still fetched whole, one at a time. Properties set in
/// `kafka.properties` win over these.
pub fn read_ahead(
    max_bytes: usize,
    properties: &std::collections::BTreeMap<String, String>,
) -> [(&'static str, String); 3] {
    // librdkafka's limits: `queued.max.messages.kbytes` up to INT_MAX / 1024, `fetch.max.bytes`
    // up to INT_MAX - 512.
    const MOST: usize = i32::MAX as usize - 512;
    let message_max =
        properties.get("message.max.bytes").and_then(|value| value.parse::<usize>().ok()).unwrap_or(1_000_000);
    let fetch = max_bytes.max(message_max).clamp(1, MOST);
    let queue_kbytes = max_bytes.saturating_mul(2).div_ceil(1024).clamp(1, i32::MAX as usize / 1024);
    [
        ("queued.max.messages.kbytes", queue_kbytes.to_string()),
        ("fetch.max.bytes", fetch.to_string()),
        ("max.partition.fetch.bytes", fetch.min(1 << 20).to_string()),
    ]
}

/// The librdkafka configuration for a projection's consumer, reading ahead at most what
/// [`read_ahead`] allows for batches of `max_bytes`.
pub fn consumer_config(settings: &KafkaSettings, group: &str, max_bytes: usize) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap_servers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Every partition starts at its checkpoint, or where `start_from` says when it has none
        // (set on assignment); a position the broker no longer holds is an error for the worker
        // to count and report, never a silent jump (librdkafka's `earliest` or `latest` would
        // skip what retention deleted, or everything up to the end).
        .set("auto.offset.reset", "error")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        // A killed instance's partitions move to a live one after 10 s rather than librdkafka's
        // default 45 s (settings may override both).
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "2000")
        // When its queue is full (`read_ahead`), librdkafka waits `fetch.queue.backoff.ms`
        // (default 1 s) before fetching again: the worker empties the queue long before that,
        // and then it stalls. While clearing a backlog from Tansu, 1 s cut the rate from 221,000
        // to 158,000 events/s, with whole half-seconds at 3,000.
        .set("fetch.queue.backoff.ms", "10")
        .set_log_level(RDKafkaLogLevel::Warning);
    for (name, value) in read_ahead(max_bytes, &settings.properties) {
        config.set(name, value);
    }
    for (name, value) in &settings.properties {
        config.set(name, value);
    }
    config
}

/// Warnings about properties that weaken what the engine promises (logged once at start).
pub fn property_warnings(settings: &KafkaSettings) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(level) = settings.properties.get("isolation.level").filter(|level| *level != "read_committed") {
        warnings.push(format!(
            "`isolation.level` = `{level}`: records of aborted (and still open) transactions will be applied"
        ));
    }
    if let Some(reset) = settings.properties.get("auto.offset.reset").filter(|reset| *reset != "error") {
        warnings.push(format!(
            "`auto.offset.reset` = `{reset}`: records that retention deletes before they are read are skipped \
             without being counted (`kafka.on_data_loss` cannot see them)"
        ));
    }
    warnings
}

/// A running consumer thread.
pub struct ConsumerThread {
    pub commands: std_mpsc::Sender<Command>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ConsumerThread {
    /// Subscribes to `topics` and polls on a new thread, sending everything to `inputs`; it reads
    /// ahead for batches of `max_bytes` ([`read_ahead`]).
    pub fn start(
        settings: &KafkaSettings,
        max_bytes: usize,
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
            pending: std::sync::Mutex::new((Vec::new(), 0)),
            started: std::sync::Mutex::new(HashMap::new()),
        };
        let consumer: BaseConsumer<ProjectorContext> =
            consumer_config(settings, &group, max_bytes).create_with_context(context)?;
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

    /// Waits for the thread to end (call after the input channel closed). Returns what it
    /// panicked with, if it did.
    pub fn join(mut self) -> Option<String> {
        let thread = self.thread.take()?;
        let panic = thread.join().err()?;
        Some(match panic.downcast::<String>() {
            Ok(message) => format!("panicked: {message}"),
            Err(panic) => match panic.downcast::<&str>() {
                Ok(message) => format!("panicked: {message}"),
                Err(_) => "panicked".to_string(),
            },
        })
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
pub const CHUNK: usize = 256;

/// Bytes (keys, values, headers) a chunk of records sent to the worker holds at most, unless it is
/// one record larger than that: the channel to the worker holds a bounded number of chunks, so
/// this bounds what it holds in bytes too.
pub const CHUNK_BYTES: usize = 1 << 20;

/// How often, at most, an idle consumer reports its positions.
const POSITIONS_EVERY: Duration = Duration::from_millis(200);

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
    // The positions last reported, and when.
    let mut reported: HashMap<TopicPartition, i64> = HashMap::new();
    let mut reported_at = std::time::Instant::now();
    // A fault the tests inject (feature `failpoints`): `consumer-poll-<projection>`.
    #[cfg(feature = "failpoints")]
    let fail_point = format!("consumer-poll-{projection}");
    while !stop.load(std::sync::atomic::Ordering::SeqCst) && !inputs.is_closed() {
        #[cfg(feature = "failpoints")]
        fail::eval(&fail_point, |_| ());
        while let Ok(command) = commands.try_recv() {
            if let Command::Seek { partition, .. } = &command {
                reported.remove(partition);
            }
            run_command(&projection, &consumer, command, &mut epochs, start_from);
        }
        // Wait for records only when none are pending; otherwise take what is already fetched
        // and send the chunk as soon as nothing more is.
        let pending = consumer.context().pending.lock().expect("pending records").0.len();
        let wait = if pending == 0 { Duration::from_millis(100) } else { Duration::ZERO };
        match consumer.poll(wait) {
            None => {
                if !consumer.context().send_pending() {
                    break;
                }
                if reported_at.elapsed() >= POSITIONS_EVERY {
                    reported_at = std::time::Instant::now();
                    if !report_positions(&consumer, &inputs, &epochs, &mut reported) {
                        break;
                    }
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
                let bytes = record_bytes(&record);
                let epoch = epochs.get(&*record.topic).and_then(|of| of.get(&record.partition)).copied().unwrap_or(0);
                // A record that would take the chunk past `CHUNK_BYTES` starts the next one.
                let overflows = {
                    let pending = consumer.context().pending.lock().expect("pending records");
                    !pending.0.is_empty() && pending.1 + bytes > CHUNK_BYTES
                };
                if overflows && !consumer.context().send_pending() {
                    break;
                }
                let full = {
                    let mut pending = consumer.context().pending.lock().expect("pending records");
                    pending.0.push((record, epoch));
                    pending.1 += bytes;
                    pending.0.len() >= CHUNK || pending.1 >= CHUNK_BYTES
                };
                if full && !consumer.context().send_pending() {
                    break;
                }
            }
            Some(Err(KafkaError::MessageConsumption(code)))
                if matches!(code, RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange) =>
            {
                tracing::warn!(projection = %projection, error = %code, "a partition cannot be read from its position: comparing checkpoints with the broker's offsets");
                if !consumer.context().send_pending() {
                    break;
                }
                let watermarks = assigned_watermarks(&consumer);
                if consumer.context().inputs.blocking_send(Input::OutOfRange { watermarks }).is_err() {
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

/// The bytes a record holds: key, value, header names and values.
pub fn record_bytes(record: &Record) -> usize {
    record.key.as_ref().map_or(0, Vec::len)
        + record.value.as_ref().map_or(0, Vec::len)
        + record.headers.iter().map(|(name, value)| name.len() + value.as_ref().map_or(0, Vec::len)).sum::<usize>()
}

/// Sends the positions of the assigned partitions that changed since last reported; false when
/// the worker is gone.
fn report_positions(
    consumer: &BaseConsumer<ProjectorContext>,
    inputs: &mpsc::Sender<Input>,
    epochs: &HashMap<String, HashMap<i32, u64>>,
    reported: &mut HashMap<TopicPartition, i64>,
) -> bool {
    let Ok(positions) = consumer.position() else {
        return true;
    };
    let mut changed = Vec::new();
    for element in positions.elements() {
        let Offset::Offset(offset) = element.offset() else {
            continue;
        };
        let partition = (element.topic().to_string(), element.partition());
        if reported.get(&partition) == Some(&offset) {
            continue;
        }
        let epoch = epochs.get(element.topic()).and_then(|of| of.get(&element.partition())).copied().unwrap_or(0);
        reported.insert(partition.clone(), offset);
        changed.push((partition, offset, epoch));
    }
    changed.is_empty() || inputs.blocking_send(Input::Positions(changed)).is_ok()
}

/// The low and high watermarks of every partition assigned (those the broker answers for).
fn assigned_watermarks(consumer: &BaseConsumer<ProjectorContext>) -> Vec<(TopicPartition, i64, i64)> {
    let Ok(assignment) = consumer.assignment() else {
        return Vec::new();
    };
    assignment
        .elements()
        .iter()
        .filter_map(|element| {
            let (low, high) =
                consumer.fetch_watermarks(element.topic(), element.partition(), Duration::from_secs(5)).ok()?;
            Some(((element.topic().to_string(), element.partition()), low, high))
        })
        .collect()
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
            if consumer.seek(&partition.0, partition.1, target, Duration::from_secs(10)).is_err() {
                // A partition whose fetching stopped (its offset was out of range) cannot be
                // sought: the assignment is set again, this partition at `target`, the others
                // where they stand.
                if let Err(error) = reassign(consumer, &partition, target) {
                    tracing::warn!(projection, topic = %partition.0, partition = partition.1, %error, "seek failed");
                }
            }
            consumer.context().started.lock().expect("start offsets").insert(partition.clone(), target);
            epochs.entry(partition.0).or_default().insert(partition.1, epoch);
        }
    }
}

/// Assigns the consumer's partitions again: `partition` from `target`, every other one from the
/// position after what it delivered (or where it was last started, when it delivered nothing
/// since). Records fetched and not yet delivered are fetched again; none is delivered twice.
fn reassign(consumer: &BaseConsumer<ProjectorContext>, partition: &TopicPartition, target: Offset) -> KafkaResult<()> {
    let assignment = consumer.assignment()?;
    let positions = consumer.position()?;
    let started = consumer.context().started.lock().expect("start offsets").clone();
    let mut list = TopicPartitionList::new();
    for element in assignment.elements() {
        let current = (element.topic().to_string(), element.partition());
        let offset = if current == *partition {
            target
        } else {
            match positions.find_partition(element.topic(), element.partition()).map(|found| found.offset()) {
                Some(Offset::Offset(next)) => Offset::Offset(next),
                _ => started.get(&current).copied().unwrap_or(Offset::Stored),
            }
        };
        list.add_partition_offset(element.topic(), element.partition(), offset)?;
    }
    consumer.assign(&list)
}

/// Low and high watermarks of every partition of `topics`, from a short-lived client.
pub fn watermarks(
    settings: &KafkaSettings,
    topics: &[String],
    timeout: Duration,
) -> KafkaResult<HashMap<TopicPartition, (i64, i64)>> {
    let consumer: BaseConsumer = consumer_config(settings, "projector-watermarks", DEFAULT_BATCH_BYTES).create()?;
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

    /// The consumer's read-ahead follows `batch.max_bytes`, within librdkafka's limits, and
    /// properties set in the settings win.
    #[test]
    fn read_ahead_follows_the_batch_bytes() {
        let mut settings = Settings::default().kafka;
        let get = |config: &ClientConfig, name: &str| config.get(name).map(str::to_string);
        let defaults = consumer_config(&settings, "g", DEFAULT_BATCH_BYTES);
        assert_eq!(get(&defaults, "queued.max.messages.kbytes").as_deref(), Some("16384"));
        assert_eq!(get(&defaults, "fetch.max.bytes").as_deref(), Some("8388608"));
        assert_eq!(get(&defaults, "max.partition.fetch.bytes").as_deref(), Some("1048576"));
        let small = consumer_config(&settings, "g", 64 << 10);
        assert_eq!(get(&small, "queued.max.messages.kbytes").as_deref(), Some("128"));
        assert_eq!(get(&small, "fetch.max.bytes").as_deref(), Some("1000000"), "at least message.max.bytes");
        assert_eq!(get(&small, "max.partition.fetch.bytes").as_deref(), Some("1000000"));
        for max_bytes in [1, 64 << 10, 64 << 20, usize::MAX] {
            let created: Result<BaseConsumer, _> = consumer_config(&settings, "g", max_bytes).create();
            assert!(created.is_ok(), "{max_bytes}: {:?}", created.err());
        }
        settings.properties.insert("message.max.bytes".into(), "20000000".into());
        settings.properties.insert("queued.max.messages.kbytes".into(), "1000".into());
        let config = consumer_config(&settings, "g", DEFAULT_BATCH_BYTES);
        assert_eq!(get(&config, "queued.max.messages.kbytes").as_deref(), Some("1000"));
        assert_eq!(get(&config, "fetch.max.bytes").as_deref(), Some("20000000"));
        let created: Result<BaseConsumer, _> = config.create();
        assert!(created.is_ok(), "{:?}", created.err());
    }

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
            let created: Result<BaseConsumer, _> = consumer_config(&settings, "g", DEFAULT_BATCH_BYTES).create();
            assert!(created.is_ok(), "{protocol} {mechanism:?}: {:?}", created.err());
        }
    }
}
