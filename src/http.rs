//! `/metrics` and the health probes on their own address (`http.listen`), served beside the lag
//! sampler ([`crate::lag::RunningSampler`]) that keeps the lag metrics fresh: everything an engine
//! exports for operators.
//!
//! - `GET /metrics`: the engine's registry in the Prometheus text format.
//! - `GET /health/live`: 200 while the process serves requests.
//! - `GET /health/ready`: 200 when Postgres answers `SELECT 1`, the lag sampler reached Kafka
//!   recently, and every projection is `running` or `paused`; 503 otherwise. Both answer with a
//!   small JSON document saying which check failed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use deadpool_postgres::Pool;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::lag::{KafkaReachability, Mode, RunningSampler};
use crate::metrics::Metrics;
use crate::projection::Projection;
use crate::settings::Settings;

/// States in which a projection counts as ready.
const READY_STATES: [&str; 2] = ["running", "paused"];

/// What `/health/ready` looks at.
pub struct Health {
    /// The projections running now (a reload changes them).
    projections: RwLock<Vec<String>>,
    metrics: Metrics,
    pool: Pool,
    kafka: Arc<Mutex<KafkaReachability>>,
    /// How long ago the sampler may last have reached Kafka.
    kafka_max_age: Duration,
}

/// The answer of `/health/ready`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Readiness {
    pub ready: bool,
    /// `ok`, or why not.
    pub postgres: String,
    pub kafka: String,
    /// Each projection's state (`starting` before its worker set one).
    pub projections: BTreeMap<String, String>,
}

impl Health {
    pub async fn readiness(&self) -> Readiness {
        let postgres = match tokio::time::timeout(Duration::from_secs(2), self.ping_postgres()).await {
            Ok(result) => result,
            Err(_) => Err("postgres did not answer within 2s".to_string()),
        };
        let kafka = self.kafka.lock().expect("not poisoned").check(self.kafka_max_age);
        let projections: BTreeMap<String, String> = self
            .projections
            .read()
            .expect("not poisoned")
            .iter()
            .map(|name| (name.clone(), self.metrics.current_state(name).unwrap_or("starting").to_string()))
            .collect();
        let ready = postgres.is_ok()
            && kafka.is_ok()
            && projections.values().all(|state| READY_STATES.contains(&state.as_str()));
        let text = |result: Result<(), String>| result.map_or_else(|error| error, |()| "ok".to_string());
        Readiness { ready, postgres: text(postgres), kafka: text(kafka), projections }
    }

    async fn ping_postgres(&self) -> Result<(), String> {
        crate::store::lag::ping(&self.pool).await
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
}

/// The router of the engine's HTTP endpoints.
fn router(metrics: Metrics, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .with_state(AppState { metrics, health })
}

async fn serve_metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], state.metrics.encode()).into_response()
}

async fn live() -> Response {
    json(StatusCode::OK, &serde_json::json!({ "live": true }))
}

async fn ready(State(state): State<AppState>) -> Response {
    let readiness = state.health.readiness().await;
    let status = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json(status, &readiness)
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    let text = serde_json::to_string(body).expect("serializable");
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

/// The HTTP server and the lag sampler of one engine; both stop when this is dropped.
pub struct Observability {
    pub health: Arc<Health>,
    sampler: RunningSampler,
    metrics: Metrics,
    /// The address the HTTP server listens on (`None`: it could not bind, see the log).
    pub address: Option<SocketAddr>,
    server: Option<JoinHandle<()>>,
}

impl Observability {
    /// Registers the projections' metrics, starts the lag sampler (with `mode` as the lag
    /// series' `mode` label) and serves `/metrics` and the health probes on `http.listen`.
    ///
    /// An address already in use is logged, not fatal: the engine keeps projecting, and
    /// Prometheus' `up == 0` shows the missing endpoint.
    pub async fn start(
        settings: &Settings,
        projections: &[Projection],
        pool: Pool,
        metrics: Metrics,
        mode: Mode,
    ) -> Observability {
        for projection in projections {
            metrics.register_projection(&projection.name, projection.handlers.keys().map(|event_type| &**event_type));
        }
        let metrics_for_reload = metrics.clone();
        let interval = Duration::from_millis(settings.http.lag_refresh_ms.max(1));
        let sampler =
            RunningSampler::start(&settings.kafka, pool.clone(), projections, mode, metrics.clone(), interval);
        let health = Arc::new(Health {
            projections: RwLock::new(projections.iter().map(|p| p.name.clone()).collect()),
            metrics: metrics.clone(),
            pool,
            kafka: sampler.kafka.clone(),
            kafka_max_age: interval * 3 + Duration::from_secs(15),
        });
        let (address, server) = match tokio::net::TcpListener::bind(&settings.http.listen).await {
            Ok(listener) => {
                let address = listener.local_addr().ok();
                tracing::info!(address = %settings.http.listen, bound = ?address, "serving /metrics, /health/live and /health/ready");
                let app = router(metrics, health.clone());
                let server = tokio::spawn(async move {
                    if let Err(error) = axum::serve(listener, app).await {
                        tracing::error!(%error, "http server stopped");
                    }
                });
                (address, Some(server))
            }
            Err(error) => {
                tracing::error!(address = %settings.http.listen, %error,
                    "cannot listen for /metrics and health: running without them");
                (None, None)
            }
        };
        Observability { health, sampler, metrics: metrics_for_reload, address, server }
    }

    /// The projections running now, after a reload: readiness and lag follow them.
    pub fn set_projections(&self, projections: &[Projection]) {
        for projection in projections {
            self.metrics
                .register_projection(&projection.name, projection.handlers.keys().map(|event_type| &**event_type));
        }
        *self.health.projections.write().expect("not poisoned") = projections.iter().map(|p| p.name.clone()).collect();
        self.sampler.set_projections(projections);
    }
}

impl Drop for Observability {
    /// Stops the HTTP server; the sampler stops as it is dropped.
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            server.abort();
        }
    }
}
