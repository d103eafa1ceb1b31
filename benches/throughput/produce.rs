//! Producing: the whole workload loaded into the topic before an engine starts, the producers'
//! settings, and whether a backlog fits in librdkafka's mock cluster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};

use crate::workload::{entity_id, event_value, Rec, Workload};

struct CountingContext {
    failed: AtomicU64,
}
impl ClientContext for CountingContext {}
impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The settings every producer of the bench has: no idempotence, `linger.ms`, and a
/// `message.max.bytes` for values of `value_bytes` (librdkafka's default, 1,000,000, refuses a
/// 1,000,000-byte value with its key and envelope).
pub fn producer_config(bootstrap: &str, linger_ms: &str, value_bytes: usize) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "false")
        .set("linger.ms", linger_ms)
        .set("message.max.bytes", (value_bytes + 65536).max(1_000_000).to_string());
    config
}

pub fn send_retrying<C: ProducerContext>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'_, [u8], [u8], C::DeliveryOpaque>,
) -> anyhow::Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(10));
            }
            Err((error, _)) => return Err(anyhow!("producing: {error}")),
        }
    }
}

/// Publishes the whole workload, batched; returns the seconds it took and the bytes of the keys
/// and values published. The last record of each
/// partition is held back and published alone, in a batch of one, after the rest: Tansu reports
/// a partition's high watermark as its last batch's base offset + 1, which is then exact (a
/// rebuild reads up to the high watermarks). The producer holds at most 16 MiB of records not yet
/// delivered, so that what it leaves behind in the bench process is small next to the engine.
pub fn load_topic(bootstrap: &str, workload: &Workload) -> anyhow::Result<(f64, u64)> {
    let producer = |batch: &str| -> anyhow::Result<BaseProducer<CountingContext>> {
        Ok(producer_config(bootstrap, "20", workload.value_bytes)
            .set("batch.num.messages", batch)
            .set("queue.buffering.max.messages", "500000")
            .set("queue.buffering.max.kbytes", "16384")
            .set("message.timeout.ms", "300000")
            .create_with_context(CountingContext { failed: AtomicU64::new(0) })?)
    };
    let mut last = vec![None; workload.partitions as usize];
    for (i, rec) in workload.records.iter().enumerate() {
        last[workload.partition_of(rec.entity) as usize] = Some(i);
    }
    let started = Instant::now();
    let bytes = AtomicU64::new(0);
    let send = |producer: &BaseProducer<CountingContext>, rec: &Rec| {
        let key = entity_id(rec.entity).to_string();
        let payload = event_value(workload.format, rec.entity, rec.version, workload.value_bytes);
        bytes.fetch_add((key.len() + payload.len()) as u64, Ordering::Relaxed);
        send_retrying(
            producer,
            BaseRecord::to(&workload.topic)
                .partition(workload.partition_of(rec.entity))
                .key(key.as_bytes())
                .payload(&payload[..]),
        )
    };
    let bulk = producer("10000")?;
    for (i, rec) in workload.records.iter().enumerate() {
        if last[workload.partition_of(rec.entity) as usize] == Some(i) {
            continue;
        }
        send(&bulk, rec)?;
        if i % 1000 == 0 {
            bulk.poll(Duration::ZERO);
        }
    }
    bulk.flush(Duration::from_secs(600))?;
    let tail = producer("1")?;
    for i in last.iter().flatten() {
        send(&tail, &workload.records[*i])?;
    }
    tail.flush(Duration::from_secs(60))?;
    let failed = bulk.context().failed.load(Ordering::Relaxed) + tail.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} records were not delivered");
    }
    Ok((started.elapsed().as_secs_f64(), bytes.into_inner()))
}

/// librdkafka's mock cluster keeps at most 5 MB per partition (rdkafka_mock.c, `max_size`, not
/// configurable) and deletes the oldest records beyond it: a backlog that does not fit cannot be
/// loaded beforehand. `Err` says why.
pub fn mock_fits(workload: &Workload) -> Result<(), String> {
    let count = workload.records.len().clamp(1, 1000);
    let bytes: usize = workload
        .records
        .iter()
        .take(count)
        .map(|r| event_value(workload.format, r.entity, r.version, workload.value_bytes).len() + 36 + 70)
        .sum();
    let per_record = bytes as f64 / count as f64;
    let largest = workload.per_partition().into_iter().max().unwrap_or(0) as f64 * per_record;
    if largest > 0.9 * 5.0 * 1024.0 * 1024.0 {
        Err(format!(
            "skipped: the backlog needs about {:.0} MB per partition; librdkafka's mock cluster keeps 5 MB per partition and deletes older records",
            largest / 1024.0 / 1024.0
        ))
    } else {
        Ok(())
    }
}
