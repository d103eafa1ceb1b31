//! One event of a batch: its plan run, as the projection dedupes (by event id, or by the
//! entity's version: applied, a duplicate, or a gap held until its predecessor arrives), inside a
//! savepoint of its own when the batch is isolated; a poison event is parked.

use deadpool_postgres::Transaction;

use super::error::{class_of, ApplyError, ErrorClass};
use super::park::{park, ParkClass};
use super::plan::{Bound, Planner};
use super::{describe, stored};
use crate::outcome::{self, Outcome};
use crate::projection::value::bind_all;
use crate::projection::{Decoded, Dedupe, Event, Handler, Projection, Record, StatementKind};

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

/// Where a record being processed comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Kafka,
    /// Re-read from `projector.held_events`: a gap again leaves it there.
    Held,
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
    Ok(Processed { label: event.event_type.to_string(), outcome, key: event.key.clone() })
}

/// The event's plan ([`Planner::plan`]): a value that does not fit parks the event untouched.
async fn bind_handler(
    tx: &Transaction<'_>,
    handler: &Handler,
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
    let (names, values) = stored::split_headers(record);
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

/// Runs one record, inside a savepoint when `isolate`. `Ok(None)`: it was parked (poison), under
/// `key` (as stored).
pub(super) async fn run_isolated(
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
            park(tx, projection, record, outcome::event_type(decoded), key, ParkClass::Poison, &message).await?;
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
