//! Wiring only: connect, migrate, check the projections against the schema, run one worker per
//! projection until shutdown, drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::lag::Mode;
use crate::metrics::Metrics;
use crate::projection::Projection;
use crate::settings::{redact_url, Settings};
use crate::store;
use crate::worker;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("projections do not fit the database:\n  {}", .0.join("\n  "))]
    Statements(Vec<String>),
    #[error("no projections to run (looked in `{0}`)")]
    NoProjections(String),
    /// A projection hit an error retrying cannot fix (missing table or column, no permission, …):
    /// the others committed their batches in flight and stopped too.
    #[error("stopped: {}", .0.join("; "))]
    Fatal(Vec<String>),
    /// Some projections did not stop within `shutdown_timeout_secs`: their batches in flight were
    /// rolled back (they are read again by whoever runs the projections next).
    #[error("projections did not stop within {seconds} s, their batches in flight rolled back: {}", .projections.join(", "))]
    ShutdownTimeout { seconds: u64, projections: Vec<String> },
}

/// Runs the engine until `shutdown` completes, then lets every projection commit or roll back
/// its batch in flight and leave its consumer group.
pub async fn run(
    settings: &Settings,
    projections: Vec<Projection>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    if projections.is_empty() {
        return Err(AppError::NoProjections(settings.projections_dir.display().to_string()));
    }
    tracing::info!(database = %redact_url(&settings.database.url), kafka = %settings.kafka.bootstrap_servers, "starting");
    for warning in crate::kafka::property_warnings(&settings.kafka) {
        tracing::warn!("{warning}");
    }
    store::fast::set_based_enabled(settings.batch.set_based);
    let pool = store::connect(&settings.database.url, settings.database.pool_size).await?;
    let (applied, waiting) = store::migrate_current(&settings.database.url, &projections).await?;
    for migration in applied {
        tracing::info!(%migration, "migration applied");
    }
    for projection in &waiting {
        tracing::warn!(%projection, "its definition changed: its migrations wait for `projector rebuild` or `projector accept`");
    }
    {
        let client = pool.get().await.map_err(|error| store::StoreError::Connect(error.to_string()))?;
        // Statements of a projection waiting for its rebuild (the definition gate) are not
        // checked against the live tables: its migrations are not applied to them.
        let current: Vec<Projection> =
            projections.iter().filter(|projection| !waiting.contains(&projection.name)).cloned().collect();
        let problems = store::check_statements(&client, &current).await;
        if !problems.is_empty() {
            return Err(AppError::Statements(problems));
        }
    }

    // `/metrics`, health probes and the lag sampler; stopped when dropped, on every return path.
    // They have connections of their own: lag and readiness stay measurable while every engine
    // connection waits (on a lock, or for a slow commit).
    let own_pool = store::connect(&settings.database.url, 2).await?;
    let _observability =
        crate::http::Observability::start(settings, &projections, own_pool, metrics.clone(), Mode::Live).await;

    let (stop, stopped) = watch::channel(false);
    let mut workers = tokio::task::JoinSet::new();
    let mut names = std::collections::HashMap::new();
    let all: Vec<String> = projections.iter().map(|projection| projection.name.clone()).collect();
    for projection in projections {
        let projection = Arc::new(projection);
        tracing::info!(projection = %projection.name, topics = ?projection.topics, "projection starting");
        let (pool, settings, metrics, stopped) = (pool.clone(), settings.clone(), metrics.clone(), stopped.clone());
        let name = projection.name.clone();
        let task = workers.spawn(async move { worker::run(projection, pool, &settings, metrics, stopped).await });
        names.insert(task.id(), name);
    }

    // A projection that fails for good stops the engine: the others commit their batches in
    // flight, and the process exits non-zero so that the operator (or the orchestrator) sees it.
    let mut failures = Vec::new();
    tokio::pin!(shutdown);
    // Until the shutdown signal, or the first worker to end (which only a failure does).
    tokio::select! {
        _ = &mut shutdown => {}
        finished = workers.join_next_with_id() => match finished {
            None => {}
            Some(Ok((id, Ok(())))) => {
                // A worker ends by itself only at shutdown: one that ended before is a
                // projection no longer running, so the engine stops rather than look healthy.
                let name = names.remove(&id).unwrap_or_default();
                metrics.set_state(&name, "failed");
                tracing::error!(projection = %name, "projection worker ended unexpectedly: stopping the engine");
                failures.push(format!("the worker of `{name}` ended unexpectedly"));
            }
            Some(Ok((id, Err(error)))) => {
                names.remove(&id);
                tracing::error!(%error, "projection failed: stopping the engine");
                failures.push(error.to_string());
            }
            Some(Err(panic)) => {
                if let Some(name) = names.remove(&panic.id()) {
                    metrics.set_state(&name, "failed");
                }
                tracing::error!(%panic, "projection worker panicked: stopping the engine");
                failures.push(format!("worker panicked: {panic}"));
            }
        },
    }
    tracing::info!("shutting down: committing batches in flight");
    let _ = stop.send(true);
    // Each worker commits (or rolls back) its batches in flight and leaves its group, within the
    // deadline; past it, what is left is aborted: its transactions roll back, nothing is lost.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(settings.shutdown_timeout_secs);
    loop {
        match tokio::time::timeout_at(deadline, workers.join_next_with_id()).await {
            Ok(None) => break,
            Ok(Some(Ok((id, result)))) => {
                names.remove(&id);
                if let Err(error) = result {
                    failures.push(error.to_string());
                }
            }
            Ok(Some(Err(panic))) => {
                names.remove(&panic.id());
                failures.push(format!("worker panicked: {panic}"));
            }
            Err(_) => {
                let mut late: Vec<String> = names.into_values().collect();
                late.sort();
                workers.abort_all();
                while workers.join_next().await.is_some() {}
                tracing::error!(seconds = settings.shutdown_timeout_secs, projections = ?late,
                    "shutdown took too long: batches in flight rolled back");
                pool.close();
                return Err(AppError::ShutdownTimeout { seconds: settings.shutdown_timeout_secs, projections: late });
            }
        }
    }
    pool.close();
    for name in &all {
        let counts: Vec<String> = crate::store::apply::Outcome::ALL
            .iter()
            .map(|outcome| format!("{} {}", outcome.as_str(), metrics.outcome_count(name, *outcome)))
            .collect();
        tracing::info!(projection = %name, "events since start: {}", counts.join(", "));
    }
    if !failures.is_empty() {
        return Err(AppError::Fatal(failures));
    }
    tracing::info!("stopped");
    Ok(())
}
