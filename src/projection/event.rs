//! A Kafka record decoded through a projection's envelope: tombstone, ignored, handled or poison.

use std::fmt;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::fields::{Json, Span};
use super::schemas::{frame, FrameError, Schemas};
use super::{Dedupe, Handler, Projection, Source};

/// A Kafka record as the consumer hands it over.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: std::sync::Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Each header's name and value, as the producer wrote them (any bytes; a name ends at its
    /// first NUL, as librdkafka keeps names as C strings).
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub timestamp_ms: Option<i64>,
}

impl Record {
    /// The value of the last header called `name` (`None`: no such header, or one without a
    /// value).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().rev().find(|(header, _)| header == name.as_bytes()).and_then(|(_, value)| value.as_deref())
    }
}

/// The envelope fields of an event, and where the projection's other fields are in its record.
#[derive(Debug, Clone)]
pub struct Event {
    pub event_type: String,
    pub event_id: Option<String>,
    pub key: Option<String>,
    pub version: Option<i64>,
    pub occurred_at: Option<DateTime<Utc>>,
    /// Slot `i`: where the projection's `i`-th JSON path is in the record's value
    /// ([`Fields`](super::fields::Fields)), or in `body` when it is given.
    pub spans: Vec<Option<Span>>,
    /// The value as JSON text, when the record's value is not that text itself (a
    /// Confluent-framed body, read with its schema).
    pub body: Option<std::sync::Arc<str>>,
}

/// What a record means to one projection.
#[derive(Debug)]
pub enum Decoded<'p> {
    /// No value: nothing to do.
    Tombstone,
    /// An event type this projection has no handler for.
    Ignored {
        event_type: String,
    },
    Handled {
        event: Event,
        handler: &'p Handler,
    },
    /// A record this projection cannot decode; `event_type` when it was readable.
    Poison {
        event_type: Option<String>,
        error: DecodeError,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("value is not valid UTF-8: {0}")]
    NotUtf8(String),
    #[error("value is not valid JSON: {0}")]
    NotJson(String),
    #[error("envelope field `{field}` (from `{from}`) is missing")]
    Missing { field: &'static str, from: String },
    #[error("envelope field `{field}` (from `{from}`) is not valid UTF-8")]
    FieldNotUtf8 { field: &'static str, from: String },
    #[error("envelope field `{field}` (from `{from}`) must be {expected}, got {got}")]
    WrongType { field: &'static str, from: String, expected: &'static str, got: String },
    #[error("envelope field `version` (from `{from}`) must be a non-negative integer, got {got}")]
    BadVersion { from: String, got: String },
    #[error("envelope field `occurred_at` (from `{from}`) is not an RFC 3339 time, got {got}")]
    BadOccurredAt { from: String, got: String },
    #[error(transparent)]
    Framed(#[from] FrameError),
    #[error("not a CloudEvent in binary mode: {0}")]
    NotCloudEvent(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Path(path) => f.write_str(&path.join(".")),
            Source::Header(name) => write!(f, "header:{name}"),
            Source::KafkaKey => f.write_str("kafka:key"),
            Source::KafkaTimestamp => f.write_str("kafka:timestamp"),
        }
    }
}

impl Projection {
    /// Decodes `record` through this projection's envelope. Only the fields the projection reads
    /// are looked at; the rest of the value is checked to be JSON and skipped.
    pub fn decode(&self, record: &Record) -> Decoded<'_> {
        let Some(bytes) = record.value.as_deref().or_else(|| self.no_data(record)) else {
            return Decoded::Tombstone;
        };
        let body = match self.body(record, bytes) {
            Ok(body) => body,
            Err(error) => return Decoded::Poison { event_type: None, error },
        };
        if let Some(body) = body {
            return match self.decode_text(record, &body) {
                Decoded::Handled { mut event, handler } => {
                    event.body = Some(body.into());
                    Decoded::Handled { event, handler }
                }
                decoded => decoded,
            };
        }
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(error) => return Decoded::Poison { event_type: None, error: DecodeError::NotUtf8(error.to_string()) },
        };
        match self.decode_text(record, text) {
            // Said of a value that a `serde_json::Value` cannot hold (nested deeper than 128, a
            // lone surrogate), the JSON error comes first, as it did before fields were read
            // without building the tree.
            Decoded::Poison { event_type, error } => match serde_json::from_str::<Value>(text) {
                Err(json) => Decoded::Poison { event_type: None, error: DecodeError::NotJson(json.to_string()) },
                Ok(_) => Decoded::Poison { event_type, error },
            },
            decoded => decoded,
        }
    }

    fn decode_text(&self, record: &Record, text: &str) -> Decoded<'_> {
        let poison = |event_type: Option<String>, error| Decoded::Poison { event_type, error };
        let spans = match self.fields.find(text) {
            Ok(spans) => spans,
            Err(error) => return poison(None, DecodeError::NotJson(error.to_string())),
        };
        let envelope = &self.envelope;
        let [type_slot, id_slot, key_slot, version_slot, time_slot] = self.envelope_slots;
        let field = |source, slot, name| read(source, slot, name, record, text, &spans, &self.schemas);
        let event_type =
            match field(&envelope.event_type, type_slot, "type").and_then(|raw| text_of(raw, "type", false)) {
                Ok(Some(event_type)) => event_type,
                Ok(None) => return poison(None, missing("type", &envelope.event_type)),
                Err(error) => return poison(None, error),
            };
        let Some(handler) = self.handlers.get(&event_type) else {
            return Decoded::Ignored { event_type };
        };
        let fields = (|| {
            let event_id = field(&envelope.event_id, id_slot, "id").and_then(|raw| text_of(raw, "id", true))?;
            let key = field(&envelope.key, key_slot, "key").and_then(|raw| text_of(raw, "key", true))?;
            let version = field(&envelope.version, version_slot, "version").and_then(version_of)?;
            let occurred_at = field(&envelope.occurred_at, time_slot, "occurred_at").and_then(time_of)?;
            match &self.dedupe {
                Dedupe::Version(_) if key.is_none() => Err(missing("key", &envelope.key)),
                Dedupe::Version(_) if version.is_none() => Err(missing("version", &envelope.version)),
                Dedupe::EventId if event_id.is_none() => Err(missing("id", &envelope.event_id)),
                _ => Ok((event_id, key, version, occurred_at)),
            }
        })();
        match fields {
            Ok((event_id, key, version, occurred_at)) => Decoded::Handled {
                event: Event { event_type, event_id, key, version, occurred_at, spans, body: None },
                handler,
            },
            Err(error) => poison(Some(event_type), error),
        }
    }
}

impl Projection {
    /// The key a record is parked under, so that later events of the same entity are parked
    /// behind it: the envelope's key when it can be read (even from an event that is otherwise
    /// poison), else the Kafka record key. `None` when neither exists: the record is parked alone.
    pub fn parking_key(&self, record: &Record, decoded: &Decoded<'_>) -> Option<String> {
        let from_envelope = match decoded {
            Decoded::Handled { event, .. } => event.key.clone(),
            Decoded::Tombstone | Decoded::Ignored { .. } => None,
            Decoded::Poison { .. } => {
                // The JSON the record was read as: a framed body, a binary-mode CloudEvent's
                // attributes and data, or the value itself.
                let bytes = record.value.as_deref().unwrap_or(b"null");
                let body = self.body(record, bytes).ok().flatten();
                let text = body.as_deref().or_else(|| std::str::from_utf8(bytes).ok()).unwrap_or("null");
                let spans = self.fields.find(text).unwrap_or_else(|_| vec![None; self.fields.len()]);
                read(&self.envelope.key, self.envelope_slots[2], "key", record, text, &spans, &self.schemas)
                    .and_then(|raw| text_of(raw, "key", true))
                    .ok()
                    .flatten()
            }
        };
        from_envelope.or_else(|| record.key.as_deref().map(kafka_key_text))
    }
}

/// A Kafka record key as a parking key: its text when it is UTF-8, else `0x` and its bytes in hex
/// (binary keys stay apart from one another; one that looks like text starting `0x` can only be
/// parked behind one of them, never let through).
pub fn kafka_key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => text.to_string(),
        Err(_) => format!("0x{}", key.iter().map(|byte| format!("{byte:02x}")).collect::<String>()),
    }
}

/// A field's raw value with where it came from.
enum Raw<'v> {
    Json(Json<'v>),
    Text(String),
    Millis(i64),
}

struct Read<'v> {
    raw: Raw<'v>,
    source: &'v Source,
}

fn missing(field: &'static str, source: &Source) -> DecodeError {
    DecodeError::Missing { field, from: source.to_string() }
}

/// The raw value of `source`, `None` when absent (a JSON null counts as absent). `slot` is the
/// source's slot in `spans` when it is a JSON path.
fn read<'v>(
    source: &'v Source,
    slot: Option<usize>,
    field: &'static str,
    record: &'v Record,
    text: &'v str,
    spans: &[Option<Span>],
    schemas: &Schemas,
) -> Result<Option<Read<'v>>, DecodeError> {
    let utf8 = |bytes: &[u8]| {
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::FieldNotUtf8 { field, from: source.to_string() })
    };
    let raw = match source {
        Source::Path(_) => match slot.and_then(|slot| spans.get(slot).copied().flatten()) {
            Some((start, end)) => match Json::parse(&text[start as usize..end as usize]) {
                Ok(Json::Null) => None,
                Ok(json) => Some(Raw::Json(json)),
                Err(error) => return Err(DecodeError::NotJson(error.to_string())),
            },
            None => None,
        },
        Source::Header(name) => record.header(name).map(utf8).transpose()?.map(Raw::Text),
        Source::KafkaKey => match record.key.as_deref() {
            Some(key) => Some(Raw::Text(match frame(key) {
                Some(framed) => schemas.key(framed)?,
                None => utf8(key)?,
            })),
            None => None,
        },
        Source::KafkaTimestamp => record.timestamp_ms.map(Raw::Millis),
    };
    Ok(raw.map(|raw| Read { raw, source }))
}

/// A JSON value shown in an error: its JSON text, shortened.
pub(crate) fn shown(value: &Value) -> String {
    shorten(value.to_string())
}

/// A value read from a record, shown in an error as [`shown`] shows it.
pub(crate) fn shown_json(json: &Json<'_>) -> String {
    match json.to_value() {
        Ok(value) => shown(&value),
        Err(_) => shorten(match json {
            Json::Number(raw) | Json::Composite(raw) => raw.to_string(),
            other => format!("{other:?}"),
        }),
    }
}

fn shorten(text: String) -> String {
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

fn text_of(read: Option<Read<'_>>, field: &'static str, integers: bool) -> Result<Option<String>, DecodeError> {
    let Some(Read { raw, source }) = read else {
        return Ok(None);
    };
    match raw {
        Raw::Text(text) => Ok(Some(text)),
        Raw::Json(Json::String(text)) => Ok(Some(text.into_owned())),
        Raw::Json(Json::Number(n)) if integers && is_integer(n) => Ok(Some(n.to_string())),
        Raw::Millis(ms) if integers => Ok(Some(ms.to_string())),
        other => Err(DecodeError::WrongType {
            field,
            from: source.to_string(),
            expected: if integers { "a string or integer" } else { "a string" },
            got: match other {
                Raw::Json(json) => shown_json(&json),
                Raw::Text(text) => text,
                Raw::Millis(ms) => ms.to_string(),
            },
        }),
    }
}

/// A JSON number that is an integer a 64-bit type holds.
fn is_integer(number: &str) -> bool {
    number.parse::<i64>().is_ok() || number.parse::<u64>().is_ok()
}

fn version_of(read: Option<Read<'_>>) -> Result<Option<i64>, DecodeError> {
    let Some(Read { raw, source }) = read else {
        return Ok(None);
    };
    let digits = |text: &str| {
        (!text.is_empty() && text.bytes().all(|c| c.is_ascii_digit())).then(|| text.parse::<i64>().ok()).flatten()
    };
    let version = match &raw {
        Raw::Json(Json::Number(n)) => n.parse::<i64>().ok().filter(|v| *v >= 0),
        Raw::Json(Json::String(text)) => digits(text),
        Raw::Json(_) => None,
        Raw::Text(text) => digits(text),
        Raw::Millis(ms) => Some(*ms).filter(|v| *v >= 0),
    };
    // What the error shows is built only for an error.
    let got = || match raw {
        Raw::Json(Json::Number(n)) => n.to_string(),
        Raw::Json(Json::String(text)) => shown(&Value::String(text.into_owned())),
        Raw::Json(other) => shown_json(&other),
        Raw::Text(text) => format!("{text:?}"),
        Raw::Millis(ms) => ms.to_string(),
    };
    match version {
        Some(version) => Ok(Some(version)),
        None => Err(DecodeError::BadVersion { from: source.to_string(), got: got() }),
    }
}

/// An RFC 3339 string, or integer milliseconds since the epoch.
pub(crate) fn parse_time(json: &Json<'_>) -> Option<DateTime<Utc>> {
    match json {
        Json::String(text) => DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc)),
        Json::Number(n) => DateTime::from_timestamp_millis(n.parse::<i64>().ok()?),
        Json::Int(n) => DateTime::from_timestamp_millis(*n),
        Json::Time(time) => Some(*time),
        _ => None,
    }
}

fn time_of(read: Option<Read<'_>>) -> Result<Option<DateTime<Utc>>, DecodeError> {
    let Some(Read { raw, source }) = read else {
        return Ok(None);
    };
    let time = match &raw {
        Raw::Json(json) => parse_time(json),
        Raw::Text(text) => match text.parse::<i64>() {
            Ok(ms) => DateTime::from_timestamp_millis(ms),
            Err(_) => DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc)),
        },
        Raw::Millis(ms) => DateTime::from_timestamp_millis(*ms),
    };
    let got = || match raw {
        Raw::Json(json) => shown_json(&json),
        Raw::Text(text) => format!("{text:?}"),
        Raw::Millis(ms) => ms.to_string(),
    };
    match time {
        Some(time) => Ok(Some(time)),
        None => Err(DecodeError::BadOccurredAt { from: source.to_string(), got: got() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::compile_file;
    use std::path::Path;

    fn projection(extra: &str) -> Projection {
        let text = format!(
            "topics = [\"t\"]\n{extra}\n[table]\nname = \"s\"\nkey = \"id\"\n[on.Placed]\ninsert = {{ x = \":data.x\" }}\n"
        );
        compile_file(Path::new("s.toml"), &text).unwrap()
    }

    fn record(value: &[u8]) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            key: Some(b"k-1".to_vec()),
            value: Some(value.to_vec()),
            headers: vec![(b"ce_type".to_vec(), Some(b"Placed".to_vec())), (b"bad".to_vec(), Some(vec![0xff]))],
            timestamp_ms: Some(1_700_000_000_000),
        }
    }

    fn poison(projection: &Projection, value: &[u8]) -> String {
        match projection.decode(&record(value)) {
            Decoded::Poison { error, .. } => error.to_string(),
            other => panic!("expected poison, got {other:?}"),
        }
    }

    fn handled(projection: &Projection, value: &[u8]) -> Event {
        match projection.decode(&record(value)) {
            Decoded::Handled { event, .. } => event,
            other => panic!("expected handled, got {other:?}"),
        }
    }

    #[test]
    fn tombstone_ignored_handled() {
        let p = projection("");
        let mut tombstone = record(b"");
        tombstone.value = None;
        assert!(matches!(p.decode(&tombstone), Decoded::Tombstone));
        assert!(
            matches!(p.decode(&record(br#"{"type":"Other"}"#)), Decoded::Ignored { event_type } if event_type == "Other")
        );
        let event = handled(&p, br#"{"type":"Placed","id":12,"stream_id":"o-1","stream_version":"3","occurred_at":"2024-05-01T10:00:00+02:00","data":{}}"#);
        assert_eq!(event.event_id.as_deref(), Some("12"));
        assert_eq!(event.key.as_deref(), Some("o-1"));
        assert_eq!(event.version, Some(3));
        assert_eq!(event.occurred_at.unwrap().to_rfc3339(), "2024-05-01T08:00:00+00:00");
        let event = handled(&p, br#"{"type":"Placed","stream_id":42,"stream_version":0,"occurred_at":1700000000000}"#);
        assert_eq!(event.key.as_deref(), Some("42"));
        assert_eq!(event.event_id, None);
        assert_eq!(event.occurred_at.unwrap().timestamp_millis(), 1_700_000_000_000);
    }

    #[test]
    fn poison_cases() {
        let p = projection("");
        assert!(poison(&p, b"\xff{}").starts_with("value is not valid UTF-8"));
        assert!(poison(&p, b"{").starts_with("value is not valid JSON"));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(poison(&p, deep.as_bytes()).contains("recursion limit exceeded"));
        assert_eq!(poison(&p, br#"{"stream_id":"a"}"#), "envelope field `type` (from `type`) is missing");
        assert_eq!(poison(&p, br#"{"type":1}"#), "envelope field `type` (from `type`) must be a string, got 1");
        assert_eq!(
            poison(&p, br#"{"type":"Placed","stream_version":1}"#),
            "envelope field `key` (from `stream_id`) is missing"
        );
        assert_eq!(
            poison(&p, br#"{"type":"Placed","stream_id":{"a":1},"stream_version":1}"#),
            "envelope field `key` (from `stream_id`) must be a string or integer, got {\"a\":1}"
        );
        assert_eq!(
            poison(&p, br#"{"type":"Placed","stream_id":"a"}"#),
            "envelope field `version` (from `stream_version`) is missing"
        );
        for (version, got) in
            [("-1", "-1"), ("9223372036854775808", "9223372036854775808"), ("1.5", "1.5"), ("\"x1\"", "\"x1\"")]
        {
            let value = format!(r#"{{"type":"Placed","stream_id":"a","stream_version":{version}}}"#);
            assert_eq!(
                poison(&p, value.as_bytes()),
                format!("envelope field `version` (from `stream_version`) must be a non-negative integer, got {got}")
            );
        }
        assert_eq!(
            poison(&p, br#"{"type":"Placed","stream_id":"a","stream_version":1,"occurred_at":"yesterday"}"#),
            "envelope field `occurred_at` (from `occurred_at`) is not an RFC 3339 time, got \"yesterday\""
        );
        match p.decode(&record(br#"{"type":"Placed"}"#)) {
            Decoded::Poison { event_type, .. } => assert_eq!(event_type.as_deref(), Some("Placed")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn headers_and_kafka_sources() {
        let p =
            projection("[envelope]\ntype = \"header:ce_type\"\nkey = \"kafka:key\"\noccurred_at = \"kafka:timestamp\"");
        let event = handled(&p, br#"{"stream_version":2}"#);
        assert_eq!(event.event_type, "Placed");
        assert_eq!(event.key.as_deref(), Some("k-1"));
        assert_eq!(event.occurred_at.unwrap().timestamp_millis(), 1_700_000_000_000);
        let p = projection("[envelope]\ntype = \"header:bad\"");
        assert_eq!(poison(&p, b"{}"), "envelope field `type` (from `header:bad`) is not valid UTF-8");
    }

    #[test]
    fn event_id_dedupe_requires_the_id() {
        let text = "topics = [\"t\"]\ndedupe = \"event_id\"\n[on.Placed]\nsql = \"SELECT 1\"\n";
        let p = compile_file(Path::new("e.toml"), text).unwrap();
        assert_eq!(poison(&p, br#"{"type":"Placed"}"#), "envelope field `id` (from `id`) is missing");
        let event = handled(&p, br#"{"type":"Placed","id":"e-1"}"#);
        assert_eq!(event.event_id.as_deref(), Some("e-1"));
        assert_eq!(event.version, None);
    }
}
