//! The fast path of a batch: predict every event's outcome from one read of the rows' current
//! versions (or of the processed event ids), then send only the statements that will apply,
//! pipelined on the connection in batch order (tokio-postgres sends concurrently polled queries
//! back to back; Postgres runs them in that order).
//!
//! It is exact, not optimistic: when an outcome cannot be predicted (a gap, a value that does not
//! bind, an event without key or id) it declines before writing anything, and the batch takes the
//! careful path, event by event. A guarded statement that then changes no row, which the
//! prediction says it must, fails the batch with [`ApplyError::Mispredicted`]: it rolls back and
//! is retried on the careful path.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};

use deadpool_postgres::Transaction;
use futures::stream::{FuturesOrdered, TryStreamExt};

use super::apply::{ApplyError, BatchReport, Outcome};
use super::describe;
use crate::projection::value::{bind_all, SqlValue};
use crate::projection::{Decoded, Dedupe, Projection, Record, StatementKind, VersionedTable};

/// What the fast path did.
pub enum Fast {
    Done(BatchReport),
    /// Nothing was written: take the careful path.
    Declined,
}

fn failed(error: &tokio_postgres::Error) -> ApplyError {
    super::apply::fail(error)
}

/// One event the fast path will apply: its statements, bound.
struct Planned {
    statements: Vec<(tokio_postgres::Statement, Vec<SqlValue>)>,
}

pub async fn try_apply(
    tx: &Transaction<'_>,
    projection: &Projection,
    records: &[Record],
    decoded: &[Decoded<'_>],
) -> Result<Fast, ApplyError> {
    // Bind everything first: an event that does not bind declines (the careful path parks it).
    let mut report = BatchReport::default();
    let mut events = Vec::with_capacity(records.len());
    for (record, decoded) in records.iter().zip(decoded) {
        match decoded {
            Decoded::Tombstone | Decoded::Ignored { .. } => report.count("other", Outcome::Ignored),
            Decoded::Poison { .. } => return Ok(declined(projection, "an event does not decode")),
            Decoded::Handled { event, handler } => {
                let mut statements = Vec::with_capacity(handler.statements.len());
                for statement in &handler.statements {
                    let prepared = tx.prepare_cached(&statement.sql).await.map_err(|error| failed(&error))?;
                    let Ok(values) = bind_all(statement, prepared.params(), event, record) else {
                        return Ok(declined(projection, "an event's values do not bind"));
                    };
                    statements.push((prepared, values));
                }
                events.push((event, handler, Planned { statements }));
            }
        }
    }

    let mut applied: Vec<Planned> = Vec::new();
    match &projection.dedupe {
        Dedupe::Version(table) => {
            let mut keys: Vec<&str> = Vec::new();
            for (event, _, _) in &events {
                match (&event.key, event.version) {
                    (Some(key), Some(_)) => keys.push(key),
                    _ => return Ok(declined(projection, "an event has no key or version")),
                }
            }
            let mut current = current_versions(tx, table, &keys).await?;
            for (event, handler, planned) in events {
                let key = event.key.as_deref().expect("checked above");
                let version = event.version.expect("checked above");
                let row = current.get(key).copied().flatten();
                let outcome = match (handler.statements[0].kind, row) {
                    (_, Some(at)) if at >= version => Outcome::Duplicate,
                    (StatementKind::Create, None) => Outcome::Applied,
                    (StatementKind::Update, Some(at)) if at == version - 1 => Outcome::Applied,
                    // A gap, or anything unusual: the careful path handles it.
                    _ => return Ok(declined(projection, "an event does not follow its row's version")),
                };
                if outcome == Outcome::Applied {
                    current.insert(key.to_string(), Some(version));
                    applied.push(planned);
                }
                report.count(&event.event_type, outcome);
            }
        }
        Dedupe::EventId => {
            let mut ids: Vec<&str> = Vec::new();
            for (event, _, _) in &events {
                match &event.event_id {
                    Some(id) => ids.push(id),
                    None => return Ok(declined(projection, "an event has no id")),
                }
            }
            let seen = tx
                .query(
                    "SELECT event_id FROM projector.processed_events WHERE projection = $1 AND event_id = ANY($2)",
                    &[&projection.name, &ids],
                )
                .await
                .map_err(|error| failed(&error))?;
            let mut seen: HashSet<String> = seen.into_iter().map(|row| row.get(0)).collect();
            let mut new_ids: Vec<String> = Vec::new();
            for (event, _, planned) in events {
                let id = event.event_id.clone().expect("checked above");
                if seen.insert(id.clone()) {
                    new_ids.push(id);
                    applied.push(planned);
                    report.count(&event.event_type, Outcome::Applied);
                } else {
                    report.count(&event.event_type, Outcome::Duplicate);
                }
            }
            if !new_ids.is_empty() {
                let inserted = tx
                    .execute(
                        "INSERT INTO projector.processed_events (projection, event_id)
                         SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
                        &[&projection.name, &new_ids],
                    )
                    .await
                    .map_err(|error| failed(&error))?;
                if inserted as usize != new_ids.len() {
                    return Err(ApplyError::Mispredicted(format!(
                        "{} of {} new event ids were already processed",
                        new_ids.len() as u64 - inserted,
                        new_ids.len()
                    )));
                }
            }
        }
    }

    // Every statement of every applied event, pipelined, in batch order. For versioned
    // projections the first statement of each event is its guard and must change a row.
    let guarded = matches!(projection.dedupe, Dedupe::Version(_));
    let mut pipeline = FuturesOrdered::new();
    for planned in &applied {
        for (index, (statement, values)) in planned.statements.iter().enumerate() {
            let params: Vec<&(dyn postgres_types::ToSql + Sync)> =
                values.iter().map(|value| &**value as &(dyn postgres_types::ToSql + Sync)).collect();
            let must_change = guarded && index == 0;
            pipeline.push_back(async move { tx.execute(statement, &params).await.map(|rows| (rows, must_change)) });
        }
    }
    let results: Vec<(u64, bool)> = pipeline.try_collect().await.map_err(|error| fast_error(&error))?;
    if let Some(position) = results.iter().position(|(rows, must_change)| *must_change && *rows == 0) {
        return Err(ApplyError::Mispredicted(format!("guarded statement {position} of the batch changed no row")));
    }
    report.fast = true;
    Ok(Fast::Done(report))
}

fn declined(projection: &Projection, why: &str) -> Fast {
    tracing::debug!(projection = %projection.name, why, "fast path declined");
    Fast::Declined
}

/// A statement failing on the fast path: data errors go to the careful path, which parks the
/// event responsible alone.
fn fast_error(error: &tokio_postgres::Error) -> ApplyError {
    match error.as_db_error().map(|db| &db.code().code()[..2]) {
        Some("22" | "23") => ApplyError::Mispredicted(describe(error)),
        _ => failed(error),
    }
}

/// The version of each key's row now (`None`: no row), in one round trip.
async fn current_versions(
    tx: &Transaction<'_>,
    table: &VersionedTable,
    keys: &[&str],
) -> Result<HashMap<String, Option<i64>>, ApplyError> {
    let sql = lookup_sql(tx, table).await?;
    let rows = tx.query(sql.as_str(), &[&keys]).await.map_err(|error| failed(&error))?;
    Ok(rows.into_iter().map(|row| (row.get::<_, String>(0), Some(row.get::<_, i64>(1)))).collect())
}

/// `SELECT key::text, version FROM table WHERE key = ANY($1::text[]::<key type>[])`: the key
/// column's own type keeps its index usable. Built once per table. A key written differently from
/// its text form (an upper-case uuid) is then not found: the prediction fails safe (the batch
/// goes the careful way).
async fn lookup_sql(tx: &Transaction<'_>, table: &VersionedTable) -> Result<String, ApplyError> {
    static CACHE: OnceLock<Mutex<HashMap<(String, String), String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let cache_key = (table.table.clone(), table.key_column.clone());
    if let Some(sql) = cache.lock().expect("lookup cache").get(&cache_key) {
        return Ok(sql.clone());
    }
    let row = tx
        .query_one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = to_regclass($1) AND attname = $2 AND NOT attisdropped",
            &[&table.table, &table.key_column],
        )
        .await
        .map_err(|error| failed(&error))?;
    let key_type: String = row.get(0);
    // `= ANY(array)` keeps the primary key index in every plan (a join with `unnest` is planned
    // as a hash join over the whole table until the plan turns generic).
    let sql = format!(
        "SELECT {key}::text, {version} FROM {table} WHERE {key} = ANY($1::text[]::{key_type}[])",
        version = table.version_column,
        table = table.table,
        key = table.key_column,
    );
    cache.lock().expect("lookup cache").insert(cache_key, sql.clone());
    Ok(sql)
}
