//! What every engine test needs: a database of its own, a mock Kafka topic of its own, settings
//! pointing at both, and an engine that can be started, stopped gracefully or crashed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use projector::app::AppError;
use projector::kafka::mock::MockKafka;
use projector::metrics::Metrics;
use projector::projection::Projection;
use projector::settings::Settings;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_postgres::{Client, NoTls};

/// The server the test databases are created on, unless `PROJECTOR_TEST_DATABASE_URL` says otherwise.
pub fn server_url() -> String {
    std::env::var("PROJECTOR_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A short random hex name part, for databases, topics and consumer groups.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Connects to `url`, driving the connection on the current runtime.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|error| panic!("connecting to `{url}`: {error} (is PostgreSQL running?)"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// `projector_test_<random>`, created empty (the engine migrates it) and dropped at the end.
pub struct TestDb {
    pub url: String,
    name: String,
    dropped: bool,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let name = unique("projector_test");
        connect(&server_url())
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|error| panic!("creating database `{name}`: {error}"));
        let url = projector::demo::database_url(&server_url(), &name).expect("database url");
        TestDb { url, name, dropped: false }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Drops the database, disconnecting whoever is still connected (a crashed engine's pool).
    pub async fn drop(mut self) {
        connect(&server_url())
            .await
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name))
            .await
            .unwrap_or_else(|error| panic!("dropping database `{}`: {error}", self.name));
        self.dropped = true;
    }
}

impl Drop for TestDb {
    /// Best effort when the test panicked before dropping it: on a thread with its own runtime,
    /// since this may run inside the test's runtime.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            runtime.block_on(async {
                if let Ok((client, connection)) = tokio_postgres::connect(&server_url(), NoTls).await {
                    tokio::spawn(connection);
                    let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
                }
            });
        })
        .join();
    }
}

/// Creates a topic of its own on `kafka`.
pub fn new_topic(kafka: &MockKafka, partitions: i32) -> String {
    let topic = unique("orders");
    kafka.create_topic(&topic, partitions, 1).expect("creating a topic on the mock cluster");
    topic
}

/// Settings for one test: its broker, database and consumer groups, small batches.
pub fn settings(kafka: &MockKafka, db: &TestDb, max_events: usize, commit_offsets: bool) -> Settings {
    let mut settings = Settings::default();
    settings.kafka.bootstrap_servers = kafka.bootstrap_servers();
    settings.kafka.group_prefix = unique("group");
    settings.kafka.commit_offsets = commit_offsets;
    settings.database.url = db.url.clone();
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

pub async fn wait_caught_up(settings: &Settings, projections: &[Projection]) {
    projector::demo::wait_caught_up(settings, projections, Duration::from_secs(120))
        .await
        .expect("the projections catch up");
}

/// An engine (`projector::app::run`) running on a task of its own, with fresh metrics. Dropped
/// without `stop` or `crash` (a failing test), it is aborted, so that its database can be dropped.
pub struct Engine {
    pub metrics: Metrics,
    handle: Option<JoinHandle<Result<(), AppError>>>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Engine {
    pub fn start(settings: &Settings, projections: &[Projection]) -> Engine {
        let metrics = Metrics::new();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let (settings, projections, task_metrics) = (settings.clone(), projections.to_vec(), metrics.clone());
        let handle = tokio::spawn(async move {
            projector::app::run(&settings, projections, task_metrics, async {
                let _ = stopped.await;
            })
            .await
        });
        Engine { metrics, handle: Some(handle), shutdown: Some(shutdown) }
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
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// The count of `outcome` for `projection`, and the same over every outcome, as a short report.
pub fn outcomes(metrics: &Metrics, projection: &str) -> Vec<(&'static str, u64)> {
    projector::outcome::Outcome::ALL
        .iter()
        .map(|outcome| (outcome.as_str(), metrics.outcome_count(projection, *outcome)))
        .collect()
}

/// `streams` interleaved, each in its own order: at each step the next of `picks` (cycled) chooses
/// which of the streams not yet done goes on.
pub fn interleave<T: Clone>(streams: &[Vec<T>], picks: &[proptest::sample::Index]) -> Vec<T> {
    let mut cursors = vec![0usize; streams.len()];
    let mut records = Vec::new();
    let mut picks = picks.iter().cycle();
    loop {
        let open: Vec<usize> = (0..streams.len()).filter(|&i| cursors[i] < streams[i].len()).collect();
        if open.is_empty() {
            return records;
        }
        let stream = open[picks.next().expect("picks to choose with").index(open.len())];
        records.push(streams[stream][cursors[stream]].clone());
        cursors[stream] += 1;
    }
}

/// Inserts a copy of a record after it, for each `(original, offset)`: `original` picks the
/// record, `offset` how far after it the copy goes (a producer's retry).
pub fn insert_copies<T: Clone>(records: &mut Vec<T>, copies: &[(proptest::sample::Index, proptest::sample::Index)]) {
    for (original, offset) in copies {
        let original = original.index(records.len());
        let at = original + 1 + offset.index(records.len() - original);
        let copy = records[original].clone();
        records.insert(at, copy);
    }
}

/// `SELECT count(*)` as i64.
pub async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap_or_else(|error| panic!("`{sql}`: {error}")).get::<_, i64>(0)
}

/// Every row of `table` as text (`t::text`), ordered by its key: for byte-for-byte comparisons.
pub async fn table_text(client: &Client, table: &str, key: &str) -> Vec<String> {
    client
        .query(&format!("SELECT t::text FROM {table} t ORDER BY {key}"), &[])
        .await
        .unwrap_or_else(|error| panic!("reading `{table}`: {error}"))
        .iter()
        .map(|row| row.get(0))
        .collect()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after 30 s.
pub async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after 30 s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy on a loopback port in front of `target`, that can cut every connection (and
/// refuse new ones) and be restored: Postgres "becomes unreachable" for the engine only.
pub struct TcpProxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: String) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the proxy");
        let port = listener.local_addr().expect("address").port();
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (accept_cut, accept_connections) = (cut.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if accept_cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                accept_connections.lock().unwrap().push(task.abort_handle());
            }
        });
        TcpProxy { port, cut, connections, accept }
    }

    /// Closes every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

/// `url` with its host and port replaced by `127.0.0.1:<port>`.
pub fn via_port(url: &str, port: u16) -> String {
    let mut parsed = url::Url::parse(url).expect("a database url");
    parsed.set_host(Some("127.0.0.1")).expect("host");
    parsed.set_port(Some(port)).expect("port");
    parsed.to_string()
}

/// `host:port` of the database server of `url`.
pub fn host_port(url: &str) -> String {
    let parsed = url::Url::parse(url).expect("a database url");
    format!("{}:{}", parsed.host_str().unwrap_or("127.0.0.1"), parsed.port().unwrap_or(5432))
}
