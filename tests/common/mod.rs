//! What the integration tests share, written once. Every test binary includes it as
//! `#[path = "../common/mod.rs"] mod common;` and takes what it needs.
//!
//! Every test owns what it starts: its database (`projector_test_<hex>`, dropped at the end, or
//! best-effort when the test panics), its topics and consumer groups, its broker and its
//! `projector` processes (killed on drop; when a test panics, the drops print the tail of each
//! process's log) or its in-process engine (aborted on drop).
//!
//! - `db`: the PostgreSQL server, a database per test ([`TestDb`]), shared queries, a lock that
//!   holds the engine's writes back.
//! - `proxy`: a TCP proxy in front of Postgres that can cut every connection.
//! - `wait`: [`wait_for`], polling with a deadline.
//! - `tansu`: [`free_port`], [`log_tail`] and a Tansu broker process ([`Tansu`]); self-contained,
//!   the throughput benchmark can include it too.
//! - `process`: `projector` as a child process ([`Projector`], [`projector_command`]), a log
//!   folder per test, external tools.
//! - `engine`: the engine in process on librdkafka's mock cluster ([`Engine`]), its settings,
//!   topics and projections.
//! - `scrape`: `/metrics` over plain HTTP and the text exposition parsed.
//! - `records`: records published byte for byte, the bank-account events, a seeded generator
//!   ([`records::seeded_rng`]) and streams interleaved at random ([`records::interleave`]).
//! - `model`: the shop's events as typed facts, the read models they fold to, random histories
//!   (the in-process tests).
//! - `shop`: the example shop as the process-level tests see it: JSON histories with duplicates,
//!   their fold, a check that read models and checkpoints caught up.

#![allow(dead_code)]

pub mod db;
pub mod engine;
pub mod model;
pub mod process;
pub mod proxy;
pub mod records;
pub mod scrape;
pub mod shop;
pub mod tansu;
pub mod wait;

#[allow(unused_imports)]
pub use db::{checkpoints, connect, query_i64, server_url, unique, TestDb};
#[allow(unused_imports)]
pub use engine::{
    example_projection, example_projections, init_tracing, new_topic, outcomes, settings, versioned_projection,
    wait_caught_up, Engine,
};
#[allow(unused_imports)]
pub use process::{projector_command, projector_subcommand, wait_for_rows, LogDir, Projector};
#[allow(unused_imports)]
pub use shop::produce_one_per_batch;
#[allow(unused_imports)]
pub use tansu::{free_port, log_tail, Tansu};
#[allow(unused_imports)]
pub use wait::wait_for;
