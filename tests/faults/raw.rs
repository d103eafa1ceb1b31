//! The `accounts` projection the fault tests run, and records published exactly as given: any
//! bytes as value, key and headers, tombstones, absent keys.

use std::path::Path;
use std::time::Duration;

use projector::kafka::mock::MockKafka;
use projector::projection::{compile_file, Projection};
use projector::settings::Settings;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use tokio_postgres::Client;

/// One account per key, guarded by the account's version. `note` is required by `Deposited`
/// unless `optional_note`: the "fix" of the parking test.
pub fn accounts(topic: &str, optional_note: bool) -> Projection {
    let note = if optional_note { ":data.note?" } else { ":data.note" };
    let text = format!(
        r#"name = "accounts"
topics = ["{topic}"]
dedupe = "version"

[table]
name = "accounts"
key = "id"
version = "version"

[on.Opened]
insert = {{ owner = ":data.owner", balance = ":data.amount" }}

[on.Deposited]
update = {{ balance = "balance + :data.amount", note = "{note}" }}
"#
    );
    compile_file(Path::new("accounts.toml"), &text).expect("the accounts projection compiles")
}

pub const ACCOUNTS_TABLE: &str = "CREATE TABLE accounts (
    id      text    PRIMARY KEY,
    version bigint  NOT NULL,
    owner   text    NOT NULL,
    balance numeric NOT NULL CHECK (balance >= 0),
    note    text
)";

/// What an `accounts` test starts from: its own mock broker, topic and database (with the
/// `accounts` table), a connection to it, settings with `max_events` per batch, and the projection.
pub struct Accounts {
    pub _kafka: MockKafka,
    pub topic: String,
    pub db: crate::support::TestDb,
    pub client: Client,
    pub settings: Settings,
    pub projections: Vec<Projection>,
    pub bootstrap: String,
}

pub async fn setup(partitions: i32, max_events: usize) -> Accounts {
    crate::support::init_tracing();
    let kafka = MockKafka::start(1).expect("mock kafka");
    let topic = crate::support::new_topic(&kafka, partitions);
    let db = crate::support::TestDb::create().await;
    let client = db.client().await;
    client.batch_execute(ACCOUNTS_TABLE).await.expect("accounts table");
    let settings = crate::support::settings(&kafka, &db, max_events, true);
    let projections = vec![accounts(&topic, false)];
    let bootstrap = settings.kafka.bootstrap_servers.clone();
    Accounts { _kafka: kafka, topic, db, client, settings, projections, bootstrap }
}

/// An event of the default envelope: `type`, `id`, `stream_id`, `stream_version`, `data`.
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

pub fn opened(key: &str, amount: i64) -> Value {
    event(key, 1, "Opened", json!({"owner": format!("owner of {key}"), "amount": amount}))
}

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
}

pub async fn publish(bootstrap: &str, topic: &str, records: &[Raw]) {
    publish_to(bootstrap, topic, None, records).await
}

/// [`publish`], every record to `partition` (`None`: by its key).
pub async fn publish_to(bootstrap: &str, topic: &str, partition: Option<i32>, records: &[Raw]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "false")
        .set("max.in.flight.requests.per.connection", "1")
        .set("message.max.bytes", "20000000")
        .create()
        .expect("producer");
    for record in records {
        let headers = OwnedHeaders::new();
        for (name, value) in &record.headers {
            add_header(&headers, name, value);
        }
        let mut future: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(partition) = partition {
            future = future.partition(partition);
        }
        if let Some(key) = &record.key {
            future = future.key(key);
        }
        if let Some(value) = &record.value {
            future = future.payload(value);
        }
        producer.send(future, Duration::from_secs(10)).await.map_err(|(error, _)| error).expect("publishing");
    }
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

/// `(version, balance as text, note)` of account `key`, `None` without a row.
pub async fn account(client: &Client, key: &str) -> Option<(i64, String, Option<String>)> {
    client
        .query_opt("SELECT version, balance::text, note FROM accounts WHERE id = $1", &[&key])
        .await
        .expect("reading accounts")
        .map(|row| (row.get(0), row.get(1), row.get(2)))
}

/// `(entity_key, error_class, state)` of the projection's dead letters, in the order parked.
pub async fn dead_letters(client: &Client) -> Vec<(Option<String>, String, String, String)> {
    client
        .query("SELECT entity_key, error_class, state, error FROM projector.dead_letters ORDER BY id", &[])
        .await
        .expect("reading dead letters")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect()
}
