//! A Kafka record decoded through a projection's envelope: tombstone, ignored, handled or poison.

use std::borrow::Cow;
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
    /// Its handler's event type (shared, not copied per event).
    pub event_type: std::sync::Arc<str>,
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
        let Some((event_type, handler)) = self.handlers.get_key_value(&*event_type) else {
            return Decoded::Ignored { event_type: event_type.into_owned() };
        };
        let owned = |text: Option<Cow<'_, str>>| text.map(Cow::into_owned);
        let fields = (|| {
            let event_id =
                field(&envelope.event_id, id_slot, "id").and_then(|raw| text_of(raw, "id", true)).map(owned)?;
            let key = field(&envelope.key, key_slot, "key").and_then(|raw| text_of(raw, "key", true)).map(owned)?;
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
                event: Event { event_type: event_type.clone(), event_id, key, version, occurred_at, spans, body: None },
                handler,
            },
            Err(error) => poison(Some(event_type.to_string()), error),
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
                    .map(Cow::into_owned)
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

/// A field's text, borrowed from the record where it can be.
fn text_of<'v>(
    read: Option<Read<'v>>,
    field: &'static str,
    integers: bool,
) -> Result<Option<Cow<'v, str>>, DecodeError> {
    let Some(Read { raw, source }) = read else {
        return Ok(None);
    };
    match raw {
        Raw::Text(text) => Ok(Some(Cow::Owned(text))),
        Raw::Json(Json::String(text)) => Ok(Some(text)),
        Raw::Json(Json::Number(n)) if integers && is_integer(n) => Ok(Some(Cow::Borrowed(n))),
        Raw::Millis(ms) if integers => Ok(Some(Cow::Owned(ms.to_string()))),
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
mod tests;
