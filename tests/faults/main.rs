//! Faults and bad input against real PostgreSQL and librdkafka's in-process mock Kafka cluster:
//! poison events parked per key, retried and skipped; held gaps timing out; a corpus of hostile
//! records; Postgres cut off mid-stream through a TCP proxy.
//!
//! Databases, topics, engines and the TCP proxy come from `common`; the shop's events and the
//! read models they fold to from `common::model`.
//!
//! # Layout
//! - `definition`: an instance running an old definition cannot commit after `accept`.
//! - `consumer`: a consumer thread that dies is seen (the projection `failed`) and replaced.
//! - `raw`: a test projection (`accounts`) and records published byte for byte.
//! - `parking`: per-key parking, `parked retry` after a fix, `parked skip`, gap timeouts.
//! - `hostile`: every hostile record parked or ignored with its reason, other keys unharmed.
//! - `bytes`: a property: any bytes as keys, values and headers, mixed into valid histories with
//!   duplicates and restarts: the read model is the fold of the valid events, and every record is
//!   counted once in `projector_events_total` (`scripts/soak.sh` runs it for thousands of cases).
//! - `outage`: Postgres unreachable mid-stream and back: nothing lost, nothing applied twice.
//! - `retention`: records the broker deleted before they were read: counted, held or skipped.
//! - `security`: Postgres TLS by `sslmode`; no password in errors.
//! - `registry`: the schema registry's client over TLS, with and without its CA.
//! - `transactions`: committed transactions applied, aborted ones never; checkpoints, lag and
//!   rebuilds past their markers.
//! - `wire`: record batches and transaction markers written to the mock broker byte for byte; a
//!   proxy adding the aborted transactions to its Fetch responses.

#[path = "../common/mod.rs"]
mod common;

mod bytes;
mod consumer;
mod definition;
mod hostile;
mod outage;
mod parking;
mod raw;
mod registry;
mod retention;
mod security;
mod transactions;
mod wire;
