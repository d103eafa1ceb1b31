//! Wiring only: connect, migrate, check the projections against the schema, run one worker per
//! projection until shutdown, drain.

use std::future::Future;
use std::sync::Arc;

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
    #[error("every projection stopped: {}", .0.join("; "))]
    AllFailed(Vec<String>),
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
    let pool = store::connect(&settings.database.url, settings.database.pool_size).await?;
    for migration in store::migrate(&settings.database.url).await? {
        tracing::info!(%migration, "migration applied");
    }
    {
        let client = pool.get().await.map_err(|error| store::StoreError::Connect(error.to_string()))?;
        let problems = store::check_statements(&client, &projections).await;
        if !problems.is_empty() {
            return Err(AppError::Statements(problems));
        }
    }

    // `/metrics`, health probes and the lag sampler; stopped when dropped, on every return path.
    let _observability =
        crate::http::Observability::start(settings, &projections, pool.clone(), metrics.clone(), Mode::Live).await;

    let (stop, stopped) = watch::channel(false);
    let mut workers = tokio::task::JoinSet::new();
    let mut names = std::collections::HashMap::new();
    for projection in projections {
        let projection = Arc::new(projection);
        tracing::info!(projection = %projection.name, topics = ?projection.topics, "projection starting");
        let (pool, settings, metrics, stopped) = (pool.clone(), settings.clone(), metrics.clone(), stopped.clone());
        let name = projection.name.clone();
        let task = workers.spawn(async move { worker::run(projection, pool, &settings, metrics, stopped).await });
        names.insert(task.id(), name);
    }

    let mut failures = Vec::new();
    let mut running = workers.len();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            finished = workers.join_next() => match finished {
                None => break,
                Some(result) => {
                    running -= 1;
                    match result {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            tracing::error!(%error, "projection stopped; the others keep running");
                            failures.push(error.to_string());
                        }
                        Err(panic) => {
                            if let Some(name) = names.get(&panic.id()) {
                                metrics.set_state(name, "failed");
                            }
                            failures.push(format!("worker panicked: {panic}"));
                        }
                    }
                    if running == 0 {
                        return Err(AppError::AllFailed(failures));
                    }
                }
            },
        }
    }
    tracing::info!("shutting down: committing batches in flight");
    let _ = stop.send(true);
    while let Some(result) = workers.join_next().await {
        if let Ok(Err(error)) = result {
            failures.push(error.to_string());
        }
    }
    pool.close();
    tracing::info!("stopped");
    Ok(())
}
