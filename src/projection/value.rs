//! An event's values converted to the Postgres type the server inferred for each `$n` parameter.
//!
//! The conversion is chosen by the parameter's type, never by the JSON it receives, so a value that
//! does not fit is an error naming the parameter instead of a confusing database error.

use std::str::FromStr;

use std::borrow::Cow;

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use postgres_types::{ToSql, Type};
use rust_decimal::Decimal;
use serde_json::Value;

use super::event::{parse_time, shown_json, Event, Record};
use super::fields::Json;
use super::{ParamRef, ParamSource, Statement};

/// A value ready to bind, of the Rust type its parameter's Postgres type takes (`None`: a typed
/// NULL). An enum rather than a boxed `ToSql`: one allocation fewer for every value bound.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Bool(Option<bool>),
    Int2(Option<i16>),
    Int4(Option<i32>),
    Int8(Option<i64>),
    Float4(Option<f32>),
    Float8(Option<f64>),
    Numeric(Option<Decimal>),
    Uuid(Option<uuid::Uuid>),
    TimestampTz(Option<DateTime<Utc>>),
    Timestamp(Option<NaiveDateTime>),
    Date(Option<NaiveDate>),
    Json(Option<Value>),
    Text(Option<String>),
}

impl SqlValue {
    fn inner(&self) -> &(dyn ToSql + Sync) {
        match self {
            SqlValue::Bool(value) => value,
            SqlValue::Int2(value) => value,
            SqlValue::Int4(value) => value,
            SqlValue::Int8(value) => value,
            SqlValue::Float4(value) => value,
            SqlValue::Float8(value) => value,
            SqlValue::Numeric(value) => value,
            SqlValue::Uuid(value) => value,
            SqlValue::TimestampTz(value) => value,
            SqlValue::Timestamp(value) => value,
            SqlValue::Date(value) => value,
            SqlValue::Json(value) => value,
            SqlValue::Text(value) => value,
        }
    }
}

/// Each value encodes as its own Rust type would, type checks included.
impl ToSql for SqlValue {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres_types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.inner().to_sql_checked(ty, out)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres_types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.inner().to_sql_checked(ty, out)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("parameter `:{name}` is missing from the event")]
    Missing { name: String },
    #[error("parameter `:{name}` = {value} does not fit `{ty}`: {reason}")]
    DoesNotFit { name: String, value: String, ty: String, reason: String },
    #[error("parameter `:{name}` needs unsupported type `{ty}`")]
    Unsupported { name: String, ty: String },
    #[error("parameter `:{name}`: header `{header}` is not valid UTF-8")]
    HeaderNotUtf8 { name: String, header: String },
    #[error("statement has {params} parameters but {types} types were given")]
    Count { params: usize, types: usize },
}

fn lookup<'a>(param: &'a ParamRef, event: &'a Event, record: &'a Record) -> Result<Option<Json<'a>>, BindError> {
    let text = |text: &'a str| Json::String(Cow::Borrowed(text));
    Ok(match &param.source {
        ParamSource::EventId => event.event_id.as_deref().map(text),
        ParamSource::EventType => Some(text(&event.event_type)),
        ParamSource::Key => event.key.as_deref().map(text),
        ParamSource::Version => event.version.map(Json::Int),
        ParamSource::OccurredAt => event.occurred_at.map(Json::Time),
        ParamSource::Topic => Some(text(&record.topic)),
        ParamSource::Partition => Some(Json::Int(record.partition.into())),
        ParamSource::Offset => Some(Json::Int(record.offset)),
        ParamSource::Header(header) => match record.header(header) {
            Some(bytes) => Some(text(
                std::str::from_utf8(bytes)
                    .map_err(|_| BindError::HeaderNotUtf8 { name: param.name.clone(), header: header.clone() })?,
            )),
            None => None,
        },
        ParamSource::WholeValue => Some(json_at(param, value_text(event, record))?),
        ParamSource::Path(path) => {
            // Every path of a compiled projection has its slot.
            match path.slot.and_then(|slot| event.spans.get(slot).copied().flatten()) {
                // Only the field's own bytes are checked to be UTF-8 (decoding checked the whole
                // value once); a span falls on JSON's token boundaries.
                Some((start, end)) => {
                    let field = value_bytes(event, record).get(start as usize..end as usize);
                    Some(json_at(param, field.and_then(|field| std::str::from_utf8(field).ok()).unwrap_or("null"))?)
                }
                None => None,
            }
        }
    })
}

/// The event's value as JSON: its framed body read with its schema, else the record's value.
fn value_bytes<'a>(event: &'a Event, record: &'a Record) -> &'a [u8] {
    match &event.body {
        Some(body) => body.as_bytes(),
        None => record.value.as_deref().unwrap_or(b"null"),
    }
}

/// The event's value as JSON text (decoding checked that it is UTF-8 JSON).
fn value_text<'a>(event: &'a Event, record: &'a Record) -> &'a str {
    std::str::from_utf8(value_bytes(event, record)).unwrap_or("null")
}

fn json_at<'a>(param: &ParamRef, raw: &'a str) -> Result<Json<'a>, BindError> {
    Json::parse(raw).map_err(|error| BindError::DoesNotFit {
        name: param.name.clone(),
        value: raw.chars().take(60).collect(),
        ty: "text".into(),
        reason: error.to_string(),
    })
}

/// The value of `param` converted for the Postgres type `ty`; JSON null or a missing optional
/// parameter binds a typed NULL.
pub fn bind(param: &ParamRef, event: &Event, record: &Record, ty: &Type) -> Result<SqlValue, BindError> {
    match lookup(param, event, record)? {
        None if !param.optional => Err(BindError::Missing { name: param.name.clone() }),
        None | Some(Json::Null) => null_of(ty).ok_or_else(|| unsupported(param, ty)),
        Some(value) => convert(param, &value, ty),
    }
}

/// Every parameter of `statement`, converted for `types` (the prepared statement's parameter types).
pub fn bind_all(
    statement: &Statement,
    types: &[Type],
    event: &Event,
    record: &Record,
) -> Result<Vec<SqlValue>, BindError> {
    if statement.params.len() != types.len() {
        return Err(BindError::Count { params: statement.params.len(), types: types.len() });
    }
    statement.params.iter().zip(types).map(|(param, ty)| bind(param, event, record, ty)).collect()
}

fn unsupported(param: &ParamRef, ty: &Type) -> BindError {
    BindError::Unsupported { name: param.name.clone(), ty: ty.name().to_string() }
}

fn is_text(ty: &Type) -> bool {
    matches!(*ty, Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN)
}

fn null_of(ty: &Type) -> Option<SqlValue> {
    Some(match *ty {
        Type::BOOL => SqlValue::Bool(None),
        Type::INT2 => SqlValue::Int2(None),
        Type::INT4 => SqlValue::Int4(None),
        Type::INT8 => SqlValue::Int8(None),
        Type::FLOAT4 => SqlValue::Float4(None),
        Type::FLOAT8 => SqlValue::Float8(None),
        Type::NUMERIC => SqlValue::Numeric(None),
        Type::UUID => SqlValue::Uuid(None),
        Type::TIMESTAMPTZ => SqlValue::TimestampTz(None),
        Type::TIMESTAMP => SqlValue::Timestamp(None),
        Type::DATE => SqlValue::Date(None),
        Type::JSON | Type::JSONB => SqlValue::Json(None),
        _ if is_text(ty) => SqlValue::Text(None),
        _ => return None,
    })
}

fn convert(param: &ParamRef, value: &Json<'_>, ty: &Type) -> Result<SqlValue, BindError> {
    let misfit = |reason: &str| BindError::DoesNotFit {
        name: param.name.clone(),
        value: shown_json(value),
        ty: ty.name().to_string(),
        reason: reason.to_string(),
    };
    // Integers: JSON integers and digit strings; the exact text, so range checks are exact.
    let integer = || {
        let text = match value {
            Json::Int(n) => return Ok(*n),
            Json::Number(n) => n,
            Json::String(text) => &**text,
            _ => return Err(misfit("not an integer")),
        };
        let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
        if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
            return Err(misfit("not an integer"));
        }
        text.parse::<i64>().map_err(|_| misfit("out of range"))
    };
    let in_range = |n: i64, min: i64, max: i64| {
        if (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(misfit("out of range"))
        }
    };
    let float = || match value {
        Json::Number(n) => n.parse::<f64>().ok().filter(|f| f.is_finite()).ok_or_else(|| misfit("not a number")),
        Json::Int(n) => Ok(*n as f64),
        Json::String(text) => text.trim().parse::<f64>().map_err(|_| misfit("not a number")),
        _ => Err(misfit("not a number")),
    };
    let string = || match value {
        Json::String(text) => Ok(text.to_string()),
        Json::Time(time) => Ok(time.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        _ => Err(misfit("not a string")),
    };
    let json = || value.to_value().map_err(|error| misfit(&error.to_string()));
    Ok(match *ty {
        Type::BOOL => SqlValue::Bool(Some(match value {
            Json::Bool(b) => *b,
            Json::String(text) if text == "true" => true,
            Json::String(text) if text == "false" => false,
            _ => return Err(misfit("not a boolean")),
        })),
        Type::INT2 => SqlValue::Int2(Some(in_range(integer()?, i16::MIN.into(), i16::MAX.into())? as i16)),
        Type::INT4 => SqlValue::Int4(Some(in_range(integer()?, i32::MIN.into(), i32::MAX.into())? as i32)),
        Type::INT8 => SqlValue::Int8(Some(integer()?)),
        Type::FLOAT4 => SqlValue::Float4(Some(float()? as f32)),
        Type::FLOAT8 => SqlValue::Float8(Some(float()?)),
        Type::NUMERIC => {
            let decimal = match value {
                Json::Int(n) => Ok(Decimal::from(*n)),
                Json::Number(text) | Json::String(Cow::Borrowed(text)) => decimal(text.trim()),
                Json::String(Cow::Owned(text)) => decimal(text.trim()),
                _ => return Err(misfit("not a number")),
            };
            SqlValue::Numeric(Some(decimal.map_err(|e| misfit(&e.to_string().to_lowercase()))?))
        }
        Type::UUID => SqlValue::Uuid(Some(match value {
            // Parsed where it lies in the record, not from a copy.
            Json::String(text) => uuid::Uuid::parse_str(text).map_err(|_| misfit("invalid uuid"))?,
            // Anything else `string` takes is no uuid; what it refuses, it says why.
            _ => return Err(string().err().unwrap_or_else(|| misfit("invalid uuid"))),
        })),
        Type::TIMESTAMPTZ => SqlValue::TimestampTz(Some(
            parse_time(value).ok_or_else(|| misfit("not an RFC 3339 time or epoch milliseconds"))?,
        )),
        Type::TIMESTAMP => {
            let naive = match value {
                Json::String(text) => ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
                    .iter()
                    .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok()),
                _ => None,
            };
            let time = naive.or_else(|| parse_time(value).map(|t| t.naive_utc()));
            SqlValue::Timestamp(Some(time.ok_or_else(|| misfit("not a date and time"))?))
        }
        Type::DATE => {
            let text = string()?;
            let date =
                NaiveDate::parse_from_str(&text, "%Y-%m-%d").ok().or_else(|| parse_time(value).map(|t| t.date_naive()));
            SqlValue::Date(Some(date.ok_or_else(|| misfit("not a date like `2024-05-01`"))?))
        }
        Type::JSON => SqlValue::Json(Some(json()?)),
        // `jsonb` refuses a NUL in a string or a key (`\u0000`), where `json` keeps it as written.
        Type::JSONB => {
            let value = json()?;
            if holds_nul(&value) {
                return Err(misfit(NUL));
            }
            SqlValue::Json(Some(value))
        }
        _ if is_text(ty) => {
            let text = match value {
                Json::String(text) => text.to_string(),
                Json::Number(n) => n.to_string(),
                Json::Int(n) => n.to_string(),
                Json::Bool(b) => b.to_string(),
                Json::Time(_) => string()?,
                other => other.to_value().map_err(|error| misfit(&error.to_string()))?.to_string(),
            };
            if text.contains('\0') {
                return Err(misfit(NUL));
            }
            SqlValue::Text(Some(text))
        }
        _ => return Err(unsupported(param, ty)),
    })
}

/// Why a text with a NUL does not fit: Postgres' `text` and `jsonb` cannot hold one.
const NUL: &str = "contains a NUL character (0x00), which Postgres text cannot hold";

/// Whether a string or an object key anywhere in `value` holds a NUL.
pub fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(key, item)| key.contains('\0') || holds_nul(item)),
        _ => false,
    }
}

/// A decimal from its text, plain or scientific.
fn decimal(text: &str) -> Result<Decimal, rust_decimal::Error> {
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text)
    } else {
        Decimal::from_str(text)
    }
}

#[cfg(test)]
mod tests;
