//! A batch's applied events grouped into set-based statements ([`SetBased`]), wave by wave, and
//! the waves run: the part of the fast path ([`super::fast`]) that writes many events with one
//! statement. A versioned projection's waves follow its keys (an order's *k*-th event in wave
//! *k*); an event-id projection's follow the rows its statements touch
//! ([`crate::projection::waves`]).

use std::collections::HashMap;

use deadpool_postgres::Transaction;
use futures::stream::{FuturesOrdered, TryStreamExt};
use postgres_types::{IsNull, ToSql, Type};

use super::column::{sql_type, Column};
use super::error::ApplyError;
use super::fast::{fast_error, Applier, Planned};
use crate::projection::set_based::{Footprint, SetBased};
use crate::projection::waves::{Touch, Waves};

/// Events of one statement applied by one set-based statement: no two touch the same row.
pub(super) struct Group<'a, 'p> {
    pub set: &'p SetBased,
    /// The statement's place in its handler.
    pub statement: usize,
    pub events: Vec<&'a Planned<'p>>,
}

impl<'a, 'p> Group<'a, 'p> {
    /// Adds `planned` to the group of `set` (at `statement` in its handler) in `groups`, or to a
    /// new one at their end.
    fn join(groups: &mut Vec<Group<'a, 'p>>, set: &'p SetBased, statement: usize, planned: &'a Planned<'p>) {
        match groups.iter_mut().find(|group| std::ptr::eq(group.set, set)) {
            Some(group) => group.events.push(planned),
            None => groups.push(Group { set, statement, events: vec![planned] }),
        }
    }

    /// The SQL types of the statement's parameters.
    pub fn types(&self) -> Vec<String> {
        self.events[0].statements[self.statement].statement.params().iter().map(sql_type).collect()
    }
}

/// The applied events of a versioned projection whose handlers are each one guarded statement
/// with a set-based form, in waves: wave `w` holds the `w`-th applied event of each key, grouped
/// by statement. Applying the waves in order keeps every key's order; within a wave no two
/// events share a key, so each group can be one statement. `None`: apply event by event.
pub(super) fn set_based_waves<'a, 'p>(
    applier: &Applier,
    applied: Vec<&'a Planned<'p>>,
) -> Option<Vec<Vec<Group<'a, 'p>>>> {
    if !applier.set_based || applied.is_empty() {
        return None;
    }
    let mut waves: Vec<Vec<Group<'a, 'p>>> = Vec::new();
    // Hashed once per event: foldhash, not SipHash.
    let mut seen: foldhash::HashMap<&str, usize> = HashMap::with_capacity_and_hasher(applied.len(), Default::default());
    for planned in applied {
        let [source] = planned.sources else {
            return None;
        };
        let set = source.set_based.as_ref()?;
        let wave = seen.entry(planned.key?).or_insert(0);
        if *wave == waves.len() {
            waves.push(Vec::new());
        }
        Group::join(&mut waves[*wave], set, 0, planned);
        *wave += 1;
    }
    Some(waves)
}

/// The applied events of an event-id projection whose statements all have a set-based form, in
/// waves ([`Waves`]): an event's statements go to the first wave after every earlier event whose
/// rows they may touch, each wave's events of one statement as one statement. `None`: apply
/// event by event (a statement without a set-based form or footprint, a table with a
/// nondeterministic collation, or a key of a type whose equal values may be encoded differently).
pub(super) async fn event_id_waves<'a, 'p>(
    tx: &Transaction<'_>,
    applier: &Applier,
    applied: &'a [Planned<'p>],
) -> Result<Option<Vec<Vec<Group<'a, 'p>>>>, ApplyError> {
    if !applier.set_based || applied.len() < 2 || !deterministic(tx, applier, applied).await? {
        return Ok(None);
    }
    Ok(place_event_id(applied))
}

/// [`event_id_waves`]' placement, once the tables are known to compare by value.
fn place_event_id<'a, 'p>(applied: &'a [Planned<'p>]) -> Option<Vec<Vec<Group<'a, 'p>>>> {
    let mut waves: Vec<Vec<Group<'a, 'p>>> = Vec::new();
    let mut placing = Waves::default();
    let mut encoded = bytes::BytesMut::new();
    for planned in applied {
        let mut touches = Vec::with_capacity(planned.sources.len());
        let mut sets = Vec::with_capacity(planned.sources.len());
        for (source, bound) in planned.sources.iter().zip(&planned.statements) {
            let set = source.set_based.as_ref()?;
            sets.push(set);
            touches.push(match set.footprint.as_ref()? {
                Footprint::Keyed { table, columns, params } => {
                    let mut key = Some(Vec::new());
                    for &param in params {
                        let ty = bound.statement.params().get(param)?;
                        if !compares_by_bytes(ty) {
                            return None;
                        }
                        encoded.clear();
                        match bound.values.get(param)?.to_sql_checked(ty, &mut encoded).ok()? {
                            IsNull::Yes => key = None,
                            IsNull::No => {
                                if let Some(key) = key.as_mut() {
                                    key.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
                                    key.extend_from_slice(&encoded);
                                }
                            }
                        }
                    }
                    Touch::Keyed { table: table.as_str(), columns: columns.as_slice(), key }
                }
                Footprint::Unkeyed { table } => {
                    Touch::Unkeyed { table: table.as_str(), statement: std::ptr::from_ref(set) as usize }
                }
            });
        }
        let wave = placing.place(touches);
        while waves.len() <= wave {
            waves.push(Vec::new());
        }
        for (index, set) in sets.into_iter().enumerate() {
            Group::join(&mut waves[wave], set, index, planned);
        }
    }
    Some(waves)
}

/// Whether every table `applied` events write compares its columns by value: no column has a
/// nondeterministic collation, under which two keys the waves take apart (`A`, `a`) may be one
/// row to Postgres. Read once per table and engine (one round trip for the tables not known
/// yet); `false` also when a statement has no set-based form, or its table is not found by its
/// name as the statement writes it, lowercased (a quoted mixed-case name).
async fn deterministic(tx: &Transaction<'_>, applier: &Applier, applied: &[Planned<'_>]) -> Result<bool, ApplyError> {
    let mut tables: Vec<&str> = Vec::new();
    for source in applied.iter().flat_map(|planned| planned.sources) {
        match (&source.writes, &source.set_based) {
            (Some(table), Some(_)) if !tables.contains(&table.as_str()) => tables.push(table),
            (Some(_), Some(_)) => {}
            _ => return Ok(false),
        }
    }
    let unknown: Vec<&str> = {
        let known = applier.deterministic.lock().expect("collations");
        if tables.iter().any(|table| known.get(*table) == Some(&false)) {
            return Ok(false);
        }
        tables.iter().copied().filter(|table| !known.contains_key(*table)).collect()
    };
    if !unknown.is_empty() {
        let rows = tx
            .query(
                "SELECT t, bool_and(to_regclass(t) IS NOT NULL AND coalesce(c.collisdeterministic, true))
                   FROM unnest($1::text[]) AS t
                   LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(t) AND a.attnum > 0 AND NOT a.attisdropped
                   LEFT JOIN pg_collation c ON c.oid = a.attcollation
                  GROUP BY t",
                &[&unknown],
            )
            .await
            .map_err(ApplyError::during("reading the tables' collations"))?;
        let mut known = applier.deterministic.lock().expect("collations");
        for row in rows {
            known.insert(row.get(0), row.get::<_, Option<bool>>(1).unwrap_or(true));
        }
    }
    let known = applier.deterministic.lock().expect("collations");
    Ok(tables.iter().all(|table| known.get(*table) == Some(&true)))
}

/// Whether two values of `ty` are equal exactly when their binary encodings are: not `numeric`
/// (`1.0` and `1.00`), `char(n)` (trailing blanks) or `citext`, for instance. (Text compared
/// under a nondeterministic collation would break this too: [`deterministic`] rules it out.)
fn compares_by_bytes(ty: &Type) -> bool {
    matches!(
        *ty,
        Type::TEXT
            | Type::VARCHAR
            | Type::NAME
            | Type::UUID
            | Type::INT2
            | Type::INT4
            | Type::INT8
            | Type::BOOL
            | Type::DATE
            | Type::TIMESTAMP
            | Type::TIMESTAMPTZ
    )
}

/// A group's parameters as one array each.
pub(super) fn columns<'a>(group: &Group<'a, '_>, width: usize) -> Vec<Column<'a>> {
    (0..width)
        .map(|j| {
            Column(
                group
                    .events
                    .iter()
                    .map(|planned| &planned.statements[group.statement].values[j] as &(dyn ToSql + Sync))
                    .collect(),
            )
        })
        .collect()
}

/// Runs the waves' groups in order, pipelined, each as one statement over arrays. With `exact`
/// (guarded statements), each must change exactly one row per event.
pub(super) async fn apply_set_based(
    tx: &Transaction<'_>,
    waves: &[Vec<Group<'_, '_>>],
    exact: bool,
) -> Result<(), ApplyError> {
    let mut statements: Vec<(tokio_postgres::Statement, Vec<Column<'_>>, u64)> = Vec::new();
    for group in waves.iter().flatten() {
        let types = group.types();
        let prepared = tx
            .prepare_cached(&group.set.sql(&types))
            .await
            .map_err(ApplyError::during("preparing a set-based statement"))?;
        statements.push((prepared, columns(group, types.len()), group.events.len() as u64));
    }
    let mut pipeline = FuturesOrdered::new();
    for (statement, columns, size) in &statements {
        let params: Vec<&(dyn ToSql + Sync)> = columns.iter().map(|column| column as &(dyn ToSql + Sync)).collect();
        pipeline.push_back(async move { tx.execute(statement, &params).await.map(|rows| (rows, *size)) });
    }
    let results: Vec<(u64, u64)> = pipeline.try_collect().await.map_err(fast_error)?;
    if let Some((rows, size)) = results.iter().find(|(rows, size)| exact && rows != size) {
        return Err(ApplyError::mispredicted(format!("a set-based statement for {size} events changed {rows} rows")));
    }
    Ok(())
}
