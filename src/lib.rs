//! projector turns Kafka event streams into PostgreSQL read models, declaratively, with
//! versioned conditional writes and checkpoints stored in the same transaction as the writes.
//!
//! # Layout
//! - [`settings`]: the engine's settings file and environment overrides.
//! - [`projection`]: PURE: definition files compiled into projections; event decoding; binding.
//! - [`kafka`]: one consumer per projection, rebalance callbacks bridged to the worker.
//! - [`store`]: the only place that speaks SQL: pool, migrations, checkpoints, batch application.
//! - [`worker`]: per projection: batch, apply, retry, record metrics.
//! - [`metrics`]: every metric, declared once.
//! - [`app`]: wiring for `projector run`.
//! - [`demo`]: `projector demo`, the embedded default on librdkafka's mock cluster.

pub mod app;
pub mod demo;
pub mod kafka;
pub mod metrics;
pub mod projection;
pub mod settings;
pub mod store;
pub mod worker;
