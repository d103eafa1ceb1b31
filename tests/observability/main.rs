//! Observability, end to end against real Postgres and a Kafka-protocol broker: the metrics'
//! values match what happened, the exposition and the alert rules pass `promtool`, a real
//! Prometheus scrapes an engine, readiness follows Postgres, and `projector status` reads lag
//! with no engine running.
//!
//! Needs `prometheus` and `promtool` on PATH: `bash scripts/install-prometheus.sh`.

#[path = "../common/mod.rs"]
mod common;

mod health;
mod metrics;
mod prometheus_e2e;
mod status;
