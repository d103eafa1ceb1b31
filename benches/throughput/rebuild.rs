//! The `rebuild` mode: after an engine mode, with the engine stopped, `projector::rebuild::run`
//! in place in this process; its rate overall and from its first checkpoint to its last.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_postgres::Client;

use projector::metrics::Metrics;

use crate::db::{checkpoint_sum, connect, verify};
use crate::engine::{rate_since, Cleared, Setup};
use crate::proc::{cpu_snapshot, cpu_split};
use crate::report::{ratio, round};
use crate::workload::{Workload, PROJECTION};

/// Rebuilds the projection of `setup` in place; `target` is the records of the topic, `cleared`
/// the engine's clearing of the same backlog.
pub async fn rebuild(setup: &Setup, workload: &Workload, target: i64, cleared: &Cleared) -> anyhow::Result<Value> {
    eprintln!("== {}: rebuild in place (projector::rebuild::run in this process, engine stopped)", setup.kind.label());
    let rebuild_args = projector::rebuild::RebuildArgs { name: PROJECTION.into(), ..Default::default() };
    let steady = rebuild_steady_rate(connect(&setup.url).await?, workload.topic.clone(), target);
    let before = cpu_snapshot(None, setup.broker_pid);
    let report = projector::rebuild::run(
        &setup.settings,
        std::slice::from_ref(&setup.projection),
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
    let check = verify(&setup.client, "order_summary", workload.entities, workload.version_sum()).await?;
    let result = json!({
        "events": report.events,
        "seconds": round(report.seconds, 2),
        "events_per_s": round(report.rate(), 0),
        "over_engine_wall": ratio(report.rate(), cleared.wall_rate),
        "events_per_s_steady": steady.map(|rate| round(rate, 0)),
        "steady_over_steady": steady.map(|rate| ratio(rate, cleared.steady_rate)),
        "over_steady": ratio(report.rate(), cleared.steady_rate),
        "check": check,
        "cpu": cpu_split(&before, &after),
    });
    eprintln!("  {result}");
    Ok(result)
}

/// The rebuild's steady rate, measured as the engine's: from the first checkpoint it commits to
/// the last. An in-place rebuild first empties the checkpoints, which are at `target` when it
/// starts. `None` when that was not seen.
fn rebuild_steady_rate(client: Client, topic: String, target: i64) -> tokio::task::JoinHandle<Option<f64>> {
    tokio::spawn(async move {
        let mut emptied = false;
        let mut first: Option<(Instant, i64)> = None;
        loop {
            let sum = checkpoint_sum(&client, &topic).await.ok()?;
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
