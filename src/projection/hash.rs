//! The definition hash stored with checkpoints: a canonical text of what a compiled projection
//! does, and its SHA-256; and the hash older projector versions stored, to recognise their
//! checkpoints.

use sha2::{Digest, Sha256};

use super::{Dedupe, ParamRef, ParamSource, Projection, Source};

/// Hex SHA-256 of what the projection does (topics, envelope, dedupe, every compiled statement),
/// not of the file's bytes: comments, layout and key order do not count as a change. It hashes
/// [`canonical_form`], which is written out field by field, so that the hash of a definition stays
/// the same across projector versions (a test pins the example projections' hashes).
pub(super) fn semantic_hash(projection: &Projection) -> String {
    hex_sha256(&canonical_form(projection))
}

/// Hex SHA-256 of `text`.
pub fn hex_sha256(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A string as a JSON literal: quoted, every special character escaped.
fn quoted(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// What a projection does, one fact per line, every value quoted: the text its hash is taken of.
/// Version 1 of the form; a change to it must keep older definitions' hashes (see
/// [`legacy_hash`] for how an earlier form is taken over).
pub fn canonical_form(projection: &Projection) -> String {
    let mut form = String::from("projector definition 1\n");
    for topic in &projection.topics {
        form.push_str(&format!("topic {}\n", quoted(topic)));
    }
    let envelope = &projection.envelope;
    for (field, source) in [
        ("type", &envelope.event_type),
        ("id", &envelope.event_id),
        ("key", &envelope.key),
        ("version", &envelope.version),
        ("occurred_at", &envelope.occurred_at),
    ] {
        form.push_str(&format!("envelope {field} {}\n", quoted(&source.to_string())));
    }
    // Only when set: the hashes of definitions without it stay as they were.
    if envelope.cloudevents {
        form.push_str("envelope preset \"cloudevents\"\n");
    }
    match &projection.dedupe {
        Dedupe::EventId => form.push_str("dedupe event_id\n"),
        Dedupe::Version(table) => form.push_str(&format!(
            "dedupe version table {} key {} version {}\n",
            quoted(&table.table),
            quoted(&table.key_column),
            quoted(&table.version_column)
        )),
    }
    for (event_type, handler) in &projection.handlers {
        form.push_str(&format!("on {}\n", quoted(event_type)));
        for statement in &handler.statements {
            form.push_str(&format!("  statement {}\n", quoted(&statement.sql)));
            for param in &statement.params {
                let source = match &param.source {
                    ParamSource::EventId => "event_id".to_string(),
                    ParamSource::EventType => "event_type".to_string(),
                    ParamSource::Key => "key".to_string(),
                    ParamSource::Version => "version".to_string(),
                    ParamSource::OccurredAt => "occurred_at".to_string(),
                    ParamSource::Topic => "topic".to_string(),
                    ParamSource::Partition => "partition".to_string(),
                    ParamSource::Offset => "offset".to_string(),
                    ParamSource::Header(name) => format!("header:{name}"),
                    ParamSource::WholeValue => "value".to_string(),
                    ParamSource::Path(path) => format!("path:{}", path.segments.join(".")),
                };
                let optional = if param.optional { "optional" } else { "required" };
                form.push_str(&format!("    param {} {} {optional}\n", quoted(&param.name), quoted(&source)));
            }
        }
    }
    form
}

/// The hash projector versions before the canonical form stored with checkpoints: SHA-256 of the
/// `Debug` text of the compiled definition, written out here as it was, so that checkpoints
/// written by an older projector are recognised (and taken over, see
/// `store::checkpoint::adopt_legacy_hash`) instead of stopping every projection on upgrade.
pub fn legacy_hash(projection: &Projection) -> String {
    fn source(source: &Source) -> String {
        match source {
            Source::Path(path) => format!("Path({path:?})"),
            Source::Header(name) => format!("Header({name:?})"),
            Source::KafkaKey => "KafkaKey".into(),
            Source::KafkaTimestamp => "KafkaTimestamp".into(),
        }
    }
    fn param(param: &ParamRef) -> String {
        let source = match &param.source {
            ParamSource::EventId => "EventId".to_string(),
            ParamSource::EventType => "EventType".to_string(),
            ParamSource::Key => "Key".to_string(),
            ParamSource::Version => "Version".to_string(),
            ParamSource::OccurredAt => "OccurredAt".to_string(),
            ParamSource::Topic => "Topic".to_string(),
            ParamSource::Partition => "Partition".to_string(),
            ParamSource::Offset => "Offset".to_string(),
            ParamSource::Header(name) => format!("Header({name:?})"),
            ParamSource::WholeValue => "WholeValue".to_string(),
            ParamSource::Path(path) => format!("Path({:?})", path.segments),
        };
        format!("ParamRef {{ name: {:?}, source: {source}, optional: {} }}", param.name, param.optional)
    }
    let envelope = &projection.envelope;
    let mut text = format!(
        "topics={:?}\nenvelope=Envelope {{ event_type: {}, event_id: {}, key: {}, version: {}, occurred_at: {} }}\n",
        projection.topics,
        source(&envelope.event_type),
        source(&envelope.event_id),
        source(&envelope.key),
        source(&envelope.version),
        source(&envelope.occurred_at),
    );
    match &projection.dedupe {
        Dedupe::EventId => text.push_str("dedupe=event_id\n"),
        Dedupe::Version(table) => text.push_str(&format!(
            "dedupe=version table={} key={} version={}\n",
            table.table, table.key_column, table.version_column
        )),
    }
    for (event_type, handler) in &projection.handlers {
        text.push_str(&format!("on {event_type}\n"));
        for statement in &handler.statements {
            let params: Vec<String> = statement.params.iter().map(param).collect();
            text.push_str(&format!("  {}\n  [{}]\n", statement.sql, params.join(", ")));
        }
    }
    hex_sha256(&text)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::projection::{compile_file, DefinitionError};

    fn compile(text: &str) -> Result<Projection, Vec<DefinitionError>> {
        compile_file(Path::new("projections/order_summary.toml"), text)
    }

    #[test]
    fn hash_follows_meaning_not_layout() {
        let base = "topics = [\"t\"]\ndedupe = \"event_id\"\n[on.A]\nsql = \"UPDATE totals SET n = n + 1\"\n";
        let commented = format!("# a comment\n{base}");
        let changed = base.replace("n + 1", "n + 2");
        let hash = |text: &str| compile(text).unwrap().hash;
        assert_eq!(hash(base), hash(&commented));
        assert_ne!(hash(base), hash(&changed));
    }

    /// The hash before the canonical form, as it was computed then: from the `Debug` text.
    fn debug_hash(projection: &Projection) -> String {
        // The envelope's Debug text then, before it had its `cloudevents` preset.
        let envelope = format!("{:?}", projection.envelope).replace(", cloudevents: false", "");
        let mut canonical = format!("topics={:?}\nenvelope={envelope}\n", projection.topics);
        match &projection.dedupe {
            Dedupe::EventId => canonical.push_str("dedupe=event_id\n"),
            Dedupe::Version(table) => canonical.push_str(&format!(
                "dedupe=version table={} key={} version={}\n",
                table.table, table.key_column, table.version_column
            )),
        }
        for (event_type, handler) in &projection.handlers {
            canonical.push_str(&format!("on {event_type}\n"));
            for statement in &handler.statements {
                canonical.push_str(&format!("  {}\n  {:?}\n", statement.sql, statement.params));
            }
        }
        hex_sha256(&canonical)
    }

    #[test]
    fn example_hashes_are_pinned() {
        for (file, canonical, legacy) in [
            (
                "projections/order_summary.toml",
                "00dcfcfd967bad66216d2d12cae2a0cbed4ff1d79f40828c3a9b6aeb2374206a",
                "4f772a5baa7278623c8a496892e1c6b192e31d9fde00116af886b387b67f66f8",
            ),
            (
                "projections/customer_totals.toml",
                "ecc7d95e1d02eac9d6c4b792b53fcff0e21e6ed48f3bfb8e1fa267be1cab18ba",
                "4542d40711f0317c113c83ecf2624a4454b829082411fa11e0999b6ba3ec1ba0",
            ),
        ] {
            let text = std::fs::read_to_string(file).expect("example definition");
            let projection = compile_file(Path::new(file), &text).expect("compiles");
            assert_eq!(legacy_hash(&projection), debug_hash(&projection), "{file}: the legacy hash is the Debug hash");
            assert_eq!(projection.hash, canonical, "{file}: a change to the hash stops every deployed projection");
            assert_eq!(legacy_hash(&projection), legacy, "{file}");
        }
    }
}
