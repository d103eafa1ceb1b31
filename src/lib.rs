//! projector turns Kafka event streams into PostgreSQL read models, declaratively, with
//! versioned conditional writes and checkpoints stored in the same transaction as the writes.
//!
//! # Layout
//! - [`settings`]: the engine's settings file and environment overrides; secrets kept out of logs.
//! - [`projection`]: PURE: definition files compiled into projections; event decoding; binding.
//! - [`checkpoint`]: PURE: partitions, checkpoint moves, which records are still to apply, progress.
//! - [`outcome`]: PURE: what happened to each event, and what a batch did.
//! - [`kafka`]: one consumer per projection, rebalance callbacks bridged to the worker.
//! - [`store`]: the only place that speaks SQL: pool, migrations, checkpoints, batch application,
//!   and what lag, the demo and `projector test` read and write.
//! - [`worker`]: per projection: batch, apply, retry, record metrics.
//! - [`metrics`]: every metric, declared once.
//! - [`lag`]: lag per projection and partition, measured from Kafka and Postgres; its sampler.
//! - [`http`]: `/metrics` and the health probes on their own address.
//! - [`status`]: `projector status`, lag and checkpoints read directly, no engine needed.
//! - [`app`]: wiring for `projector run`.
//! - [`rebuild`]: `projector rebuild`: in place, into shadow tables swapped in atomically, or as of a time.
//! - [`parked`]: `projector parked`: list, show, retry or skip the events that could not be applied.
//! - [`testing`]: `projector test`: a projection's fixtures run on a scratch database.
//! - [`demo`]: `projector demo`, the embedded default on librdkafka's mock cluster.
//!
//! The `projector` binary (`main.rs`) keeps its subcommands in `cli/`: their arguments and one
//! function each.

pub mod app;
pub mod checkpoint;
pub mod demo;
pub mod http;
pub mod kafka;
pub mod lag;
pub mod metrics;
pub mod outcome;
pub mod parked;
pub mod projection;
pub mod rebuild;
pub mod schema;
pub mod settings;
pub mod status;
pub mod store;
pub mod testing;
pub mod worker;
