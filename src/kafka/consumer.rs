//! A projection's consumer thread: it subscribes, polls, sends records to the worker in chunks
//! (bounded by count and bytes), reports positions, and carries out the worker's commands
//! (advisory commits, seeks).

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::config::consumer_config;
use super::rebalance::{take_chunk, ProjectorContext};
use super::record::{copy_record, record_bytes, TopicNames};
use super::{Command, Input, CHUNK, CHUNK_BYTES};
use crate::checkpoint::TopicPartition;
use crate::settings::KafkaSettings;

/// A running consumer thread.
pub struct ConsumerThread {
    pub commands: std_mpsc::Sender<Command>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ConsumerThread {
    /// Subscribes to `topics` and polls on a new thread, sending everything to `inputs`; it reads
    /// ahead for batches of `max_events` and `max_bytes` ([`read_ahead`]).
    pub fn start(
        settings: &KafkaSettings,
        max_events: usize,
        max_bytes: usize,
        projection: &str,
        topics: &[String],
        inputs: mpsc::Sender<Input>,
    ) -> KafkaResult<ConsumerThread> {
        let group = format!("{}.{}", settings.group_prefix, projection);
        let start_from = if settings.start_from == "latest" { Offset::End } else { Offset::Beginning };
        let context = ProjectorContext::new(projection, inputs.clone(), start_from);
        let consumer: BaseConsumer<ProjectorContext> =
            consumer_config(settings, &group, max_events, max_bytes).create_with_context(context)?;
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
    let mut names = TopicNames::default();
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
                let record = copy_record(&message, &mut names);
                drop(message);
                let bytes = record_bytes(&record);
                let epoch = epochs.get(&*record.topic).and_then(|of| of.get(&record.partition)).copied().unwrap_or(0);
                // A record that would take the chunk past `CHUNK_BYTES` starts the next one: the
                // chunk so far is sent before it is added.
                let (overflowed, full) = {
                    let mut pending = consumer.context().pending.lock().expect("pending records");
                    let overflowed =
                        (!pending.0.is_empty() && pending.1 + bytes > CHUNK_BYTES).then(|| take_chunk(&mut pending));
                    pending.0.push((record, epoch));
                    pending.1 += bytes;
                    (overflowed, pending.0.len() >= CHUNK || pending.1 >= CHUNK_BYTES)
                };
                if overflowed.is_some_and(|chunk| !consumer.context().send(chunk)) {
                    break;
                }
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
