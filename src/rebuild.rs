//! `projector rebuild`: rebuilding a read model from the start of its topics.
//!
//! - In place: one transaction empties the projection's tables and engine rows and resets its
//!   checkpoints to the start of each partition; then the projection is replayed. The rebuild
//!   consumes in the projection's own consumer group, so alongside a running engine each
//!   partition is replayed by exactly one of them (the reset also fences the engine's batch in
//!   flight: its checkpoint compare-and-set fails and it re-reads from the reset checkpoints).
//! - Shadow: the projection runs under the alias `<name>~shadow`, with its own checkpoints and
//!   consumer group, into copies of its tables in schema `projector_shadow_<name>` (reached
//!   through `search_path`, so the same statements write them). Once it has caught up, one
//!   transaction checks it and swaps it in, checkpoints included; the old tables are kept in
//!   `projector_retired_<name>_<time>` until `projector drop-retired`.
//! - As of a point in time: like a shadow build, but reading each partition only up to the first
//!   offset at or after the given time, and the result is moved to the table named by `--into`.
//!
//! Every build records itself in `projector.rebuilds`; an interrupted one resumes from its
//! checkpoints when started again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::checkpoint::{self as offsets, Offsets, TopicPartition};
use crate::metrics::Metrics;
use crate::projection::Projection;
use crate::settings::Settings;
use crate::store::checkpoint;
use crate::store::rebuild::{self as sql, BuildStart, Swap, SwapError};
use crate::store::{self, StoreError};
use crate::worker::{self, WorkerOptions};

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("no projection named `{0}` (see `projector validate`)")]
    UnknownProjection(String),
    #[error(
        "history is missing, a rebuild would lose events: {}; rebuild anyway with --accept-data-loss",
        .0.join(", ")
    )]
    HistoryMissing(Vec<String>),
    #[error("topic `{0}` has no partitions (does it exist?)")]
    NoPartitions(String),
    #[error("table `{table}` is also written by projection `{other}`: rebuilding `{projection}` in place would empty it for both")]
    SharedTable { projection: String, table: String, other: String },
    #[error("a shadow or point-in-time rebuild needs unqualified table names (found `{0}`): the copy is reached through search_path")]
    QualifiedTable(String),
    #[error("table `{0}` does not exist: run `projector migrate` first")]
    MissingTable(String),
    #[error("`--into` must name a table for a projection with one table, or a schema for several: `{0}` is not a plain identifier")]
    BadInto(String),
    #[error("projection name `{0}` is too long for the rebuild's schema names (at most 40 characters)")]
    NameTooLong(String),
    #[error(transparent)]
    Swap(#[from] SwapError),
    /// The shadow did not overtake the locked live checkpoints within `rebuild.swap_timeout_secs`.
    #[error(
        "swap of `{projection}` given up: the shadow did not overtake the live checkpoints within \
         `rebuild.swap_timeout_secs` = {seconds} s while they were locked ({behind} event(s) behind them); \
         the locks are released and nothing was swapped (the live projection goes on, the shadow is kept). \
         Find out why the shadow lags (see the log above), then run the same command again: it resumes \
         the shadow and tries the swap again; or raise `rebuild.swap_timeout_secs`"
    )]
    SwapTimeout { projection: String, seconds: u64, behind: u64 },
    #[error("rebuild interrupted at {done} of {total} events: run the same command again to resume")]
    Interrupted { done: u64, total: u64 },
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("projection stopped: {0}")]
    Worker(#[from] worker::WorkerError),
    #[error("the build's worker ended early (see the log above)")]
    WorkerEnded,
    /// The build's worker was still busy (its batch waiting for a lock) when it was to stop.
    #[error("the build's worker did not stop within {seconds} s: aborted, its batch in flight rolled back")]
    WorkerStuck { seconds: u64 },
    /// A task of the build panicked or was cancelled.
    #[error("a task of the build failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What to rebuild, and how.
#[derive(Debug, Clone, Default)]
pub struct RebuildArgs {
    pub name: String,
    pub shadow: bool,
    /// Start over even if a rebuild of the same kind is under way.
    pub restart: bool,
    pub accept_data_loss: bool,
    pub until: Option<DateTime<Utc>>,
    pub until_offsets: Option<Offsets>,
    pub into: Option<String>,
    /// Swap once the shadow is at most this many events behind the live end offsets.
    pub max_lag: i64,
    /// Overrides the definition's `[rebuild] min_row_ratio`.
    pub min_row_ratio: Option<f64>,
}

/// What a finished rebuild did.
#[derive(Debug, Clone, Default)]
pub struct RebuildReport {
    pub events: u64,
    pub seconds: f64,
    pub resumed: bool,
    /// Lines for the operator (row counts, checks, where the old tables are).
    pub notes: Vec<String>,
}

impl RebuildReport {
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.events as f64 / self.seconds
        } else {
            0.0
        }
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_')) && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

/// Runs a rebuild until it is done, or `interrupt` completes (it can then be resumed).
pub async fn run(
    settings: &Settings,
    projections: &[Projection],
    args: &RebuildArgs,
    metrics: Metrics,
    interrupt: impl Future<Output = ()>,
) -> Result<RebuildReport, RebuildError> {
    let projection = projections
        .iter()
        .find(|projection| projection.name == args.name)
        .ok_or_else(|| RebuildError::UnknownProjection(args.name.clone()))?;
    if projection.name.len() > 40 {
        return Err(RebuildError::NameTooLong(projection.name.clone()));
    }
    // The other projections' migrations apply in place. This one's too for a rebuild in place
    // (it empties the tables anyway); a shadow or point-in-time build applies them all to its
    // copies instead, and the live tables change only at the swap.
    let rebuilt_in_place = !args.shadow && args.until.is_none() && args.until_offsets.is_none();
    let migrated: Vec<Projection> =
        projections.iter().filter(|other| rebuilt_in_place || other.name != projection.name).cloned().collect();
    store::migrate_with(&settings.database.url, &migrated).await?;
    let client = store::connect_client(&settings.database.url).await?;

    let watermarks = watermarks(settings, &projection.topics).await?;
    for topic in &projection.topics {
        if !watermarks.keys().any(|(t, _)| t == topic) {
            return Err(RebuildError::NoPartitions(topic.clone()));
        }
    }
    let starts: Offsets = watermarks.iter().map(|(p, (low, _))| (p.clone(), *low)).collect();
    let ends: Offsets = watermarks.iter().map(|(p, (_, high))| (p.clone(), *high)).collect();
    let missing: Vec<String> = {
        let mut missing: Vec<String> = starts
            .iter()
            .filter(|(_, low)| **low > 0)
            .map(|((topic, partition), low)| format!("`{topic}` partition {partition} starts at offset {low}"))
            .collect();
        missing.sort();
        missing
    };
    if !missing.is_empty() && !args.accept_data_loss {
        return Err(RebuildError::HistoryMissing(missing));
    }

    if args.until.is_some() || args.until_offsets.is_some() {
        as_of(settings, projection, args, &client, starts, ends, metrics, interrupt).await
    } else if args.shadow {
        shadow(settings, projection, args, &client, starts, ends, metrics, interrupt).await
    } else {
        in_place(settings, projection, projections, args, client, starts, ends, metrics, interrupt).await
    }
}

#[allow(clippy::too_many_arguments)]
async fn in_place(
    settings: &Settings,
    projection: &Projection,
    projections: &[Projection],
    args: &RebuildArgs,
    mut client: tokio_postgres::Client,
    starts: Offsets,
    ends: Offsets,
    metrics: Metrics,
    interrupt: impl Future<Output = ()>,
) -> Result<RebuildReport, RebuildError> {
    let tables = projection.tables();
    for other in projections.iter().filter(|other| other.name != projection.name) {
        if let Some(table) = other.tables().into_iter().find(|table| tables.contains(table)) {
            return Err(RebuildError::SharedTable {
                projection: projection.name.clone(),
                table,
                other: other.name.clone(),
            });
        }
    }
    for table in &tables {
        if sql::schema_of(&client, table).await?.is_none() {
            return Err(RebuildError::MissingTable(table.clone()));
        }
    }
    let existing = sql::find(&client, &projection.name, &projection.name).await?;
    let resumed = matches!(&existing, Some(row) if row.state == "running" && row.mode == "in_place") && !args.restart;
    let (starts, targets) = match existing {
        Some(row) if resumed => (row.start_offsets, row.target_offsets),
        _ => {
            let start = BuildStart {
                projection: &projection.name,
                target: &projection.name,
                mode: "in_place",
                definition_hash: &projection.hash,
                start_offsets: &starts,
                target_offsets: &ends,
            };
            sql::start_in_place(&mut client, &tables, &start).await?;
            (starts, ends)
        }
    };
    tracing::info!(projection = %projection.name, resumed, tables = ?tables, "in-place rebuild");
    let pool = store::connect(&settings.database.url, settings.database.pool_size).await?;
    let mut report =
        build(settings, projection.clone(), pool, &starts, &targets, WorkerOptions::default(), metrics, interrupt)
            .await?;
    sql::finish(&client, &projection.name, &projection.name, "done", "rebuilt in place").await?;
    report.resumed = resumed;
    Ok(report)
}

/// The live schema of each table, for builds into copies (tables must be unqualified).
async fn live_tables(
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
async fn copy_search_path(client: &tokio_postgres::Client, schema: &str) -> Result<String, RebuildError> {
    let current: String =
        client.query_one("SHOW search_path", &[]).await.map_err(|error| StoreError::postgres(&error))?.get(0);
    Ok(format!("{schema},{}", current.replace(' ', "")))
}

/// Starts (or resumes) a build of `alias` into copies of the live tables in `schema`.
async fn start_or_resume_copy(
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

#[allow(clippy::too_many_arguments)]
async fn shadow(
    settings: &Settings,
    projection: &Projection,
    args: &RebuildArgs,
    client: &tokio_postgres::Client,
    starts: Offsets,
    ends: Offsets,
    metrics: Metrics,
    interrupt: impl Future<Output = ()>,
) -> Result<RebuildReport, RebuildError> {
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
        let behind: u64 = live
            .iter()
            .map(|(partition, offset)| (offset - shadow.get(partition).copied().unwrap_or(0)).max(0) as u64)
            .sum();
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
    let _ = own.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema}")).await;
    report.notes = notes;
    report.notes.push(format!(
        "the old tables are kept in schema `{retired}` until `projector drop-retired {}`",
        projection.name
    ));
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn as_of(
    settings: &Settings,
    projection: &Projection,
    args: &RebuildArgs,
    client: &tokio_postgres::Client,
    starts: Offsets,
    ends: Offsets,
    metrics: Metrics,
    interrupt: impl Future<Output = ()>,
) -> Result<RebuildReport, RebuildError> {
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
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {into}"))
            .await
            .map_err(|error| StoreError::postgres(&error))?;
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

/// Low and high watermarks of every partition of `topics`.
async fn watermarks(
    settings: &Settings,
    topics: &[String],
) -> Result<HashMap<TopicPartition, (i64, i64)>, RebuildError> {
    let (kafka, topics) = (settings.kafka.clone(), topics.to_vec());
    tokio::task::spawn_blocking(move || crate::kafka::watermarks(&kafka, &topics, Duration::from_secs(10)))
        .await?
        .map_err(RebuildError::Kafka)
}

/// End offsets of the partitions of `topics` now.
async fn current_ends(settings: &Settings, topics: &[String]) -> Result<Offsets, RebuildError> {
    let watermarks = watermarks(settings, topics).await?;
    Ok(watermarks.into_iter().map(|(partition, (_, high))| (partition, high)).collect())
}

/// Runs `projection` until its checkpoints reach `targets`, showing progress, then stops it.
#[allow(clippy::too_many_arguments)]
async fn build(
    settings: &Settings,
    projection: Projection,
    pool: deadpool_postgres::Pool,
    starts: &Offsets,
    targets: &Offsets,
    options: WorkerOptions,
    metrics: Metrics,
    interrupt: impl Future<Output = ()>,
) -> Result<RebuildReport, RebuildError> {
    let mut running = Build::start(settings, projection, pool, starts, targets, options, metrics).await;
    tokio::pin!(interrupt);
    let followed = running.follow(settings, None, &mut interrupt).await;
    let stopped = running.stop().await;
    followed?;
    stopped
}

/// A build's worker, running, with its progress.
struct Build {
    name: String,
    topics: Vec<String>,
    pool: deadpool_postgres::Pool,
    starts: Offsets,
    targets: Offsets,
    total: u64,
    done_at_start: u64,
    started: Instant,
    progress: indicatif::ProgressBar,
    metrics: Metrics,
    stop: watch::Sender<bool>,
    worker: tokio::task::JoinHandle<Result<(), worker::WorkerError>>,
    /// For builds as of a time: where each partition's first record at or after it was found.
    reached: Option<Arc<std::sync::Mutex<Offsets>>>,
    _observability: crate::http::Observability,
}

impl Build {
    async fn start(
        settings: &Settings,
        projection: Projection,
        pool: deadpool_postgres::Pool,
        starts: &Offsets,
        targets: &Offsets,
        mut options: WorkerOptions,
        metrics: Metrics,
    ) -> Build {
        options.rebuilding = true;
        // Metrics and lag of the build, with `mode="rebuild"` so that its lag pages no one.
        let observability = crate::http::Observability::start(
            settings,
            std::slice::from_ref(&projection),
            pool.clone(),
            metrics.clone(),
            crate::lag::Mode::Rebuild,
        )
        .await;
        let total: u64 = targets
            .iter()
            .map(|(partition, target)| (target - starts.get(partition).copied().unwrap_or(0)).max(0) as u64)
            .sum();
        let progress = indicatif::ProgressBar::new(total);
        progress.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {human_pos}/{human_len} events, {per_sec}, {eta} left",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        progress.set_message(format!("rebuilding {}", projection.name));
        let name = projection.name.clone();
        let topics = projection.topics.clone();
        let done_at_start = match load(&pool, &name).await {
            Ok(stored) => offsets::progress(&stored, starts, targets),
            Err(_) => 0,
        };
        progress.set_position(done_at_start);
        let (stop, stopped) = watch::channel(false);
        let worker = {
            let (settings, pool, metrics) = (settings.clone(), pool.clone(), metrics.clone());
            tokio::spawn(async move {
                worker::run_with(Arc::new(projection), pool, &settings, metrics, stopped, options).await
            })
        };
        Build {
            name,
            topics,
            pool,
            starts: starts.clone(),
            targets: targets.clone(),
            total,
            done_at_start,
            started: Instant::now(),
            progress,
            metrics,
            stop,
            worker,
            reached: None,
            _observability: observability,
        }
    }

    /// The offset each partition must reach: its target, or sooner where the end was found.
    fn effective_targets(&self) -> Offsets {
        match &self.reached {
            Some(reached) => offsets::capped(&self.targets, &reached.lock().expect("reached offsets")),
            None => self.targets.clone(),
        }
    }

    /// Waits until the checkpoints reach the targets (with `follow_lag`: then also until they are
    /// within that many events of the partitions' current ends), or `interrupt`.
    async fn follow(
        &mut self,
        settings: &Settings,
        follow_lag: Option<i64>,
        interrupt: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<(), RebuildError> {
        loop {
            let stored = self.wait_tick(interrupt).await?;
            if !offsets::reached(&stored, &self.effective_targets()) {
                continue;
            }
            let Some(max_lag) = follow_lag else { return Ok(()) };
            let ends = current_ends(settings, &self.topics).await?;
            if offsets::lag(&ends, &stored) <= max_lag {
                return Ok(());
            }
        }
    }

    /// Waits until the checkpoints are at or past `targets` on every partition, or `interrupt`.
    async fn reach(
        &mut self,
        targets: &Offsets,
        interrupt: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<(), RebuildError> {
        loop {
            let stored = self.wait_tick(interrupt).await?;
            if offsets::reached(&stored, targets) {
                return Ok(());
            }
        }
    }

    /// One progress tick: sleeps a little, fails if the worker ended, returns the checkpoints.
    async fn wait_tick(&mut self, interrupt: &mut (impl Future<Output = ()> + Unpin)) -> Result<Offsets, RebuildError> {
        loop {
            tokio::select! {
                _ = &mut *interrupt => {
                    let done = self.progress.position();
                    return Err(RebuildError::Interrupted { done, total: self.total });
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            if self.worker.is_finished() {
                return Err(RebuildError::WorkerEnded);
            }
            let Ok(stored) = load(&self.pool, &self.name).await else { continue };
            let done = offsets::progress(&stored, &self.starts, &self.targets);
            self.progress.set_position(done);
            if self.total > 0 {
                let label = self.name.split('~').next().unwrap_or(&self.name);
                self.metrics.set_rebuild_progress(label, done as f64 / self.total as f64);
            }
            return Ok(stored);
        }
    }

    /// [`Build::stop`], waiting at most `bound`: a worker still busy then (its batch waiting for a
    /// lock) is aborted, its batch rolled back; the build resumes from its checkpoints next time.
    async fn stop_within(self, bound: Duration) -> Result<RebuildReport, RebuildError> {
        let worker = self.worker.abort_handle();
        match tokio::time::timeout(bound, self.stop()).await {
            Ok(stopped) => stopped,
            Err(_) => {
                worker.abort();
                Err(RebuildError::WorkerStuck { seconds: bound.as_secs() })
            }
        }
    }

    /// Stops the worker (its batch in flight commits) and reports what the build did.
    async fn stop(self) -> Result<RebuildReport, RebuildError> {
        let _ = self.stop.send(true);
        let worker_result = self.worker.await;
        self.progress.finish_and_clear();
        worker_result??;
        let stored = load(&self.pool, &self.name).await?;
        let events = offsets::progress(&stored, &self.starts, &self.targets).saturating_sub(self.done_at_start);
        Ok(RebuildReport { events, seconds: self.started.elapsed().as_secs_f64(), resumed: false, notes: Vec::new() })
    }
}

async fn load(pool: &deadpool_postgres::Pool, name: &str) -> Result<Offsets, StoreError> {
    let client = pool.get().await.map_err(|error| StoreError::Connect(error.to_string()))?;
    checkpoint::load_all(&**client, name).await
}

/// `projector drop-retired NAME`: drops the tables earlier shadow swaps kept.
pub async fn drop_retired(settings: &Settings, name: &str) -> Result<Vec<String>, RebuildError> {
    let client = store::connect_client(&settings.database.url).await?;
    let schemas = sql::retired_schemas(&client, name).await?;
    for schema in &schemas {
        sql::drop_schema(&client, schema).await?;
    }
    Ok(schemas)
}

/// `projector accept-data-loss NAME`: moves each checkpoint of the projection that is below its
/// partition's log start (the broker deleted records the projection had not read) to the log
/// start, so that the projection reads on from there. Returns what moved: (partition, from, to).
pub async fn accept_data_loss(
    settings: &Settings,
    projection: &Projection,
) -> Result<Vec<(TopicPartition, i64, i64)>, RebuildError> {
    let low: Offsets = watermarks(settings, &projection.topics)
        .await?
        .into_iter()
        .map(|(partition, (low, _))| (partition, low))
        .collect();
    let client = store::connect_client(&settings.database.url).await?;
    Ok(checkpoint::accept_data_loss(&client, &projection.name, &low).await?)
}

/// `projector accept NAME`: keep the rows, apply the current definition from here on.
/// Its migrations not yet applied (held while the definition waited) are applied first, in place.
pub async fn accept(settings: &Settings, projection: &Projection) -> Result<u64, RebuildError> {
    for migration in store::migrate_with(&settings.database.url, std::slice::from_ref(projection)).await? {
        tracing::info!(%migration, "migration applied");
    }
    let client = store::connect_client(&settings.database.url).await?;
    Ok(checkpoint::accept_definition(&client, &projection.name, &projection.hash).await?)
}
