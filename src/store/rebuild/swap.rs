//! The swap: once a shadow has caught up, one transaction checks it and puts its tables and
//! checkpoints in the live projection's place, keeping the old tables in a retired schema.

use tokio_postgres::{GenericClient, Transaction};

use super::{lock_checkpoints, postgres, BUILD_HISTORY};
use crate::store::{describe, StoreError};

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
