//! Projection definitions, compiled: what a projection reads, how it decodes an event, and which
//! statements it runs for each event type.
//!
//! This module is pure: it does no I/O beyond reading definition and migration files, imports no
//! tokio,
//! rdkafka or tokio-postgres (only the sans-I/O `postgres-types`), so it is unit-tested in isolation.
//!
//! # Layout
//! - [`definition`]: the serde mirror of a definition file (with source spans).
//! - [`compile`]: definition files to [`Projection`]s, reporting every error with file and line.
//! - [`handlers`]: a handler's `insert`, `update`, `sql` and `also` to checked statements.
//! - [`guard`]: the guard rule, read from a statement's syntax tree.
//! - [`hash`]: the definition hash stored with checkpoints.
//! - [`migrations`]: the projection's migration files, read and checked (`store::schema` applies them).
//! - [`identifier`]: plain SQL identifiers, the names the engine writes into SQL itself.
//! - [`params`]: `:name` parameters in SQL text to `$n` placeholders.
//! - [`event`]: a Kafka record to an [`event::Event`] through the projection's envelope.
//! - [`fields`]: the JSON fields a projection reads, found in one pass over a record's value.
//! - [`value`]: an event's values converted to the Postgres type each parameter needs.
//! - [`set_based`]: one statement applied to many events at once, and the rows it touches.
//! - [`waves`]: which events of an event-id projection's batch may share set-based statements.

pub mod avro;
pub mod cloudevents;
pub mod compile;
pub mod definition;
pub mod event;
pub mod fields;
pub mod guard;
mod handlers;
pub mod hash;
pub mod identifier;
pub mod migrations;
pub mod params;
pub mod protobuf;
pub mod schemas;
pub mod set_based;
pub mod value;
pub mod waves;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use compile::{compile_file, load_dir, load_dir_partly, DefinitionError};
pub use event::{DecodeError, Decoded, Event, Record};
pub use identifier::{is_identifier, is_table_name};

/// One compiled projection, ready to run.
#[derive(Debug, Clone)]
pub struct Projection {
    pub name: String,
    /// The file it was compiled from.
    pub file: PathBuf,
    pub topics: Vec<String>,
    pub envelope: Envelope,
    pub dedupe: Dedupe,
    /// Event type to what it does. Types not in this map are `ignored`.
    /// By event type; an event handled shares its type's name from here.
    pub handlers: BTreeMap<std::sync::Arc<str>, Handler>,
    /// Hex SHA-256 of what the projection does (topics, envelope, dedupe, compiled statements):
    /// recorded with checkpoints to notice definition changes. Comments and layout do not count.
    pub hash: String,
    /// Checks a shadow rebuild must pass before the swap (`[rebuild]`); not part of the hash.
    pub rebuild: RebuildChecks,
    /// `keep_event_ids` (event-id projections only): how long a processed event id is kept in
    /// `projector.processed_events`, by when it was processed; `None`: for ever. A duplicate that
    /// arrives later than this after its original was processed is applied again. Not part of
    /// the hash: it changes which duplicates are caught, not what an event does.
    pub keep_event_ids: Option<std::time::Duration>,
    /// Where its read model's migrations live ([`migrations::dir_of`]).
    pub migrations_dir: PathBuf,
    /// Its read model's migrations, in version order (read by [`load_dir`]; none from
    /// [`compile_file`] alone); not part of the hash.
    pub migrations: Vec<refinery::Migration>,
    /// Every JSON path the envelope and the statements read: what decoding looks for.
    pub fields: fields::Fields,
    /// The slots of the envelope's fields read from the JSON value: type, id, key, version,
    /// occurred_at.
    pub envelope_slots: [Option<usize>; 5],
    /// The schemas of Confluent-framed records, shared by the process's projections (none until
    /// the caller gives them: see `crate::schema`).
    pub schemas: std::sync::Arc<schemas::Schemas>,
}

/// `[rebuild]` of a definition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RebuildChecks {
    /// Queries returning one boolean, run against the shadow tables before the swap.
    pub checks: Vec<String>,
    /// Each shadow table must hold at least this fraction of its live table's rows.
    pub min_row_ratio: Option<f64>,
}

impl Projection {
    /// Every table the projection's statements write, sorted: its read model.
    pub fn tables(&self) -> Vec<String> {
        let mut tables: Vec<String> = self
            .handlers
            .values()
            .flat_map(|handler| handler.statements.iter().filter_map(|statement| statement.writes.clone()))
            .collect();
        if let Dedupe::Version(table) = &self.dedupe {
            tables.push(table.table.to_lowercase());
        }
        tables.sort();
        tables.dedup();
        tables
    }

    /// A copy running under another name (its own checkpoints, processed ids, held events and
    /// consumer group): used by rebuilds into shadow tables.
    pub fn renamed(&self, name: &str) -> Projection {
        Projection { name: name.to_string(), ..self.clone() }
    }
}

/// How duplicates are recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dedupe {
    /// One row per entity carrying the entity's version: every handler's first statement is a
    /// guarded write (`Create` or `Update`), and `version_lookup` tells a duplicate from a gap.
    Version(VersionedTable),
    /// Every event id is recorded in `projector.processed_events` in the same transaction; an id
    /// seen before is a duplicate. Statements may be anything.
    EventId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionedTable {
    /// Table name as written in the definition (may be schema-qualified), validated as plain identifiers.
    pub table: String,
    pub key_column: String,
    pub version_column: String,
    /// `SELECT <version_column> FROM <table> WHERE <key_column> = $1` with `$1` = the event's key.
    pub version_lookup: Statement,
}

/// What one event type does.
#[derive(Debug, Clone)]
pub struct Handler {
    /// Run in order in the batch's transaction. For `Dedupe::Version` the first one is the guard:
    /// the others run only when it changed a row.
    pub statements: Vec<Statement>,
}

/// A statement compiled from a definition: `$n` placeholders only, each bound from the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub sql: String,
    /// `params[i]` binds `$(i+1)`.
    pub params: Vec<ParamRef>,
    pub kind: StatementKind,
    /// Where it was written, for error messages.
    pub origin: Origin,
    /// The table it writes (`INSERT INTO`, `UPDATE`, `DELETE FROM`, `MERGE INTO`), lowercased, as
    /// written (maybe schema-qualified); `None` for statements that write no table.
    pub writes: Option<String>,
    /// Its form applying many events at once, for guarded statements that have one.
    pub set_based: Option<set_based::SetBased>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementKind {
    /// An insert that only the entity's first event can make (`ON CONFLICT … DO NOTHING`).
    Create,
    /// An update guarded by the entity's version: `WHERE version = :version - 1`.
    Update,
    /// An update guarded by `WHERE version < :version`: it applies after a gap too.
    UpdateIfNewer,
    /// Anything else: allowed after a guard, or in an event-id-deduped projection.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A named parameter: where its value comes from and whether it may be missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamRef {
    /// As written, without the colon or the `?`: `data.amount`, `event_id`.
    pub name: String,
    pub source: ParamSource,
    /// Written `:name?`: a missing value binds SQL NULL instead of failing.
    pub optional: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamSource {
    EventId,
    EventType,
    Key,
    Version,
    OccurredAt,
    Topic,
    Partition,
    Offset,
    /// `:header.NAME`: a Kafka header's value as UTF-8 text.
    Header(String),
    /// `:value`: the whole JSON value.
    WholeValue,
    /// Any other name: a path into the JSON value, split on dots (`data.items.0.sku`).
    Path(JsonPath),
}

/// A parameter's path into the JSON value, with the slot where its projection's decoding puts the
/// field ([`fields::Fields`]). Compared and shown as its segments only: the slot is an index the
/// compiler assigns, not part of what a definition says.
#[derive(Clone)]
pub struct JsonPath {
    pub segments: Vec<String>,
    /// `None` until the projection is compiled.
    pub slot: Option<usize>,
}

impl JsonPath {
    pub fn new(segments: Vec<String>) -> JsonPath {
        JsonPath { segments, slot: None }
    }
}

impl std::ops::Deref for JsonPath {
    type Target = [String];

    fn deref(&self) -> &[String] {
        &self.segments
    }
}

impl PartialEq for JsonPath {
    fn eq(&self, other: &JsonPath) -> bool {
        self.segments == other.segments
    }
}

impl Eq for JsonPath {}

impl PartialEq<Vec<String>> for JsonPath {
    fn eq(&self, other: &Vec<String>) -> bool {
        &self.segments == other
    }
}

impl std::fmt::Debug for JsonPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.segments.fmt(f)
    }
}

/// Where each envelope field is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub event_type: Source,
    pub event_id: Source,
    pub key: Source,
    pub version: Source,
    pub occurred_at: Source,
    /// `preset = "cloudevents"`: a binary-mode CloudEvent (a `ce_specversion` header) is read as
    /// its structured JSON ([`cloudevents`]).
    pub cloudevents: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A path into the JSON value (`stream_id`, `meta.version`).
    Path(Vec<String>),
    /// `header:NAME`.
    Header(String),
    /// `kafka:key`: the record key as UTF-8.
    KafkaKey,
    /// `kafka:timestamp`: the record timestamp (milliseconds since the epoch).
    KafkaTimestamp,
}

impl Default for Envelope {
    fn default() -> Self {
        Envelope {
            event_type: Source::Path(vec!["type".into()]),
            event_id: Source::Path(vec!["id".into()]),
            key: Source::Path(vec!["stream_id".into()]),
            version: Source::Path(vec!["stream_version".into()]),
            occurred_at: Source::Path(vec!["occurred_at".into()]),
            cloudevents: false,
        }
    }
}
