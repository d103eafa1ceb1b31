//! `projector status`: checkpoints, end offsets and lag per projection and partition, read from
//! Postgres and Kafka directly, so that it works with no engine running. A table, or `--json`.
//!
//! Whether an engine is running cannot be known from the data, so the state column says what
//! the data shows: `caught up` (nothing left to apply), `behind` (records left to apply),
//! `not started` (no checkpoint yet, records waiting) or `records lost` (the checkpoint is below
//! the partition's log start: the broker deleted records the projection had not read). A running
//! engine's own state (running, paused, failed) is in its `projector_projection_state` metric and
//! `/health/ready`.

use std::time::Duration;

use comfy_table::{presets, CellAlignment, Table};
use serde::Serialize;

use crate::lag::{self, KafkaProbe, PartitionLag, ProjectionLag, Target};
use crate::projection::Projection;
use crate::settings::Settings;
use crate::store::{self, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The task reading the broker's offsets panicked or was cancelled.
    #[error("reading the broker's offsets failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Lag(#[from] lag::LagError),
}

/// One partition's line of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    pub checkpoint: Option<i64>,
    pub end_offset: i64,
    pub lag_messages: i64,
    pub lag_seconds: Option<f64>,
    /// `caught up`, `behind`, `not started` or `records lost`.
    pub state: &'static str,
    /// Records the broker deleted before the projection read them: from the checkpoint to the
    /// partition's log start (0 when the checkpoint is at or past it).
    pub records_lost: i64,
    pub last_commit_age_seconds: Option<f64>,
    /// Share of a rebuild under way done on this partition, 0 to 1 (`None`: no rebuild running).
    pub rebuild_progress: Option<f64>,
}

/// A rebuild under way (from `projector.rebuilds`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RebuildStatus {
    /// `in_place`, `shadow` or `as_of`.
    pub mode: String,
    /// The name the build's checkpoints are kept under.
    pub target: String,
    pub events_done: u64,
    pub events_total: u64,
    pub progress: f64,
}

/// One projection's part of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProjectionStatus {
    pub projection: String,
    pub lag_messages: i64,
    pub last_commit_age_seconds: Option<f64>,
    pub partitions: Vec<PartitionStatus>,
    /// A rebuild under way, if any.
    pub rebuild: Option<RebuildStatus>,
}

/// What `projector status` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub projections: Vec<ProjectionStatus>,
}

/// Measures every projection once, from Postgres and Kafka.
pub async fn collect(settings: &Settings, projections: &[Projection]) -> Result<Report, StatusError> {
    let pool = store::connect(&settings.database.url, 1).await?;
    let kafka = settings.kafka.clone();
    let probe = tokio::task::spawn_blocking(move || KafkaProbe::new(&kafka, Duration::from_secs(10))).await??;
    let (_, measured) = lag::measure(probe, &pool, &Target::of(projections)).await;
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    let mut report = report(&measured?, now);
    add_rebuilds(&pool, &mut report).await?;
    Ok(report)
}

/// Fills in the progress of rebuilds under way: their checkpoints against their targets.
async fn add_rebuilds(pool: &deadpool_postgres::Pool, report: &mut Report) -> Result<(), StatusError> {
    let client = crate::store::client(pool).await?;
    for row in store::rebuild::all(&**client).await? {
        if row.state != "running" {
            continue;
        }
        let Some(projection) = report.projections.iter_mut().find(|p| p.projection == row.projection) else {
            continue;
        };
        let stored = store::checkpoint::load_all(&**client, &row.target).await?;
        let total: i64 =
            row.target_offsets.iter().map(|(p, t)| (t - row.start_offsets.get(p).copied().unwrap_or(0)).max(0)).sum();
        let done = crate::checkpoint::progress(&stored, &row.start_offsets, &row.target_offsets);
        for partition in &mut projection.partitions {
            let key = (partition.topic.clone(), partition.partition);
            let (Some(target), start) =
                (row.target_offsets.get(&key), row.start_offsets.get(&key).copied().unwrap_or(0))
            else {
                continue;
            };
            let at = stored.get(&key).copied().unwrap_or(start).clamp(start, (*target).max(start));
            partition.rebuild_progress =
                Some(if *target > start { (at - start) as f64 / (*target - start) as f64 } else { 1.0 });
        }
        projection.rebuild = Some(RebuildStatus {
            mode: row.mode.clone(),
            target: row.target.clone(),
            events_done: done,
            events_total: total as u64,
            progress: if total > 0 { done as f64 / total as f64 } else { 1.0 },
        });
    }
    Ok(())
}

/// The report of one measurement, ages taken at `now_unix`. Pure.
pub fn report(measured: &[ProjectionLag], now_unix: f64) -> Report {
    let age = |at: Option<f64>| at.map(|at| (now_unix - at).max(0.0));
    let projections = measured
        .iter()
        .map(|projection| ProjectionStatus {
            projection: projection.projection.clone(),
            lag_messages: projection.partitions.iter().map(|p| p.lag_messages).sum(),
            last_commit_age_seconds: age(projection.last_commit_unix()),
            rebuild: None,
            partitions: projection
                .partitions
                .iter()
                .map(|p| PartitionStatus {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    checkpoint: p.checkpoint,
                    end_offset: p.end_offset,
                    lag_messages: p.lag_messages,
                    lag_seconds: p.lag_seconds,
                    state: state_of(p),
                    records_lost: p.checkpoint.map_or(0, |checkpoint| (p.start_offset - checkpoint).max(0)),
                    last_commit_age_seconds: age(p.last_commit_unix),
                    rebuild_progress: None,
                })
                .collect(),
        })
        .collect();
    Report { projections }
}

fn state_of(partition: &PartitionLag) -> &'static str {
    if partition.checkpoint.is_some_and(|checkpoint| checkpoint < partition.start_offset) {
        return "records lost";
    }
    match (partition.lag_messages, partition.checkpoint) {
        (0, _) => "caught up",
        (_, None) => "not started",
        _ => "behind",
    }
}

fn or_dash<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map_or_else(|| "-".to_string(), show)
}

/// A duration in seconds as `4s`, `3m12s`, `2h05m`, `3d04h`.
pub fn human_age(seconds: f64) -> String {
    let seconds = seconds.max(0.0).round() as u64;
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// The report as a table, one block per projection.
pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    for projection in &report.projections {
        let mut table = Table::new();
        table.load_preset(presets::ASCII_BORDERS_ONLY_CONDENSED).set_header(vec![
            "topic",
            "partition",
            "checkpoint",
            "end offset",
            "lag (msgs)",
            "lag (s)",
            "state",
            "last commit",
            "rebuild",
        ]);
        for p in &projection.partitions {
            table.add_row(vec![
                p.topic.clone(),
                p.partition.to_string(),
                or_dash(p.checkpoint, |c| c.to_string()),
                p.end_offset.to_string(),
                p.lag_messages.to_string(),
                or_dash(p.lag_seconds, |s| format!("{s:.1}")),
                p.state.to_string(),
                or_dash(p.last_commit_age_seconds, |s| format!("{} ago", human_age(s))),
                or_dash(p.rebuild_progress, |r| format!("{:.0}%", r * 100.0)),
            ]);
        }
        for column in [1, 2, 3, 4, 5] {
            if let Some(column) = table.column_mut(column) {
                column.set_cell_alignment(CellAlignment::Right);
            }
        }
        let rebuild = projection.rebuild.as_ref().map_or(String::new(), |r| {
            format!(
                ", rebuild ({}, as `{}`) {}/{} events ({:.0}%)",
                r.mode,
                r.target,
                r.events_done,
                r.events_total,
                r.progress * 100.0
            )
        });
        out.push_str(&format!(
            "{}: lag {} message(s), last commit {}{rebuild}\n{table}\n\n",
            projection.projection,
            projection.lag_messages,
            or_dash(projection.last_commit_age_seconds, |s| format!("{} ago", human_age(s))),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(checkpoint: Option<i64>, lag: i64, committed: Option<f64>) -> PartitionLag {
        PartitionLag {
            topic: "shop.orders".into(),
            partition: 0,
            start_offset: 0,
            end_offset: 10,
            checkpoint,
            lag_messages: lag,
            lag_seconds: Some(if lag == 0 { 0.0 } else { 12.0 }),
            last_commit_unix: committed,
        }
    }

    #[test]
    fn states_and_ages_come_from_the_data() {
        let measured = vec![ProjectionLag {
            projection: "order_summary".into(),
            partitions: vec![
                partition(Some(10), 0, Some(900.0)),
                partition(Some(7), 3, Some(950.0)),
                partition(None, 10, None),
                PartitionLag { start_offset: 4, ..partition(Some(2), 6, Some(960.0)) },
            ],
        }];
        let report = report(&measured, 1000.0);
        let projection = &report.projections[0];
        assert_eq!(projection.lag_messages, 19);
        assert_eq!(projection.last_commit_age_seconds, Some(40.0));
        let states: Vec<&str> = projection.partitions.iter().map(|p| p.state).collect();
        assert_eq!(states, ["caught up", "behind", "not started", "records lost"]);
        let lost: Vec<i64> = projection.partitions.iter().map(|p| p.records_lost).collect();
        assert_eq!(lost, [0, 0, 0, 2]);
        let table = render_table(&report);
        assert!(table.contains("order_summary: lag 19 message(s), last commit 40s ago"), "{table}");
        assert!(table.contains("1m40s ago"), "{table}");
    }

    #[test]
    fn human_ages() {
        assert_eq!(human_age(4.2), "4s");
        assert_eq!(human_age(192.0), "3m12s");
        assert_eq!(human_age(7500.0), "2h05m");
        assert_eq!(human_age(273_600.0), "3d04h");
    }
}
