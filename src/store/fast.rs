//! The fast path of a batch, in one of two ways:
//!
//! - **Guarded waves** (versioned projections whose handlers are each one exactly guarded statement
//!   with a set-based form): every event runs, a key's *k*-th event in wave *k*, as one
//!   statement per wave and event type over arrays, each returning the keys it changed as one
//!   array. The guards decide; then only the keys of refused events are read, to tell duplicates
//!   (the row at or past the event's version) from anything else, which rolls the batch back
//!   ([`ApplyError::Mispredicted`]) to be retried event by event.
//! - **Predicted outcomes** (everything else): one read of the rows' current versions (or, for an
//!   event-id projection, recording the batch's event ids, which returns those new) decides every
//!   event's outcome, then only the statements that will apply are sent: set-based where they
//!   all have a set-based form ([`super::grouped`]: by key for versioned projections, by the rows
//!   each statement touches for event-id ones), else pipelined on the connection in batch order
//!   (tokio-postgres sends concurrently polled queries back to back; Postgres runs them in that
//!   order). It is exact:
//!   when an outcome cannot be predicted (a gap, a value that does not bind, an event without key
//!   or id) it declines before writing anything, and the batch takes the careful path, event by
//!   event. A guarded statement that then changes no row, which the prediction says it must,
//!   fails the batch with [`ApplyError::Mispredicted`]: it rolls back and is retried on the
//!   careful path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deadpool_postgres::Transaction;
use futures::stream::{FuturesOrdered, TryStreamExt};
use postgres_types::ToSql;

use super::column::Column;
use super::error::{class_of, ApplyError, ErrorClass};
use super::grouped::{apply_set_based, columns, event_id_waves, set_based_waves, Group};
use super::plan::{Bound, Planner};
use super::{describe, stored};
use crate::outcome::{BatchReport, Outcome};
use crate::projection::{Decoded, Dedupe, Event, Handler, Projection, Record, StatementKind, VersionedTable};

/// What the fast path did.
pub enum Fast {
    Done(BatchReport),
    /// Nothing was written: take the careful path.
    Declined,
}

/// One event the fast path will apply: its statements, bound, as compiled and as prepared.
pub(super) struct Planned<'p> {
    /// Its place among the batch's handled events.
    pub index: usize,
    /// The entity key (versioned projections), the event's own.
    pub key: Option<&'p str>,
    pub sources: &'p [crate::projection::Statement],
    pub statements: Vec<Bound>,
}

/// Applies the batch's records (decoded as `decoded`) on the fast path, or declines before
/// writing anything.
pub async fn try_apply<'p>(
    tx: &Transaction<'_>,
    applier: &Applier,
    projection: &'p Projection,
    records: &[Record],
    decoded: &'p [Decoded<'p>],
) -> Result<Fast, ApplyError> {
    // Bind everything first: an event that does not bind declines (the careful path parks it).
    let mut report = BatchReport::default();
    let mut events = Vec::with_capacity(records.len());
    let mut planner = Planner::default();
    for (record, decoded) in records.iter().zip(decoded) {
        match decoded {
            Decoded::Tombstone | Decoded::Ignored { .. } => report.count("other", Outcome::Ignored),
            Decoded::Poison { .. } => return Ok(declined(projection, "an event does not decode")),
            Decoded::Handled { event, handler } => {
                let planned = planner.plan(tx, handler, event, record);
                let Ok(statements) = planned.await.map_err(ApplyError::during("preparing a statement"))? else {
                    return Ok(declined(projection, "an event's values do not bind"));
                };
                let planned = Planned {
                    index: events.len(),
                    key: event.key.as_deref(),
                    sources: &handler.statements,
                    statements,
                };
                events.push((event, *handler, planned));
            }
        }
    }

    let mut applied: Vec<Planned> = Vec::new();
    match &projection.dedupe {
        Dedupe::Version(table) => {
            if events.iter().any(|(event, _, _)| event.key.is_none() || event.version.is_none()) {
                return Ok(declined(projection, "an event has no key or version"));
            }
            // Hash and merge joins are off (`apply_batch`): each row is found through the key's
            // index, in the look-up as in the set-based statements.
            if let Some(waves) = guarded_waves(applier, &events) {
                let outcomes = apply_guarded(tx, applier, table, &events, &waves).await?;
                for ((event, _, _), outcome) in events.iter().zip(outcomes) {
                    report.count(&event.event_type, outcome);
                }
                report.fast = true;
                return Ok(Fast::Done(report));
            }
            let keys: Vec<&str> = events.iter().filter_map(|(event, _, _)| event.key.as_deref()).collect();
            let mut current = current_versions(tx, applier, table, &keys).await?;
            for (event, handler, planned) in events {
                let key = event.key.as_deref().expect("checked above");
                let version = event.version.expect("checked above");
                let row = current.get(key).copied().flatten();
                let outcome = match (handler.statements[0].kind, row) {
                    (_, Some(at)) if at >= version => Outcome::Duplicate,
                    (StatementKind::Create, None) => Outcome::Applied,
                    (StatementKind::Update | StatementKind::UpdateIfNewer, Some(at)) if at == version - 1 => {
                        Outcome::Applied
                    }
                    // A gap, or anything unusual: the careful path handles it, with the planner's
                    // settings as the user left them.
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
            // Ids as `processed_events` stores them; the first of each in the batch is recorded,
            // and those recorded now (not before) are the events to apply.
            let mut ids: Vec<std::borrow::Cow<'_, str>> = Vec::with_capacity(events.len());
            for (event, _, _) in &events {
                match &event.event_id {
                    Some(id) => ids.push(stored::key(id)),
                    None => return Ok(declined(projection, "an event has no id")),
                }
            }
            let firsts = stored::distinct(ids.iter().map(|id| &**id), ids.len());
            // The ids recorded now, as one array in one row (as the guarded waves' changed keys).
            let recorded = tx
                .query_one(
                    "WITH recorded AS (INSERT INTO projector.processed_events (projection, event_id)
                     SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING RETURNING event_id)
                     SELECT array_agg(event_id) FROM recorded",
                    &[&projection.name, &firsts],
                )
                .await
                .map_err(ApplyError::during("recording event ids"))?;
            let mut new = texts(&recorded);
            for ((event, _, planned), id) in events.into_iter().zip(&ids) {
                if new.remove(&**id) {
                    applied.push(planned);
                    report.count(&event.event_type, Outcome::Applied);
                } else {
                    report.count(&event.event_type, Outcome::Duplicate);
                }
            }
        }
    }

    // Guarded statements change exactly one row per event; an event-id projection's, any number.
    let (waves, exact) = match &projection.dedupe {
        // A lone applied event runs its own statement.
        Dedupe::Version(_) if applied.len() < 2 => (None, true),
        Dedupe::Version(_) => (set_based_waves(applier, applied.iter().collect()), true),
        Dedupe::EventId => (event_id_waves(tx, applier, &applied).await?, false),
    };
    if let Some(waves) = waves {
        apply_set_based(tx, &waves, exact).await?;
        report.fast = true;
        return Ok(Fast::Done(report));
    }

    // Every statement of every applied event, pipelined, in batch order. For versioned
    // projections the first statement of each event is its guard and must change a row. The
    // projection's own statements are planned as Postgres chooses (the engine's set-based ones
    // use a generic plan: `apply_batch`); the reset goes ahead of them in the same pipeline.
    let guarded = matches!(projection.dedupe, Dedupe::Version(_));
    let reset = async {
        match guarded && !applied.is_empty() {
            true => tx.batch_execute("RESET plan_cache_mode").await,
            false => Ok(()),
        }
    };
    let mut pipeline = FuturesOrdered::new();
    for planned in &applied {
        for (index, bound) in planned.statements.iter().enumerate() {
            let params = bound.params();
            let must_change = guarded && index == 0;
            pipeline
                .push_back(async move { tx.execute(&bound.statement, &params).await.map(|rows| (rows, must_change)) });
        }
    }
    let (reset, results) = futures::join!(reset, pipeline.try_collect::<Vec<(u64, bool)>>());
    reset.map_err(ApplyError::during("resetting the planner"))?;
    let results = results.map_err(fast_error)?;
    if let Some(position) = results.iter().position(|(rows, must_change)| *must_change && *rows == 0) {
        return Err(ApplyError::mispredicted(format!("guarded statement {position} of the batch changed no row")));
    }
    report.fast = true;
    Ok(Fast::Done(report))
}

/// What applying batches keeps beyond a projection, per engine: its settings and the version
/// look-ups it built. Cloned into each worker; clones share the look-ups.
#[derive(Clone)]
pub struct Applier {
    /// Events of one statement applied by one statement over arrays (`batch.set_based`).
    pub set_based: bool,
    /// The version look-up's text per (table, key column): see [`lookup_sql`].
    lookups: Arc<Mutex<HashMap<(String, String), String>>>,
    /// Per table an event-id projection writes (as written): whether every column of it compares
    /// by value, no nondeterministic collation (see [`super::grouped::deterministic`]).
    pub(super) deterministic: Arc<Mutex<HashMap<String, bool>>>,
}

impl Applier {
    pub fn new(set_based: bool) -> Applier {
        Applier { set_based, lookups: Arc::default(), deterministic: Arc::default() }
    }
}

impl Default for Applier {
    /// As `batch.set_based` is by default: on.
    fn default() -> Applier {
        Applier::new(true)
    }
}

/// A batch's events to apply in guarded waves, without reading the rows first: when every
/// handler is one exactly guarded statement (`Create`, or `Update` on `version = :version - 1`)
/// with a set-based form. Each guard then decides alone whether its event applies, exactly as
/// the prediction would; `apply_guarded` explains the events it refused.
fn guarded_waves<'a, 'p>(
    applier: &Applier,
    events: &'a [(&Event, &Handler, Planned<'p>)],
) -> Option<Vec<Vec<Group<'a, 'p>>>> {
    let exact = events.iter().all(|(_, handler, _)| {
        matches!(handler.statements.as_slice(), [only] if matches!(only.kind, StatementKind::Create | StatementKind::Update))
    });
    if !exact {
        return None;
    }
    // Even one event: its guarded statement alone tells applied from refused, where the event's
    // own statement would first need its row's version read (one more round trip).
    let planned: Vec<&'a Planned<'p>> = events.iter().map(|(_, _, planned)| planned).collect();
    set_based_waves(applier, planned)
}

/// Runs the waves, each group returning the keys it changed, then explains every event whose
/// guard changed no row: a duplicate when its row was already at or past its version (read once,
/// for those keys only). Anything else (a gap, a create finding its row) is not what the fast
/// path handles: [`ApplyError::Mispredicted`], and the batch is rolled back and retried event
/// by event. Returns each event's outcome, in batch order.
async fn apply_guarded(
    tx: &Transaction<'_>,
    applier: &Applier,
    table: &VersionedTable,
    events: &[(&Event, &Handler, Planned<'_>)],
    waves: &[Vec<Group<'_, '_>>],
) -> Result<Vec<Outcome>, ApplyError> {
    let mut statements: Vec<(tokio_postgres::Statement, Vec<Column<'_>>, &Group)> = Vec::new();
    for group in waves.iter().flatten() {
        let types = group.types();
        let sql = group.set.sql_changed_keys(&types, &table.key_column);
        let prepared = tx.prepare_cached(&sql).await.map_err(ApplyError::during("preparing a set-based statement"))?;
        statements.push((prepared, columns(group, types.len()), group));
    }
    let mut pipeline = FuturesOrdered::new();
    for (statement, columns, group) in &statements {
        let params: Vec<&(dyn ToSql + Sync)> = columns.iter().map(|column| column as &(dyn ToSql + Sync)).collect();
        pipeline.push_back(async move { tx.query_one(statement, &params).await.map(|row| (row, *group)) });
    }
    let results: Vec<(tokio_postgres::Row, &Group)> = pipeline.try_collect().await.map_err(fast_error)?;
    let mut applied = vec![false; events.len()];
    for (row, group) in &results {
        let changed = texts(row);
        for planned in &group.events {
            applied[planned.index] = planned.key.is_some_and(|key| changed.contains(key));
        }
    }

    let mut outcomes = vec![Outcome::Applied; events.len()];
    // The events of each key with a refused event, in batch order.
    let mut refused: foldhash::HashMap<&str, Vec<usize>> = HashMap::default();
    for (index, (event, _, _)) in events.iter().enumerate() {
        if let Some(key) = event.key.as_deref() {
            if !applied[index] || refused.contains_key(key) {
                refused.entry(key).or_default().push(index);
            }
        }
    }
    if refused.is_empty() {
        return Ok(outcomes);
    }
    // A key's events before its first refused one all applied: add them.
    for (index, (event, _, _)) in events.iter().enumerate() {
        if let Some(indexes) = event.key.as_deref().and_then(|key| refused.get_mut(key)) {
            if index < indexes[0] {
                indexes.push(index);
            }
        }
    }
    let keys: Vec<&str> = refused.keys().copied().collect();
    let now = current_versions(tx, applier, table, &keys).await?;
    for (key, mut indexes) in refused {
        indexes.sort_unstable();
        let version = |index: usize| events[index].0.version.expect("guarded events have versions");
        let kind = |index: usize| events[index].1.statements[0].kind;
        // The row before the batch: just before the key's first applied event (exact guards), or
        // as it is now when none applied.
        let mut at = match indexes.iter().find(|&&index| applied[index]) {
            Some(&first) if kind(first) == StatementKind::Create => None,
            Some(&first) => Some(version(first) - 1),
            None => now.get(key).copied().flatten(),
        };
        for index in indexes {
            let v = version(index);
            if applied[index] {
                let follows = match kind(index) {
                    StatementKind::Create => at.is_none(),
                    _ => at == Some(v - 1),
                };
                if !follows {
                    return Err(ApplyError::mispredicted(format!("key `{key}`: version {v} applied after {at:?}")));
                }
                at = Some(v);
            } else if at.is_some_and(|at| at >= v) {
                outcomes[index] = Outcome::Duplicate;
            } else {
                return Err(ApplyError::mispredicted(format!(
                    "key `{key}`: version {v} does not follow the row's version {at:?}"
                )));
            }
        }
        if at != now.get(key).copied().flatten() {
            return Err(ApplyError::mispredicted(format!("key `{key}` is at {:?}, not {at:?}", now.get(key))));
        }
    }
    Ok(outcomes)
}

/// The texts in a one-row result's array (`array_agg`'s NULL: none).
fn texts(row: &tokio_postgres::Row) -> foldhash::HashSet<&str> {
    row.get::<_, Option<Vec<&str>>>(0).unwrap_or_default().into_iter().collect()
}

fn declined(projection: &Projection, why: &str) -> Fast {
    tracing::debug!(projection = %projection.name, why, "fast path declined");
    Fast::Declined
}

/// A statement failing on the fast path: data errors go to the careful path, which parks the
/// event responsible alone. So does a set-based upsert meeting one row twice (21000), which one
/// event at a time cannot: two keys the waves took apart that Postgres sees as one (a
/// nondeterministic collation).
pub(super) fn fast_error(error: tokio_postgres::Error) -> ApplyError {
    let twice = error.code() == Some(&tokio_postgres::error::SqlState::CARDINALITY_VIOLATION);
    if twice || class_of(&error) == ErrorClass::Poison {
        ApplyError::Mispredicted { why: describe(&error), source: Some(error) }
    } else {
        ApplyError::database("applying the batch", error)
    }
}

/// The version of each key's row now (`None`: no row), in one round trip.
pub(super) async fn current_versions(
    tx: &Transaction<'_>,
    applier: &Applier,
    table: &VersionedTable,
    keys: &[&str],
) -> Result<HashMap<String, Option<i64>>, ApplyError> {
    let sql = lookup_sql(tx, applier, table).await?;
    let statement = tx.prepare_cached(&sql).await.map_err(ApplyError::during("preparing the version look-up"))?;
    // A key Postgres cannot read as the key column's type (a NUL, a malformed uuid) fails the
    // look-up as data: the careful path then parks its event.
    let rows = tx.query(&statement, &[&keys]).await.map_err(fast_error)?;
    // A row whose version is NULL reads as no row: the prediction then fails and the careful
    // path says why.
    Ok(rows.into_iter().map(|row| (row.get::<_, String>(0), row.get::<_, Option<i64>>(1))).collect())
}

/// `SELECT t.key::text, t.version FROM unnest($1::text[]) JOIN table t ON t.key = key::<key type>`:
/// each key cast to the key column's own type keeps its index usable. Built once per table and
/// engine. A key written differently from its text form (an upper-case uuid) is then not found:
/// the prediction fails safe (the batch goes the careful way).
async fn lookup_sql(tx: &Transaction<'_>, applier: &Applier, table: &VersionedTable) -> Result<String, ApplyError> {
    let cache = &applier.lookups;
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
        .map_err(ApplyError::during("reading the key column's type"))?;
    let key_type: String = row.get(0);
    // Run with hash and merge joins off (see `apply_batch`): a nested loop probing the key's
    // index once per key, whatever the table's size. (`= ANY(array)` is planned as a sequential
    // scan filtering on a hash of the keys, whose cost grows with the table.)
    let sql = format!(
        "SELECT t.{key}::text, t.{version}::bigint FROM unnest($1::text[]) AS projector_keys(key)
           JOIN {table} AS t ON t.{key} = projector_keys.key::{key_type}",
        version = table.version_column,
        table = table.table,
        key = table.key_column,
    );
    cache.lock().expect("lookup cache").insert(cache_key, sql.clone());
    Ok(sql)
}
