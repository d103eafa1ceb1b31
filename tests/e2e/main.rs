//! End to end: `projector run` as separate processes against a Kafka-protocol broker (a Tansu
//! broker process, or librdkafka's mock cluster served from this test process) and real
//! PostgreSQL, with crashes, restarts and hostile records; the read models must equal the fold of
//! what was published, computed here independently of the engine.
//!
//! Needs PostgreSQL (`PROJECTOR_TEST_DATABASE_URL`) and the `tansu` binary
//! (scripts/install-tansu.sh).
//!
//! # Layout
//! - `tansu`: the example shop through a Tansu broker, the projector SIGKILLed and restarted, the
//!   broker killed and restarted, a record too large (was `tests/e2e_tansu.rs`).
//! - `chaos`: SIGKILL at random moments, instances joining and leaving the group under load.
//! - `corpus`: a hostile corpus at the record level, then shadow and in-place rebuilds.
//! - `formats`: Avro and Protobuf in the Confluent wire format, mixed with JSON and broken
//!   frames, their schemas from a stand-in registry or a directory.
//! - `cloudevents`: CloudEvents from the SDK in both binding modes, JSON and Avro data.

#[path = "../common/mod.rs"]
mod common;

mod chaos;
mod cloudevents;
mod corpus;
mod formats;
mod tansu;
