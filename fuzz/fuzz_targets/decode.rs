//! The event decoder, the parking key and value binding on any record: every record decodes to
//! exactly one of tombstone, ignored, handled or poison, and binding either converts or says why;
//! nothing panics.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use postgres_types::Type;
use projector::projection::value::bind;
use projector::projection::{compile_file, Decoded, Projection, Record};

#[derive(Debug, Arbitrary)]
struct Input {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    timestamp_ms: Option<i64>,
    /// Which projection decodes it.
    which: bool,
}

/// One projection reading its envelope from the JSON value, one from headers and the record key.
fn projections() -> &'static [Projection; 2] {
    static PROJECTIONS: OnceLock<[Projection; 2]> = OnceLock::new();
    PROJECTIONS.get_or_init(|| {
        let body = r#"
[table]
name = "accounts"
key = "id"
version = "version"

[on.Opened]
insert = { owner = ":data.owner", balance = ":data.amount", opened_at = ":occurred_at", tags = ":data.tags?" }

[on.Deposited]
update = { balance = "balance + :data.amount", note = ":data.note?", trace = ":header.trace_id?", at = ":offset" }
"#;
        let json = format!("topics = [\"t\"]\n{body}");
        let headers = format!(
            "topics = [\"t\"]\n[envelope]\ntype = \"header:ce_type\"\nkey = \"kafka:key\"\nversion = \"header:ce_version\"\noccurred_at = \"kafka:timestamp\"\n{body}"
        );
        [
            compile_file(Path::new("json.toml"), &json).expect("compiles"),
            compile_file(Path::new("headers.toml"), &headers).expect("compiles"),
        ]
    })
}

const TYPES: [Type; 9] =
    [Type::TEXT, Type::INT8, Type::INT4, Type::NUMERIC, Type::TIMESTAMPTZ, Type::JSONB, Type::BOOL, Type::UUID, Type::FLOAT8];

fuzz_target!(|input: Input| {
    let projection = &projections()[usize::from(input.which)];
    let record = Record {
        topic: "t".into(),
        partition: 0,
        offset: 0,
        key: input.key,
        value: input.value,
        headers: input.headers,
        timestamp_ms: input.timestamp_ms,
    };
    let decoded = projection.decode(&record);
    let _ = projection.parking_key(&record, &decoded);
    match decoded {
        Decoded::Tombstone => assert!(record.value.is_none()),
        Decoded::Ignored { event_type } => assert!(!projection.handlers.contains_key(&event_type)),
        Decoded::Poison { error, .. } => {
            let _ = error.to_string();
        }
        Decoded::Handled { event, handler } => {
            assert!(event.key.is_some() && event.version.is_some_and(|version| version >= 0));
            for statement in &handler.statements {
                for param in &statement.params {
                    for ty in &TYPES {
                        if let Err(error) = bind(param, &event, &record, ty) {
                            let _ = error.to_string();
                        }
                    }
                }
            }
        }
    }
});
