//! The `rebuild` mode: after an engine mode, with the engine stopped, `projector::rebuild::run`
//! in place in this process, of the first bench projection (the only one unless `--projections`);
//! its rate overall and from its first checkpoint to its last.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_postgres::Client;

use projector::metrics::Metrics;

use crate::cleared::{rate_since, Cleared};
use crate::db::{checkpoint_sum, connect};
use crate::engine::Setup;
use crate::proc::{cpu_snapshot, cpu_split};
use crate::projections::verify_table;
use crate::report::{ratio, round};
use crate::workload::Workload;
use crate::Args;

/// Rebuilds the first projection of `setup` in place; `target` is the records of the topic,
/// `cleared` that projection's own clearing of the same backlog (beside the others, if any).
pub async fn rebuild(
    setup: &Setup,
    args: &Args,
    workload: &Workload,
    target: i64,
    cleared: &Cleared,
) -> anyhow::Result<Value> {
    let first = &setup.projections[0];
    eprintln!(
        "== {}: rebuild of {} in place (projector::rebuild::run in this process, engine stopped)",
        setup.kind.label(),
        first.name
    );
    let rebuild_args = projector::rebuild::RebuildArgs { name: first.name.clone(), ..Default::default() };
    let steady = rebuild_steady_rate(connect(&setup.url).await?, first.name.clone(), workload.topic.clone(), target);
    let before = cpu_snapshot(None, setup.broker_pid);
    let report = projector::rebuild::run(
        &setup.settings,
        std::slice::from_ref(&first.projection),
        &rebuild_args,
        Metrics::new(),
        std::future::pending(),
    )
    .await?;
    let after = cpu_snapshot(None, setup.broker_pid);
    let steady = if steady.is_finished() {
        steady.await.ok().flatten()
    } else {
        steady.abort();
        None
    };
    steady
        .is_none()
        .then(|| eprintln!("  (the rebuild's checkpoints were not seen to empty and fill: no steady rate)"));
    // The rebuild emptied the table: the existing rows went with it.
    let checked = verify_table(&setup.client, args, &first.name, workload, 0).await?;
    let mut result = json!({
        "events": report.events,
        "seconds": round(report.seconds, 2),
        "events_per_s": round(report.rate(), 0),
        "over_engine_wall": ratio(report.rate(), cleared.wall_rate),
        "events_per_s_steady": steady.map(|rate| round(rate, 0)),
        "steady_over_steady": steady.map(|rate| ratio(rate, cleared.steady_rate)),
        "over_steady": ratio(report.rate(), cleared.steady_rate),
        "check": checked["check"],
        "cpu": cpu_split(&before, &after),
    });
    if !checked["reapplied_duplicates"].is_null() {
        result["reapplied_duplicates"] = checked["reapplied_duplicates"].clone();
    }
    if setup.projections.len() > 1 {
        result["projection"] = json!(first.name);
        result["note"] = json!("the first projection alone, the others' tables and checkpoints untouched; its ratios are to that projection's own rates while all of them ran together");
    }
    eprintln!("  {result}");
    Ok(result)
}

/// The rebuild's steady rate, measured as the engine's: from the first checkpoint it commits to
/// the last. An in-place rebuild first empties the checkpoints, which are at `target` when it
/// starts. `None` when that was not seen.
fn rebuild_steady_rate(
    client: Client,
    projection: String,
    topic: String,
    target: i64,
) -> tokio::task::JoinHandle<Option<f64>> {
    tokio::spawn(async move {
        let mut emptied = false;
        let mut first: Option<(Instant, i64)> = None;
        loop {
            let sum = checkpoint_sum(&client, &projection, &topic).await.ok()?;
            let now = Instant::now();
            if !emptied {
                emptied = sum < target;
            }
            if emptied && sum > 0 && first.is_none() {
                first = Some((now, sum));
            }
            if let Some(first) = first.filter(|_| sum >= target) {
                return rate_since(first, now, target);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}
