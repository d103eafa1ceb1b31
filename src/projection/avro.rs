//! An Avro body read with its writer's schema and written out as JSON text, so that a projection
//! addresses its fields by the same paths as a JSON event's (`:data.amount`).
//!
//! Logical types keep their meaning: a decimal is a JSON number with exactly its digits and
//! scale (never a float); timestamps are RFC 3339 text in UTC (`2026-01-02T03:04:05.123Z`,
//! local ones without the `Z`), a date is `YYYY-MM-DD`, a time of day `HH:MM:SS.fff`, a uuid its
//! text. A union is the value of its branch (as in the JSON a producer would have written, not
//! Avro's `{"type": value}` encoding), an enum its symbol, bytes and fixed `\x` and their hex
//! (Postgres' bytea text), a duration `{"months", "days", "millis"}`, and a float that JSON
//! cannot hold (NaN, ±infinity) the text Postgres reads for it.

use std::collections::HashMap;
use std::fmt::Write as _;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::{DecimalSchema, Name, ResolvedSchema, Schema};
use apache_avro::types::Value as Avro;
use chrono::{DateTime, NaiveTime, SecondsFormat};
use num_bigint::BigInt;

/// A writer's schema, parsed, with its reader and its named types (for references to them).
/// Schemas are kept for the life of the process (a registry's ids never change meaning), so each
/// is parsed and resolved once, and leaked to let its reader borrow it.
pub struct AvroSchema {
    schema: &'static Schema,
    reader: GenericDatumReader<'static>,
    names: HashMap<Name, &'static Schema>,
}

impl std::fmt::Debug for AvroSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvroSchema").field("schema", self.schema).finish_non_exhaustive()
    }
}

impl AvroSchema {
    /// Parses a schema as the registry or a `.avsc` file holds it.
    pub fn parse(text: &str) -> Result<AvroSchema, String> {
        let schema: &'static Schema = Box::leak(Box::new(Schema::parse_str(text).map_err(|error| error.to_string())?));
        let names = ResolvedSchema::try_from(schema).map_err(|error| error.to_string())?.get_names().clone();
        let reader = GenericDatumReader::builder(schema).build().map_err(|error| error.to_string())?;
        Ok(AvroSchema { schema, reader, names })
    }

    /// `body` (the whole of it: bytes left over are an error) as JSON text.
    pub fn to_json(&self, body: &[u8]) -> Result<String, String> {
        let mut reader = Watched { rest: body, ran_out: false };
        let value = self.reader.read_value(&mut reader).map_err(|error| error.to_string());
        // apache-avro reads a string, a boolean or a union index cut short by the body's end as
        // null (and a union's first branch): a body that was read past its end is an error,
        // whatever came of it.
        if reader.ran_out {
            return Err("the body ends early".into());
        }
        let value = value?;
        if !reader.rest.is_empty() {
            return Err(format!("{} bytes are left after the body", reader.rest.len()));
        }
        let mut out = String::with_capacity(body.len() * 2);
        self.write(value, self.schema, &mut out)?;
        Ok(out)
    }

    /// Writes `value` (of `schema`) to `out` as JSON; a record's fields in the schema's order.
    fn write(&self, value: Avro, schema: &Schema, out: &mut String) -> Result<(), String> {
        let schema = match schema {
            Schema::Ref { name } => *self.names.get(name).ok_or_else(|| format!("unknown named type `{name}`"))?,
            schema => schema,
        };
        match value {
            Avro::Null if !matches!(schema, Schema::Null) => return Err("a null where the schema has none".into()),
            Avro::Null => out.push_str("null"),
            Avro::Boolean(value) => out.push_str(if value { "true" } else { "false" }),
            Avro::Int(value) => write!(out, "{value}").expect("writing to a string"),
            Avro::Long(value) => write!(out, "{value}").expect("writing to a string"),
            Avro::Float(value) => float(f64::from(value), out),
            Avro::Double(value) => float(value, out),
            Avro::Bytes(bytes) | Avro::Fixed(_, bytes) => string(&hex(&bytes), out),
            Avro::String(text) | Avro::Enum(_, text) => string(&text, out),
            Avro::Uuid(uuid) => {
                out.push('"');
                out.push_str(uuid.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()));
                out.push('"');
            }
            Avro::Union(branch, value) => {
                let Schema::Union(union) = schema else { return Err("a union value without a union schema".into()) };
                let branch = union.variants().get(branch as usize).ok_or("a union branch out of range")?;
                self.write(*value, branch, out)?;
            }
            Avro::Array(items) => {
                let Schema::Array(array) = schema else { return Err("an array without an array schema".into()) };
                out.push('[');
                for (i, item) in items.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.write(item, &array.items, out)?;
                }
                out.push(']');
            }
            Avro::Map(entries) => {
                let Schema::Map(map) = schema else { return Err("a map without a map schema".into()) };
                let mut entries: Vec<_> = entries.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                self.object(entries.into_iter().map(|(key, value)| (key, value, &*map.types)), out)?;
            }
            Avro::Record(fields) => {
                let Schema::Record(record) = schema else { return Err("a record without a record schema".into()) };
                let fields =
                    fields.into_iter().zip(&record.fields).map(|((name, value), field)| (name, value, &field.schema));
                self.object(fields, out)?;
            }
            Avro::Decimal(decimal) => {
                let Schema::Decimal(DecimalSchema { scale, .. }) = schema else {
                    return Err("a decimal without a decimal schema".into());
                };
                let unscaled = BigInt::from(decimal);
                let digits = match i128::try_from(&unscaled) {
                    Ok(small) => small.to_string(),
                    Err(_) => unscaled.to_string(),
                };
                out.push_str(&scaled(&digits, *scale));
            }
            Avro::BigDecimal(decimal) => out.push_str(&decimal.to_plain_string()),
            Avro::Date(days) => {
                let date = DateTime::from_timestamp(i64::from(days) * 86_400, 0).ok_or("a date out of range")?;
                string(&date.date_naive().to_string(), out);
            }
            Avro::TimeMillis(millis) => string(&time(i64::from(millis) * 1_000_000)?, out),
            Avro::TimeMicros(micros) => string(&time(micros.checked_mul(1_000).ok_or("a time out of range")?)?, out),
            Avro::TimestampMillis(millis) => string(&instant(DateTime::from_timestamp_millis(millis), true)?, out),
            Avro::TimestampMicros(micros) => string(&instant(DateTime::from_timestamp_micros(micros), true)?, out),
            Avro::TimestampNanos(nanos) => string(&instant(Some(DateTime::from_timestamp_nanos(nanos)), true)?, out),
            Avro::LocalTimestampMillis(millis) => {
                string(&instant(DateTime::from_timestamp_millis(millis), false)?, out)
            }
            Avro::LocalTimestampMicros(micros) => {
                string(&instant(DateTime::from_timestamp_micros(micros), false)?, out)
            }
            Avro::LocalTimestampNanos(nanos) => {
                string(&instant(Some(DateTime::from_timestamp_nanos(nanos)), false)?, out)
            }
            Avro::Duration(duration) => out.push_str(&format!(
                r#"{{"months":{},"days":{},"millis":{}}}"#,
                u32::from(duration.months()),
                u32::from(duration.days()),
                u32::from(duration.millis())
            )),
        }
        Ok(())
    }

    fn object<'s>(
        &self,
        entries: impl Iterator<Item = (String, Avro, &'s Schema)>,
        out: &mut String,
    ) -> Result<(), String> {
        out.push('{');
        for (i, (name, value, schema)) in entries.enumerate() {
            if i > 0 {
                out.push(',');
            }
            string(&name, out);
            out.push(':');
            self.write(value, schema, out)?;
        }
        out.push('}');
        Ok(())
    }
}

/// A body being read, noting whether anything was asked of it past its end.
struct Watched<'b> {
    rest: &'b [u8],
    ran_out: bool,
}

impl std::io::Read for Watched<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !buf.is_empty() && self.rest.len() < buf.len() {
            self.ran_out = true;
        }
        self.rest.read(buf)
    }
}

/// The digits of an unscaled integer with the decimal point `scale` places from the right.
fn scaled(digits: &str, scale: usize) -> String {
    let (sign, digits) = match digits.strip_prefix('-') {
        Some(digits) => ("-", digits),
        None => ("", digits),
    };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = digits.split_at(digits.len() - scale);
    format!("{sign}{whole}.{fraction}")
}

/// A JSON string, escaped as JSON escapes it (most need no escape, and are copied as they are).
fn string(text: &str, out: &mut String) {
    if text.bytes().any(|byte| byte < 0x20 || byte == b'"' || byte == b'\\') {
        out.push_str(&serde_json::to_string(text).expect("a string serializes"));
    } else {
        out.push('"');
        out.push_str(text);
        out.push('"');
    }
}

fn float(value: f64, out: &mut String) {
    match serde_json::Number::from_f64(value) {
        Some(number) => out.push_str(&number.to_string()),
        None if value.is_nan() => out.push_str("\"NaN\""),
        None if value > 0.0 => out.push_str("\"Infinity\""),
        None => out.push_str("\"-Infinity\""),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(2 + bytes.len() * 2);
    text.push_str("\\x");
    for byte in bytes {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

fn instant(at: Option<DateTime<chrono::Utc>>, utc: bool) -> Result<String, String> {
    let at = at.ok_or("a timestamp out of range")?;
    Ok(if utc {
        at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    } else {
        at.naive_utc().format("%Y-%m-%dT%H:%M:%S%.f").to_string()
    })
}

fn time(nanos: i64) -> Result<String, String> {
    let seconds = u32::try_from(nanos.div_euclid(1_000_000_000)).map_err(|_| "a time of day out of range")?;
    let time = NaiveTime::from_num_seconds_from_midnight_opt(seconds, nanos.rem_euclid(1_000_000_000) as u32)
        .ok_or("a time of day out of range")?;
    Ok(time.format("%H:%M:%S%.f").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Record;

    const SCHEMA: &str = r#"{
      "type": "record", "name": "Deposited", "namespace": "bank",
      "fields": [
        {"name": "type", "type": "string"},
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "version", "type": "long"},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "at_micros", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "on", "type": {"type": "int", "logicalType": "date"}},
        {"name": "data", "type": {"type": "record", "name": "Data", "fields": [
          {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 20, "scale": 4}},
          {"name": "fee", "type": {"type": "fixed", "name": "Fee", "size": 8, "logicalType": "decimal", "precision": 10, "scale": 2}},
          {"name": "note", "type": ["null", "string"], "default": null},
          {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["CASH", "WIRE"]}},
          {"name": "tags", "type": {"type": "array", "items": "string"}},
          {"name": "rate", "type": "double"}
        ]}},
        {"name": "previous", "type": ["null", "Data"], "default": null}
      ]
    }"#;

    fn body(amount: i64, note: Option<&str>) -> Vec<u8> {
        let schema = Schema::parse_str(SCHEMA).unwrap();
        let Schema::Record(record) = &schema else { unreachable!() };
        let Schema::Record(data_schema) = &record.fields[6].schema else { unreachable!() };
        let mut data = Record::new(&record.fields[6].schema).unwrap();
        data.put("amount", Avro::Decimal(apache_avro::Decimal::from(BigInt::from(amount).to_signed_bytes_be())));
        data.put("fee", Avro::Decimal(apache_avro::Decimal::from(BigInt::from(-5).to_signed_bytes_be())));
        data.put("note", Avro::Union(u32::from(note.is_some()), Box::new(note.map_or(Avro::Null, |note| note.into()))));
        data.put("kind", Avro::Enum(1, "WIRE".into()));
        data.put("tags", Avro::Array(vec!["a".into(), "b\u{0}".into()]));
        data.put("rate", Avro::Double(f64::NAN));
        let _ = data_schema;
        let mut event = Record::new(&schema).unwrap();
        event.put("type", "Deposited");
        event.put("id", Avro::Uuid("5f0c3a52-8d5e-4a56-9d3e-0b0b7a0f0a11".parse().unwrap()));
        event.put("version", 3i64);
        event.put("at", Avro::TimestampMillis(1_767_323_045_123));
        event.put("at_micros", Avro::TimestampMicros(-1));
        event.put("on", Avro::Date(20_455));
        event.put("data", data);
        event.put("previous", Avro::Union(0, Box::new(Avro::Null)));
        apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(event)
            .unwrap()
    }

    #[test]
    fn an_avro_body_reads_as_json_with_its_logical_types_exact() {
        let schema = AvroSchema::parse(SCHEMA).unwrap();
        let json = schema.to_json(&body(-123_456_789_012_345, Some("hi"))).unwrap();
        assert_eq!(
            json,
            r#"{"type":"Deposited","id":"5f0c3a52-8d5e-4a56-9d3e-0b0b7a0f0a11","version":3,"at":"2026-01-02T03:04:05.123Z","at_micros":"1969-12-31T23:59:59.999999Z","on":"2026-01-02","data":{"amount":-12345678901.2345,"fee":-0.05,"note":"hi","kind":"WIRE","tags":["a","b\u0000"],"rate":"NaN"},"previous":null}"#
        );
        let json: serde_json::Value = serde_json::from_str(&schema.to_json(&body(7, None)).unwrap()).unwrap();
        assert_eq!(json["data"]["amount"].to_string(), "0.0007");
        assert_eq!(json["data"]["note"], serde_json::Value::Null);
    }

    #[test]
    fn a_body_that_does_not_fit_its_schema_is_an_error() {
        let schema = AvroSchema::parse(SCHEMA).unwrap();
        let whole = body(1, None);
        assert!(schema.to_json(&whole[..whole.len() - 3]).is_err());
        let mut longer = whole.clone();
        longer.push(0);
        assert_eq!(schema.to_json(&longer).unwrap_err(), "1 bytes are left after the body");
        // Cut anywhere, even after its last union's index (which apache-avro alone reads as the
        // union's first branch, null), a body is an error.
        for len in 0..whole.len() {
            assert_eq!(schema.to_json(&whole[..len]).unwrap_err(), "the body ends early", "cut at {len}");
        }
        assert!(
            AvroSchema::parse(r#"{"type": "record", "name": "R", "fields": [{"name": "a", "type": "Nope"}]}"#).is_err()
        );
    }

    #[test]
    fn decimals_keep_their_scale() {
        assert_eq!(scaled("5", 2), "0.05");
        assert_eq!(scaled("-5", 2), "-0.05");
        assert_eq!(scaled("12345", 2), "123.45");
        assert_eq!(scaled("100", 0), "100");
        assert_eq!(scaled("0", 3), "0.000");
    }
}
