//! A build: the projection's worker under the build's name, run until its checkpoints reach the
//! targets (or the live ends), with progress shown and published, then stopped.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{current_ends, RebuildError, RebuildReport};
use crate::checkpoint::{self as offsets, Offsets};
use crate::metrics::Metrics;
use crate::projection::Projection;
use crate::settings::Settings;
use crate::store::checkpoint;
use crate::store::StoreError;
use crate::worker::{self, WorkerOptions};

/// Runs `projection` until its checkpoints reach `targets`, showing progress, then stops it.
#[allow(clippy::too_many_arguments)]
pub(super) async fn build(
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
pub(super) struct Build {
    pub(super) name: String,
    pub(super) topics: Vec<String>,
    pub(super) pool: deadpool_postgres::Pool,
    pub(super) starts: Offsets,
    pub(super) targets: Offsets,
    pub(super) total: u64,
    pub(super) done_at_start: u64,
    pub(super) started: Instant,
    pub(super) progress: indicatif::ProgressBar,
    pub(super) metrics: Metrics,
    pub(super) stop: watch::Sender<bool>,
    pub(super) worker: tokio::task::JoinHandle<Result<(), worker::WorkerError>>,
    /// For builds as of a time: where each partition's first record at or after it was found.
    pub(super) reached: Option<Arc<std::sync::Mutex<Offsets>>>,
    pub(super) _observability: crate::http::Observability,
}

impl Build {
    pub(super) async fn start(
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
    pub(super) fn effective_targets(&self) -> Offsets {
        match &self.reached {
            Some(reached) => offsets::capped(&self.targets, &reached.lock().expect("reached offsets")),
            None => self.targets.clone(),
        }
    }

    /// Waits until the checkpoints reach the targets (with `follow_lag`: then also until they are
    /// within that many events of the partitions' current ends), or `interrupt`.
    pub(super) async fn follow(
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
    pub(super) async fn reach(
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
    pub(super) async fn wait_tick(
        &mut self,
        interrupt: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<Offsets, RebuildError> {
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
    pub(super) async fn stop_within(self, bound: Duration) -> Result<RebuildReport, RebuildError> {
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
    pub(super) async fn stop(self) -> Result<RebuildReport, RebuildError> {
        let _ = self.stop.send(true);
        let worker_result = self.worker.await;
        self.progress.finish_and_clear();
        worker_result??;
        let stored = load(&self.pool, &self.name).await?;
        let events = offsets::progress(&stored, &self.starts, &self.targets).saturating_sub(self.done_at_start);
        Ok(RebuildReport { events, seconds: self.started.elapsed().as_secs_f64(), resumed: false, notes: Vec::new() })
    }
}

pub(super) async fn load(pool: &deadpool_postgres::Pool, name: &str) -> Result<Offsets, StoreError> {
    let client = crate::store::client(pool).await?;
    checkpoint::load_all(&**client, name).await
}
