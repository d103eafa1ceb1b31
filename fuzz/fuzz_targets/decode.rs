//! A whole Kafka record (key, value or tombstone, headers with names as bytes, topic, partition,
//! offset, timestamp) through everything it meets before SQL, for each projection of the example
//! shop (`projections/*.toml`) and two that read their envelope from headers and the record key:
//!
//! - decoding: exactly one of tombstone, ignored, handled or poison, with the envelope fields the
//!   projection's deduplication needs;
//! - the parking key and the event's key and id as stored (`stored::key`): no NUL, at most
//!   `KEY_BYTES`, and the same when stored again; the Kafka key's text (`kafka_key_text`): the
//!   text itself, or `0x` and every byte in hex;
//! - messages (errors, event types) as stored (`stored::message`): no NUL, cut; keys as shown in
//!   messages and logs (`stored::shown_key`): no control character;
//! - header look-up (`Record::header`): the value of the last header of that name;
//! - the operator's view of the record (`parked::shown_bytes`): no control character but newline
//!   and tab, and every byte read back from what is shown;
//! - binding each parameter for each type: a value or an error, never a panic; a value that
//!   encodes for its type, and never a NUL in `text` or `jsonb`.
//!
//! Any violation panics.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use postgres_types::{IsNull, Type};
use projector::parked::shown_bytes;
use projector::projection::event::kafka_key_text;
use projector::projection::value::{bind, holds_nul};
use projector::projection::{compile_file, Decoded, Dedupe, Projection, Record};
use projector::store::stored::{self, KEY_BYTES, MESSAGE_BYTES};
use serde_json::Value;

#[derive(Debug, Arbitrary)]
struct Input {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Bytes>,
    value: ValueInput,
    headers: Vec<(Bytes, Option<Bytes>)>,
    timestamp_ms: Option<i64>,
}

/// Bytes: one of the words the projections read, or any.
#[derive(Debug, Arbitrary)]
enum Bytes {
    Known(u8),
    Any(Vec<u8>),
}

/// Header names, event types and field values the projections below look for.
const WORDS: [&str; 16] = [
    "ce_type",
    "ce_version",
    "trace_id",
    "OrderPlaced",
    "OrderPaid",
    "OrderShipped",
    "OrderCancelled",
    "Opened",
    "Deposited",
    "1",
    "2",
    "-1",
    "2026-11-27T12:00:00Z",
    "67e55044-10b1-426f-9247-bb680e5fe0c8",
    "12.50",
    "customer-1",
];

impl Bytes {
    fn into_vec(self) -> Vec<u8> {
        match self {
            Bytes::Known(index) => WORDS[usize::from(index) % WORDS.len()].as_bytes().to_vec(),
            Bytes::Any(bytes) => bytes,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum ValueInput {
    Tombstone,
    Raw(Vec<u8>),
    /// A JSON object with the envelope's fields and a `data` object, maybe broken by `splice`.
    Event {
        fields: Vec<(Name, Field)>,
        data: Vec<(Name, Field)>,
        splice: Option<(u16, Vec<u8>)>,
    },
}

#[derive(Debug, Arbitrary)]
enum Name {
    Known(u8),
    Any(String),
}

/// Names of envelope and data fields the projections read.
const NAMES: [&str; 16] = [
    "type",
    "id",
    "stream_id",
    "stream_version",
    "occurred_at",
    "customer_id",
    "total",
    "amount",
    "carrier",
    "reason",
    "note",
    "owner",
    "tags",
    "data",
    "padding",
    "",
];

#[derive(Debug, Arbitrary)]
enum Field {
    Null,
    Word(u8),
    Text(String),
    Int(i64),
    Number(f64),
    Bool(bool),
    /// Written as it is: any JSON, or not JSON at all.
    Raw(String),
    Object(Vec<(String, String)>),
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

impl Field {
    fn json(&self) -> String {
        match self {
            Field::Null => "null".into(),
            Field::Word(index) => {
                let word = WORDS[usize::from(*index) % WORDS.len()];
                match word.parse::<i64>() {
                    Ok(number) if index % 2 == 0 => number.to_string(),
                    _ => json_string(word),
                }
            }
            Field::Text(text) => json_string(text),
            Field::Int(number) => number.to_string(),
            Field::Number(number) if number.is_finite() => format!("{number:e}"),
            Field::Number(_) => "1e999".into(),
            Field::Bool(flag) => flag.to_string(),
            Field::Raw(raw) => raw.clone(),
            Field::Object(entries) => object(entries.iter().map(|(name, text)| (name.as_str(), json_string(text)))),
        }
    }
}

fn object<'a>(entries: impl Iterator<Item = (&'a str, String)>) -> String {
    let entries: Vec<String> = entries.map(|(name, json)| format!("{}:{json}", json_string(name))).collect();
    format!("{{{}}}", entries.join(","))
}

fn fields_json(fields: &[(Name, Field)]) -> impl Iterator<Item = (&str, String)> {
    fields.iter().map(|(name, field)| {
        let name = match name {
            Name::Known(index) => NAMES[usize::from(*index) % NAMES.len()],
            Name::Any(name) => name.as_str(),
        };
        (name, field.json())
    })
}

impl ValueInput {
    fn into_bytes(self) -> Option<Vec<u8>> {
        match self {
            ValueInput::Tombstone => None,
            ValueInput::Raw(bytes) => Some(bytes),
            ValueInput::Event { fields, data, splice } => {
                let data = object(fields_json(&data));
                let mut bytes = object(fields_json(&fields).chain([("data", data)])).into_bytes();
                if let Some((at, splice)) = splice {
                    let at = usize::from(at) % (bytes.len() + 1);
                    bytes.splice(at..at, splice);
                }
                Some(bytes)
            }
        }
    }
}

/// The example projections, and two reading their envelope from headers and the record key.
fn projections() -> &'static [Projection] {
    static PROJECTIONS: OnceLock<Vec<Projection>> = OnceLock::new();
    PROJECTIONS.get_or_init(|| {
        let body = r#"
[table]
name = "accounts"
key = "id"
version = "version"

[on.Opened]
insert = { owner = ":data.owner", balance = ":data.amount", opened_at = ":occurred_at", tags = ":data.tags?" }

[on.Deposited]
update = { balance = "balance + :data.amount", note = ":data.note?", trace = ":header.trace_id?", at = ":offset", at_topic = ":topic", at_partition = ":partition" }
"#;
        let json = format!("topics = [\"t\"]\n{body}");
        let headers = format!(
            "topics = [\"t\"]\n[envelope]\ntype = \"header:ce_type\"\nkey = \"kafka:key\"\nversion = \"header:ce_version\"\noccurred_at = \"kafka:timestamp\"\n{body}"
        );
        let compile = |file: &str, text: &str| compile_file(Path::new(file), text).expect("compiles");
        vec![
            compile("projections/order_summary.toml", include_str!("../../projections/order_summary.toml")),
            compile("projections/customer_totals.toml", include_str!("../../projections/customer_totals.toml")),
            compile("json.toml", &json),
            compile("headers.toml", &headers),
        ]
    })
}

const TYPES: [Type; 16] = [
    Type::TEXT,
    Type::VARCHAR,
    Type::UNKNOWN,
    Type::INT2,
    Type::INT4,
    Type::INT8,
    Type::FLOAT4,
    Type::FLOAT8,
    Type::NUMERIC,
    Type::BOOL,
    Type::UUID,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMP,
    Type::DATE,
    Type::JSON,
    Type::JSONB,
];

fuzz_target!(|input: Input| {
    let record = Record {
        topic: input.topic.as_str().into(),
        partition: input.partition,
        offset: input.offset,
        key: input.key.map(Bytes::into_vec),
        value: input.value.into_bytes(),
        headers: input.headers.into_iter().map(|(name, value)| (name.into_vec(), value.map(Bytes::into_vec))).collect(),
        timestamp_ms: input.timestamp_ms,
    };
    check_record(&record);
    for projection in projections() {
        check_decoded(projection, &record);
    }
});

/// What does not depend on a projection: header look-up, the Kafka key's text, what is shown.
fn check_record(record: &Record) {
    let names = record.headers.iter().filter_map(|(name, _)| std::str::from_utf8(name).ok());
    for name in names.chain(["ce_type", "ce_version", "trace_id", ""]) {
        let last = record.headers.iter().rev().find(|(header, _)| header == name.as_bytes());
        assert_eq!(record.header(name), last.and_then(|(_, value)| value.as_deref()), "header {name:?}");
    }
    if let Some(key) = &record.key {
        check_kafka_key(key);
        // The same key past every limit: stored by digest, cut when shown.
        check_kafka_key(&longer_than(key, KEY_BYTES.max(4096)));
    }
    check_shown(None);
    check_shown(record.key.as_deref());
    check_shown(record.value.as_deref());
    if let Some(value) = &record.value {
        check_shown(Some(&longer_than(value, 4096)));
    }
    for (name, value) in &record.headers {
        check_shown(Some(name));
        check_shown(value.as_deref());
    }
}

/// `bytes` repeated until it is longer than `limit` (itself when empty).
fn longer_than(bytes: &[u8], limit: usize) -> Vec<u8> {
    bytes.repeat(if bytes.is_empty() { 0 } else { limit / bytes.len() + 1 })
}

fn check_kafka_key(key: &[u8]) {
    let text = kafka_key_text(key);
    match std::str::from_utf8(key) {
        Ok(original) => assert_eq!(text, original),
        Err(_) => assert_eq!(from_hex(text.strip_prefix("0x").expect("0x")), key, "{text}"),
    }
    check_stored_key(&text);
}

fn from_hex(hex: &str) -> Vec<u8> {
    assert!(hex.len() % 2 == 0 && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')), "{hex}");
    (0..hex.len()).step_by(2).map(|at| u8::from_str_radix(&hex[at..at + 2], 16).expect("hex")).collect()
}

/// A key or id as stored: NUL-free, within the limit, stored the same again; as shown: printable.
fn check_stored_key(text: &str) {
    let stored = stored::key(text);
    assert!(!stored.contains('\0') && stored.len() <= KEY_BYTES, "{stored:?}");
    assert_eq!(stored::key(&stored), stored, "stored twice");
    if text.len() <= KEY_BYTES && !text.contains('\0') {
        assert_eq!(stored, text);
    }
    for key in [text, &stored] {
        let shown = stored::shown_key(key);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.chars().count() <= 100 * 10 + 30, "{}", shown.len());
    }
}

/// Free text as stored: NUL-free, cut, and as it was when it needed neither.
fn check_message(text: &str) {
    let stored = stored::message(text);
    assert!(!stored.contains('\0'), "{stored:?}");
    assert!(stored.len() <= MESSAGE_BYTES + "… ( bytes in all)".len() + 20, "{}", stored.len());
    if text.len() <= MESSAGE_BYTES && !text.contains('\0') {
        assert_eq!(stored, text);
    }
}

/// `shown_bytes` of `bytes`: no control characters but newline and tab, and the bytes read back
/// (those before the cut, for more than 4 KiB).
fn check_shown(bytes: Option<&[u8]>) {
    const LIMIT: usize = 4096;
    let shown = shown_bytes(bytes);
    assert!(!shown.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\t')), "{shown:?}");
    let Some(bytes) = bytes else {
        assert_eq!(shown, "(none)");
        return;
    };
    assert_ne!(shown, "(none)", "bytes shown as no bytes");
    let body = if bytes.len() > LIMIT {
        let suffix = format!("… ({} bytes in all)", bytes.len());
        shown.strip_suffix(&suffix).unwrap_or_else(|| panic!("{shown:?} does not end with {suffix:?}"))
    } else {
        &shown
    };
    let read = read_back(body);
    if bytes.len() > LIMIT {
        assert!(read.len() + 3 >= LIMIT && read.len() <= LIMIT && bytes.starts_with(&read), "cut at {}", read.len());
    } else {
        assert_eq!(read, bytes, "{shown:?}");
    }
}

/// The bytes `shown_bytes` shows in `body` (without its cut suffix).
fn read_back(body: &str) -> Vec<u8> {
    if let Some(hex) = body.strip_prefix("(not UTF-8) 0x") {
        return from_hex(hex);
    }
    let Some(escaped) = body.strip_prefix("(escaped) ") else {
        return body.as_bytes().to_vec();
    };
    let mut text = String::new();
    let mut rest = escaped;
    while let Some(at) = rest.find('\\') {
        text.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('\\') {
            text.push('\\');
            rest = after;
            continue;
        }
        let inner = rest.strip_prefix("u{").unwrap_or_else(|| panic!("a lone backslash in {body:?}"));
        let end = inner.find('}').expect("a closed escape");
        let code = u32::from_str_radix(&inner[..end], 16).expect("hex escape");
        text.push(char::from_u32(code).expect("a character"));
        rest = &inner[end + 1..];
    }
    text.push_str(rest);
    text.into_bytes()
}

fn check_decoded(projection: &Projection, record: &Record) {
    let decoded = projection.decode(record);
    if let Some(key) = projection.parking_key(record, &decoded) {
        check_stored_key(&key);
        check_message(&format!("parked behind an earlier parked event of key `{}`", stored::shown_key(&key)));
    }
    match decoded {
        Decoded::Tombstone => assert!(record.value.is_none()),
        Decoded::Ignored { event_type } => {
            assert!(!projection.handlers.contains_key(event_type.as_str()));
            check_message(&event_type);
        }
        Decoded::Poison { event_type, error } => {
            assert!(record.value.is_some());
            check_message(&error.to_string());
            if let Some(event_type) = event_type {
                check_message(&event_type);
            }
        }
        Decoded::Handled { event, handler } => {
            match &projection.dedupe {
                Dedupe::Version(_) => assert!(event.key.is_some() && event.version.is_some_and(|v| v >= 0)),
                Dedupe::EventId => assert!(event.event_id.is_some()),
            }
            check_message(&event.event_type);
            for text in event.key.iter().chain(&event.event_id) {
                check_stored_key(text);
            }
            for statement in &handler.statements {
                for param in &statement.params {
                    for ty in &TYPES {
                        match bind(param, &event, record, ty) {
                            Ok(value) => check_bound(&value, ty),
                            Err(error) => check_message(&error.to_string()),
                        }
                    }
                }
            }
        }
    }
}

/// A bound value encodes for its type, and holds no NUL where Postgres cannot take one.
fn check_bound(value: &(dyn postgres_types::ToSql + Sync + Send), ty: &Type) {
    let mut buffer = bytes::BytesMut::new();
    let encoded = match value.to_sql_checked(ty, &mut buffer) {
        Ok(IsNull::Yes) => return,
        Ok(IsNull::No) => buffer.to_vec(),
        Err(error) => panic!("bound for {ty} but does not encode: {error}"),
    };
    match *ty {
        Type::TEXT | Type::VARCHAR | Type::UNKNOWN => assert!(!encoded.contains(&0), "a NUL bound as {ty}"),
        Type::JSONB => {
            // The version byte, then the JSON text.
            let value: Value = serde_json::from_slice(&encoded[1..]).expect("jsonb holds JSON");
            assert!(!holds_nul(&value), "a NUL bound as jsonb");
        }
        _ => {}
    }
}
