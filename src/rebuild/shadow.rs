//! A shadow build (copies of the tables in a schema of their own, swapped in once caught up) and a
//! build as of a point in time (the result moved to the table `--into` names).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::build::{load, Build};
use super::{Inputs, RebuildArgs, RebuildError, RebuildReport};
use crate::checkpoint::{self as offsets, Offsets};
use crate::projection::{is_identifier, Projection};
use crate::store::rebuild::{self as sql, BuildStart, Swap, SwapError};
use crate::store::{self, StoreError};
use crate::worker::WorkerOptions;

/// The live schema of each table, for builds into copies (tables must be unqualified).
pub(super) async fn live_tables(
    client: &tokio_postgres::Client,
    projection: &Projection,
) -> Result<Vec<(String, String)>, RebuildError> {
    let mut tables = Vec::new();
    for table in projection.tables() {
        if table.contains('.') {
            return Err(RebuildError::QualifiedTable(table));
        }
        let schema = sql::schema_of(client, &table).await?.ok_or_else(|| RebuildError::MissingTable(table.clone()))?;
        tables.push((schema, table));
    }
    Ok(tables)
}

/// `search_path` for a build into `schema`: the copy first, then what the connection had.
pub(super) async fn copy_search_path(client: &tokio_postgres::Client, schema: &str) -> Result<String, RebuildError> {
    let current = sql::search_path(client).await?;
    Ok(format!("{schema},{}", current.replace(' ', "")))
}

/// Starts (or resumes) a build of `alias` into copies of the live tables in `schema`.
pub(super) async fn start_or_resume_copy(
    client: &tokio_postgres::Client,
    projection: &Projection,
    args: &RebuildArgs,
    alias: &str,
    mode: &str,
    schema: &str,
    tables: &[(String, String)],
    starts: Offsets,
    targets: Offsets,
    url: &str,
) -> Result<(bool, Offsets, Offsets), RebuildError> {
    let existing = sql::find(client, &projection.name, alias).await?;
    let resumable = matches!(&existing, Some(row) if row.state == "running" && row.mode == mode && row.definition_hash == projection.hash);
    if resumable && !args.restart {
        let row = existing.expect("checked above");
        return Ok((true, row.start_offsets, row.target_offsets));
    }
    let start = BuildStart {
        projection: &projection.name,
        target: alias,
        mode,
        definition_hash: &projection.hash,
        start_offsets: &starts,
        target_offsets: &targets,
    };
    let mut own = store::connect_client(url).await?;
    sql::start_copy(&mut own, tables, schema, &start, &projection.migrations).await?;
    Ok((false, starts, targets))
}

pub(super) async fn shadow(
    inputs: Inputs<'_>,
    client: &tokio_postgres::Client,
    interrupt: impl Future<Output = ()>,
) -> Result<RebuildReport, RebuildError> {
    let Inputs { settings, projection, args, starts, ends, metrics } = inputs;
    let tables = live_tables(client, projection).await?;
    let alias = format!("{}~shadow", projection.name);
    let schema = format!("projector_shadow_{}", projection.name);
    let targets = ends;
    let (resumed, starts, targets) = start_or_resume_copy(
        client,
        projection,
        args,
        &alias,
        "shadow",
        &schema,
        &tables,
        starts,
        targets,
        &settings.database.url,
    )
    .await?;
    tracing::info!(projection = %projection.name, resumed, %schema, "shadow rebuild");
    let search_path = copy_search_path(client, &schema).await?;
    let pool = store::connect_with_search_path(&settings.database.url, settings.database.pool_size, Some(&search_path))
        .await?;
    let mut running =
        Build::start(settings, projection.renamed(&alias), pool, &starts, &targets, WorkerOptions::default(), metrics)
            .await;
    tokio::pin!(interrupt);
    if let Err(error) = running.follow(settings, Some(args.max_lag), &mut interrupt).await {
        let _ = running.stop().await;
        return Err(error);
    }

    // The swap. Its transaction first locks the live checkpoints, which holds the live engine's
    // next batch; while they are held, the shadow (still running) overtakes them; then it is
    // stopped, and the same transaction checks and swaps. The new tables are therefore never
    // behind the old ones: readers see the read model only move forward.
    let retired = sql::retired_schema(&projection.name, Utc::now());
    let swap = Swap {
        projection: &projection.name,
        alias: &alias,
        tables: &tables,
        shadow_schema: &schema,
        retired_schema: &retired,
        checks: &projection.rebuild.checks,
        min_row_ratio: args.min_row_ratio.or(projection.rebuild.min_row_ratio),
        history: &store::schema::history_table(&projection.name),
    };
    let mut own = store::connect_client(&settings.database.url).await?;
    let tx = own.transaction().await.map_err(|error| StoreError::postgres(&error))?;
    let live = match sql::hold_checkpoints(&tx, &projection.name).await {
        Ok(live) => live,
        Err(error) => {
            let _ = running.stop().await;
            return Err(error.into());
        }
    };
    // Bounded by `rebuild.swap_timeout_secs`: the live engine's batches wait while the locks are
    // held. Past it, the locks go first, then the shadow is stopped, and nothing is swapped.
    let bound = Duration::from_secs(settings.rebuild.swap_timeout_secs);
    let Ok(caught_up) = tokio::time::timeout(bound, running.reach(&live, &mut interrupt)).await else {
        let _ = tx.rollback().await;
        let shadow = load(&running.pool, &alias).await.unwrap_or_default();
        let behind = offsets::lag(&live, &shadow) as u64;
        tracing::error!(projection = %projection.name, seconds = bound.as_secs(), behind,
            "swap given up: the shadow did not overtake the live checkpoints in time; locks released, nothing swapped");
        if let Err(error) = running.stop_within(bound).await {
            tracing::warn!(projection = %projection.name, %error, "the shadow build did not stop cleanly");
        }
        return Err(RebuildError::SwapTimeout {
            projection: projection.name.clone(),
            seconds: bound.as_secs(),
            behind,
        });
    };
    let stopped = running.stop().await;
    caught_up?;
    let mut report = stopped?;
    report.resumed = resumed;
    let notes = match sql::swap(tx, &swap).await {
        Ok(notes) => notes,
        Err(SwapError::CheckFailed(reason)) => {
            let detail = format!("swap aborted: {reason}; the shadow copy is kept in schema {schema}");
            sql::finish(client, &projection.name, &alias, "aborted", &detail).await?;
            return Err(
                SwapError::CheckFailed(format!("{reason} (live tables untouched; shadow kept in `{schema}`)")).into()
            );
        }
        Err(error) => return Err(error.into()),
    };
    // Emptied by the swap; kept if anything else was left in it.
    let _ = sql::drop_schema_if_empty(&own, &schema).await;
    report.notes = notes;
    report.notes.push(format!(
        "the old tables are kept in schema `{retired}` until `projector drop-retired {}`",
        projection.name
    ));
    Ok(report)
}

pub(super) async fn as_of(
    inputs: Inputs<'_>,
    client: &tokio_postgres::Client,
    interrupt: impl Future<Output = ()>,
) -> Result<RebuildReport, RebuildError> {
    let Inputs { settings, projection, args, starts, ends, metrics } = inputs;
    let tables = live_tables(client, projection).await?;
    let into = args.into.clone().ok_or_else(|| RebuildError::BadInto("(missing: pass --into)".into()))?;
    if !is_identifier(&into) {
        return Err(RebuildError::BadInto(into));
    }
    // With --until-offsets the limits are known; with --until each partition ends at its first
    // record stamped at or after the time, found while reading (brokers' offsets-for-times
    // lookups are not available everywhere), or at its current end.
    let mut limits = ends;
    for (partition, offset) in args.until_offsets.iter().flatten() {
        limits.insert(partition.clone(), *offset);
    }
    let limits: Offsets = limits
        .into_iter()
        .map(|(partition, limit)| {
            let start = starts.get(&partition).copied().unwrap_or(0);
            (partition, limit.max(start))
        })
        .collect();
    let alias = format!("{}~asof", projection.name);
    let schema = format!("projector_asof_{}", projection.name);
    // A point-in-time build always starts over: its limits are part of what it means.
    let args = RebuildArgs { restart: true, ..args.clone() };
    let (_, starts, limits) = start_or_resume_copy(
        client,
        projection,
        &args,
        &alias,
        "as_of",
        &schema,
        &tables,
        starts,
        limits,
        &settings.database.url,
    )
    .await?;
    let search_path = copy_search_path(client, &schema).await?;
    let pool = store::connect_with_search_path(&settings.database.url, settings.database.pool_size, Some(&search_path))
        .await?;
    let reached = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let options = WorkerOptions {
        stop_offsets: Some(limits.clone()),
        stop_at_time_ms: args.until.map(|until| until.timestamp_millis()),
        reached: Some(reached.clone()),
        rebuilding: true,
    };
    let mut running =
        Build::start(settings, projection.renamed(&alias), pool, &starts, &limits, options, metrics).await;
    running.reached = Some(reached);
    tokio::pin!(interrupt);
    let followed = running.follow(settings, None, &mut interrupt).await;
    let stopped = running.stop().await;
    followed?;
    let mut report = stopped?;

    let moves: Vec<(String, String, String)> = if tables.len() == 1 {
        let (live_schema, table) = &tables[0];
        vec![(table.clone(), live_schema.clone(), into.clone())]
    } else {
        sql::create_schema(client, &into).await?;
        tables.iter().map(|(_, table)| (table.clone(), into.clone(), table.clone())).collect()
    };
    let mut own = store::connect_client(&settings.database.url).await?;
    sql::finish_copy(&mut own, &alias, &schema, &moves).await?;
    let until = match (args.until, &args.until_offsets) {
        (Some(until), _) => until.to_rfc3339(),
        _ => "the given offsets".to_string(),
    };
    sql::finish(client, &projection.name, &alias, "done", &format!("built as of {until} into {into}")).await?;
    report.notes =
        moves.iter().map(|(table, schema, name)| format!("`{table}` as of {until} is in `{schema}.{name}`")).collect();
    Ok(report)
}
