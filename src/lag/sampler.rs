//! Lag measured every few seconds into the metrics, for as long as an engine runs (the HTTP
//! server's readiness check reads whether it reached Kafka).

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{measure, KafkaProbe, LagError, Mode, ProjectionLag, Target};
use crate::metrics::{LagSample, Metrics};
use crate::projection::Projection;
use crate::settings::KafkaSettings;

/// What the readiness check needs to know of Kafka: when the sampler last reached it.
#[derive(Debug, Default)]
pub struct KafkaReachability {
    last_success: Option<Instant>,
    last_error: Option<String>,
}

impl KafkaReachability {
    /// `Ok` when the last attempt succeeded no longer than `max_age` ago.
    pub fn check(&self, max_age: Duration) -> Result<(), String> {
        if let Some(error) = &self.last_error {
            return Err(error.clone());
        }
        match self.last_success {
            Some(at) if at.elapsed() <= max_age => Ok(()),
            Some(at) => Err(format!("kafka last reached {}s ago", at.elapsed().as_secs())),
            None => Err("kafka not reached yet".into()),
        }
    }

    fn record_success(&mut self) {
        self.last_success = Some(Instant::now());
        self.last_error = None;
    }
}

/// Measures lag every `interval` into `metrics`, with `mode` as the `mode` label.
pub struct Sampler {
    pub settings: KafkaSettings,
    pub pool: Pool,
    /// The projections to measure (a reload changes them).
    pub targets: Arc<RwLock<Vec<Target>>>,
    pub mode: Mode,
    pub metrics: Metrics,
    /// Updated after every attempt, for the readiness check.
    pub kafka: Arc<Mutex<KafkaReachability>>,
    pub interval: Duration,
}

impl Sampler {
    /// Runs until `stop` turns true (or is dropped).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let Sampler { settings, pool, targets, mode, metrics, kafka, interval } = self;
        let timeout = Duration::from_secs(5).min(interval.max(Duration::from_secs(1)) * 2);
        let created = tokio::task::spawn_blocking(move || KafkaProbe::new(&settings, timeout)).await;
        let mut probe = match created {
            Ok(Ok(probe)) => probe,
            Ok(Err(error)) => {
                tracing::error!(%error, "cannot create the lag sampler's kafka clients: no lag metrics");
                kafka.lock().expect("not poisoned").last_error = Some(format!("kafka client: {error}"));
                return;
            }
            Err(error) => {
                tracing::error!(%error, "lag sampler did not start");
                return;
            }
        };
        let mut warned = false;
        loop {
            let current = targets.read().expect("not poisoned").clone();
            let (returned, measured) = measure(probe, &pool, &current).await;
            probe = returned;
            match measured {
                Ok(projections) => {
                    warned = false;
                    kafka.lock().expect("not poisoned").record_success();
                    record(&metrics, mode, &projections);
                }
                Err(error) => {
                    if let LagError::Kafka(cause) = &error {
                        kafka.lock().expect("not poisoned").last_error = Some(cause.to_string());
                    } else {
                        // Postgres failed after Kafka answered.
                        kafka.lock().expect("not poisoned").record_success();
                    }
                    if !warned {
                        tracing::warn!(%error, "cannot measure lag; retrying every interval");
                        warned = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
            }
        }
    }
}

/// A [`Sampler`] running as a task of its own: what it measures follows reloads, and it stops
/// when this is dropped.
pub struct RunningSampler {
    targets: Arc<RwLock<Vec<Target>>>,
    /// When the sampler last reached Kafka, for the readiness check.
    pub kafka: Arc<Mutex<KafkaReachability>>,
    task: JoinHandle<()>,
    _stop: watch::Sender<bool>,
}

impl RunningSampler {
    /// Starts measuring `projections` every `interval`, with `mode` as the lag series' `mode` label.
    pub fn start(
        settings: &KafkaSettings,
        pool: Pool,
        projections: &[Projection],
        mode: Mode,
        metrics: Metrics,
        interval: Duration,
    ) -> RunningSampler {
        let kafka = Arc::new(Mutex::new(KafkaReachability::default()));
        let targets = Arc::new(RwLock::new(Target::of(projections)));
        let (stop, stopped) = watch::channel(false);
        let sampler = Sampler {
            settings: settings.clone(),
            pool,
            targets: targets.clone(),
            mode,
            metrics,
            kafka: kafka.clone(),
            interval,
        };
        let task = tokio::spawn(sampler.run(stopped));
        RunningSampler { targets, kafka, task, _stop: stop }
    }

    /// The projections to measure from the next sample on (after a reload).
    pub fn set_projections(&self, projections: &[Projection]) {
        *self.targets.write().expect("not poisoned") = Target::of(projections);
    }
}

impl Drop for RunningSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes one measurement into the metrics.
pub fn record(metrics: &Metrics, mode: Mode, projections: &[ProjectionLag]) {
    for projection in projections {
        if let Some(at) = projection.last_commit_unix() {
            metrics.observe_commit_time(&projection.projection, at as i64);
        }
        for partition in &projection.partitions {
            metrics.record_lag(&LagSample {
                projection: &projection.projection,
                topic: &partition.topic,
                partition: partition.partition,
                mode: mode.as_str(),
                end_offset: partition.end_offset,
                checkpoint: partition.checkpoint,
                lag_messages: partition.lag_messages,
                lag_seconds: partition.lag_seconds,
            });
        }
    }
}
