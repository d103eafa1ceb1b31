//! A Protobuf body in the Confluent wire format read with its schema (`.proto` source, compiled
//! here by `protox`, the well-known types included) and written out as JSON text, so that a
//! projection addresses its fields by the same paths as a JSON event's.
//!
//! After the schema id, the frame names the message type by its indexes: the index of a
//! top-level message in the file, then of a message nested in it, and so on, as zig-zag varints
//! after their count (a single 0 byte is the file's first message). The body is written as
//! Protobuf's canonical JSON, with these choices: fields by their names in the `.proto`
//! (`customer_id`, not `customerId`), fields at their default value written too (proto3 leaves
//! zeros and empty strings off the wire, and a handler's `:data.amount` must still find 0), and
//! 64-bit integers as numbers. So a `google.protobuf.Timestamp` is RFC 3339 text, a wrapper its
//! value or null, an enum its name, bytes base64; a decimal travels as a string (`"12.34"`) and
//! binds to `numeric` exactly.

use prost_reflect::{DescriptorPool, DynamicMessage, FileDescriptor, MessageDescriptor, SerializeOptions};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};

/// The name the schema's source is compiled under.
const FILE: &str = "schema.proto";

/// A compiled `.proto` file.
#[derive(Debug)]
pub struct ProtoSchema {
    file: FileDescriptor,
}

/// The schema's own source, the one file not among the well-known types.
struct Source(String);

impl FileResolver for Source {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if name == FILE {
            File::from_source(name, &self.0)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

impl ProtoSchema {
    /// Compiles `.proto` source as the registry or a `.proto` file holds it; it may import the
    /// well-known types (`google/protobuf/timestamp.proto`, …), nothing else.
    pub fn parse(text: &str) -> Result<ProtoSchema, String> {
        let mut resolver = ChainFileResolver::new();
        resolver.add(Source(text.to_string()));
        resolver.add(GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(resolver);
        compiler.include_imports(true);
        compiler.open_file(FILE).map_err(|error| error.to_string())?;
        let pool: DescriptorPool = compiler.descriptor_pool();
        let file = pool.get_file_by_name(FILE).ok_or("the compiled file is missing")?;
        if file.messages().len() == 0 {
            return Err("the schema has no message type".into());
        }
        Ok(ProtoSchema { file })
    }

    /// `frame` (the message indexes, then the body) as JSON text.
    pub fn to_json(&self, frame: &[u8]) -> Result<String, String> {
        let mut rest = frame;
        let message = self.message(&mut rest)?;
        let decoded = DynamicMessage::decode(message, rest).map_err(|error| error.to_string())?;
        let options = SerializeOptions::new()
            .stringify_64_bit_integers(false)
            .use_proto_field_name(true)
            .skip_default_fields(false);
        let mut serializer = serde_json::Serializer::new(Vec::with_capacity(frame.len() * 2));
        decoded.serialize_with_options(&mut serializer, &options).map_err(|error| error.to_string())?;
        String::from_utf8(serializer.into_inner()).map_err(|error| error.to_string())
    }

    /// The message type the frame's indexes name; `rest` is left at the body.
    fn message(&self, rest: &mut &[u8]) -> Result<MessageDescriptor, String> {
        let mut index = || -> Result<i64, String> {
            let raw = prost::encoding::decode_varint(rest).map_err(|_| "the message indexes are cut short")?;
            Ok((raw >> 1) as i64 ^ -((raw & 1) as i64))
        };
        let count = index()?;
        let indexes = match count {
            0 => vec![0],
            1..=64 => (0..count).map(|_| index()).collect::<Result<Vec<_>, _>>()?,
            _ => return Err(format!("{count} message indexes")),
        };
        let at = |i: i64, len: usize| usize::try_from(i).ok().filter(|i| *i < len);
        let missing = || format!("no message type at indexes {indexes:?}");
        let mut message =
            at(indexes[0], self.file.messages().len()).and_then(|i| self.file.messages().nth(i)).ok_or_else(missing)?;
        for &i in &indexes[1..] {
            let child = at(i, message.child_messages().len()).and_then(|i| message.child_messages().nth(i));
            message = child.ok_or_else(missing)?;
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use prost_reflect::Value;

    const PROTO: &str = r#"
        syntax = "proto3";
        package bank;
        import "google/protobuf/timestamp.proto";
        import "google/protobuf/wrappers.proto";
        message Other { string x = 1; }
        message Deposited {
          string stream_id = 1;
          int64 stream_version = 2;
          google.protobuf.Timestamp occurred_at = 3;
          Data data = 4;
          message Data {
            string amount = 1;
            int32 count = 2;
            Kind kind = 3;
            google.protobuf.StringValue note = 4;
            bytes raw = 5;
          }
          enum Kind { CASH = 0; WIRE = 1; }
        }
    "#;

    fn body(schema: &ProtoSchema, count: i32) -> Vec<u8> {
        let pool = schema.file.parent_pool();
        let mut message = DynamicMessage::new(pool.get_message_by_name("bank.Deposited").unwrap());
        message.set_field_by_name("stream_id", Value::String("acc-1".into()));
        message.set_field_by_name("stream_version", Value::I64(9_007_199_254_740_993));
        let mut at = DynamicMessage::new(pool.get_message_by_name("google.protobuf.Timestamp").unwrap());
        at.set_field_by_name("seconds", Value::I64(1_767_323_045));
        at.set_field_by_name("nanos", Value::I32(123_000_000));
        message.set_field_by_name("occurred_at", Value::Message(at));
        let mut data = DynamicMessage::new(pool.get_message_by_name("bank.Deposited.Data").unwrap());
        data.set_field_by_name("amount", Value::String("12345678901234567.89".into()));
        data.set_field_by_name("count", Value::I32(count));
        data.set_field_by_name("kind", Value::EnumNumber(1));
        message.set_field_by_name("data", Value::Message(data));
        message.encode_to_vec()
    }

    #[test]
    fn a_protobuf_body_reads_as_json_by_its_message_indexes() {
        let schema = ProtoSchema::parse(PROTO).unwrap();
        let mut frame = vec![2, 2];
        frame.extend(body(&schema, 0));
        let json: serde_json::Value = serde_json::from_str(&schema.to_json(&frame).unwrap()).unwrap();
        assert_eq!(json["stream_id"], "acc-1");
        assert_eq!(json["stream_version"].to_string(), "9007199254740993", "a 64-bit integer, exactly");
        assert_eq!(json["occurred_at"], "2026-01-02T03:04:05.123Z");
        assert_eq!(json["data"]["amount"], "12345678901234567.89");
        assert_eq!(json["data"]["count"], 0, "a default value is written");
        assert_eq!(json["data"]["kind"], "WIRE");
        assert_eq!(json["data"]["note"], serde_json::Value::Null);
        assert_eq!(json["data"]["raw"], "");
        // [0], as its single 0 byte: the file's first message.
        let mut other = DynamicMessage::new(schema.file.parent_pool().get_message_by_name("bank.Other").unwrap());
        other.set_field_by_name("x", Value::String("y".into()));
        let first = [&[0u8][..], &other.encode_to_vec()].concat();
        assert_eq!(schema.to_json(&first).unwrap(), r#"{"x":"y"}"#);
    }

    #[test]
    fn broken_frames_and_schemas_are_errors() {
        let schema = ProtoSchema::parse(PROTO).unwrap();
        let whole = [&[2u8, 2][..], &body(&schema, 5)].concat();
        assert!(schema.to_json(&whole[..whole.len() - 1]).is_err(), "a body cut short");
        assert_eq!(schema.to_json(&[2, 8]).unwrap_err(), "no message type at indexes [4]");
        assert_eq!(schema.to_json(&[4, 2, 8]).unwrap_err(), "no message type at indexes [1, 4]");
        assert_eq!(schema.to_json(&[]).unwrap_err(), "the message indexes are cut short");
        assert!(ProtoSchema::parse("syntax = \"proto3\"; message A { strin x = 1; }").is_err());
        assert!(ProtoSchema::parse("syntax = \"proto3\"; import \"other.proto\";").is_err());
        assert!(ProtoSchema::parse("syntax = \"proto3\";").is_err());
    }
}
