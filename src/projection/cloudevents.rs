//! CloudEvents in Kafka's binary mode, read as the structured mode's JSON: each `ce_<name>` header
//! is the attribute `<name>`, `content-type` is `datacontenttype`, and the record's value (JSON,
//! or a Confluent-framed body read as JSON) is `data`. A projection with the `cloudevents` preset
//! then reads both modes by the same paths: `type`, `id`, `time`, `subject`, an extension such as
//! `sequence`, and `data.*`.
//!
//! [`Projection::body`] gives the JSON a record is read as, when it is not the value itself.
//!
//! A structured-mode record (`content-type: application/cloudevents+json`) holds that JSON in its
//! value already and is read as it is.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::event::{DecodeError, Record};
use super::schemas::frame;
use super::{Envelope, Projection, Source};

impl Projection {
    /// The value as JSON text when it is not that text itself: a Confluent-framed body read
    /// with its schema, or (with the `cloudevents` preset) a binary-mode CloudEvent as its
    /// structured JSON. `None`: the value is read as it is.
    pub(super) fn body(&self, record: &Record, bytes: &[u8]) -> Result<Option<String>, DecodeError> {
        let data = match frame(bytes) {
            Some(framed) => Some(framed.and_then(|(id, body)| self.schemas.to_json(id, body))?),
            None => None,
        };
        if !(self.envelope.cloudevents && is_binary(record)) {
            return Ok(data);
        }
        let data = match data {
            Some(data) => data,
            None if bytes.is_empty() => "null".to_string(),
            None => std::str::from_utf8(bytes).map_err(|error| DecodeError::NotUtf8(error.to_string()))?.to_string(),
        };
        structured(record, &data).map(Some)
    }

    /// A binary-mode CloudEvent without data (no value, or an empty one) is an event all the
    /// same, its `data` null; any other record without a value is a tombstone (`None`).
    pub(super) fn no_data(&self, record: &Record) -> Option<&'static [u8]> {
        (self.envelope.cloudevents && is_binary(record)).then_some(b"")
    }
}

/// The envelope of `preset = "cloudevents"`: the attributes `type`, `id`, `subject` (the key),
/// the `sequence` extension (the version) and `time`.
pub fn envelope() -> Envelope {
    let attribute = |name: &str| Source::Path(vec![name.to_string()]);
    Envelope {
        event_type: attribute("type"),
        event_id: attribute("id"),
        key: attribute("subject"),
        version: attribute("sequence"),
        occurred_at: attribute("time"),
        cloudevents: true,
    }
}

/// The header that marks a record as a CloudEvent in binary mode (the binding requires it).
pub const SPEC_VERSION: &str = "ce_specversion";

/// Whether `record` is a binary-mode CloudEvent.
pub fn is_binary(record: &Record) -> bool {
    record.headers.iter().any(|(name, _)| name == SPEC_VERSION.as_bytes())
}

/// The structured-mode JSON of a binary-mode record whose data is `data` (JSON text). A header
/// given twice counts by its last value, as elsewhere.
pub fn structured(record: &Record, data: &str) -> Result<String, DecodeError> {
    let data = RawValue::from_string(data.to_string()).map_err(|error| DecodeError::NotJson(error.to_string()))?;
    let mut attributes = Map::new();
    for (name, value) in &record.headers {
        let attribute = match name.strip_prefix(b"ce_") {
            Some(attribute) => attribute,
            None if name.eq_ignore_ascii_case(b"content-type") => b"datacontenttype",
            None => continue,
        };
        let (Ok(attribute), Some(Ok(value))) =
            (std::str::from_utf8(attribute), value.as_deref().map(std::str::from_utf8))
        else {
            return Err(DecodeError::NotCloudEvent(format!(
                "header `{}` is not a UTF-8 attribute",
                String::from_utf8_lossy(name)
            )));
        };
        if attribute == "data" {
            return Err(DecodeError::NotCloudEvent("header `ce_data`: data is the record's value".into()));
        }
        attributes.insert(attribute.to_string(), Value::String(value.to_string()));
    }
    let mut text = serde_json::to_string(&attributes).expect("attributes serialize");
    text.pop();
    if !attributes.is_empty() {
        text.push(',');
    }
    text.push_str("\"data\":");
    text.push_str(data.get());
    text.push('}');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: &[(&str, &[u8])]) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            value: Some(b"{}".to_vec()),
            headers: headers.iter().map(|(name, value)| (name.as_bytes().to_vec(), Some(value.to_vec()))).collect(),
            timestamp_ms: None,
        }
    }

    #[test]
    fn binary_mode_reads_as_the_structured_json() {
        let binary = record(&[
            ("ce_specversion", b"1.0"),
            ("ce_id", b"e-1"),
            ("ce_type", b"Deposited"),
            ("traceparent", b"00-ab"),
            ("content-type", b"application/json"),
            ("ce_sequence", b"7"),
            ("ce_id", b"e-2"),
        ]);
        assert!(is_binary(&binary));
        assert!(!is_binary(&record(&[("content-type", b"application/cloudevents+json")])));
        let json: Value = serde_json::from_str(&structured(&binary, r#"{"amount": 2}"#).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"specversion": "1.0", "id": "e-2", "type": "Deposited",
                "datacontenttype": "application/json", "sequence": "7", "data": {"amount": 2}})
        );
        assert_eq!(structured(&record(&[]), "[1]").unwrap(), r#"{"data":[1]}"#);
    }

    fn compile_text(text: &str) -> Result<Projection, Vec<crate::projection::DefinitionError>> {
        crate::projection::compile_file(std::path::Path::new("s.toml"), text)
    }

    fn messages(text: &str) -> Vec<(usize, String)> {
        compile_text(text).unwrap_err().into_iter().map(|error| (error.line, error.message)).collect()
    }

    /// `preset = "cloudevents"`: the attributes as the envelope's defaults, each still set by
    /// hand; part of the hash; an unknown preset is an error at its line.
    #[test]
    fn the_cloudevents_preset_reads_attributes() {
        let with = |extra: &str| {
            format!("topics = [\"t\"]\ndedupe = \"event_id\"\n[envelope]\n{extra}\n[on.A]\nsql = \"SELECT 1\"\n")
        };
        let preset = compile_text(&with("preset = \"cloudevents\"")).expect("compiles");
        let path = |name: &str| Source::Path(vec![name.to_string()]);
        let envelope = &preset.envelope;
        assert!(envelope.cloudevents);
        assert_eq!(
            [&envelope.event_type, &envelope.event_id, &envelope.key, &envelope.version, &envelope.occurred_at],
            [&path("type"), &path("id"), &path("subject"), &path("sequence"), &path("time")]
        );
        let keyed = compile_text(&with("preset = \"cloudevents\"\nkey = \"accountid\"")).expect("compiles");
        assert_eq!(keyed.envelope.key, path("accountid"));
        assert_eq!(keyed.envelope.event_type, path("type"));
        let plain = compile_text(&with(
            "type = \"type\"\nid = \"id\"\nkey = \"subject\"\nversion = \"sequence\"\noccurred_at = \"time\"",
        ))
        .unwrap();
        assert_ne!(plain.hash, preset.hash, "binary mode is read only with the preset");
        let errors = messages(&with("preset = \"kafka-connect\""));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, 4);
        assert!(errors[0].1.contains("unknown preset `kafka-connect`"), "{errors:?}");
    }

    /// A projection with the preset reads both modes alike; without it, binary mode's headers
    /// are not attributes.
    #[test]
    fn both_modes_decode_alike_through_the_preset() {
        use crate::projection::{compile_file, Decoded};
        let text = |envelope: &str| {
            format!(
                "topics = [\"t\"]\n{envelope}\n[table]\nname = \"s\"\nkey = \"id\"\n[on.Deposited]\nupdate = {{ n = \":data.n\" }}\n"
            )
        };
        let preset =
            compile_file(std::path::Path::new("s.toml"), &text("[envelope]\npreset = \"cloudevents\"")).unwrap();
        let mut binary = record(&[
            ("ce_specversion", b"1.0"),
            ("ce_type", b"Deposited"),
            ("ce_id", b"e-1"),
            ("ce_subject", b"acc-1"),
            ("ce_sequence", b"3"),
            ("ce_time", b"2026-01-02T03:04:05Z"),
        ]);
        binary.value = Some(br#"{"n": 5}"#.to_vec());
        let mut structured = record(&[("content-type", b"application/cloudevents+json")]);
        structured.value = Some(
            br#"{"specversion":"1.0","type":"Deposited","id":"e-1","subject":"acc-1","sequence":3,"time":"2026-01-02T03:04:05Z","data":{"n":5}}"#.to_vec(),
        );
        for record in [&binary, &structured] {
            let Decoded::Handled { event, .. } = preset.decode(record) else { panic!("not handled: {record:?}") };
            assert_eq!(
                (event.key.as_deref(), event.version, event.event_id.as_deref()),
                (Some("acc-1"), Some(3), Some("e-1"))
            );
            assert_eq!(event.occurred_at.map(|at| at.timestamp()), Some(1_767_323_045));
        }
        // One without a version is parked under its subject, as the key's later events are.
        let mut unversioned = binary.clone();
        unversioned.headers.retain(|(name, _)| name != b"ce_sequence");
        let decoded = preset.decode(&unversioned);
        assert!(matches!(decoded, Decoded::Poison { .. }), "{decoded:?}");
        assert_eq!(preset.parking_key(&unversioned, &decoded).as_deref(), Some("acc-1"));
        // An event without data (no value, or an empty one) is handled, its data null.
        for value in [None, Some(Vec::new())] {
            let mut without = binary.clone();
            without.value = value;
            assert!(matches!(preset.decode(&without), Decoded::Handled { .. }), "{without:?}");
        }
        let plain = compile_file(std::path::Path::new("s.toml"), &text("")).unwrap();
        assert!(
            matches!(plain.decode(&binary), Decoded::Poison { .. }),
            "without the preset, `type` is not in the value"
        );
    }

    #[test]
    fn an_attribute_that_is_not_text_or_data_that_is_not_json_is_an_error() {
        assert!(matches!(structured(&record(&[("ce_id", &[0xff])]), "{}"), Err(DecodeError::NotCloudEvent(_))));
        assert!(matches!(structured(&record(&[("ce_data", b"x")]), "{}"), Err(DecodeError::NotCloudEvent(_))));
        assert!(matches!(structured(&record(&[]), "{"), Err(DecodeError::NotJson(_))));
    }
}
