//! Avro, Protobuf and JSON Schema in the Confluent wire format, end to end: records written by
//! `apache-avro` (two writer schemas), by prost (through prost-reflect, the `.proto` compiled by
//! protox) and as JSON,
//! framed (a zero byte, the schema id, Protobuf's message indexes, the body) and mixed with JSON
//! records and broken frames in one Tansu topic, read by `projector run` with its schemas from a stand-in schema
//! registry (served here: `GET /schemas/ids/{id}`, basic auth, failing at first) or from a
//! directory of `.avsc` files. Duplicates and a SIGKILL are mixed in. The read model must hold
//! every payment's last version exactly (decimals to the last digit, timestamps to the
//! millisecond, dates and uuids), and each broken record must be parked with its reason while
//! every other record is applied.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apache_avro::types::{Record as AvroRecord, Value as Avro};
use apache_avro::Schema;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use num_bigint::BigInt;
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::json;
use tokio_postgres::Client;

use crate::common::records::{interleave, publish_to, seeded_rng, Raw};
use crate::common::shop::records_per_partition;
use crate::common::{checkpoints, free_port, projector_command, wait_for, LogDir, Projector, Tansu, TestDb};

const TOPIC: &str = "payments";
const PARTITIONS: i32 = 3;
const CATCH_UP: Duration = Duration::from_secs(90);

const DEFINITION: &str = r#"
name = "payments"
topics = ["payments"]
dedupe = "version"

[table]
name = "payments"
key = "payment_id"
version = "version"

[on.PaymentMade]
insert = { amount = ":data.amount", paid_at = ":data.paid_at", paid_on = ":data.paid_on", reference = ":data.reference", note = ":data.note?" }

[on.PaymentAdjusted]
update = { amount = ":data.amount", paid_at = ":data.paid_at" }
"#;

const MIGRATION: &str = "CREATE TABLE payments (
    payment_id text PRIMARY KEY,
    version bigint NOT NULL,
    amount numeric(24, 6) NOT NULL,
    paid_at timestamptz NOT NULL,
    paid_on date NOT NULL,
    reference uuid NOT NULL,
    note text
)";

/// Writer schema 1; schema 2 adds a field with a default (a producer on a newer version).
fn schema_text(version: u32) -> String {
    let channel = if version == 2 { r#", {"name": "channel", "type": "string", "default": "web"}"# } else { "" };
    format!(
        r#"{{"type": "record", "name": "PaymentEvent", "namespace": "pay", "fields": [
          {{"name": "type", "type": "string"}},
          {{"name": "id", "type": {{"type": "string", "logicalType": "uuid"}}}},
          {{"name": "stream_id", "type": "string"}},
          {{"name": "stream_version", "type": "long"}},
          {{"name": "occurred_at", "type": {{"type": "long", "logicalType": "timestamp-micros"}}}},
          {{"name": "data", "type": {{"type": "record", "name": "Payment", "fields": [
            {{"name": "amount", "type": {{"type": "bytes", "logicalType": "decimal", "precision": 24, "scale": 6}}}},
            {{"name": "paid_at", "type": {{"type": "long", "logicalType": "timestamp-millis"}}}},
            {{"name": "paid_on", "type": {{"type": "int", "logicalType": "date"}}}},
            {{"name": "reference", "type": {{"type": "string", "logicalType": "uuid"}}}},
            {{"name": "note", "type": ["null", "string"], "default": null}}{channel}
          ]}}}}
        ]}}"#
    )
}

/// Schema 3: the same event in Protobuf. `Payment` comes first, so the frame names
/// `PaymentEvent` by a non-zero message index; the decimal travels as a string, the date as text.
const PROTO: &str = r#"
syntax = "proto3";
package pay;
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";
message Payment {
  string amount = 1;
  google.protobuf.Timestamp paid_at = 2;
  string paid_on = 3;
  string reference = 4;
  google.protobuf.StringValue note = 5;
}
message PaymentEvent {
  string type = 1;
  string id = 2;
  string stream_id = 3;
  int64 stream_version = 4;
  google.protobuf.Timestamp occurred_at = 5;
  Payment data = 6;
}
"#;

/// [`PROTO`] compiled by protox, as a producer's build would.
fn proto_pool() -> prost_reflect::DescriptorPool {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("payments.proto"), PROTO).expect("proto file");
    let set = protox::compile([dir.path().join("payments.proto")], [dir.path()]).expect("compiling the .proto");
    prost_reflect::DescriptorPool::from_file_descriptor_set(set).expect("descriptor pool")
}

/// One payment event, as the test knows it.
#[derive(Debug, Clone)]
struct Payment {
    key: String,
    version: i64,
    /// The amount's unscaled integer (six decimal places).
    unscaled: i128,
    paid_at_ms: i64,
    paid_on_days: i32,
    reference: uuid::Uuid,
    note: Option<String>,
}

impl Payment {
    fn event_type(&self) -> &'static str {
        if self.version == 1 {
            "PaymentMade"
        } else {
            "PaymentAdjusted"
        }
    }

    /// Framed Avro with writer schema `id` (1 or 2).
    fn avro(&self, id: u32) -> Raw {
        let schema = Schema::parse_str(&schema_text(id)).expect("schema");
        let Schema::Record(record) = &schema else { unreachable!() };
        let data_schema = &record.fields[5].schema;
        let mut data = AvroRecord::new(data_schema).expect("data record");
        let bytes = BigInt::from(self.unscaled).to_signed_bytes_be();
        data.put("amount", Avro::Decimal(apache_avro::Decimal::from(bytes)));
        data.put("paid_at", Avro::TimestampMillis(self.paid_at_ms));
        data.put("paid_on", Avro::Date(self.paid_on_days));
        data.put("reference", Avro::Uuid(self.reference));
        let note = self.note.clone().map_or(Avro::Null, Avro::String);
        data.put("note", Avro::Union(u32::from(self.note.is_some()), Box::new(note)));
        if id == 2 {
            data.put("channel", "app");
        }
        let mut event = AvroRecord::new(&schema).expect("event record");
        event.put("type", self.event_type());
        event.put("id", Avro::Uuid(uuid::Uuid::new_v4()));
        event.put("stream_id", self.key.as_str());
        event.put("stream_version", self.version);
        event.put("occurred_at", Avro::TimestampMicros(self.paid_at_ms * 1000 + 7));
        event.put("data", data);
        let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema).build().expect("writer");
        let body = writer.write_value_to_vec(event).expect("avro body");
        let mut value = vec![0];
        value.extend_from_slice(&id.to_be_bytes());
        value.extend_from_slice(&body);
        Raw::bytes(Some(&self.key), &value)
    }

    /// Framed Protobuf with schema 3, written by prost through prost-reflect's dynamic messages.
    fn protobuf(&self, pool: &prost_reflect::DescriptorPool) -> Raw {
        use prost::Message;
        use prost_reflect::{DynamicMessage, Value};
        let timestamp = |millis: i64| {
            let mut at = DynamicMessage::new(pool.get_message_by_name("google.protobuf.Timestamp").expect("Timestamp"));
            at.set_field_by_name("seconds", Value::I64(millis.div_euclid(1000)));
            at.set_field_by_name("nanos", Value::I32((millis.rem_euclid(1000) * 1_000_000) as i32));
            Value::Message(at)
        };
        let paid_on = chrono::NaiveDate::from_num_days_from_ce_opt(719_163 + self.paid_on_days).expect("date");
        let mut data = DynamicMessage::new(pool.get_message_by_name("pay.Payment").expect("Payment"));
        data.set_field_by_name("amount", Value::String(self.amount_text()));
        data.set_field_by_name("paid_at", timestamp(self.paid_at_ms));
        data.set_field_by_name("paid_on", Value::String(paid_on.to_string()));
        data.set_field_by_name("reference", Value::String(self.reference.to_string()));
        if let Some(note) = &self.note {
            let mut wrapped =
                DynamicMessage::new(pool.get_message_by_name("google.protobuf.StringValue").expect("wrapper"));
            wrapped.set_field_by_name("value", Value::String(note.clone()));
            data.set_field_by_name("note", Value::Message(wrapped));
        }
        let mut event = DynamicMessage::new(pool.get_message_by_name("pay.PaymentEvent").expect("PaymentEvent"));
        event.set_field_by_name("type", Value::String(self.event_type().into()));
        event.set_field_by_name("id", Value::String(uuid::Uuid::new_v4().to_string()));
        event.set_field_by_name("stream_id", Value::String(self.key.clone()));
        event.set_field_by_name("stream_version", Value::I64(self.version));
        event.set_field_by_name("occurred_at", timestamp(self.paid_at_ms));
        event.set_field_by_name("data", Value::Message(data));
        // Schema 3, then the message indexes [1] (count 1, index 1, zig-zag), then the body.
        let mut value = vec![0, 0, 0, 0, 3, 2, 2];
        value.extend(event.encode_to_vec());
        Raw::bytes(Some(&self.key), &value)
    }

    /// The same event as JSON framed with schema 4, a JSON Schema.
    fn json_framed(&self) -> Raw {
        let json = self.json();
        let mut value = vec![0, 0, 0, 0, 4];
        value.extend(json.value.expect("a value"));
        Raw { value: Some(value), ..json }
    }

    /// The same event as JSON, as a producer that has not moved to Avro writes it.
    fn json(&self) -> Raw {
        let paid_at = chrono::DateTime::from_timestamp_millis(self.paid_at_ms).expect("time");
        let paid_on = chrono::NaiveDate::from_num_days_from_ce_opt(719_163 + self.paid_on_days).expect("date");
        Raw::json(&json!({
            "type": self.event_type(), "id": uuid::Uuid::new_v4().to_string(), "stream_id": self.key,
            "stream_version": self.version, "occurred_at": paid_at.to_rfc3339(),
            "data": {
                "amount": self.amount_text().parse::<serde_json::Number>().expect("number"),
                "paid_at": paid_at.to_rfc3339(), "paid_on": paid_on.to_string(),
                "reference": self.reference.to_string(), "note": self.note,
            },
        }))
    }

    fn amount_text(&self) -> String {
        let sign = if self.unscaled < 0 { "-" } else { "" };
        let magnitude = self.unscaled.unsigned_abs();
        format!("{sign}{}.{:06}", magnitude / 1_000_000, magnitude % 1_000_000)
    }
}

/// `payments` keys, each with 1 to 4 versions; amounts up to 18 digits before the point (past
/// what a float holds exactly), some negative.
fn history(rng: &mut StdRng, payments: usize) -> Vec<Vec<Payment>> {
    (0..payments)
        .map(|i| {
            let key = format!("pay-{i:03}");
            let reference = uuid::Uuid::from_u128(rng.random());
            let paid_on_days = rng.random_range(0..25_000);
            let note = (i % 3 != 0).then(|| format!("note {i} ünïcode"));
            (1..=rng.random_range(1..=4))
                .map(|version| Payment {
                    key: key.clone(),
                    version,
                    unscaled: rng.random_range(-10i128.pow(23) + 1..10i128.pow(23)),
                    paid_at_ms: rng.random_range(0..4_000_000_000_000),
                    paid_on_days,
                    reference,
                    note: note.clone(),
                })
                .collect()
        })
        .collect()
}

/// Every payment's row as the read model must hold it: `(key, version, amount, paid_at in epoch
/// ms, paid_on, reference, note)`.
type Row = (String, i64, String, i64, String, String, Option<String>);

fn expected(history: &[Vec<Payment>]) -> Vec<Row> {
    history
        .iter()
        .map(|versions| {
            let (first, last) = (&versions[0], versions.last().expect("a version"));
            let paid_on = chrono::NaiveDate::from_num_days_from_ce_opt(719_163 + first.paid_on_days).expect("date");
            (
                first.key.clone(),
                last.version,
                last.amount_text(),
                last.paid_at_ms,
                paid_on.to_string(),
                first.reference.to_string(),
                first.note.clone(),
            )
        })
        .collect()
}

async fn read_model(client: &Client) -> Result<Vec<Row>, String> {
    let rows = client
        .query(
            "SELECT payment_id, version, amount::text, (extract(epoch FROM paid_at) * 1000)::bigint,
                    paid_on::text, reference::text, note
               FROM payments ORDER BY payment_id",
            &[],
        )
        .await
        .map_err(|error| error.to_string())?;
    Ok(rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5), row.get(6)))
        .collect())
}

/// The stand-in registry's state: the schemas it serves, and every request it answered, by id.
#[derive(Default)]
struct Registry {
    schemas: HashMap<u32, serde_json::Value>,
    /// Requests to fail with 503 before serving: a registry that is down at first.
    fail_first: usize,
    requests: Vec<(u32, u16)>,
}

type Shared = Arc<Mutex<Registry>>;

/// `GET /schemas/ids/{id}` as the Confluent Schema Registry answers it, behind basic auth
/// (`svc:s3cret`).
async fn schema_by_id(
    State(registry): State<Shared>,
    UrlPath(id): UrlPath<u32>,
    headers: HeaderMap,
) -> (StatusCode, String) {
    let mut registry = registry.lock().expect("registry");
    let authorized =
        headers.get("authorization").and_then(|value| value.to_str().ok()) == Some("Basic c3ZjOnMzY3JldA==");
    let (status, body) = if !authorized {
        (StatusCode::UNAUTHORIZED, json!({"error_code": 401, "message": "Unauthorized"}))
    } else if registry.fail_first > 0 {
        registry.fail_first -= 1;
        (StatusCode::SERVICE_UNAVAILABLE, json!({"error_code": 50003, "message": "the registry is starting"}))
    } else {
        match registry.schemas.get(&id) {
            Some(schema) => (StatusCode::OK, schema.clone()),
            None => (StatusCode::NOT_FOUND, json!({"error_code": 40403, "message": "Schema not found"})),
        }
    };
    registry.requests.push((id, status.as_u16()));
    (status, body.to_string())
}

async fn serve_registry(registry: Shared) -> String {
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("binding the registry");
    let app = axum::Router::new().route("/schemas/ids/{id}", axum::routing::get(schema_by_id)).with_state(registry);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://127.0.0.1:{port}")
}

/// Where `projector run` finds its schemas.
enum Schemas {
    Registry,
    Directory,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_and_protobuf_from_a_registry_with_json_duplicates_broken_frames_and_a_sigkill_give_the_exact_read_model()
{
    let registry: Shared = Arc::default();
    let outcome = run(Schemas::Registry, Some(registry.clone())).await;
    let requests = registry.lock().expect("registry").requests.clone();
    let served = |id: u32| requests.iter().filter(|(asked, status)| *asked == id && *status == 200).count();
    // Asked and answered (a 503 is retried, whichever id it fell on).
    let answered = |id: u32| requests.iter().filter(|(asked, status)| *asked == id && *status != 503).count();
    eprintln!("registry requests: {requests:?}");
    // Each process asks once per schema (there were two processes); 503s were retried, not parked.
    assert!(
        (1..=2).contains(&served(1)) && (1..=2).contains(&served(2)),
        "schemas fetched more than once per process: {requests:?}"
    );
    assert!((1..=2).contains(&served(3)) && (1..=2).contains(&served(4)), "{requests:?}");
    assert!(requests.iter().filter(|(_, status)| *status == 503).count() == 3, "{requests:?}");
    assert!((1..=2).contains(&answered(99)), "the unknown id was answered {} times: {requests:?}", answered(99));
    assert!(outcome.retried_log, "no log line says the registry could not be reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_and_protobuf_from_a_schema_directory_give_the_exact_read_model() {
    run(Schemas::Directory, None).await;
}

struct Outcome {
    retried_log: bool,
}

async fn run(schemas: Schemas, registry: Option<Shared>) -> Outcome {
    let started = Instant::now();
    let mut rng = seeded_rng();

    let tansu = Tansu::start().await.expect("starting tansu");
    tansu.create_topic(TOPIC, PARTITIONS).await.expect("creating the topic");
    let db = TestDb::create().await;
    let client = db.connect().await;
    let log_dir = LogDir::new("formats");
    let log = log_dir.path.join("projector.log");
    let projections = log_dir.path.join("projections");
    std::fs::create_dir_all(projections.join("payments/migrations")).expect("projections folder");
    std::fs::write(projections.join("payments.toml"), DEFINITION).expect("definition");
    std::fs::write(projections.join("payments/migrations/V1__create_payments.sql"), MIGRATION).expect("migration");

    // Schemas 1 and 2 are Avro, 3 Protobuf, 4 JSON Schema; 5 a kind not read, or broken; 99 unknown.
    let mut config = String::from(
        "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n[schemas]\n",
    );
    match schemas {
        Schemas::Registry => {
            let registry = registry.expect("registry");
            {
                let mut state = registry.lock().expect("registry");
                state.fail_first = 3;
                for id in [1, 2] {
                    state.schemas.insert(id, json!({"schema": schema_text(id)}));
                }
                let wkt = |name: &str| json!({"name": name, "subject": name, "version": 1});
                let references = [wkt("google/protobuf/timestamp.proto"), wkt("google/protobuf/wrappers.proto")];
                state.schemas.insert(3, json!({"schema": PROTO, "schemaType": "PROTOBUF", "references": references}));
                state.schemas.insert(4, json!({"schema": "{\"type\": \"object\"}", "schemaType": "JSON"}));
                state.schemas.insert(5, json!({"schema": "struct P { 1: string id }", "schemaType": "THRIFT"}));
            }
            let url = serve_registry(registry).await;
            config.push_str(&format!(
                "registry_url = \"{url}\"\nusername = \"svc\"\npassword = \"s3cret\"\ntimeout_ms = 2000\n"
            ));
        }
        Schemas::Directory => {
            let dir = log_dir.path.join("schemas");
            std::fs::create_dir_all(&dir).expect("schema folder");
            for id in [1, 2] {
                std::fs::write(dir.join(format!("{id}.avsc")), schema_text(id)).expect("schema file");
            }
            std::fs::write(dir.join("3.proto"), PROTO).expect("schema file");
            std::fs::write(dir.join("4.json"), r#"{"type": "object"}"#).expect("schema file");
            std::fs::write(dir.join("5.avsc"), "syntax = \"proto3\";").expect("schema file");
            config.push_str(&format!("dir = \"{}\"\n", dir.display()));
        }
    }
    let settings = log_dir.path.join("projector.toml");
    std::fs::write(&settings, config).expect("projector.toml");

    // The history: Avro with schema 1 or 2, Protobuf, some as JSON, duplicates, in order per key.
    let pool = proto_pool();
    let history = history(&mut rng, 40);
    let queues: Vec<Vec<Raw>> = history
        .iter()
        .map(|versions| {
            let mut raws = Vec::new();
            for payment in versions {
                let raw = match rng.random_range(0..10) {
                    0 => payment.json(),
                    1 => payment.json_framed(),
                    2..=4 => payment.avro(1),
                    5..=6 => payment.avro(2),
                    _ => payment.protobuf(&pool),
                };
                raws.push(raw.clone());
                if rng.random_bool(0.25) {
                    raws.push(raw);
                }
            }
            raws
        })
        .collect();
    let mut records = interleave(&mut rng, queues);
    // The broken ones, each its own Kafka key, spread through the history.
    let mut garbage = vec![0, 0, 0, 0, 1];
    garbage.extend_from_slice(&[0x08, 0xff, 0xff, 0xff]);
    let broken = [
        (Raw::bytes(Some("bad-unknown"), &[0, 0, 0, 0, 99, 2, b'x']), "schema id 99 is unknown"),
        (Raw::bytes(Some("bad-truncated"), &[0, 0, 1]), "truncated"),
        (Raw::bytes(Some("bad-body"), &garbage), "body does not decode with Avro schema 1"),
        (
            Raw::bytes(Some("bad-kind"), &[0, 0, 0, 0, 5, 2, b'x']),
            match schemas {
                Schemas::Registry => "THRIFT schema, which projector does not read yet",
                Schemas::Directory => "schema id 5 is unknown: the Avro schema in",
            },
        ),
        (
            Raw::bytes(Some("bad-proto-index"), &[0, 0, 0, 0, 3, 2, 8, 10, 0]),
            "body does not decode with Protobuf schema 3: no message type at indexes [4]",
        ),
    ];
    for (i, (raw, _)) in broken.iter().enumerate() {
        let at = records.len() * (i + 1) / (broken.len() + 1);
        records.insert(at, raw.clone());
    }
    let (first, second) = records.split_at(records.len() / 2);
    eprintln!("{} records, {} payments, {} broken", records.len(), history.len(), broken.len());

    let command = || {
        let mut command = projector_command(&db.url, &tansu.bootstrap, "formats", &log);
        command
            .env("PROJECTOR_CONFIG", &settings)
            .env("PROJECTOR_PROJECTIONS_DIR", &projections)
            .env("PROJECTOR_BATCH__MAX_EVENTS", "16")
            .env("PROJECTOR_BATCH__MAX_WAIT_MS", "20")
            .env("PROJECTOR_RETRY__MAX_BACKOFF_MS", "300");
        command
    };
    let mut positions = publish_to(&tansu.bootstrap, TOPIC, None, first).await;
    let projector = Projector::spawn(command(), &log, "first run");
    wait_for("some payments to be applied", CATCH_UP, || async {
        projector.assert_running();
        match client.query_one("SELECT count(*) FROM payments", &[]).await {
            Ok(row) if row.get::<_, i64>(0) >= 5 => Ok(()),
            Ok(row) => Err(format!("{} rows", row.get::<_, i64>(0))),
            Err(error) => Err(error.to_string()),
        }
    })
    .await;
    projector.kill();
    positions.extend(publish_to(&tansu.bootstrap, TOPIC, None, second).await);
    let projector = Projector::spawn(command(), &log, "after SIGKILL");

    let ends = records_per_partition(&positions);
    let expected = expected(&history);
    wait_for("the read model and the checkpoints to catch up", CATCH_UP, || async {
        projector.assert_running();
        let model = read_model(&client).await?;
        let at = checkpoints(&client, "payments", TOPIC).await.map_err(|error| error.to_string())?;
        if model != expected {
            let wrong: Vec<_> = model.iter().filter(|row| !expected.contains(row)).take(3).collect();
            return Err(format!("{} of {} rows; not expected: {wrong:?}", model.len(), expected.len()));
        }
        if at != ends {
            return Err(format!("checkpoints {at:?}, ends {ends:?}"));
        }
        Ok(())
    })
    .await;

    // Each broken record parked with its reason; nothing else parked or held.
    let parked: BTreeMap<String, String> = client
        .query(
            "SELECT convert_from(record_key, 'UTF8'), error FROM projector.dead_letters WHERE projection = 'payments'",
            &[],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(parked.len(), broken.len(), "parked: {parked:#?}");
    for (raw, reason) in &broken {
        let key = String::from_utf8(raw.key.clone().expect("key")).expect("utf-8 key");
        let error = parked.get(&key).unwrap_or_else(|| panic!("`{key}` was not parked: {parked:#?}"));
        assert!(error.contains(reason), "`{key}` parked with `{error}`, expected `{reason}`");
    }
    let held =
        client.query_one("SELECT count(*) FROM projector.held_events", &[]).await.expect("held").get::<_, i64>(0);
    assert_eq!(held, 0);

    let retried_log = std::fs::read_to_string(&log).expect("log").contains("cannot get a record's schema");
    drop(projector);
    drop(client);
    db.drop().await;
    eprintln!("passed in {:?}", started.elapsed());
    Outcome { retried_log }
}
