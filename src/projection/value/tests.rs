//! The binding's tests: sources resolved, each SQL type converted, typed nulls, what does not fit, and the parameters counted.

use super::*;
use crate::projection::fields::Fields;
use crate::projection::params::source_of;
use bytes_of::to_text;

/// Encodes a bound value the way the client would, to look at what was bound.
mod bytes_of {
    use super::*;
    pub fn to_text(value: &SqlValue, ty: &Type) -> Option<Vec<u8>> {
        let mut buf = bytes::BytesMut::new();
        match value.to_sql_checked(ty, &mut buf).unwrap() {
            postgres_types::IsNull::Yes => None,
            postgres_types::IsNull::No => Some(buf.to_vec()),
        }
    }
}

fn event(value: Value) -> (Event, Record) {
    let event = Event {
        event_type: "Placed".into(),
        event_id: Some("e-1".into()),
        key: Some("o-1".into()),
        version: Some(3),
        occurred_at: DateTime::from_timestamp_millis(1_700_000_000_000),
        spans: Vec::new(),
        body: None,
    };
    let record = Record {
        topic: "t".into(),
        partition: 2,
        offset: 9,
        key: None,
        value: Some(value.to_string().into_bytes()),
        headers: vec![(b"trace".to_vec(), Some(b"abc".to_vec())), (b"bad".to_vec(), Some(vec![0xff]))],
        timestamp_ms: None,
    };
    (event, record)
}

fn param(name: &str) -> ParamRef {
    let (name, optional) = match name.strip_suffix('?') {
        Some(name) => (name, true),
        None => (name, false),
    };
    ParamRef { name: name.into(), source: source_of(name), optional }
}

/// The parameter `name` compiled alone, and `event` decoded for it: its path's field, if it
/// reads one, is slot 0.
fn compiled(name: &str, event: &mut Event, record: &Record) -> ParamRef {
    let mut param = param(name);
    if let ParamSource::Path(path) = &mut param.source {
        let mut fields = Fields::default();
        path.slot = Some(fields.add(&path.segments));
        event.spans = fields.find(value_text(event, record)).unwrap();
    }
    param
}

/// The JSON value of `name` for this event; `None` when missing. A header that is not valid
/// UTF-8 is `None` here (and a [`BindError::HeaderNotUtf8`] in [`bind`]).
fn resolve(name: &str, event: &Event, record: &Record) -> Option<Value> {
    let mut event = event.clone();
    let param = compiled(name, &mut event, record);
    lookup(&param, &event, record).ok().flatten().and_then(|json| json.to_value().ok())
}

fn bound(name: &str, ty: Type) -> Result<Option<Vec<u8>>, String> {
    let (mut event, record) = event(serde_json::from_str(
        r#"{"data":{"total":"12.50","n":40000,"big":1e2,"exact":0.1000000000000000000000000001,"s":"abc","u":"67e55044-10b1-426f-9247-bb680e5fe0c8","t":"2024-05-01T10:00:00Z","d":"2024-05-01","b":true,"nil":null,"items":[{"sku":"A"}]}}"#,
    ).unwrap());
    let param = compiled(name, &mut event, &record);
    bind(&param, &event, &record, &ty).map(|v| to_text(&v, &ty)).map_err(|e| e.to_string())
}

#[test]
fn resolves_sources() {
    let (event, record) = event(serde_json::json!({"data": {"items": [{"sku": "A"}]}}));
    let get = |name: &str| resolve(name, &event, &record);
    assert_eq!(get("key"), Some(Value::from("o-1")));
    assert_eq!(get("version"), Some(Value::from(3)));
    assert_eq!(get("occurred_at"), Some(Value::from("2023-11-14T22:13:20Z")));
    assert_eq!(get("partition"), Some(Value::from(2)));
    assert_eq!(get("offset"), Some(Value::from(9)));
    assert_eq!(get("header.trace"), Some(Value::from("abc")));
    assert_eq!(get("header.bad"), None);
    assert_eq!(get("data.items.0.sku"), Some(Value::from("A")));
    assert_eq!(get("data.items.1.sku"), None);
    assert_eq!(get("value"), Some(serde_json::json!({"data": {"items": [{"sku": "A"}]}})));
}

#[test]
fn converts_by_type() {
    assert_eq!(bound("data.n", Type::INT4).unwrap(), Some(40000i32.to_be_bytes().to_vec()));
    assert_eq!(bound("version", Type::INT8).unwrap(), Some(3i64.to_be_bytes().to_vec()));
    assert_eq!(bound("data.s", Type::TEXT).unwrap(), Some(b"abc".to_vec()));
    assert_eq!(bound("data.n", Type::TEXT).unwrap(), Some(b"40000".to_vec()));
    assert_eq!(bound("data.items", Type::TEXT).unwrap(), Some(br#"[{"sku":"A"}]"#.to_vec()));
    assert_eq!(bound("data.b", Type::BOOL).unwrap(), Some(vec![1]));
    assert!(bound("data.total", Type::NUMERIC).unwrap().is_some());
    assert!(bound("data.big", Type::NUMERIC).unwrap().is_some());
    assert!(bound("data.exact", Type::NUMERIC).unwrap().is_some());
    assert!(bound("data.u", Type::UUID).unwrap().is_some());
    assert!(bound("data.t", Type::TIMESTAMPTZ).unwrap().is_some());
    assert!(bound("data.t", Type::TIMESTAMP).unwrap().is_some());
    assert!(bound("data.d", Type::DATE).unwrap().is_some());
    assert!(bound("occurred_at", Type::TIMESTAMPTZ).unwrap().is_some());
    assert!(bound("data.items", Type::JSONB).unwrap().is_some());
    assert_eq!(bound("data.total", Type::FLOAT8).unwrap(), Some(12.5f64.to_be_bytes().to_vec()));
}

#[test]
fn nulls_are_typed() {
    for ty in [Type::INT4, Type::TEXT, Type::NUMERIC, Type::UUID, Type::JSONB, Type::TIMESTAMPTZ, Type::DATE] {
        assert_eq!(bound("data.nil", ty.clone()), Ok(None), "{ty}");
        assert_eq!(bound("data.absent?", ty.clone()), Ok(None), "{ty}");
    }
}

#[test]
fn errors() {
    assert_eq!(bound("data.absent", Type::TEXT).unwrap_err(), "parameter `:data.absent` is missing from the event");
    assert_eq!(
        bound("data.n", Type::INT2).unwrap_err(),
        "parameter `:data.n` = 40000 does not fit `int2`: out of range"
    );
    assert_eq!(
        bound("data.s", Type::INT8).unwrap_err(),
        "parameter `:data.s` = \"abc\" does not fit `int8`: not an integer"
    );
    assert!(bound("data.s", Type::NUMERIC)
        .unwrap_err()
        .starts_with("parameter `:data.s` = \"abc\" does not fit `numeric`: "));
    assert_eq!(
        bound("data.s", Type::UUID).unwrap_err(),
        "parameter `:data.s` = \"abc\" does not fit `uuid`: invalid uuid"
    );
    assert_eq!(
        bound("data.n", Type::UUID).unwrap_err(),
        "parameter `:data.n` = 40000 does not fit `uuid`: not a string"
    );
    let error = bound("occurred_at", Type::UUID).unwrap_err();
    assert!(
        error.starts_with("parameter `:occurred_at` = ") && error.ends_with("does not fit `uuid`: invalid uuid"),
        "{error}"
    );
    assert_eq!(bound("data.s", Type::POINT).unwrap_err(), "parameter `:data.s` needs unsupported type `point`");
    assert!(bound("header.bad", Type::TEXT).unwrap_err().contains("is not valid UTF-8"));
    let (mut event, record) =
        event(serde_json::json!({"n": 99999999999999999999999u128.to_string().parse::<Value>().unwrap()}));
    let n = compiled("n", &mut event, &record);
    let error = bind(&n, &event, &record, &Type::INT8).err().unwrap().to_string();
    assert!(error.ends_with("out of range"), "{error}");
    let error = bind(&n, &event, &record, &Type::NUMERIC).err().map(|e| e.to_string());
    assert!(error.is_none(), "{error:?}");
    let (mut event, record) = event_with_huge();
    let n = compiled("n", &mut event, &record);
    let error = bind(&n, &event, &record, &Type::NUMERIC).err().unwrap().to_string();
    assert!(error.contains("does not fit `numeric`"), "{error}");
}

fn event_with_huge() -> (Event, Record) {
    event(serde_json::from_str(r#"{"n":123456789012345678901234567890123}"#).unwrap())
}

#[test]
fn bind_all_checks_counts() {
    let (event, record) = event(serde_json::json!({}));
    let statement = Statement {
        sql: "SELECT $1, $2".into(),
        params: vec![param("key"), param("version")],
        kind: crate::projection::StatementKind::Other,
        origin: crate::projection::Origin { file: "f".into(), line: 1 },
        writes: None,
        set_based: None,
    };
    assert_eq!(bind_all(&statement, &[Type::TEXT, Type::INT8], &event, &record).unwrap().len(), 2);
    assert!(bind_all(&statement, &[Type::TEXT], &event, &record).is_err());
}
