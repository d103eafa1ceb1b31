//! The librdkafka configuration of the engine's consumers: the properties it sets (read-ahead
//! bounded by `batch.max_bytes`, `read_committed`, no automatic offset reset), the warnings about
//! properties that weaken its promises, and a short-lived client's watermarks.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;

use crate::checkpoint::TopicPartition;
use crate::settings::{KafkaSettings, DEFAULT_BATCH_BYTES, DEFAULT_BATCH_EVENTS};

/// librdkafka's own read-ahead for a consumer whose batches hold `max_events` and `max_bytes`
/// (`batch.max_events`, `batch.max_bytes`), so that what it holds is bounded by the same settings
/// as the worker's batches:
///
/// - `queued.min.messages`: its queue of fetched records stops fetching at two batches' worth of
///   records (librdkafka's default is 100,000; 8,000 for the default 4,000-event batches), for
///   one projection: several share that (`Settings::sharing`). Each queued record costs
///   librdkafka about 400 bytes beside its key and value, so with small records this is what
///   bounds the queue (BENCHMARKS.md, "Many projections").
/// - `queued.max.messages.kbytes`: … and at two batches' worth of bytes (librdkafka's default is
///   64 MB per consumer; 16 MB for the default 8 MiB batches). A fetch is asked for only below
///   both, so the queue overshoots them by one fetch at most.
/// - `fetch.max.bytes`: one fetch brings at most one batch's worth (librdkafka's default is 50 MB),
///   and no less than `message.max.bytes` (1,000,000 unless set), which librdkafka requires.
/// - `max.partition.fetch.bytes`: at most 1 MiB of it from one partition (librdkafka's default),
///   less when the whole fetch is smaller.
///
/// A record batch larger than these is still fetched whole, one at a time. Properties set in
/// `kafka.properties` win over these.
pub fn read_ahead(
    max_events: usize,
    max_bytes: usize,
    properties: &std::collections::BTreeMap<String, String>,
) -> [(&'static str, String); 4] {
    // librdkafka's limits: `queued.max.messages.kbytes` up to INT_MAX / 1024, `fetch.max.bytes`
    // up to INT_MAX - 512.
    const MOST: usize = i32::MAX as usize - 512;
    let message_max =
        properties.get("message.max.bytes").and_then(|value| value.parse::<usize>().ok()).unwrap_or(1_000_000);
    let fetch = max_bytes.max(message_max).clamp(1, MOST);
    let queue_kbytes = max_bytes.saturating_mul(2).div_ceil(1024).clamp(1, i32::MAX as usize / 1024);
    // librdkafka's range: 1 to 10,000,000.
    let queue_records = max_events.saturating_mul(2).clamp(1, 10_000_000);
    [
        ("queued.min.messages", queue_records.to_string()),
        ("queued.max.messages.kbytes", queue_kbytes.to_string()),
        ("fetch.max.bytes", fetch.to_string()),
        ("max.partition.fetch.bytes", fetch.min(1 << 20).to_string()),
    ]
}

/// The librdkafka configuration for a projection's consumer, reading ahead at most what
/// [`read_ahead`] allows for batches of `max_events` and `max_bytes`.
pub fn consumer_config(settings: &KafkaSettings, group: &str, max_events: usize, max_bytes: usize) -> ClientConfig {
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
        // and then it stalls, clearing a backlog in bursts (BENCHMARKS.md has the measurement).
        .set("fetch.queue.backoff.ms", "10")
        .set_log_level(RDKafkaLogLevel::Warning);
    for (name, value) in read_ahead(max_events, max_bytes, &settings.properties) {
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

/// Low and high watermarks of every partition of `topics`, from a short-lived client.
pub fn watermarks(
    settings: &KafkaSettings,
    topics: &[String],
    timeout: Duration,
) -> KafkaResult<HashMap<TopicPartition, (i64, i64)>> {
    let consumer: BaseConsumer =
        consumer_config(settings, "projector-watermarks", DEFAULT_BATCH_EVENTS, DEFAULT_BATCH_BYTES).create()?;
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

    /// The consumer's read-ahead follows `batch.max_events` and `batch.max_bytes`, within
    /// librdkafka's limits, and properties set in the settings win.
    #[test]
    fn read_ahead_follows_the_batch_bounds() {
        let mut settings = Settings::default().kafka;
        let get = |config: &ClientConfig, name: &str| config.get(name).map(str::to_string);
        let defaults = consumer_config(&settings, "g", DEFAULT_BATCH_EVENTS, DEFAULT_BATCH_BYTES);
        assert_eq!(get(&defaults, "queued.min.messages").as_deref(), Some("8000"));
        assert_eq!(get(&defaults, "queued.max.messages.kbytes").as_deref(), Some("16384"));
        assert_eq!(get(&defaults, "fetch.max.bytes").as_deref(), Some("8388608"));
        assert_eq!(get(&defaults, "max.partition.fetch.bytes").as_deref(), Some("1048576"));
        let small = consumer_config(&settings, "g", 1, 64 << 10);
        assert_eq!(get(&small, "queued.min.messages").as_deref(), Some("2"));
        assert_eq!(get(&small, "queued.max.messages.kbytes").as_deref(), Some("128"));
        assert_eq!(get(&small, "fetch.max.bytes").as_deref(), Some("1000000"), "at least message.max.bytes");
        assert_eq!(get(&small, "max.partition.fetch.bytes").as_deref(), Some("1000000"));
        for (max_events, max_bytes) in [(1, 1), (4000, 64 << 10), (100_000, 64 << 20), (usize::MAX, usize::MAX)] {
            let created: Result<BaseConsumer, _> = consumer_config(&settings, "g", max_events, max_bytes).create();
            assert!(created.is_ok(), "{max_events} {max_bytes}: {:?}", created.err());
        }
        settings.properties.insert("message.max.bytes".into(), "20000000".into());
        settings.properties.insert("queued.max.messages.kbytes".into(), "1000".into());
        let config = consumer_config(&settings, "g", DEFAULT_BATCH_EVENTS, DEFAULT_BATCH_BYTES);
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
            let created: Result<BaseConsumer, _> =
                consumer_config(&settings, "g", DEFAULT_BATCH_EVENTS, DEFAULT_BATCH_BYTES).create();
            assert!(created.is_ok(), "{protocol} {mechanism:?}: {:?}", created.err());
        }
    }
}
