//! The subcommands of `projector`: their arguments (clap) and one function each, in the room of
//! what they do; this file parses, dispatches and holds what several share.
//!
//! # Layout
//! - [`commands`]: `run`, `validate`, `migrate`, `demo`, `test`, `status`.
//! - [`rebuild`]: `rebuild`, `accept`, `accept-data-loss`, `drop-retired`.
//! - [`parked`]: `parked list|show|retry|skip`.

mod commands;
mod parked;
mod rebuild;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use projector::projection::{load_dir, DefinitionError, Projection};
use projector::settings::{redact_text, LogFormat, Settings};

#[derive(Parser)]
#[command(name = "projector", version, about = "Project Kafka event streams into PostgreSQL read models")]
pub struct Cli {
    /// Settings file (default: `projector.toml` when it exists). Environment variables override it.
    #[arg(long, global = true, env = "PROJECTOR_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run every projection until SIGINT or SIGTERM.
    Run,
    /// Check definition files (all errors at once); with --database-url also against the live schema.
    Validate {
        /// Folder of definition files (default: the settings' `projections_dir`).
        dir: Option<PathBuf>,
        /// Also prepare every statement against this database.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Apply pending migrations, the engine's and then each projection's (`<projections_dir>/NAME/migrations/`), and exit.
    Migrate,
    /// The embedded default: a mock Kafka cluster, the example shop events, the example projections.
    Demo,
    /// Run projections' fixtures (`<projections_dir>/NAME/tests/*.toml`) on a scratch database:
    /// as written, then each event delivered twice, replayed, keys interleaved, a key's events out
    /// of order. Exit code 0 when every run gives the expected rows, 1 when one does not, 2 when
    /// a definition or fixture is invalid.
    Test {
        /// The projections to test (default: every one with fixtures).
        names: Vec<String>,
        /// `text`, `json` or `junit`.
        #[arg(long, default_value = "text")]
        format: commands::TestFormat,
        /// Replays the shuffled orders of an earlier run (it prints its seed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Rebuild a projection's read model from the start of its topics (resumes one under way).
    Rebuild(rebuild::RebuildCli),
    /// Keep a changed projection's rows and apply its new definition from here on.
    Accept {
        /// The projection.
        name: String,
    },
    /// Accept that the broker deleted records a projection had not read (retention): move its
    /// checkpoints that are below their partition's log start to it, so that it reads on.
    AcceptDataLoss {
        /// The projection.
        name: String,
    },
    /// Drop the old tables that shadow rebuilds of a projection kept.
    DropRetired {
        /// The projection.
        name: String,
    },
    /// Events that could not be applied: list, show, retry (after a fix) or skip them.
    #[command(subcommand)]
    Parked(parked::ParkedCli),
    /// Checkpoints, end offsets and lag per projection and partition, read from Postgres and
    /// Kafka directly (no running engine needed).
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

/// Loads the settings, then runs the subcommand; invalid settings exit with code 2.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            // Invalid settings, like invalid definitions: exit code 2 (README, Exit codes).
            report(&redact_text(&format!("error: {error}")));
            return Ok(ExitCode::from(2));
        }
    };
    match cli.command {
        Command::Run => commands::run(&settings).await,
        Command::Validate { dir, database_url } => commands::validate(&settings, dir, database_url).await,
        Command::Migrate => commands::migrate(&settings).await,
        Command::Rebuild(args) => rebuild::rebuild(&settings, args).await,
        Command::Accept { name } => rebuild::accept(&settings, &name).await,
        Command::AcceptDataLoss { name } => rebuild::accept_data_loss(&settings, &name).await,
        Command::DropRetired { name } => rebuild::drop_retired(&settings, &name).await,
        Command::Demo => commands::demo(&settings).await,
        Command::Test { names, format, seed } => commands::test(&settings, names, format, seed).await,
        Command::Parked(command) => parked::parked(&settings, command).await,
        Command::Status { json } => commands::status(&settings, json).await,
    }
}

/// Every projection of `dir`, with the schemas `settings` names; `Err(code)` when a definition
/// does not load, or the schema registry's settings are wrong (the errors printed).
pub(crate) fn load_projections(settings: &Settings, dir: &Path) -> Result<Vec<Projection>, ExitCode> {
    let schemas = projector::schema::from_settings(&settings.schemas).map_err(|error| {
        report(&format!("[schemas]: {error:#}"));
        ExitCode::from(2)
    })?;
    let mut projections = load_dir(dir).map_err(|errors| report_definition_errors(&errors))?;
    projector::schema::attach(&mut projections, &schemas);
    Ok(projections)
}

/// The projection called `name` from the projections folder; `Ok(Err(code))` when a definition
/// does not load (its errors printed).
pub(crate) fn find_projection(settings: &Settings, name: &str) -> anyhow::Result<Result<Projection, ExitCode>> {
    let projections = match load_projections(settings, &settings.projections_dir) {
        Ok(projections) => projections,
        Err(code) => return Ok(Err(code)),
    };
    let projection = projections
        .into_iter()
        .find(|projection| projection.name == name)
        .ok_or_else(|| anyhow::anyhow!("no projection named `{name}`"))?;
    Ok(Ok(projection))
}

pub(crate) fn report_definition_errors(errors: &[DefinitionError]) -> ExitCode {
    for error in errors {
        report(&error.to_string());
    }
    report(&format!("{} error(s) in definitions", errors.len()));
    ExitCode::from(2)
}

/// The log's format, set by `main` before anything runs.
pub static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Writes an error that stops the command to stderr: as it is, or with `log.format = "json"` as
/// an `ERROR` log line (one JSON object), so that a log pipeline reads it too.
pub fn report(message: &str) {
    match LOG_FORMAT.get() {
        Some(LogFormat::Json) => tracing::error!("{message}"),
        _ => eprintln!("{message}"),
    }
}

/// Completes on SIGINT or SIGTERM. The handlers are in place when this returns, not when the
/// future is first polled: a SIGTERM that arrives while the engine is still starting (connecting,
/// migrating) is then a graceful stop too, not the default action, which kills the process.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    }
}
