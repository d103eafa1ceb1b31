//! What the observability tests share: a database and a mock Kafka topic of their own, an engine
//! with its HTTP endpoints on a free port, a plain HTTP/1.0 client, the exposition parsed, a lock
//! that holds the engine's writes back, and polling (the TCP proxy in front of Postgres is the
//! engine tests').

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use projector::app::AppError;
use projector::demo::ShopEvent;
use projector::kafka::mock::MockKafka;
use projector::metrics::Metrics;
use projector::projection::Projection;
use projector::settings::Settings;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[path = "../common/scrape.rs"]
mod scrape;
pub use scrape::{http_get, Exposition};
use tokio_postgres::Client;

// Databases and names are the engine tests' own helpers.
#[path = "../engine/support.rs"]
#[allow(dead_code)]
mod engine_support;
pub use engine_support::{connect, host_port, unique, via_port, TcpProxy, TestDb};

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port").local_addr().expect("address").port()
}

/// Settings for one test: its broker, database, consumer groups, an HTTP port of its own, and a
/// lag refresh of 200 ms.
pub fn settings(kafka: &MockKafka, database_url: &str) -> Settings {
    let mut settings = Settings::default();
    settings.kafka.bootstrap_servers = kafka.bootstrap_servers();
    settings.kafka.group_prefix = unique("group");
    settings.database.url = database_url.to_string();
    settings.database.pool_size = 4;
    settings.batch.max_events = 50;
    settings.batch.max_wait_ms = 20;
    settings.http.listen = format!("127.0.0.1:{}", free_port());
    settings.http.lag_refresh_ms = 200;
    settings
}

pub fn new_topic(kafka: &MockKafka, partitions: i32) -> String {
    let topic = unique("orders");
    kafka.create_topic(&topic, partitions, 1).expect("creating a topic on the mock cluster");
    topic
}

/// The example projections (`order_summary`, `customer_totals`) reading `topic`.
pub fn example_projections(topic: &str) -> Vec<Projection> {
    let mut projections = projector::demo::example_projections().expect("example projections compile");
    for projection in &mut projections {
        projection.topics = vec![topic.to_string()];
    }
    projections
}

pub const PROJECTIONS: [&str; 2] = ["order_summary", "customer_totals"];

/// `count` events of new orders (each an `OrderPlaced`), in a valid order.
pub fn new_orders(count: usize) -> Vec<ShopEvent> {
    (0..count)
        .map(|i| {
            projector::demo::shop_event(
                &uuid::Uuid::new_v4().to_string(),
                1,
                "OrderPlaced",
                serde_json::json!({"customer_id": format!("customer-{}", i % 3), "total": "12.50"}),
            )
        })
        .collect()
}

/// The demo's history of `orders` orders, flattened in stream order.
pub fn history(orders: usize) -> Vec<ShopEvent> {
    projector::demo::demo_history(orders).into_iter().flatten().collect()
}

pub async fn publish(settings: &Settings, topic: &str, events: &[ShopEvent]) {
    projector::demo::publish(&settings.kafka.bootstrap_servers, topic, events).await.expect("publishing");
}

/// An engine (`projector::app::run`) on a task of its own.
pub struct Engine {
    pub metrics: Metrics,
    pub address: String,
    handle: JoinHandle<Result<(), AppError>>,
    shutdown: oneshot::Sender<()>,
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
        Engine { metrics, address: settings.http.listen.clone(), handle, shutdown }
    }

    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        match tokio::time::timeout(Duration::from_secs(60), self.handle).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => panic!("the engine failed: {error}"),
            Ok(Err(join)) => panic!("the engine task failed: {join}"),
            Err(_) => panic!("the engine did not stop within 60 s"),
        }
    }

    /// `GET /metrics`, parsed (waiting for the server while the engine starts).
    pub async fn scrape(&self) -> Exposition {
        poll("GET /metrics answers 200", Duration::from_secs(60), || async {
            match http_get(&self.address, "/metrics").await {
                Ok((200, body)) => Ok(Exposition::parse(&body)),
                other => Err(format!("{other:?}")),
            }
        })
        .await
    }
}

/// Percent-encodes a query parameter value.
pub fn encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout` with the last
/// state `describe` gives.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if tokio::time::Instant::now() > deadline => {
                panic!("{what}: not reached within {timeout:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Holds the engine's writes back: an open transaction holding exclusive locks on the example
/// read models, so that every batch waits and no checkpoint moves until [`WriteLock::release`].
pub struct WriteLock {
    client: Client,
}

impl WriteLock {
    pub async fn take(database_url: &str) -> WriteLock {
        let client = connect(database_url).await;
        client
            .batch_execute("BEGIN; LOCK TABLE order_summary, customer_totals IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("locking the read models");
        WriteLock { client }
    }

    pub async fn release(self) {
        self.client.batch_execute("ROLLBACK").await.expect("releasing the lock");
    }
}

/// The path of an external tool, or a failure that says how to install it (never a silent skip).
pub fn require_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{name}` is not on PATH: install it with `bash scripts/install-prometheus.sh` (Debian's prometheus package ships prometheus and promtool)")
    })
}

/// The repository's root (for `deploy/`).
pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}
