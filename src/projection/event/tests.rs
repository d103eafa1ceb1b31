//! Decoding's tests: tombstones, ignored and handled records, poison and its errors, headers and
//! Kafka's own fields as sources, and an event-id projection's required id.

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
    let p = projection("[envelope]\ntype = \"header:ce_type\"\nkey = \"kafka:key\"\noccurred_at = \"kafka:timestamp\"");
    let event = handled(&p, br#"{"stream_version":2}"#);
    assert_eq!(&*event.event_type, "Placed");
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
