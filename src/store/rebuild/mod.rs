//! The SQL of rebuilds: resetting a projection in place, preparing shadow tables, the atomic swap,
//! and the bookkeeping in `projector.rebuilds`.
//!
//! Lock order, everywhere: a projection's checkpoint rows first (`FOR UPDATE`), then its tables.
//! A batch of a running engine takes them in the same order (its checkpoint compare-and-set comes
//! first), so a rebuild and a live engine can wait for each other but never deadlock; and a batch
//! that started before a reset or a swap finds its checkpoint moved and rolls back.
//!
//! # Layout
//! - this file: `projector.rebuilds` rows, the checkpoint locks, a reset in place, shadow copies
//!   prepared and finished.
//! - [`swap`]: the atomic swap of a caught-up shadow.
//! - [`retired`]: the schemas a swap retires, named, found and dropped.

mod retired;
mod swap;

pub use self::retired::{drop_schema, is_retired_schema_of, retired_schema, retired_schemas};
pub use self::swap::{swap, Swap, SwapError};

use std::collections::HashMap;

use chrono::Utc;
use serde_json::{json, Value};
use tokio_postgres::{Client, GenericClient, Transaction};

use crate::checkpoint::TopicPartition;
use crate::store::{describe, StoreError};

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

/// The connection's `search_path`, as Postgres shows it.
pub async fn search_path(client: &impl GenericClient) -> Result<String, StoreError> {
    Ok(client.query_one("SHOW search_path", &[]).await.map_err(postgres)?.get(0))
}

/// Creates `schema` (a checked identifier) unless it exists.
pub async fn create_schema(client: &impl GenericClient, schema: &str) -> Result<(), StoreError> {
    client.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")).await.map_err(postgres)
}

/// Drops `schema` (a checked identifier) if it is empty; one that still holds anything is kept.
pub async fn drop_schema_if_empty(client: &impl GenericClient, schema: &str) -> Result<(), StoreError> {
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema}")).await.map_err(postgres)
}
