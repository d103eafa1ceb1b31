//! Engine settings: one TOML file (`projector.toml`), every value overridable from the environment.
//!
//! Environment overrides use the `PROJECTOR_` prefix and `__` between levels, for example
//! `PROJECTOR_KAFKA__BOOTSTRAP_SERVERS=broker:9092` or `PROJECTOR_BATCH__MAX_EVENTS=500`.
//! librdkafka properties go through `PROJECTOR_KAFKA__PROPERTIES__<NAME>` with the property's dots
//! written as underscores (`PROJECTOR_KAFKA__PROPERTIES__SASL_PASSWORD` sets `sasl.password`; no
//! librdkafka property has an underscore in its name). `DATABASE_URL` sets the database URL.
//! The `Debug` form of these settings never shows a password.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod redact;

use redact::is_secret_property;
pub use redact::{redact_text, redact_url};

/// Everything the engine needs to know before it starts.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub database: DatabaseSettings,
    /// Folder holding one definition file per projection.
    pub projections_dir: PathBuf,
    pub batch: BatchSettings,
    pub http: HttpSettings,
    pub parking: ParkingSettings,
    #[serde(default)]
    pub retry: RetrySettings,
    #[serde(default)]
    pub rebuild: RebuildSettings,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub schemas: SchemaSettings,
    /// On SIGINT or SIGTERM, how long the batches in flight may take to commit before they are
    /// abandoned (rolled back: read again by whoever runs the projection next) and the process
    /// exits with code 1.
    #[serde(default = "twenty")]
    pub shutdown_timeout_secs: u64,
}

fn twenty() -> u64 {
    20
}

/// How batches that fail are retried (`[retry]`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Failed attempts in a row (a lost connection, a deadlock, an error no one event can be
    /// blamed for) after which the projection is reported `failed`. It keeps retrying, at most
    /// every `max_backoff_ms`, and is `running` again once a batch commits.
    pub max_attempts: u32,
    /// The longest wait between two attempts, in milliseconds.
    pub max_backoff_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings { max_attempts: 10, max_backoff_ms: 30_000 }
    }
}

/// The process's log (`[log]`), on stderr.
/// Where the schemas of Confluent-framed records (Avro) come from (`[schemas]`): a directory of
/// schema files named by id, a Confluent Schema Registry, or both (the directory is asked first).
/// With neither, a framed record is parked, saying so.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaSettings {
    /// The registry's base URL (`https://registry.internal:8081`); its `GET /schemas/ids/{id}`
    /// is asked once per id.
    pub registry_url: Option<String>,
    /// Basic auth for the registry.
    pub username: Option<String>,
    pub password: Option<String>,
    /// A PEM file of the CA that signed the registry's certificate (else the system's roots).
    pub ca_file: Option<PathBuf>,
    /// A directory of schema files, each named by its id: `42.avsc`.
    pub dir: Option<PathBuf>,
    /// How long one request to the registry may take before it is retried, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for SchemaSettings {
    fn default() -> Self {
        SchemaSettings {
            registry_url: None,
            username: None,
            password: None,
            ca_file: None,
            dir: None,
            timeout_ms: 10_000,
        }
    }
}

#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    #[serde(default)]
    pub format: LogFormat,
}

/// How each log line is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people: `<time> <LEVEL> <target>: <message> key=value …`, coloured on a terminal.
    #[default]
    Text,
    /// For log pipelines: one JSON object per line, `timestamp`, `level`, `target`, `message`
    /// and the event's fields at the top level beside them, and the spans it is in (`spans`).
    Json,
}

/// Rebuilds (`[rebuild]`; a definition's own `[rebuild]` holds its pre-swap checks).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildSettings {
    /// How long, in seconds, a shadow swap may hold the live projection's checkpoints (its
    /// engine's batches wait meanwhile) for the shadow to overtake them. Past it the swap releases
    /// them and gives up, changing nothing: the live projection goes on, the shadow is kept, and
    /// running the rebuild again resumes it and tries the swap again.
    pub swap_timeout_secs: u64,
}

impl Default for RebuildSettings {
    fn default() -> Self {
        RebuildSettings { swap_timeout_secs: 60 }
    }
}

/// What happens when records are gone from the broker before a projection read them (retention
/// passed its checkpoint, or the topic was created again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDataLoss {
    /// Count them, hold the partition and report the projection `failed` until an operator
    /// rebuilds it or accepts the loss (`projector accept-data-loss`).
    #[default]
    Fail,
    /// Count them, log them, and go on from the partition's log start.
    Skip,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// Each projection consumes in its own consumer group, `<group_prefix>.<projection>`.
    pub group_prefix: String,
    /// Where a partition with no checkpoint starts: `earliest` (default) or `latest`.
    pub start_from: String,
    /// Commit offsets to Kafka after each database commit, for outside tools (advisory only:
    /// the engine always resumes from the checkpoints stored in Postgres).
    pub commit_offsets: bool,
    /// When the broker no longer holds records a projection has not read: `fail` (default) or
    /// `skip`.
    #[serde(default)]
    pub on_data_loss: OnDataLoss,
    /// Extra librdkafka properties (`security.protocol`, `sasl.*`, `ssl.*`, …), passed through as
    /// is. Numbers and booleans are taken as their text (environment values arrive typed).
    #[serde(deserialize_with = "property_values")]
    pub properties: BTreeMap<String, String>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:port/database?sslmode=…`; `DATABASE_URL` overrides it.
    pub url: String,
    pub pool_size: usize,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    /// Most events applied in one transaction; with several projections running, each one's
    /// batches hold at most its share ([`Settings::sharing`]).
    pub max_events: usize,
    /// Most bytes (keys, values, headers) of the records in one batch. With large records it bounds
    /// a projection's memory before `max_events` does: librdkafka's read-ahead (its queue holds
    /// two batches' worth, by count and by bytes, plus one fetch of at most one batch's worth:
    /// `kafka::read_ahead`), the
    /// records handed over to the worker (about two batches' worth), the batch being gathered and
    /// the batches being applied (under three): about nine batches' worth of records at most, and
    /// less in practice (BENCHMARKS.md, "Memory").
    #[serde(default = "eight_mib")]
    pub max_bytes: usize,
    /// Longest records wait for a busy lane before they are sent on behind its commit, in
    /// milliseconds. A free lane takes what has arrived at once (natural batching).
    pub max_wait_ms: u64,
    /// Apply the events of handlers that are one guarded statement set-based (one statement for
    /// many events, a key's events in successive statements); false: one statement per event,
    /// pipelined. The outcome is the same either way.
    #[serde(default = "enabled")]
    pub set_based: bool,
    /// A batch is split by partition into this many parts (lanes), each applied concurrently in a
    /// transaction (and on a connection) of its own; at most a projection's share of
    /// `database.pool_size` ([`Settings::lanes`]). A lane decodes its next batch while its
    /// previous one commits.
    #[serde(default = "four")]
    pub lanes: usize,
    /// Records a projection's consumer hands its worker ahead of the batch being gathered, at
    /// most (in whole chunks of `kafka::CHUNK`): two batches' worth for one projection, the
    /// share [`Settings::sharing`] gives when several run. Set by the engine, not by users.
    #[serde(skip)]
    pub handover: Option<usize>,
}

fn four() -> usize {
    4
}

/// `batch.max_events` by default.
pub const DEFAULT_BATCH_EVENTS: usize = 4000;

/// `batch.max_bytes` by default: 8 MiB.
pub const DEFAULT_BATCH_BYTES: usize = 8 << 20;

fn eight_mib() -> usize {
    DEFAULT_BATCH_BYTES
}

fn enabled() -> bool {
    true
}

/// Events that cannot be applied (`projector parked …`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParkingSettings {
    /// An out-of-order event (`gap`) whose predecessor has not arrived within this many seconds
    /// is parked, with every later event of its key behind it. 0: held for ever.
    pub gap_timeout_secs: u64,
}

/// `/metrics` and the health probes, and the lag sampler behind the lag metrics.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address of `/metrics`, `/health/live` and `/health/ready`: `127.0.0.1:9464` by default
    /// (in the 9100-9999 range of Prometheus exporters); `0.0.0.0:9464` to let Prometheus or
    /// Kubernetes reach it from other hosts. Env: `PROJECTOR_HTTP__LISTEN`.
    pub listen: String,
    /// How often lag is measured from Kafka and Postgres, in milliseconds (also when idle).
    pub lag_refresh_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            kafka: KafkaSettings {
                bootstrap_servers: "127.0.0.1:9092".into(),
                group_prefix: "projector".into(),
                start_from: "earliest".into(),
                commit_offsets: true,
                on_data_loss: OnDataLoss::Fail,
                properties: BTreeMap::new(),
            },
            database: DatabaseSettings { url: "postgres://postgres@127.0.0.1:5432/postgres".into(), pool_size: 8 },
            projections_dir: PathBuf::from("projections"),
            batch: BatchSettings {
                max_events: DEFAULT_BATCH_EVENTS,
                max_bytes: eight_mib(),
                max_wait_ms: 100,
                set_based: true,
                lanes: 4,
                handover: None,
            },
            http: HttpSettings { listen: "127.0.0.1:9464".into(), lag_refresh_ms: 5000 },
            parking: ParkingSettings { gap_timeout_secs: 600 },
            retry: RetrySettings::default(),
            rebuild: RebuildSettings::default(),
            log: LogSettings::default(),
            schemas: SchemaSettings::default(),
            shutdown_timeout_secs: twenty(),
        }
    }
}

/// librdkafka properties are all text; accept numbers and booleans written without quotes.
fn property_values<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Text(String),
        Integer(i64),
        Float(f64),
        Bool(bool),
    }
    let values = BTreeMap::<String, Value>::deserialize(deserializer)?;
    Ok(values
        .into_iter()
        .map(|(name, value)| {
            let text = match value {
                Value::Text(text) => text,
                Value::Integer(number) => number.to_string(),
                Value::Float(number) => number.to_string(),
                Value::Bool(flag) => flag.to_string(),
            };
            (name, text)
        })
        .collect())
}

#[derive(Debug, thiserror::Error)]
#[error("invalid settings: {0}")]
pub struct SettingsError(String);

/// The environment variable that sets the librdkafka property `name` (`sasl.password`:
/// `PROJECTOR_KAFKA__PROPERTIES__SASL_PASSWORD`); `Settings::load` maps it back.
pub fn property_variable(name: &str) -> String {
    format!("PROJECTOR_KAFKA__PROPERTIES__{}", name.replace('.', "_").to_uppercase())
}

impl Settings {
    /// Defaults, then the file (if it exists, or fails when it was named explicitly), then the
    /// environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, SettingsError> {
        let mut settings: Settings =
            Settings::figment(file)?.extract().map_err(|error| SettingsError(redact_text(&error.to_string())))?;
        // The environment's names (`SASL_PASSWORD`, lowercased by figment) back to the property's.
        settings.kafka.properties = std::mem::take(&mut settings.kafka.properties)
            .into_iter()
            .map(|(name, value)| (name.replace('_', "."), value))
            .collect();
        settings.check()?;
        Ok(settings)
    }

    /// Each projection's lanes when `projections` share the pool: `batch.lanes`, but no more than
    /// its share of `database.pool_size` (at least one). A lane holds a connection while it
    /// applies a batch: lanes beyond the connections would only wait for one, each holding its
    /// decoded batch, and more concurrent transactions cost Postgres more per event
    /// (BENCHMARKS.md, "Many projections").
    pub fn lanes(&self, projections: usize) -> usize {
        self.batch.lanes.clamp(1, (self.database.pool_size / projections.max(1)).max(1))
    }

    /// The settings of one of `projections` running projections: [`Settings::lanes`], and its
    /// share of two batches' worth of records, no less than a quarter batch, for
    /// - its consumer's queue (`queued.min.messages`, see `kafka::read_ahead`, unless
    ///   `kafka.properties` sets it),
    /// - the records handed to its worker (`batch.handover`);
    ///
    /// and its batches that share, no less than half of `batch.max_events` (smaller batches
    /// cost more per event: more statements, each for fewer rows).
    ///
    /// Each projection has its own consumer and batches: 16 projections, each with 4,000-event
    /// batches and queueing two batches, peaked at 347–358 MB; with 1,000 records queued and
    /// handed over and 2,000-event batches, at 233–238 MB, about 3% slower (BENCHMARKS.md, "Many
    /// projections: batches and hand-over shared").
    pub fn sharing(&self, projections: usize) -> Settings {
        let mut settings = self.clone();
        settings.batch.lanes = self.lanes(projections);
        let events = self.batch.max_events.max(1);
        let share = (events.saturating_mul(2) / projections.max(1)).max(events / 4).clamp(1, 10_000_000);
        settings.kafka.properties.entry("queued.min.messages".to_string()).or_insert_with(|| share.to_string());
        settings.batch.handover = Some(share);
        settings.batch.max_events = events.min(share.max(events / 2));
        settings
    }

    /// `log.format` alone, as [`Settings::load`] would find it, for the log set up before the
    /// rest is read (and reported): the default when the settings do not load.
    pub fn log_format(file: Option<&Path>) -> LogFormat {
        Settings::figment(file)
            .ok()
            .and_then(|figment| figment.extract_inner::<LogFormat>("log.format").ok())
            .unwrap_or_default()
    }

    /// Defaults, then the file, then the environment, unread.
    fn figment(file: Option<&Path>) -> Result<Figment, SettingsError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(SettingsError(format!("settings file `{}` does not exist", path.display())));
                }
                figment = figment.merge(Toml::file(path));
            }
            None => figment = figment.merge(Toml::file("projector.toml")),
        }
        figment = figment.merge(Env::prefixed("PROJECTOR_").split("__").filter(|key| key != "config"));
        if let Ok(url) = std::env::var("DATABASE_URL") {
            figment = figment.merge(("database.url", url));
        }
        Ok(figment)
    }

    fn check(&self) -> Result<(), SettingsError> {
        if self.batch.max_events == 0 {
            return Err(SettingsError("`batch.max_events` must be at least 1".into()));
        }
        if self.batch.max_bytes == 0 {
            return Err(SettingsError("`batch.max_bytes` must be at least 1".into()));
        }
        if self.retry.max_attempts == 0 {
            return Err(SettingsError("`retry.max_attempts` must be at least 1".into()));
        }
        if self.rebuild.swap_timeout_secs == 0 {
            return Err(SettingsError("`rebuild.swap_timeout_secs` must be at least 1".into()));
        }
        if self.http.lag_refresh_ms == 0 {
            return Err(SettingsError("`http.lag_refresh_ms` must be at least 1".into()));
        }
        if self.database.pool_size == 0 {
            return Err(SettingsError("`database.pool_size` must be at least 1".into()));
        }
        if !matches!(self.kafka.start_from.as_str(), "earliest" | "latest") {
            return Err(SettingsError(format!(
                "`kafka.start_from` must be `earliest` or `latest`, not `{}`",
                self.kafka.start_from
            )));
        }
        Ok(())
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .kafka
            .properties
            .iter()
            .map(|(name, value)| (name.as_str(), if is_secret_property(name) { "***" } else { value.as_str() }))
            .collect();
        f.debug_struct("Settings")
            .field("kafka.bootstrap_servers", &self.kafka.bootstrap_servers)
            .field("kafka.group_prefix", &self.kafka.group_prefix)
            .field("kafka.start_from", &self.kafka.start_from)
            .field("kafka.commit_offsets", &self.kafka.commit_offsets)
            .field("kafka.on_data_loss", &self.kafka.on_data_loss)
            .field("kafka.properties", &properties)
            .field("database.url", &redact_url(&self.database.url))
            .field("database.pool_size", &self.database.pool_size)
            .field("projections_dir", &self.projections_dir)
            .field("schemas.registry_url", &self.schemas.registry_url.as_deref().map(redact_url))
            .field("schemas.username", &self.schemas.username)
            .field("schemas.password", &self.schemas.password.as_ref().map(|_| "***"))
            .field("schemas.dir", &self.schemas.dir)
            .field("batch.max_events", &self.batch.max_events)
            .field("batch.max_bytes", &self.batch.max_bytes)
            .field("batch.max_wait_ms", &self.batch.max_wait_ms)
            .field("batch.set_based", &self.batch.set_based)
            .field("batch.lanes", &self.batch.lanes)
            .field("http.listen", &self.http.listen)
            .field("http.lag_refresh_ms", &self.http.lag_refresh_ms)
            .field("parking.gap_timeout_secs", &self.parking.gap_timeout_secs)
            .field("retry.max_attempts", &self.retry.max_attempts)
            .field("retry.max_backoff_ms", &self.retry.max_backoff_ms)
            .field("rebuild.swap_timeout_secs", &self.rebuild.swap_timeout_secs)
            .field("shutdown_timeout_secs", &self.shutdown_timeout_secs)
            .finish()
    }
}
#[cfg(test)]
mod tests;
