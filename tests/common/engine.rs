//! The engine in process (`projector::app::run` on a task of its own) against librdkafka's mock
//! cluster: topics, settings, projections, and an engine that stops gracefully, ends by itself or
//! crashes, and serves `/metrics`.

use std::time::Duration;

use projector::app::AppError;
use projector::demo::ShopEvent;
use projector::kafka::mock::MockKafka;
use projector::metrics::Metrics;
use projector::projection::Projection;
use projector::settings::Settings;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::db::unique;
use super::free_port;
use super::scrape::{http_get, Exposition};
use super::wait::wait_for;

/// Creates a topic of its own on `kafka`.
pub fn new_topic(kafka: &MockKafka, partitions: i32) -> String {
    let topic = unique("orders");
    kafka.create_topic(&topic, partitions, 1).expect("creating a topic on the mock cluster");
    topic
}

/// Settings for one test: its broker, database and consumer groups, `max_events` per batch.
pub fn settings(kafka: &MockKafka, database_url: &str, max_events: usize, commit_offsets: bool) -> Settings {
    let mut settings = Settings::default();
    settings.kafka.bootstrap_servers = kafka.bootstrap_servers();
    settings.kafka.group_prefix = unique("group");
    settings.kafka.commit_offsets = commit_offsets;
    settings.database.url = database_url.to_string();
    settings.database.pool_size = 4;
    settings.batch.max_events = max_events;
    settings.batch.max_wait_ms = 20;
    // A crashed consumer that was still joining its group cannot leave it: the group waits for
    // it until its session times out (45 s by default) before the next engine gets partitions.
    // Kafka's behaviour for any crash, so the tests shorten the session instead of waiting.
    settings.kafka.properties.insert("session.timeout.ms".into(), "2000".into());
    settings.kafka.properties.insert("heartbeat.interval.ms".into(), "200".into());
    // `PROJECTOR_TEST_KAFKA_DEBUG=cgrp,…`: librdkafka's debug contexts, logged at debug level.
    if let Ok(contexts) = std::env::var("PROJECTOR_TEST_KAFKA_DEBUG") {
        settings.kafka.properties.insert("debug".into(), contexts);
        settings.kafka.properties.insert("log_level".into(), "7".into());
    }
    // Engines run side by side: each on a port of its own for /metrics.
    settings.http.listen = "127.0.0.1:0".into();
    settings
}

/// [`settings`] for the observability tests: 50 events per batch, the HTTP endpoints on a free
/// port of their own (so that [`Engine::scrape`] finds them), lag refreshed every 200 ms.
pub fn served_settings(kafka: &MockKafka, database_url: &str) -> Settings {
    let mut settings = settings(kafka, database_url, 50, true);
    settings.http.listen = format!("127.0.0.1:{}", free_port());
    settings.http.lag_refresh_ms = 200;
    settings
}

/// The example projections (`order_summary`, `customer_totals`) reading `topic`.
pub fn example_projections(topic: &str) -> Vec<Projection> {
    let mut projections = projector::demo::example_projections().expect("example projections compile");
    for projection in &mut projections {
        projection.topics = vec![topic.to_string()];
    }
    projections
}

/// Only the example projection called `name`, reading `topic`.
pub fn example_projection(topic: &str, name: &str) -> Vec<Projection> {
    example_projections(topic).into_iter().filter(|projection| projection.name == name).collect()
}

/// A versioned projection `name` reading `topic` into `table`, keyed by `key`, with `handlers`
/// (its `[on.<type>]` sections), compiled as from `<name>.toml`.
pub fn versioned_projection(name: &str, topic: &str, table: &str, key: &str, handlers: &str) -> Projection {
    let text = format!(
        "name = \"{name}\"\ntopics = [\"{topic}\"]\n\n[table]\nname = \"{table}\"\nkey = \"{key}\"\n\n{handlers}"
    );
    projector::projection::compile_file(std::path::Path::new(&format!("{name}.toml")), &text)
        .unwrap_or_else(|errors| panic!("projection `{name}` does not compile: {errors:?}"))
}

/// Publishes `events` to `topic` on the broker of `settings`.
pub async fn publish(settings: &Settings, topic: &str, events: &[ShopEvent]) {
    projector::demo::publish(&settings.kafka.bootstrap_servers, topic, events).await.expect("publishing");
}

/// Waits (up to 120 s) until every projection's checkpoints reach the end of its topics.
pub async fn wait_caught_up(settings: &Settings, projections: &[Projection]) {
    projector::demo::wait_caught_up(settings, projections, Duration::from_secs(120))
        .await
        .expect("the projections catch up");
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// An engine (`projector::app::run`) running on a task of its own, with fresh metrics. Dropped
/// without `stop`, `exited` or `crash` (a failing test), it is aborted, so that its database can
/// be dropped.
pub struct Engine {
    pub metrics: Metrics,
    /// Where its HTTP endpoints listen: `settings.http.listen` (a real port with
    /// [`served_settings`]).
    pub address: String,
    handle: Option<JoinHandle<Result<(), AppError>>>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Engine {
    pub fn start(settings: &Settings, projections: &[Projection]) -> Engine {
        let metrics = Metrics::new();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let (task_settings, projections, task_metrics) = (settings.clone(), projections.to_vec(), metrics.clone());
        let handle = tokio::spawn(async move {
            projector::app::run(&task_settings, projections, task_metrics, async {
                let _ = stopped.await;
            })
            .await
        });
        Engine { metrics, address: settings.http.listen.clone(), handle: Some(handle), shutdown: Some(shutdown) }
    }

    /// Graceful stop: the batch in flight commits, the consumers leave their groups.
    pub async fn stop(mut self) -> Metrics {
        let _ = self.shutdown.take().expect("running").send(());
        let handle = self.handle.take().expect("running");
        match tokio::time::timeout(Duration::from_secs(60), handle).await {
            Ok(Ok(Ok(()))) => self.metrics.clone(),
            Ok(Ok(Err(error))) => panic!("the engine failed: {error}"),
            Ok(Err(join)) => panic!("the engine task failed: {join}"),
            Err(_) => panic!("the engine did not stop within 60 s"),
        }
    }

    /// Waits up to `timeout` for the engine to stop by itself, and returns how it ended.
    pub async fn exited(mut self, timeout: Duration) -> Result<(), AppError> {
        let handle = self.handle.take().expect("running");
        match tokio::time::timeout(timeout, handle).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => panic!("the engine task failed: {join}"),
            Err(_) => panic!("the engine did not stop by itself within {timeout:?}"),
        }
    }

    /// Crash: the task is dropped wherever it is; an open transaction rolls back.
    pub async fn crash(mut self) -> Metrics {
        let handle = self.handle.take().expect("running");
        handle.abort();
        let _ = handle.await;
        self.metrics.clone()
    }

    /// `GET /metrics`, parsed (waiting up to 60 s for the server while the engine starts).
    pub async fn scrape(&self) -> Exposition {
        wait_for("GET /metrics answers 200", Duration::from_secs(60), || async {
            match http_get(&self.address, "/metrics").await {
                Ok((200, body)) => Ok(Exposition::parse(&body)),
                other => Err(format!("{other:?}")),
            }
        })
        .await
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// The count of each outcome for `projection`, as a short report.
pub fn outcomes(metrics: &Metrics, projection: &str) -> Vec<(&'static str, u64)> {
    projector::outcome::Outcome::ALL
        .iter()
        .map(|outcome| (outcome.as_str(), metrics.outcome_count(projection, *outcome)))
        .collect()
}
