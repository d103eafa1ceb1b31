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
//!
//! # Layout
//! - this file: the errors, the arguments and the report; in place; what the operator commands
//!   (`drop-retired`, `accept-data-loss`, `accept`) ask of the store.
//! - [`shadow`]: a shadow build swapped in, and a build as of a point in time.
//! - [`build`]: a build's worker, run until its checkpoints reach their targets, with progress.

mod build;
mod shadow;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};

use self::build::build;
use self::shadow::{as_of, shadow};
use crate::checkpoint::{Offsets, TopicPartition};
use crate::metrics::Metrics;
use crate::projection::Projection;
use crate::settings::Settings;
use crate::store::checkpoint;
use crate::store::rebuild::{self as sql, BuildStart, SwapError};
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

    let inputs = Inputs { settings, projection, args, starts, ends, metrics };
    if args.until.is_some() || args.until_offsets.is_some() {
        as_of(inputs, &client, interrupt).await
    } else if args.shadow {
        shadow(inputs, &client, interrupt).await
    } else {
        in_place(inputs, projections, client, interrupt).await
    }
}

/// What every kind of build starts from: the projection, how it is asked for, and each
/// partition's offsets now (its log start and end).
pub(super) struct Inputs<'a> {
    pub settings: &'a Settings,
    pub projection: &'a Projection,
    pub args: &'a RebuildArgs,
    pub starts: Offsets,
    pub ends: Offsets,
    pub metrics: Metrics,
}

pub(super) async fn in_place(
    inputs: Inputs<'_>,
    projections: &[Projection],
    mut client: tokio_postgres::Client,
    interrupt: impl Future<Output = ()>,
) -> Result<RebuildReport, RebuildError> {
    let Inputs { settings, projection, args, starts, ends, metrics } = inputs;
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

/// Low and high watermarks of every partition of `topics`.
pub(super) async fn watermarks(
    settings: &Settings,
    topics: &[String],
) -> Result<HashMap<TopicPartition, (i64, i64)>, RebuildError> {
    let (kafka, topics) = (settings.kafka.clone(), topics.to_vec());
    tokio::task::spawn_blocking(move || crate::kafka::watermarks(&kafka, &topics, Duration::from_secs(10)))
        .await?
        .map_err(RebuildError::Kafka)
}

/// End offsets of the partitions of `topics` now.
pub(super) async fn current_ends(settings: &Settings, topics: &[String]) -> Result<Offsets, RebuildError> {
    let watermarks = watermarks(settings, topics).await?;
    Ok(watermarks.into_iter().map(|(partition, (_, high))| (partition, high)).collect())
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
