//! `projector status`: checkpoints, end offsets and lag per projection and partition, read from
//! Postgres and Kafka directly, so that it works with no engine running. A table, or `--json`.
//!
//! Whether an engine is running cannot be known from the data, so the state column says what
//! the data shows: `caught up` (nothing left to apply), `behind` (records left to apply) or
//! `not started` (no checkpoint yet, records waiting). A running engine's own state (running,
//! paused, failed) is in its `projector_projection_state` metric and `/health/ready`.

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
    Kafka(String),
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
    /// `caught up`, `behind` or `not started`.
    pub state: &'static str,
    pub last_commit_age_seconds: Option<f64>,
    /// Always `None` until rebuilds exist.
    pub rebuild_progress: Option<f64>,
}

/// One projection's part of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProjectionStatus {
    pub projection: String,
    pub lag_messages: i64,
    pub last_commit_age_seconds: Option<f64>,
    pub partitions: Vec<PartitionStatus>,
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
    let probe = tokio::task::spawn_blocking(move || KafkaProbe::new(&kafka, Duration::from_secs(10)))
        .await
        .map_err(|error| StatusError::Kafka(error.to_string()))?
        .map_err(|error| StatusError::Kafka(error.to_string()))?;
    let (_, measured) = lag::measure(probe, &pool, &Target::of(projections)).await;
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    Ok(report(&measured?, now))
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
                    last_commit_age_seconds: age(p.last_commit_unix),
                    rebuild_progress: None,
                })
                .collect(),
        })
        .collect();
    Report { projections }
}

fn state_of(partition: &PartitionLag) -> &'static str {
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
        out.push_str(&format!(
            "{}: lag {} message(s), last commit {}\n{table}\n\n",
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
            ],
        }];
        let report = report(&measured, 1000.0);
        let projection = &report.projections[0];
        assert_eq!(projection.lag_messages, 13);
        assert_eq!(projection.last_commit_age_seconds, Some(50.0));
        let states: Vec<&str> = projection.partitions.iter().map(|p| p.state).collect();
        assert_eq!(states, ["caught up", "behind", "not started"]);
        let table = render_table(&report);
        assert!(table.contains("order_summary: lag 13 message(s), last commit 50s ago"), "{table}");
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
