//! The `projector` binary's commands, run as processes against real PostgreSQL (and, for `run`,
//! librdkafka's mock cluster served from this test process on a loopback port).
//!
//! # Layout
//! - `logs`: `log.format = "json"`, one JSON object per line.
//! - `projector_test`: `projector test` on the example projections' fixtures and on a projection
//!   that is not idempotent under reordering; reports; broken fixtures.
//! - `schema`: a projection's SQL migrations, applied by `projector migrate` and `projector run`.
//! - `reload`: SIGHUP makes `projector run` add, change and remove projections without a restart.
//! - `walkthrough`: the README's "Adding a projection", step by step against a running engine.

#[path = "../common/mod.rs"]
mod common;

mod logs;
mod projector_test;
mod reload;
mod schema;
mod walkthrough;
