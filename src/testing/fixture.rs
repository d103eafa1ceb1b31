//! A fixture file (`<projections_dir>/NAME/tests/*.toml`): events in, rows expected out; read,
//! checked and turned into the records it delivers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::projection::{Projection, Record};

/// A fixture file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureFile {
    description: Option<String>,
    #[serde(default, rename = "event")]
    events: Vec<EventSpec>,
    #[serde(default)]
    expect: BTreeMap<String, Vec<toml::Table>>,
}

/// One event of a fixture: the record's value (a TOML table, written as JSON), or its text.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventSpec {
    key: Option<String>,
    #[serde(default)]
    partition: i32,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    value: Option<toml::Table>,
    /// The value as text, as a producer wrote it (for values a TOML table cannot say).
    value_text: Option<String>,
    timestamp_ms: Option<i64>,
}

/// A row's columns as Postgres prints them (`None`: NULL).
pub(super) type Row = Vec<Option<String>>;

/// A fixture, ready to run.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub file: PathBuf,
    pub description: Option<String>,
    pub(super) events: Vec<FixtureEvent>,
    /// Table → columns (in the order first written) and expected rows.
    pub(super) expect: BTreeMap<String, (Vec<String>, Vec<Row>)>,
}

/// One event of a fixture, as the record it is delivered as.
#[derive(Debug, Clone)]
pub(super) struct FixtureEvent {
    key: Option<String>,
    pub(super) partition: i32,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    value: Option<Vec<u8>>,
    timestamp_ms: Option<i64>,
}

/// The folder of `projection`'s fixtures: `<projections_dir>/NAME/tests`.
pub fn fixtures_dir(projection: &Projection) -> PathBuf {
    projection.file.with_extension("").join("tests")
}

/// Reads the fixtures of `projection`, in file name order; an error names the file (and line).
pub fn load_fixtures(projection: &Projection) -> Result<Vec<Fixture>, String> {
    let dir = fixtures_dir(projection);
    let entries = match std::fs::read_dir(&dir) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(format!("{}: cannot read the folder: {error}", dir.display())),
        Ok(entries) => entries,
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|file| {
            parse_fixture(file, &std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?)
        })
        .collect()
}

/// Parses one fixture file's text.
pub fn parse_fixture(file: &Path, text: &str) -> Result<Fixture, String> {
    let at = |message: String| format!("{}: {message}", file.display());
    let parsed: FixtureFile = toml::from_str(text).map_err(|error| {
        let line = error.span().map(|span| text[..span.start].matches('\n').count() + 1);
        match line {
            Some(line) => format!("{}:{line}: {}", file.display(), error.message().trim_end()),
            None => at(error.message().trim_end().to_string()),
        }
    })?;
    let mut events = Vec::new();
    for (i, spec) in parsed.events.into_iter().enumerate() {
        let value = match (spec.value, spec.value_text) {
            (Some(table), None) => Some(serde_json::to_vec(&table).map_err(|e| at(format!("event {}: {e}", i + 1)))?),
            (None, Some(text)) => Some(text.into_bytes()),
            (None, None) => None,
            (Some(_), Some(_)) => return Err(at(format!("event {}: give `value` or `value_text`, not both", i + 1))),
        };
        events.push(FixtureEvent {
            key: spec.key,
            partition: spec.partition,
            headers: spec
                .headers
                .into_iter()
                .map(|(name, value)| (name.into_bytes(), Some(value.into_bytes())))
                .collect(),
            value,
            timestamp_ms: spec.timestamp_ms,
        });
    }
    if events.is_empty() {
        return Err(at("no events: add `[[event]]` entries".into()));
    }
    let mut expect = BTreeMap::new();
    for (table, rows) in parsed.expect {
        let mut columns: Vec<String> = Vec::new();
        for row in &rows {
            for column in row.keys() {
                if !columns.contains(column) {
                    columns.push(column.clone());
                }
            }
        }
        let mut texts = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let mut values = Vec::new();
            for column in &columns {
                let value = row.get(column).ok_or_else(|| {
                    at(format!(
                        "expected row {} of `{table}` has no `{column}` (every row names the same columns)",
                        i + 1
                    ))
                })?;
                values.push(
                    expected_text(value)
                        .map_err(|message| at(format!("`{table}` row {}: `{column}`: {message}", i + 1)))?,
                );
            }
            texts.push(values);
        }
        expect.insert(table, (columns, texts));
    }
    if expect.is_empty() {
        return Err(at("no expected rows: add `[[expect.<table>]]` entries (or `expect.<table> = []`)".into()));
    }
    Ok(Fixture { file: file.to_path_buf(), description: parsed.description, events, expect })
}

/// A column's expected value as Postgres' text form: strings as written, numbers and booleans as
/// Postgres prints them, `{ null = true }` for NULL.
fn expected_text(value: &toml::Value) -> Result<Option<String>, String> {
    match value {
        toml::Value::String(text) => Ok(Some(text.clone())),
        toml::Value::Integer(number) => Ok(Some(number.to_string())),
        toml::Value::Float(number) => Ok(Some(number.to_string())),
        toml::Value::Boolean(flag) => Ok(Some(flag.to_string())),
        toml::Value::Datetime(at) => Ok(Some(at.to_string())),
        toml::Value::Table(table) if table.get("null") == Some(&toml::Value::Boolean(true)) && table.len() == 1 => {
            Ok(None)
        }
        _ => Err("expected a string, number, boolean, or `{ null = true }`".into()),
    }
}

/// The record `event` is delivered as, at `offset` of `topic`.
pub(super) fn record_of(event: &FixtureEvent, topic: &str, offset: i64) -> Record {
    Record {
        topic: Arc::from(topic),
        partition: event.partition,
        offset,
        key: event.key.as_ref().map(|key| key.clone().into_bytes()),
        value: event.value.clone(),
        headers: event.headers.clone(),
        timestamp_ms: event.timestamp_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixture_names_its_file_and_line_when_it_does_not_parse() {
        let error = parse_fixture(Path::new("t.toml"), "[[event]]\nkey = \"a\"\nvalue = 3\n").unwrap_err();
        assert!(error.starts_with("t.toml:3:"), "{error}");
        let error = parse_fixture(Path::new("t.toml"), "[[event]]\nvalue = { a = 1 }\n").unwrap_err();
        assert!(error.contains("no expected rows"), "{error}");
    }
}
