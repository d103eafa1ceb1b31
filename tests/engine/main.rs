//! Integration tests of the engine (`projector::app::run`) against real PostgreSQL and
//! librdkafka's in-process mock Kafka cluster: each test has its own database, topic and consumer
//! groups, and compares the read models with the fold of the distinct events it published.
//!
//! # Layout
//! - `definitions`: the definition files under `tests/fixtures/definitions` load or fail as
//!   their headers say (was `tests/definitions.rs`).
//! - `scenarios`: one test per promise (duplicates, crash between commits, replay, gaps, ids).
//! - `guarded`: the fast path's guarded waves, batch by batch, without Kafka.
//! - `event_id_sets`: an event-id projection's batches set-based, against one event at a time.
//! - `properties`: the same promises over random histories, restarts and crashes.
//!
//! Databases, topics, settings and engines come from `common::engine` and `common::db`; the
//! shop's events and the read models they fold to from `common::model`.

#[path = "../common/mod.rs"]
mod common;

mod definitions;
mod event_id_sets;
mod guarded;
mod properties;
mod scenarios;
