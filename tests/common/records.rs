//! Records published exactly as given: any bytes as key, value, header names and header values;
//! tombstones (no value); no key at all. And the bank-account events the fault and corpus tests
//! publish.

use std::time::Duration;

use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};

/// An event of the default envelope: `type`, `id` (a new UUID), `stream_id`, `stream_version`,
/// `occurred_at`, `data`.
pub fn event(key: &str, version: i64, event_type: &str, data: Value) -> Value {
    json!({
        "type": event_type,
        "id": uuid::Uuid::new_v4().to_string(),
        "stream_id": key,
        "stream_version": version,
        "occurred_at": "2026-11-27T12:00:00Z",
        "data": data,
    })
}

/// An account's first event: `Opened` with its owner and first amount.
pub fn opened(key: &str, amount: i64) -> Value {
    event(key, 1, "Opened", json!({"owner": format!("owner of {key}"), "amount": amount}))
}

/// An account's `version`-th event: `Deposited` with an amount and a note.
pub fn deposited(key: &str, version: i64, amount: i64) -> Value {
    event(key, version, "Deposited", json!({"amount": amount, "note": format!("deposit {version}")}))
}

/// A record as published: every part optional, any bytes (header names too).
#[derive(Debug, Clone, Default)]
pub struct Raw {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Raw {
    /// `value` as JSON, keyed by its `stream_id`.
    pub fn json(value: &Value) -> Raw {
        Raw {
            key: value["stream_id"].as_str().map(|key| key.as_bytes().to_vec()),
            value: Some(serde_json::to_vec(value).expect("json")),
            headers: Vec::new(),
        }
    }

    pub fn bytes(key: Option<&str>, value: &[u8]) -> Raw {
        Raw { key: key.map(|key| key.as_bytes().to_vec()), value: Some(value.to_vec()), headers: Vec::new() }
    }

    /// This record, to `topic` and `partition` (`None`: by its key), for a producer to send.
    pub fn to_send<'a>(&'a self, topic: &'a str, partition: Option<i32>) -> FutureRecord<'a, [u8], [u8]> {
        let headers = OwnedHeaders::new();
        for (name, value) in &self.headers {
            add_header(&headers, name, value);
        }
        let mut future: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(partition) = partition {
            future = future.partition(partition);
        }
        if let Some(key) = &self.key {
            future = future.key(key);
        }
        if let Some(value) = &self.value {
            future = future.payload(value);
        }
        future
    }
}

/// Publishes `records` in order, each awaited before the next and alone in its produce request
/// (Tansu's high watermark is the last batch's base offset + 1, so exact offsets need
/// single-record batches), every record to `partition` (`None`: by its key). Returns each
/// record's `(partition, offset)`.
pub async fn publish_to(bootstrap: &str, topic: &str, partition: Option<i32>, records: &[Raw]) -> Vec<(i32, i64)> {
    let producer = one_per_batch_producer(bootstrap);
    let mut positions = Vec::with_capacity(records.len());
    for record in records {
        let future = record.to_send(topic, partition);
        let delivered =
            producer.send(future, Duration::from_secs(30)).await.map_err(|(error, _)| error).expect("publishing");
        positions.push((delivered.partition, delivered.offset));
    }
    positions
}

/// A producer that keeps each partition's records in the order they are sent, batching them.
pub fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "false")
        .set("max.in.flight.requests.per.connection", "1")
        .set("message.max.bytes", "20000000")
        .create()
        .expect("producer")
}

/// A producer that sends each record alone in its produce request, one at a time, records of up
/// to 20 MB.
pub fn one_per_batch_producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("batch.num.messages", "1")
        .set("linger.ms", "0")
        .set("enable.idempotence", "false")
        .set("max.in.flight.requests.per.connection", "1")
        .set("message.max.bytes", "20000000")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("creating a producer")
}

/// Adds a header whose name is any bytes (rdkafka's `OwnedHeaders::insert` takes only `&str`).
fn add_header(headers: &OwnedHeaders, name: &[u8], value: &[u8]) {
    use rdkafka::bindings as rdsys;
    let native = headers.as_borrowed() as *const rdkafka::message::BorrowedHeaders as *mut rdsys::rd_kafka_headers_t;
    // SAFETY: `native` is the live header list `headers` owns; librdkafka copies name and value.
    let error = unsafe {
        rdsys::rd_kafka_header_add(
            native,
            name.as_ptr().cast(),
            name.len() as isize,
            value.as_ptr().cast(),
            value.len() as isize,
        )
    };
    assert_eq!(error, rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR, "adding a header");
}

/// A random generator for a test's records, seeded from `PROJECTOR_E2E_SEED` when it is set, else
/// at random; the seed is printed, so a failing run can be repeated.
pub fn seeded_rng() -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed: u64 =
        std::env::var("PROJECTOR_E2E_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (rerun with PROJECTOR_E2E_SEED={seed})");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// The streams' records interleaved at random, each stream's kept in its order.
pub fn interleave<T>(rng: &mut impl rand::Rng, mut streams: Vec<Vec<T>>) -> Vec<T> {
    for stream in &mut streams {
        stream.reverse();
    }
    let mut all = Vec::new();
    while streams.iter().any(|stream| !stream.is_empty()) {
        let i = rng.random_range(0..streams.len());
        if let Some(item) = streams[i].pop() {
            all.push(item);
        }
    }
    all
}
