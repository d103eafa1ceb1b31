//! `projector test`: a projection's fixtures, run through the engine's own decode → bind → apply
//! path ([`crate::store::apply::apply_batch`], as `run` calls it) on a scratch database with the
//! projection's migrations applied; no Kafka. A fixture (`<projections_dir>/NAME/tests/*.toml`)
//! lists events in and the rows expected out. Each fixture runs as written, then, unasked, again
//! under what at-least-once delivery does: every event delivered twice, the whole stream replayed
//! over the built rows, keys interleaved in other orders (each key's order kept), and a key's
//! events out of order. Every run must give the expected rows; a report names the run, its event
//! order, and the differing rows column by column.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::checkpoint::Move;
use crate::projection::{Decoded, Projection, Record};
use crate::store::apply::{apply_batch, Batch, Handling};
use crate::store::fast::Applier;
use crate::store::{self, StoreError};

/// Runs of each kind with a random order, per fixture.
const SHUFFLES: usize = 3;

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
type Row = Vec<Option<String>>;

/// A fixture, ready to run.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub file: PathBuf,
    pub description: Option<String>,
    events: Vec<FixtureEvent>,
    /// Table → columns (in the order first written) and expected rows.
    expect: BTreeMap<String, (Vec<String>, Vec<Row>)>,
}

#[derive(Debug, Clone)]
struct FixtureEvent {
    key: Option<String>,
    partition: i32,
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

/// One run of a fixture: its name, the events in the order delivered (indices into the
/// fixture, from 1), and what differed from the expected rows (empty: passed).
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub run: String,
    pub order: Vec<usize>,
    pub differences: Vec<String>,
}

/// A fixture's runs.
#[derive(Debug, Clone, Serialize)]
pub struct FixtureResult {
    pub projection: String,
    pub fixture: String,
    pub description: Option<String>,
    pub runs: Vec<RunResult>,
    /// Each event's label for the text report (type and id, as the projection reads them).
    #[serde(skip)]
    pub labels: Vec<String>,
}

impl FixtureResult {
    pub fn passed(&self) -> bool {
        self.runs.iter().all(|run| run.differences.is_empty())
    }
}

/// Everything `projector test` found.
#[derive(Debug, Clone, Serialize)]
pub struct TestReport {
    pub seed: u64,
    pub fixtures: Vec<FixtureResult>,
}

impl TestReport {
    pub fn passed(&self) -> bool {
        self.fixtures.iter().all(FixtureResult::passed)
    }
}

/// Why `projector test` could not run.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// A fixture does not parse, or names nothing to test.
    #[error("{0}")]
    Fixture(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

/// Runs the fixtures of `projections` on scratch databases of the server `url` names, with
/// `seed` choosing the shuffled orders.
pub async fn run(url: &str, projections: &[Projection], seed: u64) -> Result<TestReport, TestError> {
    let mut all = Vec::new();
    for projection in projections {
        let fixtures = load_fixtures(projection).map_err(TestError::Fixture)?;
        if !fixtures.is_empty() {
            all.push((projection, fixtures));
        }
    }
    let mut report = TestReport { seed, fixtures: Vec::new() };
    for (projection, fixtures) in all {
        let scratch = Scratch::create(url, projection).await?;
        let result = async {
            for fixture in &fixtures {
                report.fixtures.push(run_fixture(&scratch, projection, fixture, seed).await?);
            }
            Ok::<_, TestError>(())
        }
        .await;
        scratch.drop().await;
        result?;
    }
    Ok(report)
}

/// A database of its own for one projection's fixtures, dropped at the end.
struct Scratch {
    server: String,
    name: String,
    pool: deadpool_postgres::Pool,
}

impl Scratch {
    async fn create(url: &str, projection: &Projection) -> Result<Scratch, TestError> {
        let name = format!(
            "projector_test_{}_{}",
            projection.name.chars().take(24).collect::<String>(),
            rand::rng().random::<u32>()
        );
        let scratch_url =
            crate::demo::recreate_database(url, &name).await.map_err(|error| TestError::Other(format!("{error:#}")))?;
        store::migrate_with(&scratch_url, std::slice::from_ref(projection)).await?;
        let pool = store::connect(&scratch_url, 2).await?;
        {
            let client = pool.get().await.map_err(|error| StoreError::Connect(error.to_string()))?;
            let problems = store::check_statements(&client, std::slice::from_ref(projection), true).await;
            if !problems.is_empty() {
                drop(client);
                let scratch = Scratch { server: url.to_string(), name, pool };
                scratch.drop().await;
                return Err(TestError::Fixture(problems.join("\n")));
            }
        }
        Ok(Scratch { server: url.to_string(), name, pool })
    }

    async fn drop(self) {
        self.pool.close();
        if let Ok(admin) = store::connect(&self.server, 1).await {
            if let Ok(client) = admin.get().await {
                let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name)).await;
            }
        }
    }
}

/// The runs of one fixture.
async fn run_fixture(
    scratch: &Scratch,
    projection: &Projection,
    fixture: &Fixture,
    seed: u64,
) -> Result<FixtureResult, TestError> {
    let (keys, labels) = keys_of(projection, fixture);
    let written: Vec<usize> = (0..fixture.events.len()).collect();
    let mut runs: Vec<(String, Vec<usize>)> = vec![
        ("as written".into(), written.clone()),
        ("each event delivered twice".into(), written.iter().flat_map(|&i| [i, i]).collect()),
        ("the whole stream replayed over the built rows".into(), written.iter().chain(&written).copied().collect()),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seen: BTreeSet<Vec<usize>> = runs.iter().map(|(_, order)| order.clone()).collect();
    for i in 0..SHUFFLES {
        let order = interleaved(&keys, &mut rng);
        if seen.insert(order.clone()) {
            runs.push((format!("keys interleaved in another order (seed {seed}, #{})", i + 1), order));
        }
    }
    for i in 0..SHUFFLES {
        if let Some((key, order)) = out_of_order(&keys, &mut rng) {
            if seen.insert(order.clone()) {
                runs.push((format!("events of key `{key}` out of order (seed {seed}, #{})", i + 1), order));
            }
        }
    }
    let mut results = Vec::new();
    for (name, order) in runs {
        reset(scratch, projection, fixture).await?;
        let differences = match deliver(scratch, projection, fixture, &order).await {
            Ok(()) => compare(scratch, fixture).await?,
            Err(error) => vec![format!("the engine could not apply the events: {error}")],
        };
        results.push(RunResult { run: name, order: order.iter().map(|i| i + 1).collect(), differences });
    }
    Ok(FixtureResult {
        projection: projection.name.clone(),
        fixture: fixture.file.display().to_string(),
        description: fixture.description.clone(),
        runs: results,
        labels,
    })
}

/// The fixture's events grouped by the key the engine orders them by (events with none each on
/// their own), each group in the order written; and a label per event (its type and id, as the
/// projection reads them) for reports.
fn keys_of(projection: &Projection, fixture: &Fixture) -> (Vec<(String, Vec<usize>)>, Vec<String>) {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    let mut labels = Vec::with_capacity(fixture.events.len());
    for (i, event) in fixture.events.iter().enumerate() {
        let record = record_of(event, "fixture", 0);
        let decoded = projection.decode(&record);
        let key = match &decoded {
            Decoded::Handled { .. } | Decoded::Poison { .. } => projection.parking_key(&record, &decoded),
            _ => None,
        }
        .unwrap_or_else(|| format!("(event {})", i + 1));
        labels.push(match &decoded {
            Decoded::Handled { event, .. } => match &event.event_id {
                Some(id) => format!("({} {id})", event.event_type),
                None => format!("({})", event.event_type),
            },
            Decoded::Ignored { event_type } => format!("({event_type}, ignored)"),
            Decoded::Tombstone => "(tombstone)".into(),
            Decoded::Poison { .. } => "(not decodable)".into(),
        });
        match groups.iter_mut().find(|(known, _)| *known == key) {
            Some((_, members)) => members.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    (groups, labels)
}

/// A random interleaving of the groups, each group's order kept.
fn interleaved(groups: &[(String, Vec<usize>)], rng: &mut impl Rng) -> Vec<usize> {
    let mut slots: Vec<usize> =
        groups.iter().enumerate().flat_map(|(g, (_, members))| std::iter::repeat_n(g, members.len())).collect();
    slots.shuffle(rng);
    let mut next = vec![0; groups.len()];
    slots
        .into_iter()
        .map(|g| {
            next[g] += 1;
            groups[g].1[next[g] - 1]
        })
        .collect()
}

/// The written order, but with the events of one random key (of two or more) shuffled among
/// their own positions.
fn out_of_order(groups: &[(String, Vec<usize>)], rng: &mut impl Rng) -> Option<(String, Vec<usize>)> {
    let candidates: Vec<&(String, Vec<usize>)> = groups.iter().filter(|(_, members)| members.len() > 1).collect();
    let (key, members) = candidates.get(rng.random_range(0..candidates.len().max(1)))?;
    let mut shuffled = members.clone();
    while shuffled == *members {
        shuffled.shuffle(rng);
    }
    let mut order: Vec<usize> = (0..groups.iter().map(|(_, m)| m.len()).sum()).collect();
    for (position, event) in members.iter().zip(&shuffled) {
        order[*position] = *event;
    }
    Some((key.clone(), order))
}

fn record_of(event: &FixtureEvent, topic: &str, offset: i64) -> Record {
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

/// Empties the projection's tables and its engine rows, as before its first event.
async fn reset(scratch: &Scratch, projection: &Projection, fixture: &Fixture) -> Result<(), TestError> {
    let client = scratch.pool.get().await.map_err(|error| StoreError::Connect(error.to_string()))?;
    let mut tables: BTreeSet<String> = projection.tables().into_iter().collect();
    tables.extend(fixture.expect.keys().cloned());
    let mut sql = format!("TRUNCATE {}", tables.into_iter().collect::<Vec<_>>().join(", "));
    for table in ["checkpoints", "processed_events", "held_events", "dead_letters"] {
        sql.push_str(&format!("; DELETE FROM projector.{table} WHERE projection = '{}'", projection.name));
    }
    client
        .batch_execute(&sql)
        .await
        .map_err(|error| TestError::Fixture(format!("{}: {}", fixture.file.display(), store::describe(&error))))?;
    Ok(())
}

/// Delivers the fixture's events in `order`, one record per event at the next offset of its
/// partition, in batches of one partition's consecutive records, as the engine's lanes apply
/// them: retried event by event when the engine asks, as `run` does.
async fn deliver(scratch: &Scratch, projection: &Projection, fixture: &Fixture, order: &[usize]) -> Result<(), String> {
    let topic = projection.topics.first().cloned().unwrap_or_default();
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let records: Vec<Record> = order
        .iter()
        .map(|&i| {
            let event = &fixture.events[i];
            let offset = next.entry(event.partition).or_insert(0);
            *offset += 1;
            record_of(event, &topic, *offset - 1)
        })
        .collect();
    // As `projector run` applies them by default (`batch.set_based`).
    let applier = Applier::default();
    let mut start = 0;
    while start < records.len() {
        let partition = records[start].partition;
        let end = records[start..]
            .iter()
            .position(|record| record.partition != partition)
            .map_or(records.len(), |n| start + n);
        let chunk = &records[start..end];
        let from = if chunk[0].offset == 0 { None } else { Some(chunk[0].offset) };
        let batch = Batch {
            records: chunk,
            moves: vec![Move { partition: (topic.clone(), partition), from, to: chunk[chunk.len() - 1].offset + 1 }],
        };
        let mut client = scratch.pool.get().await.map_err(|error| error.to_string())?;
        let mut isolate = false;
        loop {
            match apply_batch(&mut client, &applier, projection, &batch, None, isolate).await {
                Ok(_) => break,
                Err(error) if error.handling() == Handling::Isolate && !isolate => isolate = true,
                Err(error) => return Err(error.to_string()),
            }
        }
        start = end;
    }
    Ok(())
}

/// What differs between the expected rows and the tables: row by row, matched on the first
/// column written, and column by column.
async fn compare(scratch: &Scratch, fixture: &Fixture) -> Result<Vec<String>, TestError> {
    let client = scratch.pool.get().await.map_err(|error| StoreError::Connect(error.to_string()))?;
    let mut differences = Vec::new();
    for (table, (columns, expected)) in &fixture.expect {
        let selected: Vec<String> = columns.iter().map(|column| format!("({column})::text")).collect();
        let select = if columns.is_empty() {
            format!("SELECT FROM {table}")
        } else {
            format!("SELECT {} FROM {table}", selected.join(", "))
        };
        let rows = client.query(&select, &[]).await.map_err(|error| {
            TestError::Fixture(format!("{}: `{table}`: {}", fixture.file.display(), store::describe(&error)))
        })?;
        let mut got: Vec<Row> =
            rows.iter().map(|row| (0..columns.len()).map(|i| row.get::<_, Option<String>>(i)).collect()).collect();
        let mut expected = expected.clone();
        got.sort();
        expected.sort();
        if got == expected {
            continue;
        }
        let show = |value: &Option<String>| value.as_ref().map_or("NULL".to_string(), |text| format!("{text:?}"));
        let identity = |row: &Row| format!("{}={}", columns[0], show(&row[0]));
        let mut unmatched_got = got.clone();
        for row in &expected {
            if let Some(at) = unmatched_got.iter().position(|candidate| candidate == row) {
                unmatched_got.remove(at);
                continue;
            }
            match unmatched_got.iter().position(|candidate| candidate[0] == row[0]) {
                Some(at) => {
                    let other = unmatched_got.remove(at);
                    for (i, column) in columns.iter().enumerate().skip(1) {
                        if other[i] != row[i] {
                            differences.push(format!(
                                "`{table}` row {}: `{column}` expected {}, got {}",
                                identity(row),
                                show(&row[i]),
                                show(&other[i])
                            ));
                        }
                    }
                }
                None => differences.push(format!("`{table}`: missing row {}", describe_row(columns, row, &show))),
            }
        }
        for row in unmatched_got {
            differences.push(format!("`{table}`: unexpected row {}", describe_row(columns, &row, &show)));
        }
    }
    Ok(differences)
}

fn describe_row(columns: &[String], row: &[Option<String>], show: &dyn Fn(&Option<String>) -> String) -> String {
    let fields: Vec<String> =
        columns.iter().zip(row).map(|(column, value)| format!("{column}={}", show(value))).collect();
    format!("({})", fields.join(", "))
}

/// The report as text, for a terminal.
pub fn text(report: &TestReport) -> String {
    let mut out = String::new();
    for result in &report.fixtures {
        let runs = result.runs.len();
        if result.passed() {
            out.push_str(&format!("ok    {} {} ({runs} runs)\n", result.projection, result.fixture));
            continue;
        }
        out.push_str(&format!("FAIL  {} {}\n", result.projection, result.fixture));
        for run in result.runs.iter().filter(|run| !run.differences.is_empty()) {
            let order: Vec<String> = run
                .order
                .iter()
                .map(|i| match result.labels.get(i - 1) {
                    Some(label) => format!("{i} {label}"),
                    None => i.to_string(),
                })
                .collect();
            out.push_str(&format!("      {}: events delivered as {}\n", run.run, order.join(", ")));
            for difference in &run.differences {
                out.push_str(&format!("        {difference}\n"));
            }
        }
    }
    let failed = report.fixtures.iter().filter(|fixture| !fixture.passed()).count();
    out.push_str(&format!(
        "{} fixture(s), {failed} failed; seed {} (`--seed {}` replays these orders)\n",
        report.fixtures.len(),
        report.seed,
        report.seed
    ));
    out
}

/// The report as JUnit XML: a test suite per projection, a test case per fixture and run.
pub fn junit(report: &TestReport) -> String {
    use quick_xml::escape::escape;
    let mut suites: BTreeMap<&str, Vec<&FixtureResult>> = BTreeMap::new();
    for fixture in &report.fixtures {
        suites.entry(&fixture.projection).or_default().push(fixture);
    }
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"projector test\">\n");
    for (projection, fixtures) in suites {
        let cases: Vec<(&FixtureResult, &RunResult)> =
            fixtures.iter().flat_map(|fixture| fixture.runs.iter().map(move |run| (*fixture, run))).collect();
        let failures = cases.iter().filter(|(_, run)| !run.differences.is_empty()).count();
        out.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\">\n",
            escape(projection),
            cases.len()
        ));
        for (fixture, run) in cases {
            out.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\"",
                escape(fixture.fixture.as_str()),
                escape(run.run.as_str())
            ));
            if run.differences.is_empty() {
                out.push_str("/>\n");
            } else {
                let order: Vec<String> = run.order.iter().map(ToString::to_string).collect();
                out.push_str(&format!(
                    ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                    escape(run.differences[0].as_str()),
                    escape(
                        format!("events delivered as {}\n{}", order.join(", "), run.differences.join("\n")).as_str()
                    )
                ));
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleavings_keep_each_keys_order_and_out_of_order_breaks_one() {
        let groups = vec![("a".to_string(), vec![0, 2, 4]), ("b".to_string(), vec![1, 3]), ("c".to_string(), vec![5])];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let order = interleaved(&groups, &mut rng);
            assert_eq!(order.len(), 6);
            for (_, members) in &groups {
                let positions: Vec<usize> =
                    members.iter().map(|m| order.iter().position(|o| o == m).unwrap()).collect();
                assert!(positions.windows(2).all(|w| w[0] < w[1]), "{order:?}");
            }
            let (key, order) = out_of_order(&groups, &mut rng).expect("a key with two events");
            let members = &groups.iter().find(|(k, _)| *k == key).unwrap().1;
            let positions: Vec<usize> = members.iter().map(|m| order.iter().position(|o| o == m).unwrap()).collect();
            assert!(positions.windows(2).any(|w| w[0] > w[1]), "{key}: {order:?}");
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4, 5]);
        }
    }

    #[test]
    fn a_fixture_names_its_file_and_line_when_it_does_not_parse() {
        let error = parse_fixture(Path::new("t.toml"), "[[event]]\nkey = \"a\"\nvalue = 3\n").unwrap_err();
        assert!(error.starts_with("t.toml:3:"), "{error}");
        let error = parse_fixture(Path::new("t.toml"), "[[event]]\nvalue = { a = 1 }\n").unwrap_err();
        assert!(error.contains("no expected rows"), "{error}");
    }
}
