//! The engine under test, running: `projector::app::run` in this process (mock) or `projector
//! run` as a child process (Tansu), started, checked and stopped; and its settings.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use projector::metrics::Metrics;
use projector::settings::{property_variable, Settings};

use crate::broker::Kind;
use crate::projections::BenchProjection;
use crate::Args;

/// The bench's own connections (ceiling, naive, checks) are plain TCP: unless the URL says
/// otherwise, the engine's are too (its default, libpq's `prefer`, would use TLS where the server
/// offers it), so that every mode pays the same transport.
fn same_transport_as_the_bench(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if !parsed.query_pairs().any(|(name, _)| name == "sslmode") => {
            parsed.query_pairs_mut().append_pair("sslmode", "disable");
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

pub fn engine_settings(url: &str, bootstrap: &str, kind: Kind, args: &Args) -> Settings {
    let mut settings = Settings::default();
    settings.database.url = same_transport_as_the_bench(url);
    settings.kafka.bootstrap_servers = bootstrap.to_string();
    settings.kafka.group_prefix = format!("bench-{}", kind.label());
    settings.kafka.properties.clear();
    match kind {
        Kind::Tansu => settings.kafka.properties.extend(args.tansu_properties.iter().cloned()),
        Kind::Mock => settings.kafka.properties.extend(args.mock_properties.iter().cloned()),
    }
    settings.http.listen = "127.0.0.1:0".into();
    settings.batch.max_events = args.batch_max_events;
    settings.batch.max_bytes = args.batch_max_bytes;
    settings.batch.set_based = args.set_based;
    settings.batch.lanes = args.lanes;
    // The engine's default pool unless given: with several projections, the engine deals its
    // connections out as lanes (`Settings::lanes`).
    if let Some(size) = args.pool_size {
        settings.database.pool_size = size;
    }
    settings.kafka.properties.extend(args.kafka_properties.iter().cloned());
    settings
}

/// A running engine: `projector::app::run` on this runtime, or `projector run` as a child.
pub enum Engine {
    InProcess {
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<Result<(), projector::app::AppError>>,
        finished: Arc<AtomicBool>,
        metrics: Metrics,
    },
    Child {
        child: Arc<Mutex<Child>>,
        log: PathBuf,
    },
}

impl Engine {
    /// Runs `projections`, all at once.
    pub fn start(
        kind: Kind,
        settings: &Settings,
        projections: &[BenchProjection],
        dir: &Path,
    ) -> anyhow::Result<Engine> {
        match kind {
            Kind::Mock => {
                let metrics = Metrics::new();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let finished = Arc::new(AtomicBool::new(false));
                let task = {
                    let mut projections: Vec<_> = projections.iter().map(|p| p.projection.clone()).collect();
                    projector::schema::attach(&mut projections, &projector::schema::from_settings(&settings.schemas)?);
                    let (settings, metrics, finished) = (settings.clone(), metrics.clone(), finished.clone());
                    tokio::spawn(async move {
                        let result = projector::app::run(&settings, projections, metrics, async {
                            let _ = stopped.await;
                        })
                        .await;
                        finished.store(true, Ordering::SeqCst);
                        result
                    })
                };
                Ok(Engine::InProcess { stop, task, finished, metrics })
            }
            Kind::Tansu => {
                let projections_dir = dir.join("projections");
                std::fs::create_dir_all(&projections_dir)?;
                for projection in projections {
                    std::fs::write(projections_dir.join(format!("{}.toml", projection.name)), &projection.text)?;
                }
                let log = dir.join("projector.log");
                let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
                // `PROJECTOR_BENCH_ENGINE`: another `projector` binary (e.g. a copy, while the tree is rebuilt).
                let binary = std::env::var_os("PROJECTOR_BENCH_ENGINE")
                    .unwrap_or_else(|| env!("CARGO_BIN_EXE_projector").into());
                let mut command = Command::new(binary);
                command.arg("run");
                for (name, _) in std::env::vars_os() {
                    if name.to_string_lossy().starts_with("PROJECTOR_") {
                        command.env_remove(name);
                    }
                }
                command
                    .env("DATABASE_URL", &settings.database.url)
                    .env("PROJECTOR_KAFKA__BOOTSTRAP_SERVERS", &settings.kafka.bootstrap_servers)
                    .env("PROJECTOR_KAFKA__GROUP_PREFIX", &settings.kafka.group_prefix)
                    .env("PROJECTOR_PROJECTIONS_DIR", &projections_dir)
                    .env("PROJECTOR_HTTP__LISTEN", "127.0.0.1:0")
                    .env("PROJECTOR_BATCH__MAX_EVENTS", settings.batch.max_events.to_string())
                    .env("PROJECTOR_BATCH__MAX_BYTES", settings.batch.max_bytes.to_string())
                    .env("PROJECTOR_BATCH__SET_BASED", settings.batch.set_based.to_string())
                    .env("PROJECTOR_BATCH__LANES", settings.batch.lanes.to_string())
                    .env("PROJECTOR_DATABASE__POOL_SIZE", settings.database.pool_size.to_string())
                    .envs(settings.schemas.dir.iter().map(|dir| ("PROJECTOR_SCHEMAS__DIR", dir)))
                    .envs(settings.kafka.properties.iter().map(|(name, value)| (property_variable(name), value)))
                    .env("RUST_LOG", "warn")
                    .current_dir(dir)
                    .stdin(Stdio::null())
                    .stdout(log_file.try_clone()?)
                    .stderr(log_file);
                let child = command.spawn().context("starting the projector binary")?;
                Ok(Engine::Child { child: Arc::new(Mutex::new(child)), log })
            }
        }
    }

    /// For an engine in this process: its committed batches so far, the seconds they took and
    /// the events they held (summed over its projections).
    pub fn batches(&self) -> Option<(u64, f64, f64)> {
        let Engine::InProcess { metrics, .. } = self else { return None };
        let (mut batches, mut seconds, mut events) = (0, 0.0, 0.0);
        for family in metrics.registry.gather() {
            for metric in family.get_metric() {
                let histogram = metric.get_histogram();
                match family.name() {
                    "projector_batch_duration_seconds" => {
                        batches += histogram.get_sample_count();
                        seconds += histogram.get_sample_sum();
                    }
                    "projector_batch_events" => events += histogram.get_sample_sum(),
                    _ => {}
                }
            }
        }
        Some((batches, seconds, events))
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            Engine::InProcess { .. } => None,
            Engine::Child { child, .. } => Some(child.lock().unwrap().id()),
        }
    }

    /// A check that fails once the engine has stopped.
    pub fn alive(&self) -> impl FnMut() -> anyhow::Result<()> + use<> {
        let (finished, child) = match self {
            Engine::InProcess { finished, .. } => (Some(finished.clone()), None),
            Engine::Child { child, log } => (None, Some((child.clone(), log.clone()))),
        };
        move || {
            if finished.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
                bail!("the engine stopped");
            }
            if let Some((child, log)) = &child {
                if let Some(status) = child.lock().unwrap().try_wait()? {
                    let log = std::fs::read_to_string(log).unwrap_or_default();
                    bail!("projector exited ({status}); its log ends:\n{}", &log[log.len().saturating_sub(3000)..]);
                }
            }
            Ok(())
        }
    }

    /// SIGINT/SIGTERM-style shutdown: the batch in flight commits, the group is left.
    pub async fn stop(self) -> anyhow::Result<()> {
        match self {
            Engine::InProcess { stop, task, .. } => {
                let _ = stop.send(());
                task.await??;
            }
            Engine::Child { child, .. } => {
                let pid = child.lock().unwrap().id();
                let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    {
                        let mut child = child.lock().unwrap();
                        if child.try_wait()?.is_some() {
                            break;
                        }
                        if Instant::now() > deadline {
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Ok(())
    }
}
