//! The workload: the generated records (each entity's stream, interleaved, with duplicates) and
//! the events' JSON; the projections that read them are in `projections.rs`.

use anyhow::bail;
use chrono::{DateTime, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::Args;

/// The event types of the workload: an order's stream is `OrderPlaced` v1, `OrderPaid` v2, then
/// `OrderNoted` v3….
pub const EVENT_TYPES: [&str; 3] = ["OrderPlaced", "OrderPaid", "OrderNoted"];

#[derive(Clone, Copy)]
pub struct Rec {
    pub entity: u32,
    pub version: u32,
}

#[derive(Clone)]
pub struct Workload {
    pub topic: String,
    pub partitions: i32,
    pub entities: usize,
    /// Records in publish order (duplicates included).
    pub records: Vec<Rec>,
    pub duplicates: usize,
    /// Each entity's stream length (its last version).
    pub lengths: Vec<u32>,
    /// Each record's value padded to about this many bytes (0: none).
    pub value_bytes: usize,
    /// How the values are written.
    pub format: Format,
}

/// How the workload's values are written (`--format`): JSON, or Avro or Protobuf in the Confluent
/// wire format with the writer's schema ([`AVRO_SCHEMA`], [`PROTO_SCHEMA`]) under id
/// [`SCHEMA_ID`], which the engine reads from a schema directory.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Avro,
    Protobuf,
}

pub const SCHEMA_ID: u32 = 1;

/// The events' Protobuf schema: the JSON events' fields, the totals as decimal strings (Protobuf
/// has no decimal type). `OrderEvent` comes second: the frame names it by the indexes `[1]`.
pub const PROTO_SCHEMA: &str = r#"syntax = "proto3";
package bench;
import "google/protobuf/timestamp.proto";
message Data {
  optional string customer_id = 1;
  optional string total = 2;
  optional string amount = 3;
  optional string note = 4;
  optional string padding = 5;
}
message OrderEvent {
  string id = 1;
  string type = 2;
  string stream_id = 3;
  int64 stream_version = 4;
  google.protobuf.Timestamp occurred_at = 5;
  Data data = 6;
}
"#;

/// The schema file the engine reads for `format` (`None`: JSON needs none).
pub fn schema_file(format: Format) -> Option<(String, &'static str)> {
    match format {
        Format::Json => None,
        Format::Avro => Some((format!("{SCHEMA_ID}.avsc"), AVRO_SCHEMA)),
        Format::Protobuf => Some((format!("{SCHEMA_ID}.proto"), PROTO_SCHEMA)),
    }
}

/// The events' Avro schema: the JSON events' fields, the totals as decimals.
pub const AVRO_SCHEMA: &str = r#"{"type": "record", "name": "OrderEvent", "namespace": "bench", "fields": [
  {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
  {"name": "type", "type": "string"},
  {"name": "stream_id", "type": {"type": "string", "logicalType": "uuid"}},
  {"name": "stream_version", "type": "long"},
  {"name": "occurred_at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
  {"name": "data", "type": {"type": "record", "name": "Data", "fields": [
    {"name": "customer_id", "type": ["null", "string"], "default": null},
    {"name": "total", "type": ["null", {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}], "default": null},
    {"name": "amount", "type": ["null", {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}], "default": null},
    {"name": "note", "type": ["null", "string"], "default": null},
    {"name": "padding", "type": ["null", "string"], "default": null}
  ]}}
]}"#;

impl Workload {
    pub fn generate(args: &Args) -> anyhow::Result<Workload> {
        let events = args.events;
        let entities = args.entities.unwrap_or((events / 10).max(1));
        let duplicates = events * args.duplicate_percent / 100;
        let distinct = events - duplicates;
        if distinct < entities {
            bail!("{events} events with {duplicates} duplicates cannot cover {entities} entities");
        }
        let mut rng = StdRng::seed_from_u64(args.seed);
        let lengths: Vec<u32> =
            (0..entities).map(|e| (distinct / entities + usize::from(e < distinct % entities)) as u32).collect();
        // A random interleaving of the streams that keeps each stream in order.
        let mut order: Vec<u32> = Vec::with_capacity(distinct);
        for (e, len) in lengths.iter().enumerate() {
            order.extend(std::iter::repeat_n(e as u32, *len as usize));
        }
        order.shuffle(&mut rng);
        let mut next = vec![1u32; entities];
        let distinct_records: Vec<Rec> = order
            .into_iter()
            .map(|e| {
                let version = next[e as usize];
                next[e as usize] += 1;
                Rec { entity: e, version }
            })
            .collect();
        // Duplicates: copies of random events, re-published up to a tenth of the stream later.
        let spread = (distinct / 10).max(1) as u64;
        let mut keyed: Vec<(u64, Rec)> =
            distinct_records.iter().enumerate().map(|(i, rec)| (2 * i as u64, *rec)).collect();
        for i in rand::seq::index::sample(&mut rng, distinct, duplicates) {
            let later = i as u64 + rng.random_range(1..=spread);
            keyed.push((2 * later + 1, distinct_records[i]));
        }
        keyed.sort_unstable_by_key(|(position, _)| *position);
        Ok(Workload {
            topic: "bench.orders".into(),
            partitions: args.partitions,
            entities,
            records: keyed.into_iter().map(|(_, rec)| rec).collect(),
            duplicates,
            lengths,
            value_bytes: args.value_bytes,
            format: args.format,
        })
    }

    pub fn partition_of(&self, entity: u32) -> i32 {
        (entity % self.partitions as u32) as i32
    }

    pub fn per_partition(&self) -> Vec<i64> {
        let mut counts = vec![0i64; self.partitions as usize];
        for rec in &self.records {
            counts[self.partition_of(rec.entity) as usize] += 1;
        }
        counts
    }

    pub fn distinct(&self) -> usize {
        self.records.len() - self.duplicates
    }

    pub fn version_sum(&self) -> i64 {
        self.lengths.iter().map(|len| i64::from(*len)).sum()
    }
}

pub fn entity_id(entity: u32) -> Uuid {
    Uuid::from_u64_pair(0x5eed_0000_0000_0000, u64::from(entity))
}

pub fn customer_of(entity: u32) -> String {
    format!("customer-{}", entity % 997)
}

pub fn total_of(entity: u32) -> Decimal {
    Decimal::new(1000 + i64::from(entity % 90_000), 2)
}

pub fn note_of(version: u32) -> String {
    format!("note {version}")
}

pub fn occurred_at(version: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(i64::from(version))
}

fn event_type(version: u32) -> &'static str {
    EVENT_TYPES[(version as usize).clamp(1, 3) - 1]
}

/// The record value of `entity`'s event `version`, as the workload's format writes it.
pub fn event_value(format: Format, entity: u32, version: u32, value_bytes: usize) -> Vec<u8> {
    match format {
        Format::Json => event_json(entity, version, None, value_bytes),
        Format::Avro => event_avro(entity, version, value_bytes),
        Format::Protobuf => event_protobuf(entity, version, value_bytes),
    }
}

/// [`event_json`]'s event in Protobuf ([`PROTO_SCHEMA`], compiled by protox, encoded by prost),
/// Confluent-framed with the message indexes `[1]`, padded like the others.
pub fn event_protobuf(entity: u32, version: u32, value_bytes: usize) -> Vec<u8> {
    use prost::Message;
    use prost_reflect::{DescriptorPool, DynamicMessage, Value};
    thread_local! {
        static POOL: DescriptorPool = {
            let dir = tempfile::tempdir().expect("a temporary folder");
            let path = dir.path().join("bench.proto");
            std::fs::write(&path, PROTO_SCHEMA).expect("writing the .proto");
            let set = protox::compile([&path], [dir.path()]).expect("the bench's Protobuf schema");
            DescriptorPool::from_file_descriptor_set(set).expect("its descriptors")
        };
    }
    POOL.with(|pool| {
        let message = |name: &str| DynamicMessage::new(pool.get_message_by_name(name).expect("a message type"));
        let event = |padding: Option<String>| {
            let mut data = message("bench.Data");
            let mut set = |field: &str, value: Option<String>| {
                if let Some(value) = value {
                    data.set_field_by_name(field, Value::String(value));
                }
            };
            set("customer_id", (version <= 2).then(|| customer_of(entity)));
            set("total", (version == 1).then(|| total_of(entity).to_string()));
            set("amount", (version == 2).then(|| total_of(entity).to_string()));
            set("note", (version >= 3).then(|| note_of(version)));
            set("padding", padding);
            let mut at = message("google.protobuf.Timestamp");
            at.set_field_by_name("seconds", Value::I64(occurred_at(version).timestamp()));
            let mut event = message("bench.OrderEvent");
            let id = Uuid::from_u64_pair(u64::from(entity), u64::from(version)).to_string();
            event.set_field_by_name("id", Value::String(id));
            event.set_field_by_name("type", Value::String(event_type(version).into()));
            event.set_field_by_name("stream_id", Value::String(entity_id(entity).to_string()));
            event.set_field_by_name("stream_version", Value::I64(i64::from(version)));
            event.set_field_by_name("occurred_at", Value::Message(at));
            event.set_field_by_name("data", Value::Message(data));
            let mut framed = vec![0];
            framed.extend_from_slice(&SCHEMA_ID.to_be_bytes());
            framed.extend_from_slice(&[2, 2]);
            framed.extend(event.encode_to_vec());
            framed
        };
        let value = event(None);
        // A string of n bytes takes about n + 3 (its tag and length).
        match value_bytes.checked_sub(value.len() + 4) {
            Some(padding) if value_bytes > 0 => event(Some("x".repeat(padding))),
            _ => value,
        }
    })
}

/// [`event_json`]'s event in Avro ([`AVRO_SCHEMA`]), Confluent-framed: the same fields and
/// values, padded to about `value_bytes` the same way.
pub fn event_avro(entity: u32, version: u32, value_bytes: usize) -> Vec<u8> {
    use apache_avro::types::Value as Avro;
    thread_local! {
        static SCHEMA: apache_avro::Schema = apache_avro::Schema::parse_str(AVRO_SCHEMA).expect("the bench's Avro schema");
    }
    let optional = |value: Option<Avro>| match value {
        Some(value) => Avro::Union(1, Box::new(value)),
        None => Avro::Union(0, Box::new(Avro::Null)),
    };
    let decimal = |value: Decimal| {
        let unscaled = num_bigint::BigInt::from(value.mantissa()).to_signed_bytes_be();
        Avro::Decimal(apache_avro::Decimal::from(unscaled))
    };
    let event = |padding: Option<String>| {
        let customer = (version <= 2).then(|| Avro::String(customer_of(entity)));
        let data = Avro::Record(vec![
            ("customer_id".into(), optional(customer)),
            ("total".into(), optional((version == 1).then(|| decimal(total_of(entity))))),
            ("amount".into(), optional((version == 2).then(|| decimal(total_of(entity))))),
            ("note".into(), optional((version >= 3).then(|| Avro::String(note_of(version))))),
            ("padding".into(), optional(padding.map(Avro::String))),
        ]);
        let event = Avro::Record(vec![
            ("id".into(), Avro::Uuid(Uuid::from_u64_pair(u64::from(entity), u64::from(version)))),
            ("type".into(), Avro::String(event_type(version).into())),
            ("stream_id".into(), Avro::Uuid(entity_id(entity))),
            ("stream_version".into(), Avro::Long(i64::from(version))),
            ("occurred_at".into(), Avro::TimestampMicros(occurred_at(version).timestamp_micros())),
            ("data".into(), data),
        ]);
        let mut framed = vec![0];
        framed.extend_from_slice(&SCHEMA_ID.to_be_bytes());
        SCHEMA.with(|schema| {
            let writer = apache_avro::writer::datum::GenericDatumWriter::builder(schema).build().expect("writer");
            framed.extend(writer.write_value_to_vec(event).expect("the event as Avro"));
        });
        framed
    };
    let value = event(None);
    // A string of n bytes takes about n + 2 (its length, a varint, and the union's index).
    match value_bytes.checked_sub(value.len() + 3) {
        Some(padding) if value_bytes > 0 => event(Some("x".repeat(padding))),
        _ => value,
    }
}

/// The record value of `entity`'s event `version`; the id is a function of both, so a duplicate
/// carries its original's id. With `value_bytes`, its `data` holds a `padding` string that makes
/// the value that long.
pub fn event_json(entity: u32, version: u32, at: Option<DateTime<Utc>>, value_bytes: usize) -> Vec<u8> {
    let mut data = match version {
        1 => json!({"customer_id": customer_of(entity), "total": total_of(entity).to_string()}),
        2 => json!({"customer_id": customer_of(entity), "amount": total_of(entity).to_string()}),
        _ => json!({"note": note_of(version)}),
    };
    let event = |data: &Value| {
        serde_json::to_vec(&json!({
            "id": Uuid::from_u64_pair(u64::from(entity), u64::from(version)).to_string(),
            "type": event_type(version),
            "stream_id": entity_id(entity).to_string(),
            "stream_version": version,
            "occurred_at": at.unwrap_or_else(|| occurred_at(version)).to_rfc3339(),
            "data": data,
        }))
        .expect("event as JSON")
    };
    let value = event(&data);
    // `,"padding":""` is 13 bytes.
    match value_bytes.checked_sub(value.len() + 13) {
        Some(padding) if value_bytes > 0 => {
            data["padding"] = Value::String("x".repeat(padding));
            event(&data)
        }
        _ => value,
    }
}
