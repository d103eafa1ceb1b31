//! Applying one batch: every event's statements, the held-event releases they unlock, and the
//! checkpoint moves, in ONE transaction. Each event gets exactly one [`Outcome`].

use std::collections::{BTreeMap, BTreeSet};

use deadpool_postgres::Transaction;
use postgres_types::ToSql;
use tokio_postgres::error::SqlState;

use super::checkpoint::{self, TopicPartition};
use super::describe;
use super::fast::{self, Fast};
use crate::projection::value::{bind_all, SqlValue};
use crate::projection::{Decoded, Dedupe, Event, Handler, Projection, Record, StatementKind};

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Its statements changed the read model.
    Applied,
    /// Already reflected (row at or past its version, or its id already processed): nothing changed.
    Duplicate,
    /// Its predecessor has not been applied yet: held in `projector.held_events`.
    Gap,
    /// The projection does not handle its type (or it is a tombstone).
    Ignored,
    /// It cannot be applied (malformed, a value that does not fit, a constraint it violates):
    /// parked in `projector.dead_letters`.
    Parked,
}

impl Outcome {
    pub const ALL: [Outcome; 5] =
        [Outcome::Applied, Outcome::Duplicate, Outcome::Gap, Outcome::Ignored, Outcome::Parked];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Gap => "gap",
            Outcome::Ignored => "ignored",
            Outcome::Parked => "parked",
        }
    }
}

/// A batch to apply: records in arrival order, and where each partition's checkpoint moves.
pub struct Batch<'a> {
    pub records: &'a [Record],
    /// (partition, stored checkpoint the batch started from, next offset after the batch).
    pub moves: Vec<(TopicPartition, Option<i64>, i64)>,
}

/// What a committed batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    /// (event type label, outcome) to count. Labels are handled types, `other` or `invalid`.
    pub outcomes: BTreeMap<(String, Outcome), u64>,
    /// Held events applied because their predecessor arrived (also counted as `applied`).
    pub released: u64,
    /// Applied by the fast path ([`super::fast`]).
    pub fast: bool,
}

impl BatchReport {
    pub(super) fn count(&mut self, label: &str, outcome: Outcome) {
        *self.outcomes.entry((label.to_string(), outcome)).or_default() += 1;
    }

    pub fn total(&self, outcome: Outcome) -> u64 {
        self.outcomes.iter().filter(|((_, o), _)| *o == outcome).map(|(_, n)| n).sum()
    }
}

/// Why a batch did not commit. The transaction is rolled back in every case.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A checkpoint was not where the batch started: another instance owns the partition now.
    #[error("checkpoint of `{}` partition {} moved under us: another instance owns it", .partition.0, .partition.1)]
    Fenced { partition: TopicPartition },
    /// Worth retrying as is (connection lost, serialization failure, deadlock, …).
    #[error("transient: {0}")]
    Transient(String),
    /// An event's data made a statement fail; retry with each event isolated to park it alone.
    #[error("event at `{topic}` partition {partition} offset {offset} failed: {message}")]
    EventFailed { topic: String, partition: i32, offset: i64, message: String },
    /// Retrying cannot help (missing table or column, no permission, …).
    #[error("{0}")]
    Fatal(String),
    /// The fast path's prediction did not hold; retry on the careful path.
    #[error("fast path declined after writing: {0}")]
    Mispredicted(String),
}

/// How a database error is handled.
enum ErrorClass {
    Transient,
    /// Caused by the event's values (data exceptions, constraint violations).
    Poison,
    Fatal,
}

fn classify(error: &tokio_postgres::Error) -> ErrorClass {
    let Some(db) = error.as_db_error() else {
        return ErrorClass::Transient;
    };
    let code = db.code();
    if code == &SqlState::T_R_SERIALIZATION_FAILURE
        || code == &SqlState::T_R_DEADLOCK_DETECTED
        || code == &SqlState::LOCK_NOT_AVAILABLE
        || code == &SqlState::QUERY_CANCELED
    {
        return ErrorClass::Transient;
    }
    match &code.code()[..2] {
        "08" | "53" | "57" | "58" => ErrorClass::Transient,
        "22" | "23" => ErrorClass::Poison,
        _ => ErrorClass::Fatal,
    }
}

pub(super) fn fail(error: &tokio_postgres::Error) -> ApplyError {
    match classify(error) {
        ErrorClass::Transient | ErrorClass::Poison => ApplyError::Transient(describe(error)),
        ErrorClass::Fatal => ApplyError::Fatal(describe(error)),
    }
}

/// Why one event was not applied or held.
enum EventError {
    /// Park it with this message.
    Poison(String),
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for EventError {
    fn from(error: tokio_postgres::Error) -> Self {
        EventError::Db(error)
    }
}

/// Applies `batch` in one transaction and commits it. With `isolate`, each event runs inside its
/// own savepoint, so that a statement failing on one event's data parks that event alone.
pub async fn apply_batch(
    client: &mut deadpool_postgres::Object,
    projection: &Projection,
    batch: &Batch<'_>,
    isolate: bool,
) -> Result<BatchReport, ApplyError> {
    let tx = client.transaction().await.map_err(|error| fail(&error))?;
    for (partition, from, to) in &batch.moves {
        let moved = checkpoint::compare_and_set(&*tx, &projection.name, partition, *from, *to, &projection.hash)
            .await
            .map_err(|error| fail(&error))?;
        if !moved {
            return Err(ApplyError::Fenced { partition: partition.clone() });
        }
    }

    let mut report = BatchReport::default();
    // Keys of this batch with held events: after one of them applies, its successors are released
    // at once, so later events of the key in this same batch find the row where they expect it.
    // Each record is decoded once, here.
    let decoded: Vec<Decoded<'_>> = batch.records.iter().map(|record| projection.decode(record)).collect();
    let mut held_keys = held_keys_among(&tx, projection, &decoded).await?;
    if !isolate && held_keys.is_empty() {
        if let Fast::Done(report) = fast::try_apply(&tx, projection, batch.records, &decoded).await? {
            tx.commit().await.map_err(|error| fail(&error))?;
            return Ok(report);
        }
    }
    for (record, decoded) in batch.records.iter().zip(decoded) {
        let processed = run_isolated(&tx, projection, record, decoded, Source::Kafka, None, isolate).await?;
        let Some(Processed { label, outcome, key }) = processed else {
            report.count(&label_of(projection, record), Outcome::Parked);
            continue;
        };
        report.count(&label, outcome);
        match (outcome, key) {
            (Outcome::Gap, Some(key)) => {
                held_keys.insert(key);
            }
            (Outcome::Applied, Some(key)) if held_keys.contains(&key) => {
                if release_key(&tx, projection, &key, &mut report, isolate).await? {
                    held_keys.remove(&key);
                }
            }
            _ => {}
        }
    }
    tx.commit().await.map_err(|error| fail(&error))?;
    Ok(report)
}

/// Where a record being processed comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Kafka,
    /// Re-read from `projector.held_events`: a gap again leaves it there.
    Held,
}

/// The outcome label of a record: its type when the projection handles it, else `other` (or
/// `invalid` when it cannot be decoded). Bounded by the definition, whatever the events say.
fn label_of(projection: &Projection, record: &Record) -> String {
    match projection.decode(record) {
        Decoded::Handled { event, .. } => event.event_type,
        Decoded::Poison { event_type: Some(event_type), .. } if projection.handlers.contains_key(&event_type) => {
            event_type
        }
        Decoded::Poison { .. } => "invalid".into(),
        Decoded::Ignored { .. } | Decoded::Tombstone => "other".into(),
    }
}

/// What processing one record came to (not yet counted).
struct Processed {
    /// Outcome label: the event type, or `other`.
    label: String,
    outcome: Outcome,
    /// The entity key, for versioned projections.
    key: Option<String>,
}

/// Decodes and applies one record.
async fn process(
    tx: &Transaction<'_>,
    projection: &Projection,
    record: &Record,
    decoded: Decoded<'_>,
    source: Source,
) -> Result<Processed, EventError> {
    let (event, handler) = match decoded {
        Decoded::Tombstone | Decoded::Ignored { .. } => {
            return Ok(Processed { label: "other".into(), outcome: Outcome::Ignored, key: None })
        }
        Decoded::Poison { error, .. } => return Err(EventError::Poison(error.to_string())),
        Decoded::Handled { event, handler } => (event, handler),
    };
    let outcome = match &projection.dedupe {
        Dedupe::EventId => apply_deduped_by_id(tx, projection, &event, handler, record).await?,
        Dedupe::Version(_) => apply_versioned(tx, projection, &event, handler, record, source).await?,
    };
    Ok(Processed { label: event.event_type, outcome, key: event.key })
}

/// Prepares each statement (cached per connection) and binds the event's values to the types
/// Postgres inferred, before anything runs: a value that does not fit parks the event untouched.
async fn bind_handler(
    tx: &Transaction<'_>,
    handler: &Handler,
    event: &Event,
    record: &Record,
) -> Result<Vec<(tokio_postgres::Statement, Vec<SqlValue>)>, EventError> {
    let mut bound = Vec::with_capacity(handler.statements.len());
    for statement in &handler.statements {
        let prepared = tx.prepare_cached(&statement.sql).await?;
        let values = bind_all(statement, prepared.params(), event, record)
            .map_err(|error| EventError::Poison(format!("{} (statement at {})", error, statement.origin)))?;
        bound.push((prepared, values));
    }
    Ok(bound)
}

fn as_params(values: &[SqlValue]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|value| &**value as &(dyn ToSql + Sync)).collect()
}

async fn apply_deduped_by_id(
    tx: &Transaction<'_>,
    projection: &Projection,
    event: &Event,
    handler: &Handler,
    record: &Record,
) -> Result<Outcome, EventError> {
    let bound = bind_handler(tx, handler, event, record).await?;
    let event_id = event.event_id.as_deref().ok_or_else(|| EventError::Poison("event has no id".into()))?;
    let mark = tx
        .prepare_cached(
            "INSERT INTO projector.processed_events (projection, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .await?;
    if tx.execute(&mark, &[&projection.name, &event_id]).await? == 0 {
        return Ok(Outcome::Duplicate);
    }
    for (statement, values) in &bound {
        tx.execute(statement, &as_params(values)).await?;
    }
    Ok(Outcome::Applied)
}

async fn apply_versioned(
    tx: &Transaction<'_>,
    projection: &Projection,
    event: &Event,
    handler: &Handler,
    record: &Record,
    source: Source,
) -> Result<Outcome, EventError> {
    let Dedupe::Version(table) = &projection.dedupe else {
        unreachable!("apply_versioned is only called for versioned projections");
    };
    let (Some(key), Some(version)) = (event.key.as_deref(), event.version) else {
        return Err(EventError::Poison("event has no key or no version".into()));
    };
    let bound = bind_handler(tx, handler, event, record).await?;
    let (guard, guard_values) = &bound[0];
    if tx.execute(guard, &as_params(guard_values)).await? > 0 {
        for (statement, values) in &bound[1..] {
            tx.execute(statement, &as_params(values)).await?;
        }
        return Ok(Outcome::Applied);
    }

    // Nothing changed: tell a duplicate from a gap by the row's current version.
    let lookup = tx.prepare_cached(&table.version_lookup.sql).await?;
    let key_value = bind_all(&table.version_lookup, lookup.params(), event, record)
        .map_err(|error| EventError::Poison(error.to_string()))?;
    let found: Option<i64> = tx.query_opt(&lookup, &as_params(&key_value)).await?.map(|row| row.get(0));
    let guard_kind = handler.statements[0].kind;
    match (guard_kind, found) {
        (_, Some(current)) if current >= version => Ok(Outcome::Duplicate),
        (StatementKind::Create, Some(current)) => Err(EventError::Poison(format!(
            "`{}` creates key `{key}` at version {version}, but the row exists at version {current}",
            event.event_type
        ))),
        (StatementKind::Create, None) => Err(EventError::Poison(format!(
            "`{}` for key `{key}` inserted no row although none exists",
            event.event_type
        ))),
        (_, Some(current)) if current == version - 1 => Err(EventError::Poison(format!(
            "`{}` for key `{key}` changed no row although the row is at version {current}: the statement's other conditions did not match",
            event.event_type
        ))),
        (_, found) => {
            if source == Source::Kafka {
                hold(tx, projection, key, version, found, record).await?;
            }
            Ok(Outcome::Gap)
        }
    }
}

async fn hold(
    tx: &Transaction<'_>,
    projection: &Projection,
    key: &str,
    version: i64,
    found: Option<i64>,
    record: &Record,
) -> Result<(), EventError> {
    let (names, values) = split_headers(record);
    let inserted = tx
        .execute(
            "INSERT INTO projector.held_events
                 (projection, entity_key, version, found_version, topic, partition, \"offset\",
                  record_key, record_value, header_names, header_values, timestamp_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT DO NOTHING",
            &[
                &projection.name,
                &key,
                &version,
                &found,
                &record.topic,
                &record.partition,
                &record.offset,
                &record.key,
                &record.value,
                &names,
                &values,
                &record.timestamp_ms,
            ],
        )
        .await?;
    let shown = found.map_or("none".to_string(), |found| found.to_string());
    tracing::warn!(
        projection = %projection.name,
        key,
        row_version = %shown,
        event_version = version,
        topic = %record.topic,
        partition = record.partition,
        offset = record.offset,
        already_held = inserted == 0,
        "gap: event held until its predecessor is applied"
    );
    Ok(())
}

fn split_headers(record: &Record) -> (Vec<&str>, Vec<Option<&[u8]>>) {
    record.headers.iter().map(|(name, value)| (name.as_str(), value.as_deref())).unzip()
}

/// The keys among `records` that have held events (none for event-id projections).
async fn held_keys_among(
    tx: &Transaction<'_>,
    projection: &Projection,
    decoded: &[Decoded<'_>],
) -> Result<BTreeSet<String>, ApplyError> {
    if !matches!(projection.dedupe, Dedupe::Version(_)) {
        return Ok(BTreeSet::new());
    }
    let keys: BTreeSet<&str> = decoded
        .iter()
        .filter_map(|decoded| match decoded {
            Decoded::Handled { event, .. } => event.key.as_deref(),
            _ => None,
        })
        .collect();
    if keys.is_empty() {
        return Ok(BTreeSet::new());
    }
    let keys: Vec<&str> = keys.into_iter().collect();
    let rows = tx
        .query(
            "SELECT DISTINCT entity_key FROM projector.held_events WHERE projection = $1 AND entity_key = ANY($2)",
            &[&projection.name, &keys],
        )
        .await
        .map_err(|error| fail(&error))?;
    Ok(rows.into_iter().map(|row| row.get(0)).collect())
}

/// Runs one record, inside a savepoint when `isolate`. `Ok(None)`: it was parked (poison).
async fn run_isolated(
    tx: &Transaction<'_>,
    projection: &Projection,
    record: &Record,
    decoded: Decoded<'_>,
    source: Source,
    held_key: Option<&str>,
    isolate: bool,
) -> Result<Option<Processed>, ApplyError> {
    if isolate {
        tx.batch_execute("SAVEPOINT projector_event").await.map_err(|error| fail(&error))?;
    }
    let message = match process(tx, projection, record, decoded, source).await {
        Ok(processed) => {
            if isolate {
                tx.batch_execute("RELEASE SAVEPOINT projector_event").await.map_err(|error| fail(&error))?;
            }
            return Ok(Some(processed));
        }
        Err(EventError::Poison(message)) => message,
        Err(EventError::Db(error)) => match classify(&error) {
            ErrorClass::Poison if isolate => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT projector_event").await.map_err(|error| fail(&error))?;
                describe(&error)
            }
            ErrorClass::Poison => {
                return Err(ApplyError::EventFailed {
                    topic: record.topic.clone(),
                    partition: record.partition,
                    offset: record.offset,
                    message: describe(&error),
                })
            }
            _ => return Err(fail(&error)),
        },
    };
    park(tx, projection, record, held_key, &message).await.map_err(|error| fail(&error))?;
    Ok(None)
}

/// Applies the held events of `key` in version order, as far as they follow on. Returns true
/// when none is left held.
async fn release_key(
    tx: &Transaction<'_>,
    projection: &Projection,
    key: &str,
    report: &mut BatchReport,
    isolate: bool,
) -> Result<bool, ApplyError> {
    let rows = tx
        .query(
            "SELECT version, topic, partition, \"offset\", record_key, record_value,
                    header_names, header_values, timestamp_ms
               FROM projector.held_events
              WHERE projection = $1 AND entity_key = $2
              ORDER BY version",
            &[&projection.name, &key],
        )
        .await
        .map_err(|error| fail(&error))?;
    let total = rows.len();
    let mut released = 0;
    for row in rows {
        let version: i64 = row.get(0);
        let names: Vec<String> = row.get(6);
        let values: Vec<Option<Vec<u8>>> = row.get(7);
        let record = Record {
            topic: row.get(1),
            partition: row.get(2),
            offset: row.get(3),
            key: row.get(4),
            value: row.get(5),
            headers: names.into_iter().zip(values).collect(),
            timestamp_ms: row.get(8),
        };
        let decoded = projection.decode(&record);
        match run_isolated(tx, projection, &record, decoded, Source::Held, Some(key), isolate).await? {
            // Its predecessor is still missing: it and its successors stay held.
            Some(Processed { outcome: Outcome::Gap, .. }) => break,
            Some(Processed { label, outcome: Outcome::Applied, .. }) => {
                tracing::info!(projection = %projection.name, key, version, "held event applied: its predecessor arrived");
                report.released += 1;
                report.count(&label, Outcome::Applied);
            }
            // Already reflected (a redelivered copy applied first), or no longer handled.
            Some(_) => {}
            None => report.count(&label_of(projection, &record), Outcome::Parked),
        }
        tx.execute(
            "DELETE FROM projector.held_events WHERE projection = $1 AND entity_key = $2 AND version = $3",
            &[&projection.name, &key, &version],
        )
        .await
        .map_err(|error| fail(&error))?;
        released += 1;
    }
    Ok(released == total)
}

async fn park(
    tx: &Transaction<'_>,
    projection: &Projection,
    record: &Record,
    key: Option<&str>,
    message: &str,
) -> Result<(), tokio_postgres::Error> {
    let (event_type, entity_key) = match projection.decode(record) {
        Decoded::Handled { event, .. } => (Some(event.event_type), event.key),
        Decoded::Poison { event_type, .. } => (event_type, None),
        Decoded::Ignored { event_type } => (Some(event_type), None),
        Decoded::Tombstone => (None, None),
    };
    let entity_key = entity_key.or(key.map(str::to_string));
    let (names, values) = split_headers(record);
    tracing::warn!(
        projection = %projection.name,
        topic = %record.topic,
        partition = record.partition,
        offset = record.offset,
        key = entity_key.as_deref().unwrap_or(""),
        error = message,
        "event parked"
    );
    tx.execute(
        "INSERT INTO projector.dead_letters
             (projection, topic, partition, \"offset\", entity_key, event_type, record_key, record_value,
              header_names, header_values, timestamp_ms, error_class, error, definition_hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'poison', $12, $13)
         ON CONFLICT (projection, topic, partition, \"offset\") DO NOTHING",
        &[
            &projection.name,
            &record.topic,
            &record.partition,
            &record.offset,
            &entity_key,
            &event_type,
            &record.key,
            &record.value,
            &names,
            &values,
            &record.timestamp_ms,
            &message,
            &projection.hash,
        ],
    )
    .await?;
    Ok(())
}
