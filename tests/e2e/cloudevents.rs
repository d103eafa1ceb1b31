//! CloudEvents, both Kafka binding modes, end to end: events built with the CloudEvents SDK
//! (`cloudevents-sdk`) and put in Kafka's shape by its own serializers (the binding below: the
//! SDK's rdkafka binding is for an older rdkafka), in binary mode with JSON or Avro data and in
//! structured mode, mixed in one Tansu topic with duplicates, read by `projector run` through a
//! projection with the `cloudevents` preset. The read model must be the fold of the distinct
//! events, attributes (`source`) and data alike; a binary event with a broken attribute is parked.

use std::collections::BTreeMap;
use std::time::Duration;

use apache_avro::types::{Record as AvroRecord, Value as Avro};
use apache_avro::Schema;
use cloudevents::event::SpecVersion;
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, MessageAttributeValue, Result as CeResult, StructuredDeserializer,
    StructuredSerializer,
};
use cloudevents::{EventBuilder, EventBuilderV10};
use num_bigint::BigInt;
use rand::Rng;
use serde_json::json;

use crate::common::records::{interleave, publish_to, seeded_rng, Raw};
use crate::common::shop::records_per_partition;
use crate::common::{checkpoints, projector_command, wait_for, LogDir, Projector, Tansu, TestDb};

const TOPIC: &str = "accounts";

const DEFINITION: &str = r#"
name = "accounts"
topics = ["accounts"]
dedupe = "version"

[envelope]
preset = "cloudevents"

[table]
name = "accounts"
key = "account_id"
version = "version"

[on."bank.AccountOpened"]
insert = { owner = ":data.owner", balance = ":data.amount", opened_at = ":occurred_at", last_source = ":source" }

[on."bank.Deposited"]
update = { balance = "balance + :data.amount", last_source = ":source" }
"#;

const MIGRATION: &str = "CREATE TABLE accounts (
    account_id text PRIMARY KEY,
    version bigint NOT NULL,
    owner text,
    balance numeric(14, 2) NOT NULL,
    opened_at timestamptz NOT NULL,
    last_source text NOT NULL
)";

const DATA_SCHEMA: &str = r#"{"type": "record", "name": "Data", "namespace": "bank", "fields": [
  {"name": "owner", "type": ["null", "string"], "default": null},
  {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 14, "scale": 2}}
]}"#;

/// A CloudEvent in Kafka's shape, written by the SDK's serializers: the binding's rules (every
/// attribute and extension a `ce_` header, `datacontenttype` the `content-type` header, data
/// the value; structured mode the JSON format in the value with
/// `content-type: application/cloudevents+json`).
#[derive(Default)]
struct KafkaShape(Raw);

impl BinarySerializer<Raw> for KafkaShape {
    fn set_spec_version(mut self, version: SpecVersion) -> CeResult<Self> {
        self.0.headers.push((b"ce_specversion".to_vec(), version.to_string().into_bytes()));
        Ok(self)
    }

    fn set_attribute(mut self, name: &str, value: MessageAttributeValue) -> CeResult<Self> {
        let header = if name == "datacontenttype" { "content-type".to_string() } else { format!("ce_{name}") };
        self.0.headers.push((header.into_bytes(), value.to_string().into_bytes()));
        Ok(self)
    }

    fn set_extension(self, name: &str, value: MessageAttributeValue) -> CeResult<Self> {
        self.set_attribute(name, value)
    }

    fn end_with_data(mut self, bytes: Vec<u8>) -> CeResult<Raw> {
        self.0.value = Some(bytes);
        Ok(self.0)
    }

    fn end(self) -> CeResult<Raw> {
        Ok(self.0)
    }
}

impl StructuredSerializer<Raw> for KafkaShape {
    fn set_structured_event(mut self, bytes: Vec<u8>) -> CeResult<Raw> {
        self.0.headers.push((b"content-type".to_vec(), b"application/cloudevents+json".to_vec()));
        self.0.value = Some(bytes);
        Ok(self.0)
    }
}

/// One event of an account, as the test knows it.
struct Fact {
    account: String,
    version: i64,
    /// Cents.
    amount: i64,
    owner: Option<String>,
    source: String,
    at: chrono::DateTime<chrono::Utc>,
}

enum Mode {
    BinaryJson,
    BinaryAvro,
    Structured,
}

fn cents(amount: i64) -> String {
    let sign = if amount < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", amount.unsigned_abs() / 100, amount.unsigned_abs() % 100)
}

fn record(fact: &Fact, mode: &Mode) -> Raw {
    let event_type = if fact.version == 1 { "bank.AccountOpened" } else { "bank.Deposited" };
    let builder = EventBuilderV10::new()
        .id(uuid::Uuid::new_v4().to_string())
        .ty(event_type)
        .source(fact.source.as_str())
        .subject(fact.account.as_str())
        .time(fact.at)
        .extension("sequence", fact.version);
    let builder = match mode {
        Mode::BinaryAvro => {
            let schema = Schema::parse_str(DATA_SCHEMA).expect("schema");
            let mut data = AvroRecord::new(&schema).expect("record");
            let owner = fact.owner.clone().map_or(Avro::Null, Avro::String);
            data.put("owner", Avro::Union(u32::from(fact.owner.is_some()), Box::new(owner)));
            let unscaled = BigInt::from(fact.amount).to_signed_bytes_be();
            data.put("amount", Avro::Decimal(apache_avro::Decimal::from(unscaled)));
            let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema).build().expect("writer");
            let mut framed = vec![0, 0, 0, 0, 1];
            framed.extend(writer.write_value_to_vec(data).expect("avro body"));
            builder.data("application/avro", framed)
        }
        _ => {
            let amount = cents(fact.amount).parse::<serde_json::Number>().expect("number");
            builder.data("application/json", json!({"owner": fact.owner, "amount": amount}))
        }
    };
    let event = builder.build().expect("a valid CloudEvent");
    let mut raw = match mode {
        Mode::Structured => StructuredDeserializer::deserialize_structured(event, KafkaShape::default()),
        _ => BinaryDeserializer::deserialize_binary(event, KafkaShape::default()),
    }
    .expect("the event in Kafka's shape");
    raw.key = Some(fact.account.as_bytes().to_vec());
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_in_binary_and_structured_mode_with_json_and_avro_data_fold_exactly() {
    let mut rng = seeded_rng();

    let tansu = Tansu::start().await.expect("starting tansu");
    tansu.create_topic(TOPIC, 2).await.expect("creating the topic");
    let db = TestDb::create().await;
    let client = db.connect().await;
    let log_dir = LogDir::new("cloudevents");
    let log = log_dir.path.join("projector.log");
    let projections = log_dir.path.join("projections");
    std::fs::create_dir_all(projections.join("accounts/migrations")).expect("projections folder");
    std::fs::write(projections.join("accounts.toml"), DEFINITION).expect("definition");
    std::fs::write(projections.join("accounts/migrations/V1__create_accounts.sql"), MIGRATION).expect("migration");
    let schemas = log_dir.path.join("schemas");
    std::fs::create_dir_all(&schemas).expect("schema folder");
    std::fs::write(schemas.join("1.avsc"), DATA_SCHEMA).expect("schema file");
    let settings = log_dir.path.join("projector.toml");
    std::fs::write(&settings, format!("[schemas]\ndir = \"{}\"\n", schemas.display())).expect("projector.toml");

    // 30 accounts, 1 to 5 events each, in order per account, each in a mode drawn at random,
    // a quarter of them twice.
    let mut expected = BTreeMap::new();
    let mut queues: Vec<Vec<Raw>> = Vec::new();
    for i in 0..30 {
        let account = format!("acc-{i:02}");
        let owner = (i % 4 != 0).then(|| format!("owner {i}"));
        let opened_at = chrono::DateTime::from_timestamp_millis(1_700_000_000_000 + i * 1_000).expect("time");
        let mut balance = 0;
        let mut raws = Vec::new();
        let versions = rng.random_range(1..=5);
        let mut last_source = String::new();
        for version in 1..=versions {
            let fact = Fact {
                account: account.clone(),
                version,
                amount: rng.random_range(-100_000_000..100_000_000),
                owner: owner.clone(),
                source: format!("/teller/{}", rng.random_range(0..5)),
                at: opened_at + chrono::Duration::seconds(version),
            };
            balance += fact.amount;
            last_source = fact.source.clone();
            let mode = match rng.random_range(0..3) {
                0 => Mode::BinaryJson,
                1 => Mode::BinaryAvro,
                _ => Mode::Structured,
            };
            let raw = record(&fact, &mode);
            raws.push(raw.clone());
            if rng.random_bool(0.25) {
                raws.push(raw);
            }
        }
        let opened = (opened_at + chrono::Duration::seconds(1)).timestamp_millis();
        expected.insert(account, (versions, owner, cents(balance), opened, last_source));
        queues.push(raws);
    }
    let mut records = interleave(&mut rng, queues);
    // A binary-mode event whose attribute is not text: parked, the others applied.
    let mut broken = Raw::bytes(Some("acc-broken"), br#"{"amount": 1}"#);
    broken.headers = vec![(b"ce_specversion".to_vec(), b"1.0".to_vec()), (b"ce_type".to_vec(), vec![0xff, 0xfe])];
    records.insert(records.len() / 2, broken);

    let positions = publish_to(&tansu.bootstrap, TOPIC, None, &records).await;
    let ends = records_per_partition(&positions);
    let mut command = projector_command(&db.url, &tansu.bootstrap, "cloudevents", &log);
    command.env("PROJECTOR_CONFIG", &settings).env("PROJECTOR_PROJECTIONS_DIR", &projections);
    let projector = Projector::spawn(command, &log, "cloudevents");

    type Row = (i64, Option<String>, String, i64, String);
    wait_for("the read model and the checkpoints to catch up", Duration::from_secs(60), || async {
        projector.assert_running();
        let rows = client
            .query(
                "SELECT account_id, version, owner, balance::text, (extract(epoch FROM opened_at) * 1000)::bigint, last_source
                   FROM accounts",
                &[],
            )
            .await
            .map_err(|error| error.to_string())?;
        let model: BTreeMap<String, Row> =
            rows.iter().map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3), row.get(4), row.get(5)))).collect();
        if model != expected {
            let wrong: Vec<_> = model.iter().filter(|(key, row)| expected.get(*key) != Some(row)).take(3).collect();
            return Err(format!("{} of {} accounts; differing: {wrong:?}", model.len(), expected.len()));
        }
        let at = checkpoints(&client, "accounts", TOPIC).await.map_err(|error| error.to_string())?;
        if at != ends {
            return Err(format!("checkpoints {at:?}, ends {ends:?}"));
        }
        Ok(())
    })
    .await;
    let parked: Vec<(String, String)> = client
        .query("SELECT convert_from(record_key, 'UTF8'), error FROM projector.dead_letters", &[])
        .await
        .expect("dead letters")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].0, "acc-broken");
    assert!(parked[0].1.contains("header `ce_type` is not a UTF-8 attribute"), "{parked:?}");
    drop(projector);
    drop(client);
    db.drop().await;
}
