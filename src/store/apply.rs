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
        // Once per event: the label is copied only the first time a batch counts it.
        let counted = self.outcomes.iter_mut().find(|((known, of), _)| *of == outcome && known == label);
        match counted {
            Some((_, count)) => *count += 1,
            None => {
                self.outcomes.insert((label.to_string(), outcome), 1);
            }
        }
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
/// `decoded`, when given, holds the batch's records already decoded (in record order), so that
/// decoding can overlap with the previous batch's transaction; a retry decodes them again.
pub async fn apply_batch<'p>(
    client: &mut deadpool_postgres::Object,
    projection: &'p Projection,
    batch: &Batch<'_>,
    decoded: Option<Vec<Decoded<'p>>>,
    isolate: bool,
) -> Result<BatchReport, ApplyError> {
    let mut report = BatchReport::default();
    // Each record is decoded once, here. Keys of this batch with held events: after one of them
    // applies, its successors are released at once, so later events of the key in this same
    // batch find the row where they expect it. Keys with parked events: every later event of
    // the key is parked behind them, to keep the key's order.
    let decoded: Vec<Decoded<'_>> = match decoded {
        Some(decoded) if decoded.len() == batch.records.len() => decoded,
        _ => batch.records.iter().map(|record| projection.decode(record)).collect(),
    };
    let keys: Vec<Option<String>> = batch
        .records
        .iter()
        .zip(&decoded)
        .map(|(record, decoded)| match decoded {
            Decoded::Tombstone | Decoded::Ignored { .. } => None,
            _ => projection.parking_key(record, decoded),
        })
        .collect();

    let tx = client.transaction().await.map_err(|error| fail(&error))?;
    // The set-based statements of the fast path find each row through the key's index: a plan
    // made while the table was small (a hash join over a sequential scan) would otherwise be
    // cached and kept as the table grows (seen: 15-25 ms per statement at 100,000 rows).
    let planner_off = !isolate && matches!(projection.dedupe, Dedupe::Version(_));
    // One round trip: the checkpoints' compare-and-sets, the keys' states and the planner's
    // settings, pipelined.
    let moves = futures::future::try_join_all(batch.moves.iter().map(|(partition, from, to)| {
        checkpoint::compare_and_set(&tx, &projection.name, partition, *from, *to, &projection.hash)
    }));
    let planner = async {
        match planner_off {
            true => tx.batch_execute("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off").await,
            false => Ok(()),
        }
    };
    let (moved, states, planner) = tokio::join!(moves, key_states(&tx, projection, &keys), planner);
    let moved = moved.map_err(|error| fail(&error))?;
    if let Some(((partition, _, _), _)) = batch.moves.iter().zip(moved).find(|(_, moved)| !moved) {
        return Err(ApplyError::Fenced { partition: partition.clone() });
    }
    let KeyStates { mut held, mut parked } = states?;
    planner.map_err(|error| fail(&error))?;
    if !isolate && held.is_empty() && parked.is_empty() {
        if let Fast::Done(report) = fast::try_apply(&tx, projection, batch.records, &decoded).await? {
            tx.commit().await.map_err(|error| fail(&error))?;
            return Ok(report);
        }
    }
    // Event by event, with the planner's settings as the user left them.
    if planner_off {
        tx.batch_execute("RESET enable_hashjoin; RESET enable_mergejoin").await.map_err(|error| fail(&error))?;
    }
    for ((record, decoded), key) in batch.records.iter().zip(decoded).zip(keys) {
        if let Some(key) = key.as_deref().filter(|key| parked.contains(*key)) {
            let message = format!("parked behind an earlier parked event of key `{key}`, to keep the key's order");
            park(&tx, projection, record, Some(key), ParkClass::Blocked, &message)
                .await
                .map_err(|error| fail(&error))?;
            report.count(&label_of(projection, record), Outcome::Parked);
            continue;
        }
        let processed = run_isolated(&tx, projection, record, decoded, Source::Kafka, key.as_deref(), isolate).await?;
        let Some(Processed { label, outcome, key: entity_key }) = processed else {
            report.count(&label_of(projection, record), Outcome::Parked);
            if let Some(key) = key {
                parked.insert(key);
            }
            continue;
        };
        report.count(&label, outcome);
        match (outcome, entity_key) {
            (Outcome::Gap, Some(key)) => {
                held.insert(key);
            }
            (Outcome::Applied, Some(key)) if held.contains(&key) => {
                match release_key(&tx, projection, &key, &mut report, isolate).await? {
                    Released::All => {
                        held.remove(&key);
                    }
                    Released::Partly => {}
                    Released::Parked => {
                        parked.insert(key);
                    }
                }
            }
            _ => {}
        }
    }
    tx.commit().await.map_err(|error| fail(&error))?;
    Ok(report)
}

/// Why an event is in `projector.dead_letters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkClass {
    /// It cannot be applied: malformed, a value that does not fit, a constraint it violates.
    Poison,
    /// An earlier event of its key is parked.
    Blocked,
    /// Held as a gap for longer than `parking.gap_timeout_secs`.
    GapTimeout,
}

impl ParkClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ParkClass::Poison => "poison",
            ParkClass::Blocked => "blocked",
            ParkClass::GapTimeout => "gap_timeout",
        }
    }
}

/// Where a record being processed comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Kafka,
    /// Re-read from `projector.held_events`: a gap again leaves it there.
    Held,
}

/// The outcome label of a record: its type when the projection handles it, else `other` (or
/// `invalid` when it cannot be decoded). Bounded by the definition, whatever the events say.
pub(super) fn label_of(projection: &Projection, record: &Record) -> String {
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
pub(super) struct Processed {
    /// Outcome label: the event type, or `other`.
    pub label: String,
    pub outcome: Outcome,
    /// The entity key, for versioned projections.
    pub key: Option<String>,
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
                &&*record.topic,
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

/// Which of a batch's keys have held events, and which have parked ones.
struct KeyStates {
    held: BTreeSet<String>,
    parked: BTreeSet<String>,
}

/// One round trip: the keys among `keys` with held events (versioned projections only hold) and
/// those with parked events.
async fn key_states(
    tx: &Transaction<'_>,
    projection: &Projection,
    keys: &[Option<String>],
) -> Result<KeyStates, ApplyError> {
    let mut states = KeyStates { held: BTreeSet::new(), parked: BTreeSet::new() };
    let keys: BTreeSet<&str> = keys.iter().flatten().map(String::as_str).collect();
    if keys.is_empty() {
        return Ok(states);
    }
    let keys: Vec<&str> = keys.into_iter().collect();
    let statement = tx
        .prepare_cached(
            "SELECT DISTINCT true, entity_key FROM projector.held_events
              WHERE projection = $1 AND entity_key = ANY($2)
             UNION ALL
             SELECT DISTINCT false, entity_key FROM projector.dead_letters
              WHERE projection = $1 AND state = 'parked' AND entity_key = ANY($2)",
        )
        .await
        .map_err(|error| fail(&error))?;
    let rows = tx.query(&statement, &[&projection.name, &keys]).await.map_err(|error| fail(&error))?;
    for row in rows {
        let set = if row.get::<_, bool>(0) { &mut states.held } else { &mut states.parked };
        set.insert(row.get(1));
    }
    Ok(states)
}

/// Runs one record, inside a savepoint when `isolate`. `Ok(None)`: it was parked (poison), under
/// `key`.
async fn run_isolated(
    tx: &Transaction<'_>,
    projection: &Projection,
    record: &Record,
    decoded: Decoded<'_>,
    source: Source,
    key: Option<&str>,
    isolate: bool,
) -> Result<Option<Processed>, ApplyError> {
    match try_event(tx, projection, record, decoded, source, isolate).await? {
        Ok(processed) => Ok(Some(processed)),
        Err(message) => {
            park(tx, projection, record, key, ParkClass::Poison, &message).await.map_err(|error| fail(&error))?;
            Ok(None)
        }
    }
}

/// Runs one record, inside a savepoint when `isolate`. `Ok(Err(message))`: it is poison, and
/// (isolated) left no trace.
pub(super) async fn try_event(
    tx: &Transaction<'_>,
    projection: &Projection,
    record: &Record,
    decoded: Decoded<'_>,
    source: Source,
    isolate: bool,
) -> Result<Result<Processed, String>, ApplyError> {
    if isolate {
        tx.batch_execute("SAVEPOINT projector_event").await.map_err(|error| fail(&error))?;
    }
    let message = match process(tx, projection, record, decoded, source).await {
        Ok(processed) => {
            if isolate {
                tx.batch_execute("RELEASE SAVEPOINT projector_event").await.map_err(|error| fail(&error))?;
            }
            return Ok(Ok(processed));
        }
        Err(EventError::Poison(message)) => message,
        Err(EventError::Db(error)) => match classify(&error) {
            ErrorClass::Poison if isolate => describe(&error),
            ErrorClass::Poison => {
                return Err(ApplyError::EventFailed {
                    topic: record.topic.to_string(),
                    partition: record.partition,
                    offset: record.offset,
                    message: describe(&error),
                })
            }
            _ => return Err(fail(&error)),
        },
    };
    if isolate {
        tx.batch_execute("ROLLBACK TO SAVEPOINT projector_event; RELEASE SAVEPOINT projector_event")
            .await
            .map_err(|error| fail(&error))?;
    }
    Ok(Err(message))
}

/// How far [`release_key`] got.
pub(super) enum Released {
    /// No held event of the key is left.
    All,
    /// The next one still waits for its predecessor.
    Partly,
    /// One was parked: the rest stay held behind it.
    Parked,
}

/// Applies the held events of `key` in version order, as far as they follow on. Returns true
/// when none is left held.
pub(super) async fn release_key(
    tx: &Transaction<'_>,
    projection: &Projection,
    key: &str,
    report: &mut BatchReport,
    isolate: bool,
) -> Result<Released, ApplyError> {
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
    let mut result = Released::All;
    for row in rows {
        let version: i64 = row.get(0);
        let record = record_at(&row, 1);
        let decoded = projection.decode(&record);
        match run_isolated(tx, projection, &record, decoded, Source::Held, Some(key), isolate).await? {
            // Its predecessor is still missing: it and its successors stay held.
            Some(Processed { outcome: Outcome::Gap, .. }) => {
                result = Released::Partly;
                break;
            }
            Some(Processed { label, outcome: Outcome::Applied, .. }) => {
                tracing::info!(projection = %projection.name, key, version, "held event applied: its predecessor arrived");
                report.released += 1;
                report.count(&label, Outcome::Applied);
            }
            // Already reflected (a redelivered copy applied first), or no longer handled.
            Some(_) => {}
            None => {
                report.count(&label_of(projection, &record), Outcome::Parked);
                result = Released::Parked;
            }
        }
        tx.execute(
            "DELETE FROM projector.held_events WHERE projection = $1 AND entity_key = $2 AND version = $3",
            &[&projection.name, &key, &version],
        )
        .await
        .map_err(|error| fail(&error))?;
        if matches!(result, Released::Parked) {
            // Its successors stay held; they are parked behind it when they time out, or applied
            // after it by `projector parked retry`.
            break;
        }
    }
    Ok(result)
}

/// The record stored in `row` from column `first` on: topic, partition, offset, key, value,
/// header names, header values, timestamp (as `held_events` and `dead_letters` keep them).
pub(super) fn record_at(row: &tokio_postgres::Row, first: usize) -> Record {
    let names: Vec<String> = row.get(first + 5);
    let values: Vec<Option<Vec<u8>>> = row.get(first + 6);
    Record {
        topic: row.get::<_, &str>(first).into(),
        partition: row.get(first + 1),
        offset: row.get(first + 2),
        key: row.get(first + 3),
        value: row.get(first + 4),
        headers: names.into_iter().zip(values).collect(),
        timestamp_ms: row.get(first + 7),
    }
}

/// Parks `record` under `key` (see [`Projection::parking_key`]).
pub(super) async fn park(
    tx: &Transaction<'_>,
    projection: &Projection,
    record: &Record,
    key: Option<&str>,
    class: ParkClass,
    message: &str,
) -> Result<(), tokio_postgres::Error> {
    let event_type = match projection.decode(record) {
        Decoded::Handled { event, .. } => Some(event.event_type),
        Decoded::Poison { event_type, .. } => event_type,
        Decoded::Ignored { event_type } => Some(event_type),
        Decoded::Tombstone => None,
    };
    let (names, values) = split_headers(record);
    tracing::warn!(
        projection = %projection.name,
        topic = %record.topic,
        partition = record.partition,
        offset = record.offset,
        key = key.unwrap_or(""),
        class = class.as_str(),
        error = message,
        "event parked"
    );
    tx.execute(
        "INSERT INTO projector.dead_letters
             (projection, topic, partition, \"offset\", entity_key, event_type, record_key, record_value,
              header_names, header_values, timestamp_ms, error_class, error, definition_hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
         ON CONFLICT (projection, topic, partition, \"offset\") DO NOTHING",
        &[
            &projection.name,
            &&*record.topic,
            &record.partition,
            &record.offset,
            &key,
            &event_type,
            &record.key,
            &record.value,
            &names,
            &values,
            &record.timestamp_ms,
            &class.as_str(),
            &message,
            &projection.hash,
        ],
    )
    .await?;
    Ok(())
}

/// Parks the held events of `partitions` that have waited longer than `after_secs` for their
/// predecessor (class `gap_timeout`), key by key in version order: the key is then parked, and
/// its later events are parked behind them. `partitions` are the ones this instance owns, with
/// their stored checkpoints: each is compare-and-set to itself first, which fences a sweep by an
/// instance that lost the partition and orders the sweep with the owner's batches.
pub async fn park_expired_gaps(
    client: &mut deadpool_postgres::Object,
    projection: &Projection,
    partitions: &[(TopicPartition, i64)],
    after_secs: u64,
) -> Result<u64, ApplyError> {
    if partitions.is_empty() {
        return Ok(0);
    }
    let tx = client.transaction().await.map_err(|error| fail(&error))?;
    let topics: Vec<&str> = partitions.iter().map(|((topic, _), _)| topic.as_str()).collect();
    let numbers: Vec<i32> = partitions.iter().map(|((_, partition), _)| *partition).collect();
    // Cheap when nothing is expired: one indexed read, no locks.
    let expired: i64 = tx
        .query_one(
            "SELECT count(*) FROM projector.held_events h
               JOIN unnest($2::text[], $3::int[]) AS p(topic, partition) USING (topic, partition)
              WHERE h.projection = $1 AND h.held_at < now() - make_interval(secs => $4)",
            &[&projection.name, &topics, &numbers, &(after_secs as f64)],
        )
        .await
        .map_err(|error| fail(&error))?
        .get(0);
    if expired == 0 {
        return Ok(0);
    }
    for (partition, checkpoint) in partitions {
        let kept = checkpoint::compare_and_set(
            &tx,
            &projection.name,
            partition,
            Some(*checkpoint),
            *checkpoint,
            &projection.hash,
        )
        .await
        .map_err(|error| fail(&error))?;
        if !kept {
            return Err(ApplyError::Fenced { partition: partition.clone() });
        }
    }
    let rows = tx
        .query(
            "DELETE FROM projector.held_events h
              USING unnest($2::text[], $3::int[]) AS p(topic, partition)
              WHERE h.projection = $1 AND h.topic = p.topic AND h.partition = p.partition
                AND h.held_at < now() - make_interval(secs => $4)
             RETURNING h.entity_key, h.version, h.found_version, h.topic, h.partition, h.\"offset\",
                       h.record_key, h.record_value, h.header_names, h.header_values, h.timestamp_ms,
                       h.held_at::text",
            &[&projection.name, &topics, &numbers, &(after_secs as f64)],
        )
        .await
        .map_err(|error| fail(&error))?;
    let mut expired: Vec<(String, i64, Option<i64>, String, Record)> =
        rows.into_iter().map(|row| (row.get(0), row.get(1), row.get(2), row.get(11), record_at(&row, 3))).collect();
    expired.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    for (key, version, found, held_at, record) in &expired {
        let row = found.map_or("no row".to_string(), |found| format!("the row at version {found}"));
        let message = format!(
            "held since {held_at} for the predecessor of version {version} of key `{key}` ({row}), which did not \
             arrive within {after_secs} s"
        );
        park(&tx, projection, record, Some(key), ParkClass::GapTimeout, &message)
            .await
            .map_err(|error| fail(&error))?;
    }
    tx.commit().await.map_err(|error| fail(&error))?;
    Ok(expired.len() as u64)
}
