//! Integration tests of the engine (`projector::app::run`) against real PostgreSQL and
//! librdkafka's in-process mock Kafka cluster: each test has its own database, topic and consumer
//! groups, and compares the read models with the fold of the distinct events it published.
//!
//! # Layout
//! - `support`: databases, topics, settings, an engine that stops gracefully or crashes.
//! - `model`: the shop's events as typed facts, and the read models they fold to.
//! - `scenarios`: one test per promise (duplicates, crash between commits, replay, gaps, ids).
//! - `guarded`: the fast path's guarded waves, batch by batch, without Kafka.
//! - `properties`: the same promises over random histories, restarts and crashes.

mod guarded;
mod model;
mod properties;
mod scenarios;
#[allow(dead_code)]
mod support;
