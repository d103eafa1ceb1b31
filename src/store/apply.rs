//! Applying one batch: every event's statements, the held-event releases they unlock, and the
//! checkpoint moves, in ONE transaction. Each event gets exactly one [`Outcome`].

use std::collections::BTreeSet;

use deadpool_postgres::Transaction;

use super::checkpoint;
pub use super::error::{class_of, ApplyError, ErrorClass, Handling};
use super::fast::{self, Applier, Fast};
use super::plan::{Bound, Planner};
use super::{describe, stored};
use crate::checkpoint::{Move, TopicPartition};
use crate::outcome::{BatchReport, Outcome};
use crate::projection::value::bind_all;
use crate::projection::{Decoded, Dedupe, Event, Handler, Projection, Record, StatementKind};

/// A batch to apply: records in arrival order, and where each partition's checkpoint moves.
pub struct Batch<'a> {
    pub records: &'a [Record],
    /// Where each partition's checkpoint moves, from the stored value the batch started at.
    pub moves: Vec<Move>,
}

/// Why one event was not applied or held.
enum EventError {
    /// Park it with this message.
    Poison(String),
    /// A database error while doing what is named; its class decides.
    Db(&'static str, tokio_postgres::Error),
}

/// `map_err` for database calls made for one event.
fn event_db(during: &'static str) -> impl Fn(tokio_postgres::Error) -> EventError {
    move |error| EventError::Db(during, error)
}

/// Applies `batch` in one transaction and commits it. With `isolate`, each event runs inside its
/// own savepoint, so that a statement failing on one event's data parks that event alone.
/// Without, any failure caused by data ([`ErrorClass::Poison`]) rolls the batch back as
/// [`ApplyError::Isolate`], to be retried isolated.
/// `decoded`, when given, holds the batch's records already decoded (in record order), so that
/// decoding can overlap with the previous batch's transaction; a retry decodes them again.
pub async fn apply_batch<'p>(
    client: &mut deadpool_postgres::Object,
    applier: &Applier,
    projection: &'p Projection,
    batch: &Batch<'_>,
    decoded: Option<Vec<Decoded<'p>>>,
    isolate: bool,
) -> Result<BatchReport, ApplyError> {
    let decoded: Vec<Decoded<'_>> = match decoded {
        Some(decoded) if decoded.len() == batch.records.len() => decoded,
        _ => batch.records.iter().map(|record| projection.decode(record)).collect(),
    };
    match apply_decoded(client, applier, projection, batch, &decoded, isolate).await {
        Err(ApplyError::Database { class: ErrorClass::Poison, during, source }) if !isolate => {
            Err(ApplyError::Isolate { at: during.to_string(), source })
        }
        result => result,
    }
}

async fn apply_decoded<'p>(
    client: &mut deadpool_postgres::Object,
    applier: &Applier,
    projection: &'p Projection,
    batch: &Batch<'_>,
    decoded: &[Decoded<'p>],
    isolate: bool,
) -> Result<BatchReport, ApplyError> {
    let mut report = BatchReport::default();
    // The key each event is parked under, as stored. Keys of this batch with held events: after
    // one of them applies, its successors are released at once, so later events of the key in
    // this same batch find the row where they expect it. Keys with parked events: every later
    // event of the key is parked behind them, to keep the key's order.
    let keys: Vec<Option<String>> = batch
        .records
        .iter()
        .zip(decoded)
        .map(|(record, decoded)| match decoded {
            Decoded::Tombstone | Decoded::Ignored { .. } => None,
            _ => projection.parking_key(record, decoded).map(|key| stored::key(&key).into_owned()),
        })
        .collect();

    let tx = client.transaction().await.map_err(ApplyError::during("beginning the batch"))?;
    // The set-based statements of the fast path find each row through the key's index: a plan
    // made while the table was small (a hash join over a sequential scan) would otherwise be
    // cached and kept as the table grows.
    let planner_off = !isolate && matches!(projection.dedupe, Dedupe::Version(_));
    // One round trip: the checkpoints' compare-and-sets, the keys' states and the planner's
    // settings, pipelined.
    let moves = futures::future::try_join_all(
        batch.moves.iter().map(|move_| checkpoint::compare_and_set(&tx, &projection.name, move_, &projection.hash)),
    );
    let planner = async {
        match planner_off {
            true => tx.batch_execute("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off").await,
            false => Ok(()),
        }
    };
    let (moved, states, planner) = tokio::join!(moves, key_states(&tx, projection, &keys), planner);
    let moved = moved.map_err(ApplyError::during("moving the checkpoints"))?;
    for (move_, cas) in batch.moves.iter().zip(moved) {
        refused(projection, &move_.partition, cas)?;
    }
    let KeyStates { mut held, mut parked } = states?;
    planner.map_err(ApplyError::during("setting the planner"))?;
    if batch.records.is_empty() {
        // Only checkpoints move (past transaction markers).
        tx.commit().await.map_err(ApplyError::during("committing"))?;
        return Ok(report);
    }
    if !isolate && held.is_empty() && parked.is_empty() {
        if let Fast::Done(report) = fast::try_apply(&tx, applier, projection, batch.records, decoded).await? {
            tx.commit().await.map_err(ApplyError::during("committing"))?;
            return Ok(report);
        }
    }
    // Event by event, with the planner's settings as the user left them.
    if planner_off {
        tx.batch_execute("RESET enable_hashjoin; RESET enable_mergejoin")
            .await
            .map_err(ApplyError::during("resetting the planner"))?;
    }
    for ((record, decoded), key) in batch.records.iter().zip(decoded).zip(keys) {
        if let Some(key) = key.as_deref().filter(|key| parked.contains(*key)) {
            let message = format!(
                "parked behind an earlier parked event of key `{}`, to keep the key's order",
                stored::shown_key(key)
            );
            park(&tx, projection, record, event_type_of(decoded), Some(key), ParkClass::Blocked, &message).await?;
            report.count(&label_of_decoded(projection, decoded), Outcome::Parked);
            continue;
        }
        let processed = run_isolated(&tx, projection, record, decoded, Source::Kafka, key.as_deref(), isolate).await?;
        let Some(Processed { label, outcome, key: entity_key }) = processed else {
            report.count(&label_of_decoded(projection, decoded), Outcome::Parked);
            if let Some(key) = key {
                parked.insert(key);
            }
            continue;
        };
        report.count(&label, outcome);
        let Some(entity_key) = entity_key.map(|key| stored::key(&key).into_owned()) else {
            continue;
        };
        match outcome {
            Outcome::Gap => {
                held.insert(entity_key);
            }
            Outcome::Applied if held.contains(&entity_key) => {
                match release_key(&tx, projection, &entity_key, &mut report, isolate).await? {
                    Released::All => {
                        held.remove(&entity_key);
                    }
                    Released::Partly => {}
                    Released::Parked => {
                        parked.insert(entity_key);
                    }
                }
            }
            _ => {}
        }
    }
    tx.commit().await.map_err(ApplyError::during("committing"))?;
    Ok(report)
}

/// A checkpoint compare-and-set that did not move it, as the batch's error.
fn refused(projection: &Projection, partition: &TopicPartition, cas: checkpoint::Cas) -> Result<(), ApplyError> {
    match cas {
        checkpoint::Cas::Moved => Ok(()),
        checkpoint::Cas::Fenced => Err(ApplyError::Fenced { partition: partition.clone() }),
        checkpoint::Cas::OtherDefinition(stored) => Err(ApplyError::DefinitionChanged {
            partition: partition.clone(),
            stored,
            running: projection.hash.clone(),
        }),
    }
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
    label_of_decoded(projection, &projection.decode(record))
}

/// [`label_of`] of a record already decoded.
fn label_of_decoded(projection: &Projection, decoded: &Decoded<'_>) -> String {
    match decoded {
        Decoded::Handled { event, .. } => event.event_type.clone(),
        Decoded::Poison { event_type: Some(event_type), .. } if projection.handlers.contains_key(event_type) => {
            event_type.clone()
        }
        Decoded::Poison { .. } => "invalid".into(),
        Decoded::Ignored { .. } | Decoded::Tombstone => "other".into(),
    }
}

/// The event type a decoded record says it is, when it could be read.
fn event_type_of<'d>(decoded: &'d Decoded<'_>) -> Option<&'d str> {
    match decoded {
        Decoded::Handled { event, .. } => Some(&event.event_type),
        Decoded::Poison { event_type, .. } => event_type.as_deref(),
        Decoded::Ignored { event_type } => Some(event_type),
        Decoded::Tombstone => None,
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

/// Applies one decoded record.
async fn process(
    tx: &Transaction<'_>,
    projection: &Projection,
    record: &Record,
    decoded: &Decoded<'_>,
    source: Source,
) -> Result<Processed, EventError> {
    let (event, handler) = match decoded {
        Decoded::Tombstone | Decoded::Ignored { .. } => {
            return Ok(Processed { label: "other".into(), outcome: Outcome::Ignored, key: None })
        }
        Decoded::Poison { error, .. } => return Err(EventError::Poison(error.to_string())),
        Decoded::Handled { event, handler } => (event, *handler),
    };
    let outcome = match &projection.dedupe {
        Dedupe::EventId => apply_deduped_by_id(tx, projection, event, handler, record).await?,
        Dedupe::Version(_) => apply_versioned(tx, projection, event, handler, record, source).await?,
    };
    Ok(Processed { label: event.event_type.clone(), outcome, key: event.key.clone() })
}

/// The event's plan ([`Planner::plan`]): a value that does not fit parks the event untouched.
async fn bind_handler<'s>(
    tx: &Transaction<'_>,
    handler: &'s Handler,
    event: &Event,
    record: &Record,
) -> Result<Vec<Bound>, EventError> {
    let planned = Planner::default().plan(tx, handler, event, record).await;
    planned.map_err(event_db("preparing a statement"))?.map_err(EventError::Poison)
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
        .await
        .map_err(event_db("recording the event id"))?;
    let stored_id = stored::key(event_id);
    if tx.execute(&mark, &[&projection.name, &stored_id]).await.map_err(event_db("recording the event id"))? == 0 {
        return Ok(Outcome::Duplicate);
    }
    for bound in &bound {
        tx.execute(&bound.statement, &bound.params()).await.map_err(event_db(STATEMENT))?;
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
    let guard = &bound[0];
    if tx.execute(&guard.statement, &guard.params()).await.map_err(event_db(STATEMENT))? > 0 {
        for bound in &bound[1..] {
            tx.execute(&bound.statement, &bound.params()).await.map_err(event_db(STATEMENT))?;
        }
        return Ok(Outcome::Applied);
    }

    // Nothing changed: tell a duplicate from a gap by the row's current version.
    let statement = tx.prepare_cached(&table.version_lookup.sql).await.map_err(event_db("looking up the version"))?;
    let values = bind_all(&table.version_lookup, statement.params(), event, record)
        .map_err(|error| EventError::Poison(error.to_string()))?;
    let lookup = Bound { statement, values };
    let row = tx.query_opt(&lookup.statement, &lookup.params()).await.map_err(event_db("looking up the version"))?;
    let found = match row {
        Some(row) => match row.try_get::<_, Option<i64>>(0) {
            Ok(Some(version)) => Some(version),
            Ok(None) => {
                return Err(EventError::Poison(format!(
                    "the row of key `{}` has no version (NULL in `{}`)",
                    stored::shown_key(key),
                    table.version_column
                )))
            }
            Err(error) => {
                return Err(EventError::Poison(format!(
                    "the version column `{}` does not read as a bigint: {error}",
                    table.version_column
                )))
            }
        },
        None => None,
    };
    let shown = stored::shown_key(key);
    let guard_kind = handler.statements[0].kind;
    match (guard_kind, found) {
        (_, Some(current)) if current >= version => Ok(Outcome::Duplicate),
        (StatementKind::Create, Some(current)) => Err(EventError::Poison(format!(
            "`{}` creates key `{shown}` at version {version}, but the row exists at version {current}",
            event.event_type
        ))),
        (StatementKind::Create, None) => Err(EventError::Poison(format!(
            "`{}` for key `{shown}` inserted no row although none exists",
            event.event_type
        ))),
        (_, Some(current)) if current == version - 1 => {
            // The predecessor may have committed between the guard and the look-up (in another
            // lane or instance: a key's events in several partitions): the look-up sees it, the
            // guard did not. Once more, now that the row is there.
            if tx.execute(&guard.statement, &guard.params()).await.map_err(event_db(STATEMENT))? > 0 {
                for bound in &bound[1..] {
                    tx.execute(&bound.statement, &bound.params()).await.map_err(event_db(STATEMENT))?;
                }
                return Ok(Outcome::Applied);
            }
            Err(EventError::Poison(format!(
                "`{}` for key `{shown}` changed no row although the row is at version {current}: the statement's other conditions did not match",
                event.event_type
            )))
        }
        (_, found) => {
            if source == Source::Kafka {
                hold(tx, projection, key, version, found, record).await?;
            }
            Ok(Outcome::Gap)
        }
    }
}

/// Holds `record`, an event of `key` whose predecessor has not been applied, in
/// `projector.held_events`.
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
                &stored::key(key),
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
        .await
        .map_err(event_db("holding the event"))?;
    let shown = found.map_or("none".to_string(), |found| found.to_string());
    tracing::warn!(
        projection = %projection.name,
        key = %stored::shown_key(key),
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

/// A record's headers as the two arrays `held_events` and `dead_letters` keep them: names and
/// values, both as bytes.
pub(super) fn split_headers(record: &Record) -> (Vec<&[u8]>, Vec<Option<&[u8]>>) {
    record.headers.iter().map(|(name, value)| (name.as_slice(), value.as_deref())).unzip()
}

/// Which of a batch's keys have held events, and which have parked ones.
struct KeyStates {
    held: BTreeSet<String>,
    parked: BTreeSet<String>,
}

/// One round trip: the keys among `keys` (as stored) with held events (versioned projections
/// only hold) and those with parked events.
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
        .map_err(ApplyError::during("reading the keys' states"))?;
    let rows = tx
        .query(&statement, &[&projection.name, &keys])
        .await
        .map_err(ApplyError::during("reading the keys' states"))?;
    for row in rows {
        let set = if row.get::<_, bool>(0) { &mut states.held } else { &mut states.parked };
        set.insert(row.get(1));
    }
    Ok(states)
}

/// Runs one record, inside a savepoint when `isolate`. `Ok(None)`: it was parked (poison), under
/// `key` (as stored).
async fn run_isolated(
    tx: &Transaction<'_>,
    projection: &Projection,
    record: &Record,
    decoded: &Decoded<'_>,
    source: Source,
    key: Option<&str>,
    isolate: bool,
) -> Result<Option<Processed>, ApplyError> {
    match try_event(tx, projection, record, decoded, source, isolate).await? {
        Ok(processed) => Ok(Some(processed)),
        Err(message) => {
            park(tx, projection, record, event_type_of(decoded), key, ParkClass::Poison, &message).await?;
            Ok(None)
        }
    }
}

/// What a failed statement is called in an event's error.
const STATEMENT: &str = "statement";

/// Runs one record, inside a savepoint when `isolate`. `Ok(Err(message))`: it is poison, and
/// (isolated) left no trace. A database error of class [`ErrorClass::Poison`] while it runs is
/// that event's: isolated, it rolls back to the savepoint and the event is poison; not isolated,
/// the batch must be retried isolated ([`ApplyError::Isolate`]).
pub(super) async fn try_event(
    tx: &Transaction<'_>,
    projection: &Projection,
    record: &Record,
    decoded: &Decoded<'_>,
    source: Source,
    isolate: bool,
) -> Result<Result<Processed, String>, ApplyError> {
    if isolate {
        tx.batch_execute("SAVEPOINT projector_event").await.map_err(ApplyError::during("opening a savepoint"))?;
    }
    let message = match process(tx, projection, record, decoded, source).await {
        Ok(processed) => {
            if isolate {
                tx.batch_execute("RELEASE SAVEPOINT projector_event")
                    .await
                    .map_err(ApplyError::during("releasing a savepoint"))?;
            }
            return Ok(Ok(processed));
        }
        Err(EventError::Poison(message)) => message,
        Err(EventError::Db(during, error)) => match class_of(&error) {
            ErrorClass::Poison => {
                let message =
                    if during == STATEMENT { describe(&error) } else { format!("{during}: {}", describe(&error)) };
                if !isolate {
                    let at = format!("`{}` partition {} offset {}", record.topic, record.partition, record.offset);
                    return Err(ApplyError::Isolate { at, source: error });
                }
                message
            }
            _ => return Err(ApplyError::database(during, error)),
        },
    };
    if isolate {
        tx.batch_execute("ROLLBACK TO SAVEPOINT projector_event; RELEASE SAVEPOINT projector_event")
            .await
            .map_err(ApplyError::during("rolling back to a savepoint"))?;
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

/// Applies the held events of `key` (as stored) in version order, as far as they follow on.
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
        .map_err(ApplyError::during("reading held events"))?;
    let mut result = Released::All;
    for row in rows {
        let version: i64 = row.get(0);
        let record = record_at(&row, 1);
        let decoded = projection.decode(&record);
        match run_isolated(tx, projection, &record, &decoded, Source::Held, Some(key), isolate).await? {
            // Its predecessor is still missing: it and its successors stay held.
            Some(Processed { outcome: Outcome::Gap, .. }) => {
                result = Released::Partly;
                break;
            }
            Some(Processed { label, outcome: Outcome::Applied, .. }) => {
                tracing::info!(projection = %projection.name, key = %stored::shown_key(key), version, "held event applied: its predecessor arrived");
                report.released += 1;
                report.count(&label, Outcome::Applied);
            }
            // Already reflected (a redelivered copy applied first), or no longer handled.
            Some(_) => {}
            None => {
                report.count(&label_of_decoded(projection, &decoded), Outcome::Parked);
                result = Released::Parked;
            }
        }
        tx.execute(
            "DELETE FROM projector.held_events WHERE projection = $1 AND entity_key = $2 AND version = $3",
            &[&projection.name, &key, &version],
        )
        .await
        .map_err(ApplyError::during("releasing held events"))?;
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
    let names: Vec<Vec<u8>> = row.get(first + 5);
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

/// Parks `record` under `key` (see [`Projection::parking_key`]; stored as [`stored::key`] stores
/// it), with its raw bytes as they came, whatever they hold.
pub(super) async fn park(
    tx: &Transaction<'_>,
    projection: &Projection,
    record: &Record,
    event_type: Option<&str>,
    key: Option<&str>,
    class: ParkClass,
    message: &str,
) -> Result<(), ApplyError> {
    let key = key.map(stored::key);
    let event_type = event_type.map(stored::message);
    let message = stored::message(message);
    let (names, values) = split_headers(record);
    tracing::warn!(
        projection = %projection.name,
        topic = %record.topic,
        partition = record.partition,
        offset = record.offset,
        key = %key.as_deref().map(stored::shown_key).unwrap_or_default(),
        class = class.as_str(),
        error = %message,
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
    .await
    .map_err(ApplyError::during("parking"))?;
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
    let tx = client.transaction().await.map_err(ApplyError::during("beginning the gap sweep"))?;
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
        .map_err(ApplyError::during("counting expired gaps"))?
        .get(0);
    if expired == 0 {
        return Ok(0);
    }
    hold_checkpoints(&tx, projection, partitions).await?;
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
        .map_err(ApplyError::during("taking expired gaps"))?;
    let mut expired: Vec<(String, i64, Option<i64>, String, Record)> =
        rows.into_iter().map(|row| (row.get(0), row.get(1), row.get(2), row.get(11), record_at(&row, 3))).collect();
    expired.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    for (key, version, found, held_at, record) in &expired {
        let row = found.map_or("no row".to_string(), |found| format!("the row at version {found}"));
        let message = format!(
            "held since {held_at} for the predecessor of version {version} of key `{}` ({row}), which did not \
             arrive within {after_secs} s",
            stored::shown_key(key)
        );
        let decoded = projection.decode(record);
        park(&tx, projection, record, event_type_of(&decoded), Some(key), ParkClass::GapTimeout, &message).await?;
    }
    tx.commit().await.map_err(ApplyError::during("committing the gap sweep"))?;
    Ok(expired.len() as u64)
}

/// What a sweep of held events did.
#[derive(Debug, Default)]
pub struct Swept {
    /// Held events of the keys released, as counted when applied (`applied`) or parked.
    pub report: BatchReport,
    /// Keys of the partitions swept that still have held events.
    pub still_held: usize,
}

/// Releases the held events of `partitions` whose predecessor has been applied meanwhile by a
/// batch that could not see them: one of another lane or instance (a key's events in several
/// partitions or topics) that read the key's state before the hold committed. `partitions` are
/// the ones this instance owns, with their stored checkpoints, each compare-and-set to itself
/// first, as for [`park_expired_gaps`]. Only keys whose row has reached the version before their
/// first held event are tried.
pub async fn release_ready(
    client: &mut deadpool_postgres::Object,
    applier: &Applier,
    projection: &Projection,
    partitions: &[(TopicPartition, i64)],
) -> Result<Swept, ApplyError> {
    let mut swept = Swept::default();
    let Dedupe::Version(table) = &projection.dedupe else {
        return Ok(swept);
    };
    if partitions.is_empty() {
        return Ok(swept);
    }
    let tx = client.transaction().await.map_err(ApplyError::during("beginning the release sweep"))?;
    let topics: Vec<&str> = partitions.iter().map(|((topic, _), _)| topic.as_str()).collect();
    let numbers: Vec<i32> = partitions.iter().map(|((_, partition), _)| *partition).collect();
    let held: Vec<(String, i64)> = tx
        .query(
            "SELECT h.entity_key, min(h.version) FROM projector.held_events h
               JOIN unnest($2::text[], $3::int[]) AS p(topic, partition) USING (topic, partition)
              WHERE h.projection = $1
              GROUP BY h.entity_key",
            &[&projection.name, &topics, &numbers],
        )
        .await
        .map_err(ApplyError::during("reading held events"))?
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    swept.still_held = held.len();
    if held.is_empty() {
        return Ok(swept);
    }
    // Keys stored by digest cannot be looked up in the read model: they are always tried.
    let plain: Vec<&str> = held.iter().map(|(key, _)| key.as_str()).filter(|key| !key.starts_with("sha256:")).collect();
    let rows = fast::current_versions(&tx, applier, table, &plain).await?;
    let ready: Vec<&str> = held
        .iter()
        .filter(|(key, first)| {
            key.starts_with("sha256:") || rows.get(key).copied().flatten().is_some_and(|at| at >= first - 1)
        })
        .map(|(key, _)| key.as_str())
        .collect();
    if ready.is_empty() {
        return Ok(swept);
    }
    hold_checkpoints(&tx, projection, partitions).await?;
    for key in ready {
        if matches!(release_key(&tx, projection, key, &mut swept.report, true).await?, Released::All) {
            swept.still_held -= 1;
        }
    }
    tx.commit().await.map_err(ApplyError::during("committing the release sweep"))?;
    Ok(swept)
}

/// Takes the checkpoints of `partitions` (each at its owner's `checkpoint`, unchanged) into the
/// transaction: a sweep commits only while this instance, on this definition, still owns them.
async fn hold_checkpoints(
    tx: &Transaction<'_>,
    projection: &Projection,
    partitions: &[(TopicPartition, i64)],
) -> Result<(), ApplyError> {
    for (partition, checkpoint) in partitions {
        let stay = Move::stay(partition.clone(), *checkpoint);
        let kept = checkpoint::compare_and_set(tx, &projection.name, &stay, &projection.hash)
            .await
            .map_err(ApplyError::during("moving the checkpoints"))?;
        refused(projection, partition, kept)?;
    }
    Ok(())
}
