//! The SQL of rebuilds: resetting a projection in place, preparing shadow tables, the atomic swap,
//! and the bookkeeping in `projector.rebuilds`.
//!
//! Lock order, everywhere: a projection's checkpoint rows first (`FOR UPDATE`), then its tables.
//! A batch of a running engine takes them in the same order (its checkpoint compare-and-set comes
//! first), so a rebuild and a live engine can wait for each other but never deadlock; and a batch
//! that started before a reset or a swap finds its checkpoint moved and rolls back.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio_postgres::{Client, GenericClient, Transaction};

use super::checkpoint::TopicPartition;
use super::{describe, StoreError};

fn postgres(error: tokio_postgres::Error) -> StoreError {
    StoreError::Postgres(describe(&error))
}

/// Offsets per partition as stored in `projector.rebuilds` (`{"topic/partition": offset}`).
pub fn offsets_to_json(offsets: &HashMap<TopicPartition, i64>) -> Value {
    let map: serde_json::Map<String, Value> =
        offsets.iter().map(|((topic, partition), offset)| (format!("{topic}/{partition}"), json!(offset))).collect();
    Value::Object(map)
}

pub fn offsets_from_json(value: &Value) -> HashMap<TopicPartition, i64> {
    let Some(map) = value.as_object() else {
        return HashMap::new();
    };
    map.iter()
        .filter_map(|(key, offset)| {
            let (topic, partition) = key.rsplit_once('/')?;
            Some(((topic.to_string(), partition.parse().ok()?), offset.as_i64()?))
        })
        .collect()
}

/// A row of `projector.rebuilds`.
#[derive(Debug, Clone)]
pub struct RebuildRow {
    pub projection: String,
    pub target: String,
    pub mode: String,
    pub state: String,
    pub definition_hash: String,
    pub start_offsets: HashMap<TopicPartition, i64>,
    pub target_offsets: HashMap<TopicPartition, i64>,
    pub detail: Option<String>,
}

const REBUILD_COLUMNS: &str = "projection, target, mode, state, definition_hash, start_offsets, target_offsets, detail";

fn rebuild_row(row: &tokio_postgres::Row) -> RebuildRow {
    RebuildRow {
        projection: row.get(0),
        target: row.get(1),
        mode: row.get(2),
        state: row.get(3),
        definition_hash: row.get(4),
        start_offsets: offsets_from_json(&row.get::<_, Value>(5)),
        target_offsets: offsets_from_json(&row.get::<_, Value>(6)),
        detail: row.get(7),
    }
}

pub async fn find(
    client: &impl GenericClient,
    projection: &str,
    target: &str,
) -> Result<Option<RebuildRow>, StoreError> {
    let sql = format!("SELECT {REBUILD_COLUMNS} FROM projector.rebuilds WHERE projection = $1 AND target = $2");
    let row = client.query_opt(&sql, &[&projection, &target]).await.map_err(postgres)?;
    Ok(row.as_ref().map(rebuild_row))
}

/// Every rebuild row (for `status`).
pub async fn all(client: &impl GenericClient) -> Result<Vec<RebuildRow>, StoreError> {
    let sql = format!("SELECT {REBUILD_COLUMNS} FROM projector.rebuilds ORDER BY projection, target");
    let rows = client.query(&sql, &[]).await.map_err(postgres)?;
    Ok(rows.iter().map(rebuild_row).collect())
}

pub async fn finish(
    client: &impl GenericClient,
    projection: &str,
    target: &str,
    state: &str,
    detail: &str,
) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE projector.rebuilds SET state = $3, detail = $4, finished_at = now() WHERE projection = $1 AND target = $2",
            &[&projection, &target, &state, &detail],
        )
        .await
        .map_err(postgres)?;
    Ok(())
}

/// What a fresh build starts from.
pub struct BuildStart<'a> {
    pub projection: &'a str,
    /// Checkpoint identity of the build: the projection itself (in place) or an alias.
    pub target: &'a str,
    pub mode: &'a str,
    pub definition_hash: &'a str,
    pub start_offsets: &'a HashMap<TopicPartition, i64>,
    pub target_offsets: &'a HashMap<TopicPartition, i64>,
}

/// Locks the checkpoint rows of `names` (the first step of the lock order), in the order a
/// batch takes them (topic, partition), and returns them.
async fn lock_checkpoints(
    tx: &Transaction<'_>,
    names: &[&str],
) -> Result<Vec<(String, TopicPartition, i64)>, StoreError> {
    let names: Vec<&str> = names.to_vec();
    let rows = tx
        .query(
            "SELECT projection, topic, partition, next_offset FROM projector.checkpoints
              WHERE projection = ANY($1) ORDER BY topic, partition, projection FOR UPDATE",
            &[&names],
        )
        .await
        .map_err(postgres)?;
    Ok(rows.into_iter().map(|row| (row.get(0), (row.get(1), row.get(2)), row.get(3))).collect())
}

/// Locks the live projection's checkpoints for the rest of `tx` (its engine's next batch waits)
/// and returns them.
pub async fn hold_checkpoints(
    tx: &Transaction<'_>,
    projection: &str,
) -> Result<HashMap<TopicPartition, i64>, StoreError> {
    tx.batch_execute("SET LOCAL lock_timeout = '30s'").await.map_err(postgres)?;
    Ok(lock_checkpoints(tx, &[projection])
        .await?
        .into_iter()
        .map(|(_, partition, offset)| (partition, offset))
        .collect())
}

/// Forgets everything the engine keeps for `target` and starts its checkpoints at `start`.
async fn reset_engine_rows(tx: &Transaction<'_>, start: &BuildStart<'_>) -> Result<(), StoreError> {
    for table in ["checkpoints", "processed_events", "held_events", "dead_letters"] {
        tx.execute(&format!("DELETE FROM projector.{table} WHERE projection = $1"), &[&start.target])
            .await
            .map_err(postgres)?;
    }
    for ((topic, partition), offset) in start.start_offsets {
        tx.execute(
            "INSERT INTO projector.checkpoints (projection, topic, partition, next_offset, definition_hash)
             VALUES ($1, $2, $3, $4, $5)",
            &[&start.target, topic, partition, offset, &start.definition_hash],
        )
        .await
        .map_err(postgres)?;
    }
    tx.execute(
        "INSERT INTO projector.rebuilds (projection, target, mode, state, definition_hash, start_offsets, target_offsets)
         VALUES ($1, $2, $3, 'running', $4, $5, $6)
         ON CONFLICT (projection, target) DO UPDATE
         SET mode = EXCLUDED.mode, state = 'running', definition_hash = EXCLUDED.definition_hash,
             start_offsets = EXCLUDED.start_offsets, target_offsets = EXCLUDED.target_offsets,
             detail = NULL, started_at = now(), finished_at = NULL",
        &[
            &start.projection,
            &start.target,
            &start.mode,
            &start.definition_hash,
            &offsets_to_json(start.start_offsets),
            &offsets_to_json(start.target_offsets),
        ],
    )
    .await
    .map_err(postgres)?;
    Ok(())
}

/// In one transaction: empty the projection's tables and its processed ids, held and parked
/// events, set its checkpoints to the start of each partition, and record the rebuild.
pub async fn start_in_place(client: &mut Client, tables: &[String], start: &BuildStart<'_>) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(postgres)?;
    lock_checkpoints(&tx, &[start.target]).await?;
    if !tables.is_empty() {
        tx.batch_execute(&format!("TRUNCATE {}", tables.join(", "))).await.map_err(postgres)?;
    }
    reset_engine_rows(&tx, start).await?;
    tx.commit().await.map_err(postgres)
}

/// The schema an unqualified table name resolves to on this connection (`None`: no such table).
pub async fn schema_of(client: &impl GenericClient, table: &str) -> Result<Option<String>, StoreError> {
    let row = client
        .query_one(
            "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
            &[&table],
        )
        .await;
    match row {
        Ok(row) => Ok(Some(row.get(0))),
        Err(error) if error.code().is_none() && error.to_string().contains("unexpected number of rows") => Ok(None),
        Err(error) => Err(postgres(error)),
    }
}

/// The table in a build's schema that records the migrations its tables were built by (refinery's
/// layout, as the projection's history table `projector.migrations_<name>`).
pub const BUILD_HISTORY: &str = "projector_migrations";

/// Creates `schema` afresh with an empty table for each of `tables`, with the live tables' grants,
/// and starts the build. A projection with migrations (`declared`) gets its tables from them, all
/// applied in `schema` (first in `search_path`), and their history in [`BUILD_HISTORY`]: the
/// declared schema, which may differ from the live one (columns added, dropped or changed;
/// indexes). One without gets copies of the live tables (`LIKE … INCLUDING ALL`: columns,
/// defaults, constraints, indexes, identity, comments).
pub async fn start_copy(
    client: &mut Client,
    tables: &[(String, String)],
    schema: &str,
    start: &BuildStart<'_>,
    declared: &[refinery::Migration],
) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(postgres)?;
    lock_checkpoints(&tx, &[start.target]).await?;
    tx.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"))
        .await
        .map_err(postgres)?;
    if !declared.is_empty() {
        build_declared(&tx, schema, start.projection, declared).await?;
    }
    for (live_schema, table) in tables {
        if declared.is_empty() {
            tx.batch_execute(&format!("CREATE TABLE {schema}.{table} (LIKE {live_schema}.{table} INCLUDING ALL)"))
                .await
                .map_err(postgres)?;
        } else if tx
            .query_one("SELECT to_regclass($1) IS NULL", &[&format!("{schema}.{table}")])
            .await
            .map_err(postgres)?
            .get(0)
        {
            return Err(StoreError::Migrate(format!(
                "the migrations of `{}` do not create `{table}`, a table its statements write",
                start.projection
            )));
        }
        let grants = tx
            .query(
                "SELECT format('GRANT %s ON TABLE %I.%I TO %s', a.privilege_type, $2::text, $3::text,
                               CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END)
                   FROM pg_class c, aclexplode(c.relacl) a
                  WHERE c.oid = to_regclass($1) AND a.grantee <> c.relowner",
                &[&format!("{live_schema}.{table}"), &schema, table],
            )
            .await
            .map_err(postgres)?;
        for grant in grants {
            tx.batch_execute(grant.get::<_, &str>(0)).await.map_err(postgres)?;
        }
    }
    reset_engine_rows(&tx, start).await?;
    tx.commit().await.map_err(postgres)
}

/// Applies every one of `declared` in `schema`, in order, and records them in its
/// [`BUILD_HISTORY`].
async fn build_declared(
    tx: &Transaction<'_>,
    schema: &str,
    projection: &str,
    declared: &[refinery::Migration],
) -> Result<(), StoreError> {
    let current: String = tx.query_one("SELECT current_setting('search_path')", &[]).await.map_err(postgres)?.get(0);
    tx.batch_execute(&format!("SET LOCAL search_path = {schema}, {current}")).await.map_err(postgres)?;
    for migration in declared {
        tx.batch_execute(migration.sql().unwrap_or_default()).await.map_err(|error| {
            StoreError::Migrate(format!(
                "migration {migration} of `{projection}`, applied in the build's schema `{schema}`: {}",
                describe(&error)
            ))
        })?;
    }
    tx.batch_execute(&format!("SET LOCAL search_path = {current}")).await.map_err(postgres)?;
    tx.batch_execute(&format!(
        "CREATE TABLE {schema}.{BUILD_HISTORY} (version INT4 PRIMARY KEY, name VARCHAR(255), applied_on VARCHAR(255), checksum VARCHAR(255))"
    ))
    .await
    .map_err(postgres)?;
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    for migration in declared {
        tx.execute(
            &format!(
                "INSERT INTO {schema}.{BUILD_HISTORY} (version, name, applied_on, checksum) VALUES ($1, $2, $3, $4)"
            ),
            &[&migration.version(), &migration.name(), &now, &migration.checksum().to_string()],
        )
        .await
        .map_err(postgres)?;
    }
    Ok(())
}

/// Why a swap did not happen; the live tables are untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("pre-swap check failed: {0}")]
    CheckFailed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a swap needs.
pub struct Swap<'a> {
    pub projection: &'a str,
    pub alias: &'a str,
    /// (live schema, table) of each table.
    pub tables: &'a [(String, String)],
    pub shadow_schema: &'a str,
    pub retired_schema: &'a str,
    pub checks: &'a [String],
    pub min_row_ratio: Option<f64>,
    /// The projection's migration history table (`projector.migrations_<name>`): a shadow built
    /// by the projection's migrations hands its [`BUILD_HISTORY`] over to it.
    pub history: &'a str,
}

/// In ONE transaction: lock, check, move the live tables to `retired_schema` and the shadow tables
/// into their place, and hand the shadow's checkpoints, processed ids and held events to the
/// projection. Readers see the old tables or the new ones, never an empty or partial one.
///
/// `tx` already holds the live checkpoints ([`hold_checkpoints`]).
pub async fn swap(tx: Transaction<'_>, swap: &Swap<'_>) -> Result<Vec<String>, SwapError> {
    lock_checkpoints(&tx, &[swap.projection, swap.alias]).await?;
    let live: Vec<String> = swap.tables.iter().map(|(schema, table)| format!("{schema}.{table}")).collect();
    tx.batch_execute(&format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", live.join(", "))).await.map_err(postgres)?;

    let mut report = Vec::new();
    for (schema, table) in swap.tables {
        let live_rows = count_rows(&tx, &format!("{schema}.{table}")).await?;
        let shadow_rows = count_rows(&tx, &format!("{}.{table}", swap.shadow_schema)).await?;
        report.push(format!("{table}: {shadow_rows} rows (live had {live_rows})"));
        if let Some(ratio) = swap.min_row_ratio {
            if (shadow_rows as f64) < ratio * live_rows as f64 {
                return Err(SwapError::CheckFailed(format!(
                    "`{table}` has {shadow_rows} rows in the shadow copy, fewer than {ratio} × {live_rows} live rows"
                )));
            }
        }
    }
    if !swap.checks.is_empty() {
        let search_path: String = tx.query_one("SHOW search_path", &[]).await.map_err(postgres)?.get(0);
        tx.batch_execute(&format!("SET LOCAL search_path = {}, {search_path}", swap.shadow_schema))
            .await
            .map_err(postgres)?;
        for check in swap.checks {
            let passed = tx
                .query_one(check.as_str(), &[])
                .await
                .map_err(|error| SwapError::CheckFailed(format!("`{check}`: {}", describe(&error))))?;
            if !passed.try_get::<_, bool>(0).unwrap_or(false) {
                return Err(SwapError::CheckFailed(format!("`{check}` is not true on the shadow copy")));
            }
            report.push(format!("check passed: {check}"));
        }
        tx.batch_execute(&format!("SET LOCAL search_path = {search_path}")).await.map_err(postgres)?;
    }

    tx.batch_execute(&format!("CREATE SCHEMA {}", swap.retired_schema)).await.map_err(postgres)?;
    for (schema, table) in swap.tables {
        tx.batch_execute(&format!(
            "ALTER TABLE {schema}.{table} SET SCHEMA {retired}; ALTER TABLE {shadow}.{table} SET SCHEMA {schema}",
            retired = swap.retired_schema,
            shadow = swap.shadow_schema
        ))
        .await
        .map_err(postgres)?;
    }
    let built_by_migrations: bool = tx
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&format!("{}.{BUILD_HISTORY}", swap.shadow_schema)])
        .await
        .map_err(postgres)?
        .get(0);
    if built_by_migrations {
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {history} (version INT4 PRIMARY KEY, name VARCHAR(255), applied_on VARCHAR(255), checksum VARCHAR(255));
             DELETE FROM {history};
             INSERT INTO {history} (version, name, applied_on, checksum)
                  SELECT version, name, applied_on, checksum FROM {shadow}.{BUILD_HISTORY};
             DROP TABLE {shadow}.{BUILD_HISTORY}",
            history = swap.history,
            shadow = swap.shadow_schema
        ))
        .await
        .map_err(postgres)?;
        report.push(format!(
            "the tables were built by the projection's migrations; their history is in {}",
            swap.history
        ));
    }
    let retired_label = format!("{}~{}", swap.projection, swap.retired_schema);
    tx.execute(
        "UPDATE projector.dead_letters SET projection = $2 WHERE projection = $1",
        &[&swap.projection, &retired_label],
    )
    .await
    .map_err(postgres)?;
    for table in ["checkpoints", "processed_events", "held_events"] {
        tx.execute(&format!("DELETE FROM projector.{table} WHERE projection = $1"), &[&swap.projection])
            .await
            .map_err(postgres)?;
    }
    for table in ["checkpoints", "processed_events", "held_events", "dead_letters"] {
        tx.execute(
            &format!("UPDATE projector.{table} SET projection = $2 WHERE projection = $1"),
            &[&swap.alias, &swap.projection],
        )
        .await
        .map_err(postgres)?;
    }
    tx.execute(
        "UPDATE projector.rebuilds SET state = 'done', finished_at = now(), detail = $3 WHERE projection = $1 AND target = $2",
        &[&swap.projection, &swap.alias, &format!("swapped in; the old tables are kept in schema {}", swap.retired_schema)],
    )
    .await
    .map_err(postgres)?;
    tx.commit().await.map_err(postgres)?;
    Ok(report)
}

async fn count_rows(client: &impl GenericClient, table: &str) -> Result<i64, StoreError> {
    let row = client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.map_err(postgres)?;
    Ok(row.get(0))
}

/// What the name of every schema a shadow swap retires tables into starts with.
const RETIRED: &str = "projector_retired_";

/// How the time of a swap ends the name of the schema it retires tables into.
const RETIRED_AT: &str = "%Y%m%d%H%M%S";

/// The digits [`RETIRED_AT`] writes.
const RETIRED_AT_DIGITS: usize = 14;

/// The longest identifier Postgres keeps: it cuts longer ones silently (NAMEDATALEN - 1).
const MAX_IDENTIFIER: usize = 63;

/// Room for the projection's part of a retired schema's name, between [`RETIRED`] and `_<time>`.
const RETIRED_STEM: usize = MAX_IDENTIFIER - RETIRED.len() - 1 - RETIRED_AT_DIGITS;

/// Hex digits of the projection name's SHA-256 in a shortened projection part.
const RETIRED_HASH: usize = 10;

/// The projection's part of its retired schemas' names: the name itself when it is shorter than
/// [`RETIRED_STEM`] bytes; else its start and a hash of the whole name, `RETIRED_STEM` bytes in
/// all. Parts of the two kinds differ in length, so no two projections share one (but for a hash
/// collision between two long names with the same start).
fn retired_stem(projection: &str) -> String {
    if projection.len() < RETIRED_STEM {
        return projection.to_string();
    }
    let mut start = RETIRED_STEM - 1 - RETIRED_HASH;
    while !projection.is_char_boundary(start) {
        start -= 1;
    }
    let hash = crate::projection::compile::hex_sha256(projection);
    format!("{}_{}", &projection[..start], &hash[..RETIRED_HASH])
}

/// The schema a shadow swap of `projection` at `at` moves the live tables into:
/// `projector_retired_<projection>_<yyyymmddhhmmss>`, a long projection name shortened to its
/// start and a hash ([`retired_stem`]) so that the whole stays within Postgres' 63 bytes. (Cut by
/// Postgres instead, two swaps of one projection in the same year got the same name.)
pub fn retired_schema(projection: &str, at: DateTime<Utc>) -> String {
    format!("{RETIRED}{}_{}", retired_stem(projection), at.format(RETIRED_AT))
}

/// Whether `schema` is one that [`retired_schema`] names for `projection`: its prefix, then the
/// time's digits and nothing else. A prefix alone would also match the schemas of projections
/// whose names extend this one's (`a` and `a_b`). Schemas retired before names were shortened
/// carry the whole projection name, and the time as far as it fit in 63 bytes: they match too.
pub fn is_retired_schema_of(schema: &str, projection: &str) -> bool {
    let time_after = |prefix: &str, digits: usize| {
        schema
            .strip_prefix(prefix)
            .is_some_and(|time| time.len() == digits && time.bytes().all(|byte| byte.is_ascii_digit()))
    };
    let unshortened = format!("{RETIRED}{projection}_");
    time_after(&format!("{RETIRED}{}_", retired_stem(projection)), RETIRED_AT_DIGITS)
        || time_after(&unshortened, RETIRED_AT_DIGITS.min(MAX_IDENTIFIER.saturating_sub(unshortened.len())))
}

/// Schemas holding tables a shadow swap retired for `projection` (and for no other projection).
pub async fn retired_schemas(client: &impl GenericClient, projection: &str) -> Result<Vec<String>, StoreError> {
    let rows = client
        .query("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1) ORDER BY nspname", &[&RETIRED])
        .await
        .map_err(postgres)?;
    Ok(rows
        .into_iter()
        .map(|row| row.get::<_, String>(0))
        .filter(|schema| is_retired_schema_of(schema, projection))
        .collect())
}

/// Drops a schema and everything in it.
pub async fn drop_schema(client: &impl GenericClient, schema: &str) -> Result<(), StoreError> {
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await.map_err(postgres)
}

/// Moves a finished point-in-time copy to its final name(s) and forgets the build's engine rows.
pub async fn finish_copy(
    client: &mut Client,
    alias: &str,
    schema: &str,
    moves: &[(String, String, String)],
) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(postgres)?;
    for (table, to_schema, to_table) in moves {
        // Indexes (and the constraints behind them) and identity sequences are named after the
        // table; renamed with it, so that they do not collide with the live table's in `to_schema`.
        let owned = tx
            .query(
                "SELECT c.relname, CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'INDEX' END
                   FROM pg_class c
                  WHERE c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = to_regclass($1))
                     OR c.oid IN (SELECT objid FROM pg_depend
                                   WHERE refobjid = to_regclass($1) AND classid = 'pg_class'::regclass
                                     AND deptype IN ('a', 'i'))
                        AND c.relkind = 'S'",
                &[&format!("{schema}.{table}")],
            )
            .await
            .map_err(postgres)?;
        for row in owned {
            let name: String = row.get(0);
            let kind: String = row.get(1);
            let renamed = match name.strip_prefix(table.as_str()) {
                Some(rest) => format!("{to_table}{rest}"),
                None => format!("{to_table}_{name}"),
            };
            tx.batch_execute(&format!("ALTER {kind} {schema}.{name} RENAME TO {renamed}")).await.map_err(postgres)?;
        }
        tx.batch_execute(&format!(
            "ALTER TABLE {schema}.{table} RENAME TO {to_table}; ALTER TABLE {schema}.{to_table} SET SCHEMA {to_schema}"
        ))
        .await
        .map_err(postgres)?;
    }
    for table in ["checkpoints", "processed_events", "held_events"] {
        tx.execute(&format!("DELETE FROM projector.{table} WHERE projection = $1"), &[&alias])
            .await
            .map_err(postgres)?;
    }
    tx.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.map_err(postgres)?;
    tx.commit().await.map_err(postgres)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_schema_belongs_to_exactly_one_projection() {
        let at = DateTime::parse_from_rfc3339("2026-11-27T12:34:56Z").unwrap().with_timezone(&Utc);
        let a = retired_schema("a", at);
        let a_b = retired_schema("a_b", at);
        assert_eq!(a, "projector_retired_a_20261127123456");
        assert!(is_retired_schema_of(&a, "a"));
        assert!(is_retired_schema_of(&a_b, "a_b"));
        assert!(!is_retired_schema_of(&a_b, "a"), "`a_b`'s schema is not `a`'s");
        assert!(!is_retired_schema_of(&a, "a_b"));
        let dated = retired_schema("a_20250101000000", at);
        assert!(!is_retired_schema_of(&dated, "a"), "a projection name that ends in digits");
        for other in
            ["projector_retired_a_2026112712345", "projector_retired_a_", "projector_shadow_a", "a_20261127123456"]
        {
            assert!(!is_retired_schema_of(other, "a"), "{other}");
        }
    }

    #[test]
    fn retired_schema_names_fit_postgres_and_stay_apart() {
        let at = DateTime::parse_from_rfc3339("2026-11-27T12:34:56Z").unwrap().with_timezone(&Utc);
        let short = "n".repeat(RETIRED_STEM - 1);
        assert_eq!(retired_schema(&short, at), format!("projector_retired_{short}_20261127123456"));
        let long = "long_name_".repeat(4);
        let also_long = format!("{}x", &long[..39]);
        let (named, also_named) = (retired_schema(&long, at), retired_schema(&also_long, at));
        assert_eq!(named.len(), MAX_IDENTIFIER, "{named}");
        assert!(named.starts_with("projector_retired_long_name_long_na"), "{named}");
        assert_ne!(named, also_named, "names with the same start get different hashes");
        assert_eq!(named, retired_schema(&long, at), "the same name every time");
        let exactly_the_room = "n".repeat(RETIRED_STEM);
        assert_ne!(retired_stem(&exactly_the_room), exactly_the_room, "shortened: hashed parts have this length");
        for name in [short.as_str(), &long, &also_long, &exactly_the_room, "a"] {
            let schema = retired_schema(name, at);
            assert!(schema.len() <= MAX_IDENTIFIER, "{schema}");
            assert!(is_retired_schema_of(&schema, name), "{schema}");
        }
        assert!(!is_retired_schema_of(&named, &also_long));
        assert!(!is_retired_schema_of(&also_named, &long));
        // Retired before names were shortened: the whole name, the time cut at 63 bytes by Postgres.
        let cut = format!("projector_retired_{long}_2026");
        assert_eq!(cut.len(), MAX_IDENTIFIER);
        assert!(is_retired_schema_of(&cut, &long));
        assert!(!is_retired_schema_of(&cut, &also_long));
    }
}
