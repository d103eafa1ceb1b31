//! Wiring only: connect, migrate, check the projections against the schema, run one worker per
//! projection until shutdown, drain.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, watch};

use crate::lag::Mode;
use crate::metrics::Metrics;
use crate::projection::Projection;
use crate::settings::{redact_url, Settings};
use crate::store::{self, StoreError};
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
    let (_keep, reloads) = mpsc::channel(1);
    run_reloading(settings, projections, metrics, shutdown, reloads).await
}

/// [`run`], reloading the projections from `settings.projections_dir` at each message on
/// `reloads` (SIGHUP): new definitions start (their migrations applied first), removed ones stop
/// after committing their batch in flight, changed ones are restarted under the definition gate
/// (refused until rebuilt or accepted); an invalid definition is logged with file and line and
/// changes nothing (a new one does not start, a running one goes on as it was).
pub async fn run_reloading(
    settings: &Settings,
    projections: Vec<Projection>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
    mut reloads: mpsc::Receiver<()>,
) -> Result<(), AppError> {
    if projections.is_empty() {
        return Err(AppError::NoProjections(settings.projections_dir.display().to_string()));
    }
    tracing::info!(database = %redact_url(&settings.database.url), kafka = %settings.kafka.bootstrap_servers, "starting");
    for warning in crate::kafka::property_warnings(&settings.kafka) {
        tracing::warn!("{warning}");
    }
    let pool = store::connect(&settings.database.url, settings.database.pool_size).await?;
    let (waiting, problems) = migrate_and_check(settings, &pool, &projections).await?;
    for projection in &waiting {
        tracing::warn!(%projection, "its definition changed: its migrations wait for `projector rebuild` or `projector accept`");
    }
    let problems: Vec<String> = problems.into_values().flatten().collect();
    if !problems.is_empty() {
        return Err(AppError::Statements(problems));
    }

    // `/metrics`, health probes and the lag sampler; stopped when dropped, on every return path.
    // They have connections of their own: lag and readiness stay measurable while every engine
    // connection waits (on a lock, or for a slow commit).
    let own_pool = store::connect(&settings.database.url, 2).await?;
    let _observability =
        crate::http::Observability::start(settings, &projections, own_pool, metrics.clone(), Mode::Live).await;

    // The schemas of Confluent-framed records: the caller's, kept for the projections a reload
    // starts.
    let schemas = projections[0].schemas.clone();
    let mut workers = Workers::default();
    let mut all: Vec<String> = projections.iter().map(|projection| projection.name.clone()).collect();
    let count = projections.len();
    for projection in projections {
        workers.start(projection, &pool, settings, &metrics, count);
    }

    // A projection that fails for good stops the engine: the others commit their batches in
    // flight, and the process exits non-zero so that the operator (or the orchestrator) sees it.
    let mut failures = Vec::new();
    tokio::pin!(shutdown);
    // Until the shutdown signal, or the first worker to end (which only a failure does, or a
    // reload that stopped it).
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = reloads.recv() => {
                let running = reload(settings, &pool, &metrics, &schemas, &mut workers).await;
                if let Some(running) = running {
                    _observability.set_projections(&running);
                    for projection in running {
                        if !all.contains(&projection.name) {
                            all.push(projection.name);
                        }
                    }
                }
            }
            finished = workers.set.join_next_with_id(), if !workers.set.is_empty() => match finished {
                None => {}
                Some(Ok((id, Ok(())))) if workers.retiring.remove(&id) => {
                    let name = workers.names.remove(&id).unwrap_or_default();
                    tracing::info!(projection = %name, "projection stopped (reload)");
                    if let Some(at) = workers.forgotten.iter().position(|gone| *gone == name) {
                        if !workers.running.contains_key(&name) {
                            metrics.forget_projection(&name);
                        }
                        workers.forgotten.remove(at);
                    }
                }
                Some(Ok((id, Ok(())))) => {
                    // A worker ends by itself only at shutdown: one that ended before is a
                    // projection no longer running, so the engine stops rather than look healthy.
                    let name = workers.names.remove(&id).unwrap_or_default();
                    metrics.set_state(&name, "failed");
                    tracing::error!(projection = %name, "projection worker ended unexpectedly: stopping the engine");
                    failures.push(format!("the worker of `{name}` ended unexpectedly"));
                    break;
                }
                Some(Ok((id, Err(error)))) => {
                    workers.names.remove(&id);
                    tracing::error!(%error, "projection failed: stopping the engine");
                    failures.push(error.to_string());
                    break;
                }
                Some(Err(panic)) => {
                    if let Some(name) = workers.names.remove(&panic.id()) {
                        metrics.set_state(&name, "failed");
                    }
                    tracing::error!(%panic, "projection worker panicked: stopping the engine");
                    failures.push(format!("worker panicked: {panic}"));
                    break;
                }
            },
        }
    }
    tracing::info!("shutting down: committing batches in flight");
    workers.stop_all();
    let Workers { set: mut workers, mut names, .. } = workers;
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
        tracing::info!(projection = %name, "events since start: {}", metrics.outcome_summary(name));
    }
    if !failures.is_empty() {
        return Err(AppError::Fatal(failures));
    }
    tracing::info!("stopped");
    Ok(())
}

/// The running workers: one task per projection, each with its own stop signal.
#[derive(Default)]
struct Workers {
    set: tokio::task::JoinSet<Result<(), worker::WorkerError>>,
    /// Task → projection.
    names: HashMap<tokio::task::Id, String>,
    /// Projection → its definition, its stop signal and its task.
    running: HashMap<String, (Projection, watch::Sender<bool>, tokio::task::Id)>,
    /// Tasks a reload asked to stop: their end is no failure.
    retiring: HashSet<tokio::task::Id>,
    /// Projections a reload removed: their gauges go once their worker has stopped.
    forgotten: Vec<String>,
}

impl Workers {
    /// Starts `projection`'s worker, one of `running` projections sharing the pool.
    fn start(
        &mut self,
        projection: Projection,
        pool: &deadpool_postgres::Pool,
        settings: &Settings,
        metrics: &Metrics,
        running: usize,
    ) {
        let settings = settings.sharing(running);
        tracing::info!(projection = %projection.name, topics = ?projection.topics, lanes = settings.batch.lanes, "projection starting");
        let (stop, stopped) = watch::channel(false);
        let definition = projection.clone();
        let (projection, pool, metrics) = (Arc::new(projection), pool.clone(), metrics.clone());
        let task = self.set.spawn(async move { worker::run(projection, pool, &settings, metrics, stopped).await });
        self.names.insert(task.id(), definition.name.clone());
        self.running.insert(definition.name.clone(), (definition, stop, task.id()));
    }

    /// Asks `name`'s worker to stop after its batch in flight.
    fn retire(&mut self, name: &str) {
        if let Some((_, stop, id)) = self.running.remove(name) {
            let _ = stop.send(true);
            self.retiring.insert(id);
        }
    }

    fn stop_all(&mut self) {
        for (_, stop, _) in self.running.values() {
            let _ = stop.send(true);
        }
    }
}

/// Reloads the projections folder: starts, stops and restarts workers to match it. Returns the
/// projections running afterwards, or `None` when the folder cannot be read.
async fn reload(
    settings: &Settings,
    pool: &deadpool_postgres::Pool,
    metrics: &Metrics,
    schemas: &std::sync::Arc<crate::projection::schemas::Schemas>,
    workers: &mut Workers,
) -> Option<Vec<Projection>> {
    tracing::info!(dir = %settings.projections_dir.display(), "reloading the projections (SIGHUP)");
    let (loaded, errors) = match crate::projection::load_dir_partly(&settings.projections_dir) {
        Ok((mut loaded, errors)) => {
            crate::schema::attach(&mut loaded, schemas);
            (loaded, errors)
        }
        Err(errors) => {
            for error in &errors {
                tracing::error!("reload: {error}");
            }
            tracing::error!(
                "reload refused: the projections folder cannot be read; the running projections go on unchanged"
            );
            return None;
        }
    };
    // A definition that does not load is reported, and changes nothing: a new one does not
    // start, a running one goes on as it was (its file or its folder has an error).
    for error in &errors {
        tracing::error!("reload: {error}");
    }
    let broken = |projection: &Projection| {
        let folder = projection.file.with_extension("");
        errors.iter().any(|error| error.file == projection.file || error.file.starts_with(&folder))
    };
    let mut kept: Vec<Projection> = workers
        .running
        .values()
        .map(|(projection, _, _)| projection)
        .filter(|projection| broken(projection) && !loaded.iter().any(|other| other.name == projection.name))
        .cloned()
        .collect();
    if !errors.is_empty() {
        let names: Vec<&str> = kept.iter().map(|projection| projection.name.as_str()).collect();
        tracing::error!(errors = errors.len(), unchanged = ?names,
            "reload: definitions that do not load are not started, and those of them running go on as they were");
    }
    let gone: Vec<String> = workers
        .running
        .keys()
        .filter(|name| !loaded.iter().chain(&kept).any(|projection| projection.name == **name))
        .cloned()
        .collect();
    for name in gone {
        tracing::info!(projection = %name, "reload: its definition is gone: stopping it after its batch in flight");
        workers.retire(&name);
        workers.forgotten.push(name);
    }
    let fresh: Vec<Projection> = loaded
        .iter()
        .filter(|projection| {
            workers.running.get(&projection.name).is_none_or(|(running, _, _)| {
                running.hash != projection.hash || running.keep_event_ids != projection.keep_event_ids
            })
        })
        .cloned()
        .collect();
    if fresh.is_empty() {
        tracing::info!("reload: no definition changed");
    } else {
        // New and changed ones: migrations first (a changed one's wait for its rebuild), then
        // their statements against the schema; one that does not fit is not started.
        let mut problems = match migrate_and_check(settings, pool, &fresh).await {
            Ok((_, problems)) => problems,
            Err(error) => {
                tracing::error!(%error, "reload: migrations or the statements' check failed; the new and changed projections are not started");
                return Some(running_projections(&loaded, workers));
            }
        };
        // Lanes are dealt out over the projections that will be running (those kept as they
        // were keep theirs).
        let running = loaded.len() + kept.len();
        for projection in fresh {
            if let Some(problems) = problems.remove(&projection.name).filter(|problems| !problems.is_empty()) {
                for problem in problems {
                    tracing::error!("reload: {problem}");
                }
                tracing::error!(projection = %projection.name, "reload: not started: its statements do not fit the database");
                continue;
            }
            if workers.running.contains_key(&projection.name) {
                tracing::info!(projection = %projection.name, "reload: its definition changed: restarting it");
                workers.retire(&projection.name);
            }
            workers.start(projection, pool, settings, metrics, running);
        }
    }
    let mut running = running_projections(&loaded, workers);
    running.append(&mut kept);
    Some(running)
}

/// Those of `loaded` that have a worker.
fn running_projections(loaded: &[Projection], workers: &Workers) -> Vec<Projection> {
    loaded.iter().filter(|projection| workers.running.contains_key(&projection.name)).cloned().collect()
}

/// Applies the migrations of `projections` whose definition built their read model (logged), then
/// checks each one's statements against the schema. A projection whose definition changed waits
/// for its rebuild (the definition gate): its migrations are not applied and its statements are
/// not checked against the live tables. Returns the waiting projections, and each checked one's
/// problems (empty: its statements fit).
async fn migrate_and_check(
    settings: &Settings,
    pool: &Pool,
    projections: &[Projection],
) -> Result<(Vec<String>, BTreeMap<String, Vec<String>>), StoreError> {
    let (applied, waiting) = store::migrate_current(&settings.database.url, projections).await?;
    for migration in applied {
        tracing::info!(%migration, "migration applied");
    }
    let client = store::client(pool).await?;
    let mut problems = BTreeMap::new();
    for projection in projections.iter().filter(|projection| !waiting.contains(&projection.name)) {
        let found = store::check_statements(&client, std::slice::from_ref(projection), settings.batch.set_based).await;
        problems.insert(projection.name.clone(), found);
    }
    Ok((waiting, problems))
}
